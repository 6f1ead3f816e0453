"""L2-Init (Kumar, Marklund & Van Roy 2023, "Maintaining plasticity in continual learning via
regenerative regularization"): add λ·‖θ − θ₀‖² to the loss, θ₀ = the weights at the start of
the phase (captured at ``on_phase_start``, after the phase's ``init_from`` is applied, and
kept in the callback state so a resumed run pulls toward the same point).

``params: all`` regularises every parameter; ``params: decay`` only the weight-decay group.
Not supported under ZeRO-3 (the loss needs every full parameter at each step).
"""
from __future__ import annotations

from typing import Dict

import torch

from trainer.callbacks import register
from trainer.errors import ConfigError
from mitigations.base import Mitigation
from trainer.optim import param_groups


@register("l2_init")
class L2Init(Mitigation):
    max_zero_stage = 2

    def __init__(self, coef: float = 1e-3, params: str = "all"):
        if coef < 0:
            raise ConfigError(f"l2_init: coef must be >= 0, got {coef}")
        if params not in ("all", "decay"):
            raise ConfigError(f"l2_init: params={params!r} must be all or decay")
        self.coef, self.params = float(coef), params
        self.theta0: Dict[str, torch.Tensor] = {}
        self._last = float("nan")

    def _named(self, trainer):
        model = trainer.unwrapped_model
        if self.params == "all":
            return list(model.named_parameters())
        # the model's own decaying parameters: under ZeRO-1/2 the optimizer's groups hold flat partitions instead
        o = trainer.phase_cfg.optim
        decay = {id(p) for p in param_groups(model, o.weight_decay, o.no_decay)[0]["params"]}
        return [(n, p) for n, p in model.named_parameters() if id(p) in decay]

    def on_phase_start(self, trainer) -> None:
        self.theta0 = {n: p.detach().float().clone() for n, p in self._named(trainer)}

    def loss_term(self, trainer, model):
        if not self.theta0 or self.coef == 0:
            return None
        total = None
        for n, p in self._named(trainer):
            ref = self.theta0.get(n)
            if ref is None:
                continue
            ref = ref.to(p.device)
            d = (p.float() - ref).pow(2).sum()
            total = d if total is None else total + d
        if total is None:
            return None
        self._last = float(total.detach())
        return self.coef * total

    def post_step(self, trainer, logs) -> None:
        logs["l2_init/sq_dist"] = self._last

    def state_dict(self) -> dict:
        return {"theta0": {k: v.cpu() for k, v in self.theta0.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state and "theta0" in state:
            self.theta0 = {k: v.float() for k, v in state["theta0"].items()}
