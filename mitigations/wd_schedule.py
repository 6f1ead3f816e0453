"""Weight-decay policies: a schedule of the decaying group's weight_decay within a phase.

The per-phase base value is ``phases.<name>.optim.weight_decay`` and which parameters decay
is ``optim.no_decay`` (group 0 decays, group 1 never does).  This callback multiplies the
base by a factor that moves from ``start_factor`` to ``end_factor`` over the phase (or over
each task with ``per: task``) following ``schedule`` (constant | linear | cosine).  It is
set before every optimizer step, so it also holds after a resume.
"""
from __future__ import annotations

import math

from trainer.callbacks import register
from trainer.errors import ConfigError
from mitigations.base import Mitigation
from mitigations.state_access import innermost

SCHEDULES = ("constant", "linear", "cosine")


def wd_factor(schedule: str, progress: float, start: float, end: float) -> float:
    """Multiplier at ``progress`` in [0, 1] (0 = first step)."""
    t = min(1.0, max(0.0, progress))
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * t
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


@register("wd_schedule")
class WeightDecaySchedule(Mitigation):
    def __init__(self, schedule: str = "cosine", start_factor: float = 1.0, end_factor: float = 0.0,
                 per: str = "phase"):
        if schedule not in SCHEDULES:
            raise ConfigError(f"wd_schedule: schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
        if per not in ("phase", "task"):
            raise ConfigError(f"wd_schedule: per={per!r} must be phase or task")
        if start_factor < 0 or end_factor < 0:
            raise ConfigError("wd_schedule: start_factor and end_factor must be >= 0")
        self.schedule, self.start, self.end, self.per = schedule, float(start_factor), float(end_factor), per
        self.current = float("nan")

    def progress(self, trainer) -> float:
        tasks = trainer.tasks
        if self.per == "task":
            total, pos = tasks[trainer.task_idx].steps, trainer.step_in_task
        else:
            total = sum(t.steps for t in tasks)
            pos = sum(t.steps for t in tasks[:trainer.task_idx]) + trainer.step_in_task
        return pos / max(1, total - 1)

    def value(self, trainer) -> float:
        base = trainer.phase_cfg.optim.weight_decay
        return base * wd_factor(self.schedule, self.progress(trainer), self.start, self.end)

    def pre_step(self, trainer) -> None:
        self.current = self.value(trainer)
        innermost(trainer.optimizer).param_groups[0]["weight_decay"] = self.current

    def post_step(self, trainer, logs) -> None:
        logs["train/weight_decay"] = self.current
