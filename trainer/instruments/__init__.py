"""Reusable plasticity instruments (pure library code, no training-loop dependencies).

* neuron_stats: per-neuron activation statistics, ReDo dormant / dead / saturated units
* triton_stats: optional one-pass Triton kernel for the same statistics (lazy import)
* hooks: forward hooks feeding the accumulator, feature capture for rank metrics
* metrics: effective rank, srank, stable rank, norms, attention entropy, clones, sharpness

Definitions and report keys: docs/metrics.md.
"""

from .hooks import NeuronHooks, capture_features, find_mlp_modules
from .metrics import (
    attention_entropy,
    cloned_units,
    effective_rank,
    grad_norm,
    hessian_sharpness,
    mean_abs_param,
    srank,
    stable_rank,
    update_norm,
)
from .neuron_stats import (
    STAT_NAMES,
    NeuronStatsAccumulator,
    act_derivative,
    flatten_summary,
    fused_stats,
    normalize_act_kind,
    reference_stats,
)

__all__ = [
    "STAT_NAMES",
    "NeuronHooks",
    "NeuronStatsAccumulator",
    "act_derivative",
    "attention_entropy",
    "capture_features",
    "cloned_units",
    "effective_rank",
    "find_mlp_modules",
    "flatten_summary",
    "fused_stats",
    "grad_norm",
    "hessian_sharpness",
    "mean_abs_param",
    "normalize_act_kind",
    "reference_stats",
    "srank",
    "stable_rank",
    "update_norm",
]
