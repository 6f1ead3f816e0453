"""Per-neuron activation statistics for plasticity diagnostics.

For every MLP hidden neuron j we accumulate, over all tokens seen:

=====  ==============  ==============================================================
row    name            value (summed / maxed over tokens n)
=====  ==============  ==============================================================
0      ``count``       number of tokens N (same for every neuron)
1      ``sum_abs``     Σ_n |h_nj|
2      ``sum``         Σ_n h_nj
3      ``active``      Σ_n [|h_nj| > eps]                  ("active frequency" numerator)
4      ``positive``    Σ_n [h_nj > 0]
5      ``max_abs``     max_n |h_nj|
6      ``saturated``   Σ_n [|φ'(x_nj)| < delta]  (x = pre-activation; 0 if x unknown)
=====  ==============  ==============================================================

``reference_stats`` computes each row with its own straightforward torch expression (the
oracle used by the tests); ``fused_stats`` computes all rows in one fused pass (one stacked
reduction per row chunk, torch.compile-able) and dispatches to the Triton kernel in
:mod:`trainer.instruments.triton_stats` for CUDA tensors when Triton is available.

:class:`NeuronStatsAccumulator` keeps float64 running stats per layer, merges across ranks
and turns them into ReDo dormant ratios, dead / saturated counts and activation frequency.
See docs/metrics.md for the definitions and references.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

STAT_NAMES = ("count", "sum_abs", "sum", "active", "positive", "max_abs", "saturated")
K = len(STAT_NAMES)
IDX = {name: i for i, name in enumerate(STAT_NAMES)}
SUM_ROWS = tuple(i for i, n in enumerate(STAT_NAMES) if n != "max_abs")
MAX_ROW = IDX["max_abs"]

DEFAULT_EPS = 1e-6
DEFAULT_DELTA = 0.01
DEFAULT_TAUS = (0.0, 0.01, 0.1)
DEFAULT_SAT_THRESHOLD = 0.99

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# activation kinds -> small integer codes (shared with the Triton kernel)
ACT_CODES = {None: 0, "gelu_tanh": 1, "silu": 2, "gelu": 3}
_KIND_OF_CODE = {v: k for k, v in ACT_CODES.items()}
_ALIASES = {
    None: None,
    "none": None,
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gpt2": "gelu_tanh",
    "gelu": "gelu",
    "gelu_erf": "gelu",
    "silu": "silu",
    "swish": "silu",
    "llama": "silu",
}


def normalize_act_kind(act_kind) -> Optional[str]:
    """Map an activation name / flavour / module to one of None, 'gelu_tanh', 'gelu', 'silu'.

    Accepts aliases ("gpt2" -> gelu_tanh, "llama"/"swish" -> silu) and nn.Module instances
    (nn.GELU(approximate="tanh"), nn.GELU(), nn.SiLU()). Unknown modules give None
    (= no saturation statistic); unknown strings raise ValueError.
    """
    if isinstance(act_kind, torch.nn.Module):
        if isinstance(act_kind, torch.nn.GELU):
            return "gelu_tanh" if getattr(act_kind, "approximate", "none") == "tanh" else "gelu"
        if isinstance(act_kind, torch.nn.SiLU):
            return "silu"
        return None
    key = act_kind.lower() if isinstance(act_kind, str) else act_kind
    if key not in _ALIASES:
        raise ValueError(
            f"unknown act_kind {act_kind!r}; expected one of gelu_tanh, gelu, silu (or gpt2/llama)"
        )
    return _ALIASES[key]


def act_derivative(x: torch.Tensor, act_kind) -> torch.Tensor:
    """Closed-form φ'(x) (computed in x's dtype; pass float32/float64).

    gelu_tanh: φ = ½x(1+t), t = tanh(u), u = c(x + a x³), c = √(2/π), a = 0.044715
               φ' = ½(1+t) + ½x(1−t²)·c(1 + 3a x²)
    gelu:      φ = xΦ(x);  φ' = Φ(x) + x·exp(−x²/2)/√(2π)
    silu:      φ = xσ(x);  φ' = σ(x)(1 + x(1−σ(x)))
    """
    kind = normalize_act_kind(act_kind)
    if kind == "gelu_tanh":
        t = torch.tanh(_GELU_C * (x + _GELU_A * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_GELU_C * (1.0 + 3.0 * _GELU_A * x * x))
    if kind == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))
        return cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if kind == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError("act_derivative needs an activation kind (gelu_tanh, gelu or silu)")


def _flatten(h: torch.Tensor, x: Optional[torch.Tensor]):
    if h.dim() == 0:
        raise ValueError("activations must have a trailing neuron dimension, got a scalar")
    H = h.shape[-1]
    h2 = h.detach().reshape(-1, H)
    x2 = None
    if x is not None:
        if x.shape != h.shape:
            raise ValueError(f"pre-activation shape {tuple(x.shape)} != activation shape {tuple(h.shape)}")
        x2 = x.detach().reshape(-1, H)
    return h2, x2


def reference_stats(
    h: torch.Tensor,
    x: Optional[torch.Tensor] = None,
    act_kind=None,
    eps: float = DEFAULT_EPS,
    delta: float = DEFAULT_DELTA,
) -> torch.Tensor:
    """Oracle: each statistic computed separately with plain torch ops, in float64.

    Returns a float32 tensor [K, H] with rows in STAT_NAMES order. The saturation row is 0
    when ``x`` is None or ``act_kind`` is None.
    """
    h2, x2 = _flatten(h, x)
    N, H = h2.shape
    hd = h2.double()
    out = torch.zeros(K, H, dtype=torch.float64, device=h2.device)
    out[IDX["count"]] = N
    out[IDX["sum_abs"]] = hd.abs().sum(0)
    out[IDX["sum"]] = hd.sum(0)
    hf = h2.float()  # thresholds are compared in float32, as in the fused / Triton paths
    out[IDX["active"]] = (hf.abs() > eps).sum(0).double()
    out[IDX["positive"]] = (hf > 0).sum(0).double()
    if N > 0:
        out[IDX["max_abs"]] = hd.abs().max(dim=0).values
    kind = normalize_act_kind(act_kind)
    if x2 is not None and kind is not None:
        d = act_derivative(x2.float(), kind)
        out[IDX["saturated"]] = (d.abs() < delta).sum(0).double()
    return out.float()


@functools.lru_cache(maxsize=None)
def flat_intervals(act_kind: str, delta: float) -> Tuple[Tuple[float, float], ...]:
    """The x-intervals where |φ'(x)| < δ, found once per (activation, δ) in float64.

    GeLU/SiLU are flat for very negative x and also where φ' crosses zero (x ≈ −0.75 for
    GeLU, −1.28 for SiLU), so there are two intervals.  The fused path then counts
    saturation with comparisons only, instead of evaluating φ' on every element (the
    reference path still evaluates φ'; they agree up to float rounding at the edges).
    """
    grid = torch.linspace(-60.0, 60.0, 1_200_001, dtype=torch.float64)
    flat = act_derivative(grid, act_kind).abs() < delta
    edges = torch.nonzero(flat[1:] != flat[:-1]).flatten().tolist()
    bounds = [-math.inf] if flat[0] else []
    for e in edges:  # refine each edge between grid[e] and grid[e+1] by bisection
        lo, hi = grid[e].item(), grid[e + 1].item()
        inside_lo = bool(flat[e])
        for _ in range(60):
            mid = (lo + hi) / 2
            if (abs(act_derivative(torch.tensor(mid, dtype=torch.float64), act_kind).item()) < delta) == inside_lo:
                lo = mid
            else:
                hi = mid
        bounds.append((lo + hi) / 2)
    if flat[-1]:
        bounds.append(math.inf)
    return tuple((bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2))


def _fused_chunk(h2: torch.Tensor, x2: Optional[torch.Tensor], eps: float, delta: float, code: int):
    """All per-element quantities of one row chunk, each reduced over rows as it is formed:
    returns (sums[P,H], max[H]). Reducing per quantity (rather than stacking P full-size
    temporaries) halves the memory traffic on CPU; torch.compile fuses it further."""
    hf = h2.float()
    a = hf.abs()
    sums = [a.sum(0), hf.sum(0), (a > eps).sum(0, dtype=torch.float32), (hf > 0).sum(0, dtype=torch.float32)]
    if x2 is not None and code != 0:
        xf = x2.float()
        sat = None
        for lo, hi in flat_intervals(_KIND_OF_CODE[code], float(delta)):
            inside = (xf < hi) if lo == -math.inf else (xf > lo) & (xf < hi)
            sat = inside if sat is None else sat | inside
        sums.append(sat.sum(0, dtype=torch.float32))
    return torch.stack(sums), a.amax(dim=0)


_compiled_chunk = None


def _get_chunk_fn(compile: bool):
    global _compiled_chunk
    if not compile:
        return _fused_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_fused_chunk, dynamic=True)
    return _compiled_chunk


def fused_stats(
    h: torch.Tensor,
    x: Optional[torch.Tensor] = None,
    act_kind=None,
    eps: float = DEFAULT_EPS,
    delta: float = DEFAULT_DELTA,
    *,
    use_triton="auto",
    compile: bool = False,
    chunk_elems: int = 1 << 22,
) -> torch.Tensor:
    """All statistics in one pass; returns float32 [K, H] (rows in STAT_NAMES order).

    h: activations (..., H); x: matching pre-activations or None; act_kind: see
    normalize_act_kind. use_triton: "auto" (Triton for CUDA tensors when available),
    True (force; raises if unavailable) or False. compile=True wraps the torch path in
    torch.compile. Rows are processed in chunks of ~chunk_elems elements to bound the
    temporary memory of the stacked reduction.
    """
    kind = normalize_act_kind(act_kind)
    h2, x2 = _flatten(h, x)
    N, H = h2.shape

    if use_triton:
        from . import triton_stats

        if use_triton == "auto":
            go = h2.is_cuda and triton_stats.available(h2)
        else:
            if not triton_stats.available(h2):
                raise RuntimeError("use_triton=True but Triton cannot run on this tensor " f"({h2.device})")
            go = True
        if go:
            return triton_stats.triton_stats(h2, x2, kind, eps, delta)

    code = ACT_CODES[kind]
    out = torch.zeros(K, H, dtype=torch.float32, device=h2.device)
    out[IDX["count"]] = float(N)
    if N == 0 or H == 0:
        return out
    sum_rows = [IDX["sum_abs"], IDX["sum"], IDX["active"], IDX["positive"]]
    if x2 is not None and code != 0:
        sum_rows.append(IDX["saturated"])
    fn = _get_chunk_fn(compile)
    rows = max(1, chunk_elems // max(H, 1))
    acc_sum = None
    acc_max = None
    for r0 in range(0, N, rows):
        xs = x2[r0 : r0 + rows] if x2 is not None else None
        s, m = fn(h2[r0 : r0 + rows], xs, float(eps), float(delta), code)
        acc_sum = s if acc_sum is None else acc_sum + s
        acc_max = m if acc_max is None else torch.maximum(acc_max, m)
    out[sum_rows] = acc_sum
    out[MAX_ROW] = acc_max
    return out


class NeuronStatsAccumulator:
    """Running per-neuron statistics for many named layers.

    Stats are kept as float64 [K, H] tensors on the device of the activations (no host sync
    per update). Each entry has a ``role``: "hidden" (the unit whose outgoing weights feed
    the next layer: used for dormant / dead / frequency in the overall summary) or "gate"
    (e.g. the SiLU gate of a gated MLP: per-layer numbers only, plus saturation).
    """

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        delta: float = DEFAULT_DELTA,
        use_triton="auto",
        compile: bool = False,
    ):
        self.eps = float(eps)
        self.delta = float(delta)
        self.use_triton = use_triton
        self.compile = compile
        self.stats: Dict[str, torch.Tensor] = {}
        self.meta: Dict[str, dict] = {}

    # -- accumulation ---------------------------------------------------------------
    def reset(self) -> None:
        self.stats.clear()
        self.meta.clear()

    def __len__(self) -> int:
        return len(self.stats)

    @property
    def layers(self) -> list:
        return list(self.stats)

    def _meta_for(self, name: str, act_kind, role: str, has_x: bool) -> None:
        kind = normalize_act_kind(act_kind)
        has_sat = has_x and kind is not None
        m = self.meta.get(name)
        if m is None:
            self.meta[name] = {"act_kind": kind, "role": role, "has_saturation": has_sat}
        else:
            m["has_saturation"] = m["has_saturation"] or has_sat

    def add_stats(self, name: str, stats: torch.Tensor, act_kind=None, role: str = "hidden", has_x: bool = False):
        """Add an already computed [K, H] block (e.g. from fused_stats) to layer ``name``."""
        if stats.dim() != 2 or stats.shape[0] != K:
            raise ValueError(f"stats for {name!r} must have shape [{K}, H], got {tuple(stats.shape)}")
        self._meta_for(name, act_kind, role, has_x)
        s = stats.detach().to(torch.float64)
        cur = self.stats.get(name)
        if cur is None:
            self.stats[name] = s.clone()
            return
        if cur.shape != s.shape:
            raise ValueError(f"layer {name!r}: width changed from {cur.shape[1]} to {s.shape[1]}")
        s = s.to(cur.device)
        mx = torch.maximum(cur[MAX_ROW], s[MAX_ROW])
        cur += s
        cur[MAX_ROW] = mx

    def update(
        self,
        name: str,
        h: torch.Tensor,
        x: Optional[torch.Tensor] = None,
        act_kind=None,
        role: str = "hidden",
    ) -> None:
        """Accumulate activations h (..., H) (and pre-activations x, same shape) for ``name``."""
        st = fused_stats(h, x, act_kind, self.eps, self.delta, use_triton=self.use_triton, compile=self.compile)
        self.add_stats(name, st, act_kind=act_kind, role=role, has_x=x is not None)

    def merge(self, other: "NeuronStatsAccumulator") -> "NeuronStatsAccumulator":
        """Fold another accumulator into this one (sum of sums/counts, max of max)."""
        for name, st in other.stats.items():
            m = other.meta[name]
            self.add_stats(name, st, act_kind=m["act_kind"], role=m["role"], has_x=m["has_saturation"])
        return self

    def all_reduce(self, group=None, check_names: bool = True) -> "NeuronStatsAccumulator":
        """In-place reduction across ranks (SUM for sums/counts, MAX for max|h|).

        No-op when torch.distributed is not initialized or world size is 1. Call it once
        per measurement window (calling twice double counts). All ranks must have
        recorded the same layers (checked when check_names=True).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        names = sorted(self.stats)
        if check_names:
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, names, group=group)
            if any(g != names for g in gathered):
                raise RuntimeError("NeuronStatsAccumulator.all_reduce: ranks recorded different layers")
        if not names:
            return self
        devices = {n: self.stats[n].device for n in names}
        comm_dev = self.stats[names[0]].device
        if dist.get_backend(group) == "nccl" and comm_dev.type != "cuda":
            comm_dev = torch.device("cuda", torch.cuda.current_device())
        sums = torch.cat([self.stats[n][list(SUM_ROWS)].reshape(-1).to(comm_dev) for n in names])
        maxs = torch.cat([self.stats[n][MAX_ROW].to(comm_dev) for n in names])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)
        o_s = o_m = 0
        for n in names:
            st = self.stats[n]
            H = st.shape[1]
            k = len(SUM_ROWS) * H
            st[list(SUM_ROWS)] = sums[o_s : o_s + k].view(len(SUM_ROWS), H).to(devices[n])
            st[MAX_ROW] = maxs[o_m : o_m + H].to(devices[n])
            o_s += k
            o_m += H
        # saturation availability may differ per rank only in pathological cases; keep local
        return self

    # -- read-out -------------------------------------------------------------------
    def per_neuron(self) -> Dict[str, torch.Tensor]:
        """Flat dict "<layer>/<stat>" -> float32 CPU tensor [H], ready for safetensors.

        Stats: count, mean_abs, mean, active_freq, pos_freq, max_abs, sat_frac, score (ReDo
        score E|h_i| / mean_k E|h_k|).
        """
        out = {}
        for name, st in self.stats.items():
            st = st.double().cpu()
            c = st[IDX["count"]].clamp_min(1.0)
            mean_abs = st[IDX["sum_abs"]] / c
            d = {
                "count": st[IDX["count"]],
                "mean_abs": mean_abs,
                "mean": st[IDX["sum"]] / c,
                "active_freq": st[IDX["active"]] / c,
                "pos_freq": st[IDX["positive"]] / c,
                "max_abs": st[MAX_ROW],
                "sat_frac": st[IDX["saturated"]] / c,
                "score": _redo_score(mean_abs),
            }
            for k, v in d.items():
                out[f"{name}/{k}"] = v.float().contiguous()
        return out

    def summary(
        self,
        taus: Sequence[float] = DEFAULT_TAUS,
        sat_threshold: float = DEFAULT_SAT_THRESHOLD,
    ) -> dict:
        """Per-layer and overall plasticity numbers (python floats / ints).

        Returns {"layers": {name: row}, "overall": row}; row keys:
        n_neurons, tokens, dormant@τ / dormant_ratio@τ for each τ (ReDo, τ formatted with
        :g, τ = 0 means exactly E|h| == 0), dead / dead_ratio (never |h| > eps),
        saturated / saturated_ratio (saturation fraction > sat_threshold; None where no
        pre-activation was recorded), active_freq (mean over neurons of P(|h| > eps)),
        pos_freq, mean_abs. "overall" aggregates dormant/dead/freq over role="hidden"
        entries (all entries if none) and saturation over entries that have it.
        """
        layers = {}
        for name, st in self.stats.items():
            layers[name] = self._layer_row(st.double().cpu(), self.meta[name]["has_saturation"], taus, sat_threshold)
        hidden = [n for n in layers if self.meta[n]["role"] == "hidden"] or list(layers)
        sat_layers = [n for n in layers if self.meta[n]["has_saturation"]]
        overall = {"n_neurons": sum(layers[n]["n_neurons"] for n in hidden)}
        overall["tokens"] = max((layers[n]["tokens"] for n in hidden), default=0)
        tot = overall["n_neurons"]
        for key in [f"dormant@{t:g}" for t in taus] + ["dead"]:
            cnt = sum(layers[n][key] for n in hidden)
            overall[key] = cnt
            overall[key.replace("dormant@", "dormant_ratio@") if key != "dead" else "dead_ratio"] = (
                cnt / tot if tot else 0.0
            )
        for key in ("active_freq", "pos_freq", "mean_abs"):
            overall[key] = (sum(layers[n][key] * layers[n]["n_neurons"] for n in hidden) / tot) if tot else 0.0
        if sat_layers:
            s_tot = sum(layers[n]["n_neurons"] for n in sat_layers)
            s_cnt = sum(layers[n]["saturated"] for n in sat_layers)
            overall["saturated"] = s_cnt
            overall["saturated_ratio"] = s_cnt / s_tot if s_tot else 0.0
        else:
            overall["saturated"] = None
            overall["saturated_ratio"] = None
        return {"layers": layers, "overall": overall}

    @staticmethod
    def _layer_row(st: torch.Tensor, has_sat: bool, taus, sat_threshold) -> dict:
        H = st.shape[1]
        n_tok = float(st[IDX["count"], 0]) if H else 0.0
        c = max(n_tok, 1.0)
        mean_abs = st[IDX["sum_abs"]] / c
        score = _redo_score(mean_abs)
        row = {"n_neurons": H, "tokens": int(n_tok)}
        for t in taus:
            if t == 0:
                cnt = int((st[IDX["sum_abs"]] == 0).sum())
            else:
                cnt = int((score <= t).sum())
            row[f"dormant@{t:g}"] = cnt
            row[f"dormant_ratio@{t:g}"] = cnt / H if H else 0.0
        dead = int((st[IDX["active"]] == 0).sum())
        row["dead"] = dead
        row["dead_ratio"] = dead / H if H else 0.0
        if has_sat:
            sat = int((st[IDX["saturated"]] / c > sat_threshold).sum())
            row["saturated"] = sat
            row["saturated_ratio"] = sat / H if H else 0.0
        else:
            row["saturated"] = None
            row["saturated_ratio"] = None
        row["active_freq"] = float((st[IDX["active"]] / c).mean()) if H else 0.0
        row["pos_freq"] = float((st[IDX["positive"]] / c).mean()) if H else 0.0
        row["mean_abs"] = float(mean_abs.mean()) if H else 0.0
        return row


def _redo_score(mean_abs: torch.Tensor) -> torch.Tensor:
    """ReDo score s_i = E|h_i| / mean_k E|h_k| (all zeros when the whole layer is silent)."""
    denom = mean_abs.mean() if mean_abs.numel() else torch.tensor(0.0, dtype=mean_abs.dtype)
    if float(denom) == 0.0:
        return torch.zeros_like(mean_abs)
    return mean_abs / denom


def flatten_summary(summary: Mapping, prefix: str = "", include_layers: bool = True) -> Dict[str, float]:
    """{"overall/dormant_ratio@0.1": ..., "<layer>/dead": ...} with None values dropped (for loggers)."""
    out = {}
    for k, v in summary.get("overall", {}).items():
        if v is not None:
            out[f"{prefix}overall/{k}"] = v
    if include_layers:
        for name, row in summary.get("layers", {}).items():
            for k, v in row.items():
                if v is not None:
                    out[f"{prefix}{name}/{k}"] = v
    return out
