"""Rejuvenation at a boundary: interpolate toward an earlier phase's weights, then reset the
least useful neurons by attribution.

At ``on_phase_start`` of the phases it is scoped to (typically ``phases: [rl]``):
1. θ ← α·θ + (1−α)·θ_base, θ_base = RUN/phases/<base_phase>/model.safetensors (the export
   every phase writes at its end; α = 1 skips this step).
2. Attribution of each MLP hidden unit, A_i = Σ_tokens |h_i · ∂L/∂h_i|, on ``batches``
   micro-batches of the current phase (its own loss for pretraining/SFT phases; the LM loss
   on held-out pretraining rows for an RL phase, whose batches are rollouts), computed on a
   standalone copy of the model (the run's gradients are untouched) and summed across ranks.
3. The ``reset_fraction`` of units with the lowest attribution in each layer are reset:
   fresh incoming weights, zero outgoing weights, zeroed Adam moments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from trainer.callbacks import register
from trainer.errors import CheckpointError, ConfigError
from trainer.instruments.callback import pretraining_languages, spread, validation_rows
from trainer.instruments.probe import gathered_copy
from mitigations.base import Mitigation, check_boundaries
from data.packing import rank_share_rows
from mitigations.neurons import attribution_scores, generator, mlps, reset_units
from mitigations.state_access import StateAccess


def interpolate(model, access: StateAccess, base: Dict[str, torch.Tensor], alpha: float) -> int:
    n = 0
    for name, p in model.named_parameters():
        ref = base.get(name)
        if ref is None:
            continue
        full = access.get_param(p)
        access.set_param(p, alpha * full + (1 - alpha) * ref.float().to(full.device).view(full.shape))
        n += 1
    return n


def lowest_fraction(scores: Dict[int, torch.Tensor], fraction: float) -> Dict[int, torch.Tensor]:
    """{layer: indices of the ⌊fraction·H⌋ lowest-scoring units} (ties: lowest index first)."""
    out = {}
    for i, s in scores.items():
        k = int(fraction * s.numel())
        out[i] = torch.argsort(s, stable=True)[:k].sort().values
    return out


def reset_by_attribution(model, access: StateAccess, scores: Dict[int, torch.Tensor], fraction: float,
                         seed: int, step: int) -> Dict[int, torch.Tensor]:
    chosen = lowest_fraction(scores, fraction)
    for i, mlp in enumerate(mlps(model)):
        if i in chosen:
            reset_units(access, mlp, chosen[i], generator(seed, "rejuvenation", step, i))
    return chosen


@register("rejuvenation")
class Rejuvenation(Mitigation):
    # the attribution runs on a gathered copy that only the main process holds under ZeRO-3
    max_zero_stage = 2

    def __init__(self, base_phase: str = "", alpha: float = 0.5, reset_fraction: float = 0.05, batches: int = 4,
                 at=("phase_start",)):
        if not 0 <= alpha <= 1 or not 0 <= reset_fraction <= 1 or batches < 1:
            raise ConfigError("rejuvenation: need 0 <= alpha <= 1, 0 <= reset_fraction <= 1, batches >= 1")
        if alpha < 1 and not base_phase:
            raise ConfigError("rejuvenation: base_phase (an earlier phase's name) is required when alpha < 1")
        self.base_phase, self.alpha, self.fraction, self.batches = base_phase, float(alpha), float(reset_fraction), int(batches)
        self.at = check_boundaries("rejuvenation", at)

    def check(self, trainer) -> None:
        super().check(trainer)
        names = list(trainer.cfg.phases)
        if self.base_phase and self.base_phase not in names:
            raise ConfigError(f"callbacks (rejuvenation): base_phase '{self.base_phase}' is not a phase of this run")
        for n in self.phases or names:
            if self.base_phase and names.index(n) <= names.index(self.base_phase):
                raise ConfigError(f"callbacks (rejuvenation): phase '{n}' does not come after base_phase "
                                  f"'{self.base_phase}' (scope it with phases: [...])")

    def _batches(self, trainer):
        """(batches for this rank, loss_fn). SFT: the phase's next training micro-batches, peeked (the stream is
        rewound, so training still sees them). Pretraining and RL: `batches` global micro-batches of held-out
        validation text (the phase's languages; for RL the run's pretraining languages), split across ranks as
        the trainer splits a batch; a pretraining phase's stream does not exist yet at its start."""
        runner, mb = trainer.runner, trainer.cfg.trainer.micro_batch_size
        if trainer.phase_cfg.kind == "sft":
            state = runner.state_dict()
            batches = [runner.next_batch() for _ in range(self.batches)]
            runner.load_state_dict(state)
            return batches, lambda m, b: runner.loss(m, b)[0]
        acc = trainer.accelerator
        langs = trainer.phase_cfg.languages if trainer.phase_cfg.kind == "pretrain" else pretraining_languages(trainer.cfg)
        rows = spread(validation_rows(trainer, list(langs), self.batches), self.batches * mb * acc.num_processes)
        share = rank_share_rows(rows, mb, acc.process_index, acc.num_processes)
        batches = [b if counts else b[:0] for b, counts in share]
        dev = acc.device

        def lm_loss(m, b):
            b = b.to(dev)
            if len(b) == 0:  # padding: contributes nothing, keeps ranks aligned
                return sum(p.sum() * 0 for p in m.parameters())
            return m(b[:, :-1], b[:, 1:])[1]
        return batches, lm_loss

    def apply(self, trainer, reason: str) -> None:
        access = self.access(trainer)
        model = trainer.unwrapped_model
        logs = {}
        if self.alpha < 1:
            path = Path(trainer.run_dir) / "phases" / self.base_phase / "model.safetensors"
            if not path.is_file():
                raise CheckpointError(f"rejuvenation: no export of phase '{self.base_phase}' at {path}")
            logs["rejuvenation/interpolated"] = float(interpolate(model, access, load_file(str(path)), self.alpha))
        if self.fraction > 0:
            copy = gathered_copy(trainer)
            batches, loss_fn = self._batches(trainer)
            acc = trainer.accelerator
            scores = attribution_scores(copy, batches, loss_fn,
                                        lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu())
            del copy
            chosen = reset_by_attribution(model, access, scores, self.fraction, self.seed(trainer), trainer.global_step)
            logs["rejuvenation/reset"] = float(sum(int(v.numel()) for v in chosen.values()))
        trainer.log(logs)
