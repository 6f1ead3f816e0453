"""The changes proposed for models/gpt.py (bench/notes.md), applied to a subclass so that they can be
measured without editing the model file. Same parameters, same outputs (checked in bench/throughput.py).

1. gpt2: positions by slicing ``wpe.weight[P:P+T]`` instead of ``wpe(arange)``.
2. llama: RoPE cos/sin tables computed once (non-persistent float32 buffers), sliced per forward.
3. dropout modules replaced by nn.Identity when cfg.dropout == 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.gpt import GPT, rope_cos_sin


class PatchedGPT(GPT):
    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.flavour == "llama":
            cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, torch.arange(cfg.block_size), torch.float32)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.dropout == 0:
            self.drop = nn.Identity()
            for blk in self.blocks:
                blk.attn.resid_drop = nn.Identity()
                blk.mlp.drop = nn.Identity()

    def _trunk(self, idx, past=None, return_attn=False):
        B, T = idx.shape
        P = 0 if past is None else past[0][0].size(2)
        if P + T > self.cfg.block_size:
            raise ValueError(f"sequence length {P + T} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe.weight[P:P + T]
        else:
            rope = (self.rope_cos[P:P + T].to(x.dtype), self.rope_sin[P:P + T].to(x.dtype))
        x = self.drop(x)
        kvs, attns = [], [] if return_attn else None
        for i, blk in enumerate(self.blocks):
            x, kv, attn = blk(x, rope, None if past is None else past[i], return_attn)
            kvs.append(kv)
            if return_attn:
                attns.append(attn)
        return self.norm_f(x), kvs, attns

    @classmethod
    def from_ours(cls, model: GPT) -> "PatchedGPT":
        m = cls(model.cfg)
        m.load_state_dict(model.state_dict())
        return m
