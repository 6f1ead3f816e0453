"""ReDo, Recycling Dormant neurons (Sokar, Agarwal, Castro & Evci 2023, "The dormant neuron
phenomenon in deep reinforcement learning").

Every ``every`` steps and/or at boundaries (``at``), the MLP hidden units' ReDo scores
s_i = E|h_i| / mean_k E|h_k| are measured on ``measure_batches`` micro-batches of held-out
rows (the current task's language in a continual pretraining phase, every pretraining
language otherwise) with the instruments' NeuronHooks, all-reduced across ranks.  Units with
s_i ≤ τ get fresh incoming weights (``mlp.reinit_incoming``'s distribution, biases 0),
zero outgoing weights, and zeroed Adam moments for exactly those rows/columns.
"""
from __future__ import annotations

from typing import Dict

import torch

from trainer.callbacks import register
from trainer.errors import ConfigError
from trainer.instruments.callback import pretraining_languages, validation_rows
from mitigations.base import Mitigation, check_boundaries
from mitigations.neurons import dormancy_scores, generator, mlps, reset_units
from mitigations.state_access import StateAccess


def measurement_rows(trainer, batches: int) -> torch.Tensor:
    """`batches` global micro-batches of validation rows: the current task's language in a
    continual pretraining phase, spread over every pretraining language otherwise."""
    p = trainer.phase_cfg
    if p.kind == "pretrain" and p.mode == "continual" and trainer.tasks:
        langs = [trainer.task_name or p.languages[0]]
    else:
        langs = pretraining_languages(trainer.cfg)
    return validation_rows(trainer, langs, max(1, -(-batches // len(langs))))


def redo_reset(model, access: StateAccess, scores: Dict[int, torch.Tensor], tau: float, seed: int,
               step: int) -> Dict[int, torch.Tensor]:
    """Reset units with score ≤ tau in each layer; returns {layer: reset indices}."""
    out = {}
    for i, mlp in enumerate(mlps(model)):
        s = scores.get(i)
        if s is None:
            continue
        idx = torch.nonzero(s <= tau).flatten()
        reset_units(access, mlp, idx, generator(seed, "redo", step, i))
        out[i] = idx
    return out


@register("redo")
class ReDo(Mitigation):
    def __init__(self, tau: float = 0.1, every: int = 1000, at=("task_end",), measure_batches: int = 4):
        if tau < 0 or every < 0 or measure_batches < 1:
            raise ConfigError("redo: tau and every must be >= 0, measure_batches >= 1")
        self.tau, self.every, self.measure_batches = float(tau), int(every), int(measure_batches)
        self.at = check_boundaries("redo", at)
        self.total_reset = 0

    def apply(self, trainer, reason: str) -> None:
        acc = trainer.accelerator
        rows = measurement_rows(trainer, self.measure_batches)
        scores = dormancy_scores(trainer.model, rows, trainer.cfg.trainer.micro_batch_size, acc.device,
                                 acc.process_index, acc.num_processes)
        done = redo_reset(trainer.unwrapped_model, self.access(trainer), scores, self.tau, self.seed(trainer),
                          trainer.global_step)
        n = sum(int(v.numel()) for v in done.values())
        total = sum(int(s.numel()) for s in scores.values())
        self.total_reset += n
        trainer.log({"redo/reset": float(n), "redo/reset_ratio": n / max(1, total),
                     "redo/total_reset": float(self.total_reset)})

    def state_dict(self) -> dict:
        return {"total_reset": torch.tensor(self.total_reset)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.total_reset = int(state["total_reset"])
