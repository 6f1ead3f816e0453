"""One place to read/write a parameter's full fp32 value and its Adam moments.

Mitigations edit weights and optimizer state in place (neuron resets, shrink & perturb,
rejuvenation).  Where those values live depends on the backend:

* single process / DDP: the module parameter itself, and the torch AdamW's
  ``state[p]["exp_avg" | "exp_avg_sq"]`` (same shape as ``p``; absent before the first step).
* DeepSpeed ZeRO-1/2/3: the fp32 master copy and the moments are partitioned flat buffers
  owned by the ZeRO optimizer; ``deepspeed.utils.safe_get/set_full_fp32_param`` and
  ``safe_get/set_full_optimizer_state`` assemble / scatter them.  Writes also refresh the
  module's (low-precision) copy: directly under ZeRO-1/2, inside ``GatheredParameters`` under
  ZeRO-3.  Under ZeRO-3 every get/set is a collective: all ranks must make the same calls
  in the same order (the mitigations guarantee that by deciding from all-reduced
  statistics and seeded generators).

All mitigations go through :class:`StateAccess`, so a new backend needs changes here only.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Optional

import torch

from trainer.optim import deepspeed_stage, innermost, wrapper_chain

MOMENTS = ("exp_avg", "exp_avg_sq")


def _relink_zero_states(optimizer) -> None:
    """ZeRO-1/2 link each parameter to views of its optimizer state once, after the first step's
    first param group, so groups whose state did not exist yet get empty links ("exp_avg not
    found in optimizer state fragment"). Re-linking now, while every state exists, fixes that."""
    for layer in wrapper_chain(optimizer):
        if hasattr(layer, "_lazy_init_hp_params_optimizer_state"):
            layer._hp_optimizer_states_linked = False
            layer._lazy_init_hp_params_optimizer_state()
            return


class StateAccess:
    """Full-tensor views of parameters and Adam moments for any backend.

    ``StateAccess(optimizer, accelerator=None)``; ``StateAccess.of(trainer)`` for a Trainer.
    Values returned are fresh fp32 tensors (editing them changes nothing until ``set_*``).
    """

    def __init__(self, optimizer=None, accelerator=None):
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.stage = deepspeed_stage(accelerator)
        if self.stage in (1, 2) and optimizer is not None and innermost(optimizer).state:
            _relink_zero_states(optimizer)

    @classmethod
    def of(cls, trainer) -> "StateAccess":
        return cls(trainer.optimizer, trainer.accelerator)

    @property
    def deepspeed(self) -> bool:
        return self.stage is not None

    # --- parameters -------------------------------------------------------------------
    def get_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(p)
            if full is not None:
                return full.detach().float().clone().view(self._shape(p))
        return p.detach().float().clone()

    def set_param(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            if not self.deepspeed:
                p.copy_(value.to(device=p.device, dtype=p.dtype))
                return
            from deepspeed.utils import safe_set_full_fp32_param

            value = value.detach().float()
            with self._gathered([p]):
                safe_set_full_fp32_param(p, value.to(p.device))
                p.data.copy_(value.view(p.data.shape).to(device=p.device, dtype=p.dtype))

    # --- Adam moments -----------------------------------------------------------------
    def get_moment(self, p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
        """Full fp32 moment ``key`` of ``p`` (None before the optimizer's first step)."""
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_optimizer_state

            m = safe_get_full_optimizer_state(p, key)
            return None if m is None else m.detach().float().clone().view(self._shape(p))
        state = innermost(self.optimizer).state.get(p) if self.optimizer is not None else None
        if not state or key not in state:
            return None
        return state[key].detach().float().clone()

    def set_moment(self, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.deepspeed:
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(p, value.detach().float().to(p.device), key)
            return
        state = innermost(self.optimizer).state.get(p)
        if state and key in state:
            with torch.no_grad():
                state[key].copy_(value.to(device=state[key].device, dtype=state[key].dtype))

    def zero_moment_slices(self, p: torch.nn.Parameter, dim: int, idx: torch.Tensor) -> None:
        """Zero exp_avg and exp_avg_sq of ``p`` at positions ``idx`` along ``dim``."""
        for key in MOMENTS:
            m = self.get_moment(p, key)
            if m is None:
                continue
            m.index_fill_(dim, idx.to(m.device), 0.0)
            self.set_moment(p, key, m)

    # --- helpers ----------------------------------------------------------------------
    @staticmethod
    def _shape(p) -> torch.Size:
        return getattr(p, "ds_shape", None) or p.shape

    def _gathered(self, params: Iterable[torch.nn.Parameter]):
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
        return nullcontext()
