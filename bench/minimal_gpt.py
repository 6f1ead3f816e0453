"""A minimal plain-torch GPT (nanoGPT style) used as a speed reference in bench/throughput.py.

Same architecture as models.gpt.GPT for both flavours (gpt2: LayerNorm, tanh-GeLU, learned positions,
biases; llama: RMSNorm, SwiGLU, rotary positions, no biases), attention through
F.scaled_dot_product_attention(is_causal=True). No hooks, no KV cache, no options: the smallest
thing that trains the same network. ``MinimalGPT.from_ours(model)`` copies weights from a models.gpt.GPT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, h, llama = cfg.n_embd, cfg.hidden_dim, cfg.flavour == "llama"
        self.llama, self.nh = llama, cfg.n_head
        norm = (lambda: RMSNorm(d, cfg.norm_eps)) if llama else (lambda: nn.LayerNorm(d, eps=cfg.norm_eps))
        self.ln1, self.ln2 = norm(), norm()
        self.qkv = nn.Linear(d, 3 * d, bias=not llama)
        self.o = nn.Linear(d, d, bias=not llama)
        if llama:
            self.gate, self.up, self.down = (nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False),
                                             nn.Linear(h, d, bias=False))
        else:
            self.fc, self.proj = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, cos=None, sin=None):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)
        if self.llama:
            q = q * cos + torch.cat((-q[..., q.size(-1) // 2:], q[..., : q.size(-1) // 2]), -1) * sin
            k = k * cos + torch.cat((-k[..., k.size(-1) // 2:], k[..., : k.size(-1) // 2]), -1) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, C))
        h = self.ln2(x)
        if self.llama:
            return x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x + self.proj(F.gelu(self.fc(h), approximate="tanh"))


class MinimalGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, d = cfg, cfg.n_embd
        self.llama = cfg.flavour == "llama"
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = None if self.llama else nn.Embedding(cfg.block_size, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(d, cfg.norm_eps) if self.llama else nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        if self.llama:
            hd = d // cfg.n_head
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
            f = torch.arange(cfg.block_size).float()[:, None] * inv[None]
            emb = torch.cat((f, f), -1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = self.wte(idx)
        cos = sin = None
        if self.llama:
            cos, sin = self.cos[:T], self.sin[:T]
        else:
            x = x + self.wpe.weight[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @classmethod
    @torch.no_grad()
    def from_ours(cls, model) -> "MinimalGPT":
        """Same weights as a models.gpt.GPT (so all three implementations start from one state)."""
        m = cls(model.cfg)
        ours = dict(model.named_parameters(remove_duplicate=False))
        mine = dict(m.named_parameters(remove_duplicate=False))
        ren = {"norm1": "ln1", "norm2": "ln2", "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc",
               "mlp.c_proj": "proj", "mlp.gate": "gate", "mlp.up": "up", "mlp.down": "down", "norm_f": "ln_f",
               "lm_head": "head"}
        for name, p in ours.items():
            new = name
            for a, b in ren.items():
                new = new.replace(a, b)
            mine[new].copy_(p)
        return m
