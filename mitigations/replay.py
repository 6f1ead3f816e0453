"""Experience replay for continual pretraining: a fraction of every task's rows comes from
the earlier tasks' languages (uniformly over them); the current language keeps 1 − f.

The mixing itself is ``PretrainRunner.replay_fraction`` (trainer/phases.py); this callback
sets it for the phases it is scoped to.  LR re-warming at each task is the loop's default
(``phases.<name>.reset_warmup_per_task: true`` with ``optim.warmup_steps``); ``rewarm_steps``
adds an extra linear ramp over the first N steps of every task (a multiplier on the
scheduled LR, applied before the optimizer step; ``train/lr`` logs the unscaled value,
``replay/lr_scale`` the multiplier).
"""
from __future__ import annotations

from trainer.callbacks import register
from trainer.errors import ConfigError
from mitigations.base import Mitigation
from mitigations.state_access import innermost


@register("replay")
class Replay(Mitigation):
    def __init__(self, fraction: float = 0.25, rewarm_steps: int = 0):
        if not 0 <= fraction < 1:
            raise ConfigError(f"replay: fraction must be in [0, 1), got {fraction}")
        if rewarm_steps < 0:
            raise ConfigError(f"replay: rewarm_steps must be >= 0, got {rewarm_steps}")
        self.fraction, self.rewarm_steps = float(fraction), int(rewarm_steps)
        self._scale = 1.0

    def check(self, trainer) -> None:
        super().check(trainer)
        names = self.phases or list(trainer.cfg.phases)
        for n in names:
            p = trainer.cfg.phases[n]
            if p.kind != "pretrain" or p.mode != "continual":
                hint = "" if self.phases else " (scope it with phases: [...])"
                raise ConfigError(f"callbacks (replay): phase '{n}' is {p.kind}"
                                  f"{'/' + p.mode if p.kind == 'pretrain' else ''}; replay needs a continual "
                                  f"pretraining phase{hint}")

    def _sync(self, trainer) -> None:
        """Set the runner's fraction; rebuild the current mixture at the same position if needed.

        The mixture's draws depend only on (seed, batch counter), so rebuilding at the same
        counter gives exactly the stream it would have had with the fraction set from the
        start (this also covers a resume mid-task, where on_phase/task_start do not fire).
        """
        runner = trainer.runner
        if runner is None or not hasattr(runner, "replay_fraction") or runner.replay_fraction == self.fraction:
            return
        runner.replay_fraction = self.fraction
        if runner.source is not None and runner.cfg.mode == "continual":
            counter = runner.source.counter
            runner.source = runner._mixture(runner.task_idx)
            runner.source.counter = counter

    def on_phase_start(self, trainer) -> None:
        self._sync(trainer)

    def on_task_start(self, trainer) -> None:
        self._sync(trainer)

    def pre_step(self, trainer) -> None:
        self._sync(trainer)
        if self.rewarm_steps and trainer.step_in_task < self.rewarm_steps:
            self._scale = (trainer.step_in_task + 1) / self.rewarm_steps
            for g in innermost(trainer.optimizer).param_groups:
                g["lr"] *= self._scale
        else:
            self._scale = 1.0

    def post_step(self, trainer, logs) -> None:
        logs["replay/fraction"] = self.fraction
        if self.rewarm_steps:
            logs["replay/lr_scale"] = self._scale
