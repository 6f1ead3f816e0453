"""AdamW parameter groups, learning-rate schedules and optimizer-state resets."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from trainer.config import OptimConfig

_NORM_TYPES = (nn.LayerNorm,)


def _is_norm(module: nn.Module) -> bool:
    # RMSNorm classes differ between torch/our model; match by name as well as type.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float, no_decay: List[str]) -> List[dict]:
    """Group 0 decays, group 1 does not. `no_decay` names categories: norm, bias, embedding."""
    skip = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if ("norm" in no_decay and _is_norm(module)) or ("bias" in no_decay and pname == "bias") \
                    or ("embedding" in no_decay and isinstance(module, nn.Embedding)):
                skip.add(full)
    decay, keep = [], []
    for name, p in model.named_parameters():  # de-duplicates tied weights
        if p.requires_grad:
            (keep if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def wrapper_chain(optimizer):
    """The optimizer and each one it wraps, outermost first (accelerate -> DeepSpeed ZeRO -> torch)."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def deepspeed_stage(accelerator) -> Optional[int]:
    """ZeRO stage when running under DeepSpeed, else None."""
    if accelerator is None:
        return None
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def zero_stage(trainer) -> Optional[int]:
    """The run's ZeRO stage (None when not DeepSpeed)."""
    return deepspeed_stage(getattr(trainer, "accelerator", None))


def innermost(optimizer):
    """The torch optimizer under accelerate/DeepSpeed wrappers (its state and param_groups)."""
    *_, inner = wrapper_chain(optimizer)
    return inner


def apply_hyperparams(optimizer, o: OptimConfig) -> None:
    for i, group in enumerate(innermost(optimizer).param_groups):
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0
        group["betas"] = tuple(o.betas)
        group["eps"] = o.eps
    for layer in wrapper_chain(optimizer):  # DeepSpeed's ZeRO optimizers clip inside their step
        if hasattr(layer, "clip_grad"):
            layer.clip_grad = float(o.grad_clip)


def reset_state(optimizer) -> None:
    """Forget all moments and step counts: identical to a freshly built AdamW.

    The state tensors are zeroed in place rather than dropped: AdamW with step 0 and zero
    moments computes exactly what a fresh one does, and DeepSpeed ZeRO-1/2 keep views of
    these tensors (for safe_get/set_full_optimizer_state) that must stay valid.
    """
    for state in innermost(optimizer).state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


def set_lr(optimizer, lr: float) -> None:
    for group in innermost(optimizer).param_groups:
        group["lr"] = lr


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Learning rate for 0-based `step` of a `total`-step horizon: linear warm-up, then the schedule."""
    floor = o.lr * o.min_lr_ratio
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":  # warm-up, stable, then linear decay over the last decay_fraction
        decay_steps = max(1, int(round(total * o.decay_fraction)))
        start = total - decay_steps
        if step < start:
            return o.lr
        return o.lr + (floor - o.lr) * min(1.0, (step - start + 1) / decay_steps)
    progress = min(1.0, (step - o.warmup_steps + 1) / max(1, total - o.warmup_steps))
    return floor + 0.5 * (o.lr - floor) * (1 + math.cos(math.pi * progress))


def global_grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
