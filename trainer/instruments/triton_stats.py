"""Optional Triton kernel: all per-neuron statistics of neuron_stats in one pass.

Triton is imported lazily (importing this module never imports triton). The kernel reads
h (and x) once, as (N, H) row-major tiles, and writes partial [SPLIT, K, H] results that
are combined with one sum / max in torch (deterministic, no atomics).

Grid: (cdiv(H, BLOCK_H), SPLIT); program (ph, ps) owns columns ph*BLOCK_H.. and rows
[ps*rows_per_split, (ps+1)*rows_per_split).

``available(t)`` is True when triton imports and either t is a CUDA tensor or
TRITON_INTERPRET=1 and t is on the CPU (Triton's interpreter, used by the tests).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .neuron_stats import ACT_CODES, IDX, K, MAX_ROW, SUM_ROWS, normalize_act_kind

_GELU_C = 0.7978845608028654  # sqrt(2/pi)
_GELU_A = 0.044715
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

_kernels = {}  # interpret flag -> jitted kernel (decoration depends on TRITON_INTERPRET)
_triton_ok = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_importable() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_ok = True
        except Exception:
            _triton_ok = False
    return _triton_ok


def available(t: Optional[torch.Tensor] = None) -> bool:
    """Can the Triton kernel run (on tensor t, or on this machine when t is None)?"""
    if not triton_importable():
        return False
    if t is None:
        return torch.cuda.is_available() or _interpret()
    if t.is_cuda:
        return not _interpret()
    return t.device.type == "cpu" and _interpret()


def _build():
    # Triton resolves names used inside a kernel (tl, helper jit functions) through the
    # kernel's module globals, so everything the kernel references is made global here.
    global triton, tl, _add, _max
    import triton
    import triton.language as tl

    # Reductions go through tl.reduce with our own combine functions rather than tl.sum /
    # tl.max: those are @jit functions decorated when triton.language is first imported, so
    # they break under the interpreter if TRITON_INTERPRET was set after that import.
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _neuron_stats_kernel(
        h_ptr,
        x_ptr,
        out_ptr,  # float32 [SPLIT, K, H]
        N,
        H,
        stride_h,
        stride_x,
        rows_per_split,
        eps,
        delta,
        HAS_X: tl.constexpr,
        ACT: tl.constexpr,  # 0 none, 1 gelu_tanh, 2 silu, 3 gelu(erf)
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
        K_: tl.constexpr,
        R_SUM_ABS: tl.constexpr,
        R_SUM: tl.constexpr,
        R_ACTIVE: tl.constexpr,
        R_POS: tl.constexpr,
        R_MAX: tl.constexpr,
        R_SAT: tl.constexpr,
    ):
        ph = tl.program_id(0)
        ps = tl.program_id(1)
        cols = ph * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        row_lo = ps * rows_per_split
        row_hi = tl.minimum(row_lo + rows_per_split, N)

        s_abs = tl.full((BLOCK_H,), 0.0, tl.float32)
        s_sum = tl.full((BLOCK_H,), 0.0, tl.float32)
        s_act = tl.full((BLOCK_H,), 0.0, tl.float32)
        s_pos = tl.full((BLOCK_H,), 0.0, tl.float32)
        s_sat = tl.full((BLOCK_H,), 0.0, tl.float32)
        m_abs = tl.full((BLOCK_H,), 0.0, tl.float32)

        for r0 in range(row_lo, row_hi, BLOCK_N):
            rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets: N*H may exceed 2^31
            m = (rows[:, None] < row_hi) & cmask[None, :]
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
            a = tl.abs(h)
            s_abs += tl.reduce(a, 0, _add)
            s_sum += tl.reduce(h, 0, _add)
            s_act += tl.reduce(tl.where(m & (a > eps), 1.0, 0.0), 0, _add)
            s_pos += tl.reduce(tl.where(m & (h > 0.0), 1.0, 0.0), 0, _add)
            m_abs = tl.maximum(m_abs, tl.reduce(a, 0, _max))
            if HAS_X:
                x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
                if ACT == 1:
                    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
                    t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0  # tanh(u) = 2σ(2u) − 1
                    d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x))
                elif ACT == 2:
                    s = 1.0 / (1.0 + tl.exp(-x))
                    d = s * (1.0 + x * (1.0 - s))
                else:
                    d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
                s_sat += tl.reduce(tl.where(m & (tl.abs(d) < delta), 1.0, 0.0), 0, _add)

        base = out_ptr + ps * K_ * H + cols
        tl.store(base + R_SUM_ABS * H, s_abs, mask=cmask)
        tl.store(base + R_SUM * H, s_sum, mask=cmask)
        tl.store(base + R_ACTIVE * H, s_act, mask=cmask)
        tl.store(base + R_POS * H, s_pos, mask=cmask)
        tl.store(base + R_MAX * H, m_abs, mask=cmask)
        tl.store(base + R_SAT * H, s_sat, mask=cmask)

    return _neuron_stats_kernel


def _kernel():
    key = _interpret()
    if key not in _kernels:
        _kernels[key] = _build()
    return _kernels[key]


def triton_stats(
    h: torch.Tensor,
    x: Optional[torch.Tensor] = None,
    act_kind=None,
    eps: float = 1e-6,
    delta: float = 0.01,
    *,
    block_n: int = 32,
    block_h: int = 64,
    split: Optional[int] = None,
) -> torch.Tensor:
    """Same contract as neuron_stats.fused_stats: float32 [K, H], rows in STAT_NAMES order."""
    if not available(h):
        raise RuntimeError("Triton neuron stats unavailable for this tensor (need CUDA, or TRITON_INTERPRET=1 on CPU)")
    import triton

    kind = normalize_act_kind(act_kind)
    H = h.shape[-1]
    h2 = h.detach().reshape(-1, H)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    N = h2.shape[0]
    has_x = x is not None and kind is not None
    if has_x:
        if x.shape[-1] != H or x.numel() != h.numel():
            raise ValueError(f"pre-activation shape {tuple(x.shape)} != activation shape {tuple(h.shape)}")
        x2 = x.detach().reshape(-1, H)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
    else:
        x2 = h2  # dummy pointer, never read
    out = torch.zeros(K, H, dtype=torch.float32, device=h2.device)
    out[IDX["count"]] = float(N)
    if N == 0 or H == 0:
        return out

    n_col = triton.cdiv(H, block_h)
    n_rowblk = triton.cdiv(N, block_n)
    if split is None:
        if h2.is_cuda:
            sms = torch.cuda.get_device_properties(h2.device).multi_processor_count
            split = max(1, min(n_rowblk, (4 * sms + n_col - 1) // n_col))
        else:
            split = 1
    split = max(1, min(split, n_rowblk))
    rows_per_split = triton.cdiv(n_rowblk, split) * block_n
    split = triton.cdiv(N, rows_per_split)
    part = torch.empty(split, K, H, dtype=torch.float32, device=h2.device)
    _kernel()[(n_col, split)](
        h2,
        x2,
        part,
        N,
        H,
        h2.stride(0),
        x2.stride(0),
        rows_per_split,
        float(eps),
        float(delta),
        HAS_X=has_x,
        ACT=ACT_CODES[kind],
        BLOCK_N=block_n,
        BLOCK_H=block_h,
        K_=K,
        R_SUM_ABS=IDX["sum_abs"],
        R_SUM=IDX["sum"],
        R_ACTIVE=IDX["active"],
        R_POS=IDX["positive"],
        R_MAX=MAX_ROW,
        R_SAT=IDX["saturated"],
    )
    rows = [r for r in SUM_ROWS if r != IDX["count"]]
    out[rows] = part[:, rows].sum(0)
    out[MAX_ROW] = part[:, MAX_ROW].amax(0)
    return out
