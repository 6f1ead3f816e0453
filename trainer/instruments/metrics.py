"""Plasticity metrics: rank measures, parameter / gradient norms, attention entropy,
cloned units and Hessian sharpness. Everything is computed in float64 and returned as
python floats / ints (or float64 tensors where per-head values are returned).

See docs/metrics.md for the report keys, defaults and references.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

TensorsLike = Union[Mapping[str, torch.Tensor], Iterable[torch.Tensor]]


# --------------------------------------------------------------------------- rank
def _svdvals(A: torch.Tensor) -> torch.Tensor:
    A = torch.as_tensor(A).detach()
    if A.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(A.shape)}")
    if A.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    A = A.to(torch.float64)
    m, n = A.shape
    if max(m, n) < 2 * min(m, n):
        return torch.linalg.svdvals(A)
    # Tall/wide feature matrices (tokens x neurons): the eigenvalues of the small Gram matrix
    # give the same singular values several times faster; float64 keeps σ down to ~1e-8·σ_max,
    # far below what the entropy/ratio metrics resolve.
    G = A.T @ A if m > n else A @ A.T
    return torch.linalg.eigvalsh(G).clamp(min=0).sqrt().flip(0)


def singular_values(A: torch.Tensor) -> torch.Tensor:
    """σ of A in float64, descending: compute once, pass as `sv=` to the rank metrics below."""
    return _svdvals(A)


def effective_rank(A: Optional[torch.Tensor] = None, *, sv: Optional[torch.Tensor] = None) -> float:
    """Effective rank (Roy & Vetterli, 2007).

    p_i = σ_i / Σ_j σ_j ;  erank(A) = exp(−Σ_i p_i log p_i)  (0·log 0 = 0).
    Lies in [1, min(m, n)]; 0.0 for the zero matrix. `sv`: precomputed `singular_values(A)`.
    """
    s = _svdvals(A) if sv is None else sv
    tot = s.sum()
    if s.numel() == 0 or tot <= 0:
        return 0.0
    p = s / tot
    ent = -torch.special.xlogy(p, p).sum()
    return float(torch.exp(ent))


def srank(A: Optional[torch.Tensor] = None, delta: float = 0.01, *, sv: Optional[torch.Tensor] = None) -> int:
    """srank_δ (Kumar et al., 2021, "Implicit under-parameterization"), reported as srank_{1−δ}.

    srank_δ(A) = min { k : Σ_{i≤k} σ_i / Σ_i σ_i ≥ 1 − δ }, σ sorted descending.
    0 for the zero matrix.
    """
    s = _svdvals(A) if sv is None else sv
    tot = s.sum()
    if s.numel() == 0 or tot <= 0:
        return 0
    c = torch.cumsum(s, 0) / tot
    k = int(torch.searchsorted(c, torch.tensor([1.0 - delta - 1e-12], dtype=c.dtype)).item()) + 1
    return min(k, s.numel())


def stable_rank(A: Optional[torch.Tensor] = None, *, sv: Optional[torch.Tensor] = None) -> float:
    """Stable rank ‖A‖_F² / ‖A‖_2² = Σ σ_i² / σ_max² (0.0 for the zero matrix)."""
    s = _svdvals(A) if sv is None else sv
    if s.numel() == 0 or s[0] <= 0:
        return 0.0
    return float((s * s).sum() / (s[0] * s[0]))


# --------------------------------------------------------------------------- norms
def _embedding_param_ids(model: nn.Module) -> set:
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            for p in m.parameters(recurse=False):
                ids.add(id(p))
    return ids


def mean_abs_param(model: nn.Module, non_embedding: bool = True) -> float:
    """Mean absolute parameter value Σ_θ Σ|θ_i| / Σ_θ numel(θ) over unique parameters.

    non_embedding=True skips parameters owned by nn.Embedding modules (token / position
    embeddings; a tied LM head shares the embedding tensor and is skipped with it).
    """
    skip = _embedding_param_ids(model) if non_embedding else set()
    tot = 0.0
    n = 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors
        if id(p) in skip:
            continue
        tot += float(p.detach().abs().to(torch.float64).sum())
        n += p.numel()
    return tot / n if n else 0.0


def _as_list(ts: TensorsLike):
    if isinstance(ts, Mapping):
        return list(ts.keys()), list(ts.values())
    return None, list(ts)


def grad_norm(params: Iterable) -> float:
    """Global gradient L2 norm sqrt(Σ_θ ‖∇θ‖²), params without .grad are skipped.

    Accepts parameters (uses .grad) or plain gradient tensors.
    """
    tot = torch.zeros((), dtype=torch.float64)
    for p in params:
        # a parameter / leaf requiring grad contributes its .grad; any other tensor is a gradient
        g = p.grad if (isinstance(p, nn.Parameter) or p.requires_grad or p.grad is not None) else p
        if g is None:
            continue
        tot = tot + g.detach().to(torch.float64).pow(2).sum().cpu()
    return float(tot.sqrt())


def sum_of_squares(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """Σ_t ‖t‖² as a float64 scalar on `device`: per-tensor norms in one fused op, summed in float64 (the
    tensors may live on different devices, e.g. ZeRO-3 shards partly offloaded to the host)."""
    return torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(list(tensors))]).pow(2).sum()


def update_norm(before: TensorsLike, after: TensorsLike) -> float:
    """L2 norm of the parameter update sqrt(Σ_θ ‖θ_after − θ_before‖²).

    before / after: dicts name -> tensor (matched by name; keys missing in either are
    ignored) or equally long sequences of tensors (matched by position).
    """
    kb, vb = _as_list(before)
    ka, va = _as_list(after)
    if kb is not None and ka is not None:
        db = dict(zip(kb, vb))
        pairs = [(db[k], v) for k, v in zip(ka, va) if k in db]
    else:
        if len(vb) != len(va):
            raise ValueError(f"update_norm: {len(vb)} tensors before but {len(va)} after")
        pairs = list(zip(vb, va))
    if not pairs:
        return 0.0
    # One fused pass per list (torch._foreach_*): θ_after − θ_before is exact in the parameters'
    # own dtype for an update much smaller than θ (Sterbenz), and the norms are summed in float64.
    after_t = [a.detach() for _, a in pairs]
    before_t = [b.detach().to(device=a.device, dtype=a.dtype) for b, a in pairs]
    return float(sum_of_squares(torch._foreach_sub(after_t, before_t), "cpu").sqrt())


# --------------------------------------------------------------------------- attention
def attention_entropy(
    attn: Union[torch.Tensor, Sequence[torch.Tensor]],
    lazy_threshold: float = 0.9,
    collapsed_threshold: float = 0.1,
    causal: bool = True,
) -> dict:
    """Hmax-normalised attention entropy per head.

    For query t with V_t visible keys (V_t = t+1 when causal, else T):
        Ĥ_t = −Σ_k p_tk log p_tk / log V_t  ∈ [0, 1];
    per head: mean of Ĥ_t over batch and queries with V_t ≥ 2 (query 0 of a causal map
    sees one key, its entropy is 0/0 and is skipped).
    A head is "lazy" if Ĥ > lazy_threshold (near-uniform, attends everywhere) and
    "collapsed" if Ĥ < collapsed_threshold (near one-hot).

    attn: (B, n_head, T, T) probabilities, or a list of those (one per layer).
    Returns {"entropy": float64 tensor (n_head,) or (L, n_head), "mean": float,
    "lazy": int, "collapsed": int, "n_heads": int}.
    """
    if isinstance(attn, (list, tuple)):
        per = [attention_entropy(a, lazy_threshold, collapsed_threshold, causal)["entropy"] for a in attn]
        ent = torch.stack(per) if per else torch.zeros(0, 0, dtype=torch.float64)
    else:
        a = attn.detach().to(torch.float64)
        if a.dim() == 3:
            a = a.unsqueeze(0)
        if a.dim() != 4:
            raise ValueError(f"attention must be (B, n_head, T, T), got {tuple(attn.shape)}")
        Tq, Tk = a.shape[-2], a.shape[-1]
        h = -torch.special.xlogy(a, a).sum(-1)  # (B, nh, Tq)
        if causal:
            # query t (aligned to the last Tq keys) sees Tk - Tq + t + 1 keys
            vis = torch.arange(Tq, dtype=torch.float64, device=a.device) + (Tk - Tq + 1)
        else:
            vis = torch.full((Tq,), float(Tk), dtype=torch.float64, device=a.device)
        ok = vis >= 2
        if not bool(ok.any()):
            ent = torch.zeros(a.shape[1], dtype=torch.float64)
        else:
            hn = h[..., ok] / torch.log(vis[ok])
            ent = hn.mean(dim=(0, 2)).cpu()
    flat = ent.reshape(-1)
    return {
        "entropy": ent,
        "mean": float(flat.mean()) if flat.numel() else 0.0,
        "lazy": int((flat > lazy_threshold).sum()),
        "collapsed": int((flat < collapsed_threshold).sum()),
        "n_heads": int(flat.numel()),
    }


# --------------------------------------------------------------------------- clones
def cloned_units(F: torch.Tensor, threshold: float = 0.95, block: int = 1024) -> dict:
    """Count pairs of neurons with (near-)identical activation patterns.

    F: (rows = tokens, cols = neurons). cos_ij = ⟨F_:i, F_:j⟩ / (‖F_:i‖ ‖F_:j‖); a pair
    i < j is cloned when cos_ij > threshold. All-zero columns have no direction and are
    never counted (dead units are reported separately).
    Returns {"cloned_pairs": int, "cloned_pair_fraction": pairs / (H(H−1)/2),
    "cloned_units": number of units that belong to at least one cloned pair}.
    """
    F = F.detach().to(torch.float64)
    if F.dim() != 2:
        raise ValueError(f"expected features (rows, neurons), got shape {tuple(F.shape)}")
    H = F.shape[1]
    norms = F.norm(dim=0)
    nz = norms > 0
    Fn = torch.where(nz, F / norms.clamp_min(1e-300), torch.zeros_like(F))
    pairs = 0
    has = torch.zeros(H, dtype=torch.bool, device=F.device)
    idx = torch.arange(H, device=F.device)
    for j0 in range(0, H, block):
        j1 = min(H, j0 + block)
        C = Fn[:, j0:j1].T @ Fn  # (b, H)
        upper = idx[None, :] > idx[j0:j1, None]
        hit = (C > threshold) & upper
        pairs += int(hit.sum())
        has[j0:j1] |= hit.any(1)
        has |= hit.any(0)
    total = H * (H - 1) // 2
    return {
        "cloned_pairs": pairs,
        "cloned_pair_fraction": pairs / total if total else 0.0,
        "cloned_units": int(has.sum()),
    }


# --------------------------------------------------------------------------- sharpness
def hessian_sharpness(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    iters: int = 20,
    tol: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Top Hessian eigenvalue λ_max(∇²L) by power iteration on Hessian-vector products.

    g = ∇L (create_graph=True);  v_0 random, ‖v‖ = 1;  Hv = ∇(g·v);
    λ_k = vᵀ H v (Rayleigh quotient);  v ← Hv / ‖Hv‖.
    loss_fn(): closure returning a scalar loss (evaluated once). Power iteration converges
    to the eigenvalue of largest magnitude (= the sharpness for the usual PSD-dominated
    Hessians). Stops after ``iters`` steps or when |λ_k − λ_{k−1}| ≤ tol·|λ_k|.
    Returns the final Rayleigh quotient as a float.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("hessian_sharpness: no parameters require grad")
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device=p.device, dtype=p.dtype) for p in params]

    def _norm(vs):
        return torch.sqrt(sum((t.double() ** 2).sum() for t in vs))

    n = _norm(v)
    v = [t / n.to(t.dtype) for t in v]
    lam = 0.0
    for _ in range(max(1, iters)):
        Hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        Hv = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(Hv, params)]
        new = float(sum((a.double() * b.double()).sum() for a, b in zip(v, Hv)))
        nh = _norm(Hv)
        converged = tol is not None and abs(new - lam) <= tol * abs(new)
        lam = new
        if float(nh) == 0.0 or converged:
            break
        v = [h / nh.to(h.dtype) for h in Hv]
    return lam
