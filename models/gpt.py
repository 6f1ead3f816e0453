"""A small, readable GPT in one file (nanoGPT ``model.py`` style), in two flavours.

* ``gpt2``:  LayerNorm, GeLU (tanh approximation, = HF ``gelu_new``), learned positions, biases.
* ``llama``: RMSNorm, SwiGLU, rotary positions (HF ``rotate_half`` convention), no biases.

Hook points for plasticity metrics (forward hooks):

* ``blocks.{i}.mlp.act``    the nonlinearity; hook input = pre-activation, output = phi(pre-activation)
* ``blocks.{i}.mlp.hidden`` an ``nn.Identity`` on the vector feeding the output projection
                            (gpt2: GeLU output; llama: silu(gate) * up)

No distributed code and no training logic lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lm_head import LMHead
from trainer.errors import ConfigError

FLAVOURS = ("gpt2", "llama")
INITS = ("scaled", "plain", "selfnorm")


@dataclass
class ModelConfig:
    flavour: str = "gpt2"  # "gpt2" | "llama"
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 128
    mlp_hidden: int = 0  # 0 = default: 4*n_embd (gpt2); round(8/3*n_embd) up to a multiple of 32 (llama)
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init: str = "scaled"  # "scaled" | "plain" | "selfnorm"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        """The MLP width actually used (resolves mlp_hidden=0)."""
        if self.mlp_hidden > 0:
            return self.mlp_hidden
        if self.flavour == "llama":
            return 32 * math.ceil(8 * self.n_embd / 3 / 32)
        return 4 * self.n_embd

    def validate(self) -> "ModelConfig":
        """Raise ConfigError (one line, naming the field) if the config is unusable; return self."""
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"model.flavour: unknown flavour {self.flavour!r} (expected one of {', '.join(FLAVOURS)})")
        if self.init not in INITS:
            raise ConfigError(f"model.init: unknown init {self.init!r} (expected one of {', '.join(INITS)})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"model.{name}: must be a positive integer, got {v!r}")
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise ConfigError(f"model.mlp_hidden: must be a non-negative integer (0 = default), got {self.mlp_hidden!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"model.n_embd: {self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.flavour == "llama" and self.head_dim % 2 != 0:
            raise ConfigError(f"model.n_head: head dim n_embd/n_head={self.head_dim} must be even for RoPE (llama)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps: must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta: must be > 0, got {self.rope_theta!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}")
        return cls(**d).validate()


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """Llama RMSNorm (statistics in float32, like HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(head_dim: int, theta: float, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (T, head_dim), HF convention: frequencies in float32, duplicated halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x: (B, H, T, hd); cos/sin: (T, hd)
    return x * cos + rotate_half(x) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.flavour == "gpt2"
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.rope = cfg.flavour == "llama"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=bias)  # fused q, k, v (in that order)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv=None, return_attn=False):
        """kv: optional (k_past, v_past) cache, each (B, H, P, hd). Returns (y, (k, v), attn or None)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        P = 0
        if kv is not None:
            P = kv[0].size(2)
            k, v = torch.cat((kv[0], k), dim=2), torch.cat((kv[1], v), dim=2)
        p_drop = self.dropout if self.training else 0.0
        mask = None  # boolean, True = may attend; only needed when a cache meets a multi-token query
        if P > 0 and T > 1:
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        attn = None
        if return_attn:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            causal = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            attn = att
            y = F.dropout(att, p_drop, self.training) @ v
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=(T > 1 or P == 0))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y)), (k, v), attn


class _MLPBase(nn.Module):
    """Shared neuron-level API. Subclasses set self.in_std (init std of incoming weights)."""

    in_std: float = 0.02

    def neuron_params(self) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def reinit_incoming(self, neuron_idx: torch.Tensor, generator: torch.Generator | None = None):
        """Redraw the incoming weights of the given hidden neurons from this layer's init distribution
        (N(0, in_std^2); biases -> 0). Outgoing weights are left to the caller."""
        idx = torch.as_tensor(neuron_idx, dtype=torch.long)
        if idx.numel() == 0:
            return
        for p, dim in self.neuron_params()["incoming"]:
            self.redraw_incoming_(p, dim, idx, generator)

    @torch.no_grad()
    def redraw_incoming_(self, t: torch.Tensor, dim: int, idx: torch.Tensor, generator: torch.Generator | None = None):
        """In place on ``t`` (one incoming parameter, or a full copy of it): units ``idx`` along ``dim`` get
        N(0, in_std^2) weights, or 0 for a bias. Shared by reinit_incoming and the mitigations' resets."""
        i = idx.to(t.device)
        if t.ndim == 1:
            t.index_fill_(0, i, 0.0)
            return
        shape = list(t.shape)
        shape[dim] = i.numel()
        fresh = torch.randn(shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else t.device)
        t.index_copy_(dim, i, (fresh * self.in_std).to(device=t.device, dtype=t.dtype))


class GeluMLP(_MLPBase):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.c_fc = nn.Linear(cfg.n_embd, h, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.hidden = nn.Identity()
        self.c_proj = nn.Linear(h, cfg.n_embd, bias=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(self.hidden(self.act(self.c_fc(x)))))

    def neuron_params(self):
        return dict(incoming=[(self.c_fc.weight, 0), (self.c_fc.bias, 0)], outgoing=[(self.c_proj.weight, 1)])

    def out_proj(self):
        return self.c_proj


class SwiGLUMLP(_MLPBase):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.gate = nn.Linear(cfg.n_embd, h, bias=False)
        self.up = nn.Linear(cfg.n_embd, h, bias=False)
        self.act = nn.SiLU()
        self.hidden = nn.Identity()
        self.down = nn.Linear(h, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.down(self.hidden(self.act(self.gate(x)) * self.up(x))))

    def neuron_params(self):
        return dict(incoming=[(self.gate.weight, 0), (self.up.weight, 0)], outgoing=[(self.down.weight, 1)])

    def out_proj(self):
        return self.down


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        Norm = (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps)) if cfg.flavour == "gpt2" else (lambda d: RMSNorm(d, cfg.norm_eps))
        self.norm1 = Norm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = Norm(cfg.n_embd)
        self.mlp = GeluMLP(cfg) if cfg.flavour == "gpt2" else SwiGLUMLP(cfg)

    def forward(self, x, rope=None, kv=None, return_attn=False):
        a, kv, attn = self.attn(self.norm1(x), rope, kv, return_attn)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, kv, attn


def _second_moment(fn, n: int = 20001) -> float:
    """E[fn(z)^2] for z ~ N(0, 1), by the trapezoid rule on [-10, 10] (float64)."""
    z = torch.linspace(-10, 10, n, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid(fn(z) ** 2 * pdf, z))


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.flavour == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps) if cfg.flavour == "gpt2" else RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size)  # forward(x, targets) = fused, chunked loss
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    # -- init
    @torch.no_grad()
    def reset_parameters(self):
        """(Re)initialise every parameter according to cfg.init (see docs/models.md)."""
        cfg, std = self.cfg, 0.02
        out_std = std / math.sqrt(2 * cfg.n_layer) if cfg.init in ("scaled", "selfnorm") else std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if cfg.init == "selfnorm":
            # LeCun-normal on the MLP input side; the output side gets the gain 1/sqrt(E[phi(z)^2]) so that
            # a unit-variance input gives a unit-variance MLP output (phi = GeLU, or silu(g)*u with E[u^2]=1).
            phi = (lambda z: F.gelu(z, approximate="tanh")) if cfg.flavour == "gpt2" else F.silu
            gain = 1.0 / math.sqrt(_second_moment(phi))
            in_std, h = 1.0 / math.sqrt(cfg.n_embd), cfg.hidden_dim
        for blk in self.blocks:
            nn.init.normal_(blk.attn.c_proj.weight, 0.0, out_std)
            mlp = blk.mlp
            if cfg.init == "selfnorm":
                mlp.in_std = in_std
                for p, _ in mlp.neuron_params()["incoming"]:
                    if p.ndim == 2:
                        nn.init.normal_(p, 0.0, in_std)
                nn.init.normal_(mlp.out_proj().weight, 0.0, gain / math.sqrt(h))
            else:
                mlp.in_std = std
                nn.init.normal_(mlp.out_proj().weight, 0.0, out_std)

    # -- bookkeeping
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared tensors counted once). non_embedding excludes wte, wpe and lm_head."""
        emb = {id(self.wte.weight), id(self.lm_head.weight)}
        if self.wpe is not None:
            emb.add(id(self.wpe.weight))
        return sum(p.numel() for p in self.parameters() if not (non_embedding and id(p) in emb))

    # -- forward
    def _trunk(self, idx, past=None, return_attn=False):
        """Run embeddings + blocks + final norm. past: list of per-layer (k, v) or None.
        Returns (hidden (B,T,C), new per-layer kv list, attn list or None)."""
        B, T = idx.shape
        P = 0 if past is None else past[0][0].size(2)
        if P + T > self.cfg.block_size:
            raise ValueError(f"sequence length {P + T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(P, P + T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            # through the module, not wpe.weight[P:P+T]: ZeRO-3 gathers parameters in module hooks
            x = x + self.wpe(pos)
        else:
            rope = rope_cos_sin(self.cfg.head_dim, self.cfg.rope_theta, pos, x.dtype)
        x = self.drop(x)
        kvs, attns = [], [] if return_attn else None
        for i, blk in enumerate(self.blocks):
            x, kv, attn = blk(x, rope, None if past is None else past[i], return_attn)
            kvs.append(kv)
            if return_attn:
                attns.append(attn)
        return self.norm_f(x), kvs, attns

    def forward(self, idx, targets=None, return_attn: bool = False):
        """idx, targets: (B, T) LongTensors; targets == -100 are ignored. Returns (logits, loss) or, with
        return_attn=True, (logits, loss, attn_list) with attn_list[i] of shape (B, n_head, T, T).
        With targets the loss is the mean over kept tokens, computed by the fused linear + cross-entropy
        (models/lm_head.py) without materialising the logits, so logits is None then."""
        x, _, attns = self._trunk(idx, return_attn=return_attn)
        if targets is None:
            logits, loss = self.lm_head(x), None
        else:
            logits, loss = None, self.lm_head(x, targets)
        return (logits, loss, attns) if return_attn else (logits, loss)

    # -- sampling
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Autoregressive sampling with a KV cache: prefill once, then one token per step. Returns idx with the
        new tokens appended. temperature == 0 is greedy. Once the context reaches block_size the window is
        cropped to the last block_size tokens and re-prefilled each step (same result as a full recompute).
        Rows that produced eos_id keep emitting eos_id; stops early when every row has."""
        was_training = self.training
        self.eval()
        bs = self.cfg.block_size
        past, logits = None, None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if past is None or past[0][0].size(2) >= bs:  # (re)prefill on the cropped window
                x, past, _ = self._trunk(idx[:, -bs:])
            else:
                x, past, _ = self._trunk(idx[:, -1:], past=past)
            logits = self.lm_head(x[:, -1, :]).float()
            nxt = self._sample(logits, temperature, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return idx

    @staticmethod
    def _sample(logits, temperature, top_p, generator):
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = F.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            keep = sp.cumsum(-1) - sp < top_p  # smallest prefix with mass >= top_p (always keeps the top token)
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        if generator is not None and generator.device != probs.device:
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
