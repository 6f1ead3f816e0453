"""Model sizes: named presets, analytic parameter counts, a size -> config search, and FLOPs per token.

"Non-embedding" parameters (Kaplan et al. 2020's N) are all parameters except the token embedding, the
learned position embedding (gpt2) and the output projection lm_head (tied or not). Norm weights and biases
are included. ``non_embedding_params(cfg) == GPT(cfg).num_params(non_embedding=True)``.
"""

from __future__ import annotations

import dataclasses
import math

from trainer.errors import ConfigError

from .gpt import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # name: config                                                   non-embedding params (see docs/models.md)
    "nano": ModelConfig(n_layer=1, n_head=1, n_embd=64),              # ~0.05M
    "micro": ModelConfig(n_layer=4, n_head=1, n_embd=64),             # ~0.2M
    "tiny": ModelConfig(n_layer=6, n_head=2, n_embd=128),             # ~1.2M
    "small": ModelConfig(n_layer=6, n_head=4, n_embd=256, block_size=256),  # ~4.7M
    "gpt2-124m": ModelConfig(flavour="gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "llama-124m": ModelConfig(flavour="llama", vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                              mlp_hidden=2048, tie_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A fresh copy of PRESETS[name] with fields overridden (e.g. flavour="llama", vocab_size=...)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (expected one of {', '.join(PRESETS)})")
    try:
        cfg = dataclasses.replace(PRESETS[name], **overrides)
    except TypeError as e:
        raise ConfigError(f"model.preset: bad override for {name!r}: {e}") from None
    return cfg.validate()


def non_embedding_params(cfg: ModelConfig) -> int:
    """Analytic non-embedding parameter count (equals GPT.num_params(non_embedding=True))."""
    d, h, L = cfg.n_embd, cfg.hidden_dim, cfg.n_layer
    if cfg.flavour == "gpt2":
        # 2 LayerNorms (w+b), qkv (3d^2+3d), attn out (d^2+d), fc (dh+h), proj (hd+d); final LayerNorm
        return L * (4 * d * d + 2 * d * h + 9 * d + h) + 2 * d
    # 2 RMSNorms (d each), q,k,v,o (4d^2), gate/up/down (3dh); final RMSNorm
    return L * (4 * d * d + 3 * d * h + 2 * d) + d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022, appendix B) style:

        6 * N + 12 * n_layer * n_embd * seq_len

    N = non-embedding parameters (matmuls with weights: 2 FLOPs/MAC forward, 4 backward), plus the attention
    score and value products (QK^T and A.V: 2 * 2 * n_layer * seq_len * n_embd forward per token, x3 for
    fwd+bwd). The lm_head matmul is not counted (it is an "embedding" parameter). seq_len defaults to
    cfg.block_size. Causal masking is not discounted (as in PaLM's MFU convention).
    """
    T = cfg.block_size if seq_len is None else seq_len
    return 6.0 * non_embedding_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * T


def config_for_params(target: float, flavour: str = "gpt2", vocab_size: int = 2048, block_size: int = 128,
                      aspect: float = 80.0, head_dim: int = 64, tol: float = 0.1, **overrides) -> ModelConfig:
    """The config whose non-embedding parameter count is closest to ``target`` with n_embd/n_layer ~ aspect.

    Candidates: n_layer in 1..128; n_embd a multiple of head_dim (then n_head = n_embd // head_dim) or, for
    very small models, a multiple of 16 below head_dim (one head of size n_embd). Among candidates within
    ``tol`` (relative) of the target, the one with aspect ratio closest to ``aspect`` (in log space) wins;
    if none is within tol, the closest count wins. ``overrides`` are passed through to ModelConfig
    (e.g. init=, tie_embeddings=, dropout=); mlp_hidden is always the flavour default.
    """
    if not target > 0:
        raise ConfigError(f"model.params: target must be > 0, got {target!r}")
    if not aspect > 0 or head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"model.aspect/head_dim: need aspect > 0 and a positive even head_dim, got {aspect}, {head_dim}")
    widths = [w for w in range(16, head_dim, 16)] + [head_dim * k for k in range(1, 257)]
    best = None  # (score tuple, cfg)
    for L in range(1, 129):
        for d in widths:
            cfg = ModelConfig(flavour=flavour, vocab_size=vocab_size, block_size=block_size, n_layer=L,
                              n_head=max(1, d // head_dim), n_embd=d, **overrides)
            n = non_embedding_params(cfg)
            err = abs(math.log(n / target))
            if n > target * (1 + tol) * 4:  # wider only gets worse at this depth
                break
            ok = err <= math.log1p(tol)
            score = (0, abs(math.log((d / L) / aspect)), err) if ok else (1, err, 0.0)
            if best is None or score < best[0]:
                best = (score, cfg)
    if best is None:  # even the smallest candidate is over 4x the target at every depth
        smallest = ModelConfig(flavour=flavour, vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1,
                               n_embd=widths[0], **overrides)
        raise ConfigError(f"config key 'model_size': no model has about {target:g} non-embedding parameters "
                          f"(the smallest, 1 layer of width {widths[0]}, has {non_embedding_params(smallest)})")
    return best[1].validate()
