"""Shared plumbing for the mitigation callbacks: when to act, seeds, refusing combinations."""
from __future__ import annotations

from typing import Sequence

from trainer.callbacks import Callback
from trainer.errors import ConfigError
from mitigations.state_access import StateAccess
from trainer.optim import zero_stage

BOUNDARIES = ("task_end", "phase_end", "phase_start", "task_start")


def check_boundaries(name: str, at: Sequence[str]) -> tuple:
    at = (at,) if isinstance(at, str) else tuple(at or ())
    bad = [a for a in at if a not in BOUNDARIES]
    if bad:
        raise ConfigError(f"{name}: at={bad[0]!r} is not one of {', '.join(BOUNDARIES)}")
    return at


class Mitigation(Callback):
    """A callback that edits weights/optimizer state through :class:`StateAccess`.

    Subclasses set ``max_zero_stage`` (the highest ZeRO stage they support) and override
    ``apply(trainer, reason)`` for the boundary/periodic action.
    """

    max_zero_stage = 3
    at: tuple = ()
    every: int = 0

    def check(self, trainer) -> None:
        stage = zero_stage(trainer)
        if stage is not None and stage > self.max_zero_stage:
            raise ConfigError(f"callbacks ({self.name}): not supported under DeepSpeed ZeRO-{stage} "
                              f"(supported up to ZeRO-{self.max_zero_stage})")
        for n in self.phases:
            if n not in trainer.cfg.phases:
                raise ConfigError(f"callbacks ({self.name}): phases lists unknown phase '{n}' "
                                  f"(known: {', '.join(trainer.cfg.phases)})")

    def access(self, trainer) -> StateAccess:
        return StateAccess.of(trainer)

    def seed(self, trainer) -> int:
        return int(trainer.cfg.trainer.seed)

    def apply(self, trainer, reason: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # boundary plumbing
    def on_phase_start(self, trainer) -> None:
        if "phase_start" in self.at:
            self.apply(trainer, "phase_start")

    def on_task_start(self, trainer) -> None:
        if "task_start" in self.at:
            self.apply(trainer, "task_start")

    def on_task_end(self, trainer) -> None:
        if "task_end" in self.at:
            self.apply(trainer, "task_end")

    def on_phase_end(self, trainer) -> None:
        if "phase_end" in self.at:
            self.apply(trainer, "phase_end")

    def post_step(self, trainer, logs) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.apply(trainer, "step")
