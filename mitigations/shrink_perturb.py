"""Shrink & Perturb (Ash & Adams 2020, "On warm-starting neural network training"):
θ ← λ·θ + σ·ε at boundaries (``at``: task_end / phase_end / phase_start / task_start) and/or
every ``every`` steps.

``noise: init`` draws ε from the parameter's own initialisation distribution (a freshly
initialised model of the run's config, so N(0, 0.02²) weights, 1 for norm gains, 0 for
biases); ``noise: normal`` draws ε ~ N(0, 1).  ``params: matrices`` restricts the edit to
≥2-D weights (norm gains and biases keep their values).  Draws are seeded by
(run seed, step), so every rank applies the same edit.  Adam moments are kept unless
``reset_moments: true``.
"""
from __future__ import annotations

import torch

from models.gpt import GPT
from trainer.callbacks import register
from trainer.errors import ConfigError
from trainer.phases import stable_seed
from mitigations.base import Mitigation, check_boundaries
from mitigations.state_access import MOMENTS, StateAccess


def fresh_init(model_cfg, seed: int) -> dict:
    """{name: tensor} of a freshly initialised model (the run's RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {n: p.detach().float() for n, p in GPT(model_cfg).named_parameters()}


def shrink_perturb(model, access: StateAccess, shrink: float, sigma: float, noise: str, seed: int,
                   model_cfg=None, matrices_only: bool = False, reset_moments: bool = False) -> int:
    """Apply θ ← shrink·θ + sigma·ε to ``model``'s parameters; returns how many tensors changed."""
    init = fresh_init(model_cfg or model.cfg, seed) if noise == "init" and sigma else {}
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if matrices_only and p.ndim < 2:
            continue
        full = access.get_param(p)
        new = shrink * full
        if sigma:
            eps = init[name] if noise == "init" else torch.randn(full.shape, generator=gen)
            new = new + sigma * eps.to(full.device)
        access.set_param(p, new)
        if reset_moments:
            for key in MOMENTS:
                m = access.get_moment(p, key)
                if m is not None:
                    access.set_moment(p, key, torch.zeros_like(m))
        n += 1
    return n


@register("shrink_perturb")
class ShrinkPerturb(Mitigation):
    def __init__(self, shrink: float = 0.4, sigma: float = 1e-3, noise: str = "init", at=("task_end",),
                 every: int = 0, params: str = "all", reset_moments: bool = False):
        if not 0 <= shrink <= 1:
            raise ConfigError(f"shrink_perturb: shrink must be in [0, 1], got {shrink}")
        if sigma < 0 or every < 0:
            raise ConfigError("shrink_perturb: sigma and every must be >= 0")
        if noise not in ("init", "normal"):
            raise ConfigError(f"shrink_perturb: noise={noise!r} must be init or normal")
        if params not in ("all", "matrices"):
            raise ConfigError(f"shrink_perturb: params={params!r} must be all or matrices")
        self.shrink, self.sigma, self.noise, self.every = float(shrink), float(sigma), noise, int(every)
        self.at = check_boundaries("shrink_perturb", at)
        self.matrices_only, self.reset_moments = params == "matrices", bool(reset_moments)
        self.applied = 0

    def apply(self, trainer, reason: str) -> None:
        seed = stable_seed(self.seed(trainer), "shrink_perturb", trainer.global_step, reason, self.applied)
        shrink_perturb(trainer.unwrapped_model, self.access(trainer), self.shrink, self.sigma, self.noise, seed,
                       trainer.model_cfg, self.matrices_only, self.reset_moments)
        self.applied += 1
        trainer.log({"shrink_perturb/applied": float(self.applied)})

    def state_dict(self) -> dict:
        return {"applied": torch.tensor(self.applied)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.applied = int(state["applied"])
