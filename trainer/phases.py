"""Phase runners: what a phase trains on, its task boundaries, its loss and its evaluation.

The training loop (trainer/loop.py) is the same for every phase; a runner supplies
`tasks()` (the boundaries inside the phase), `next_batch()`, `loss()`, `evaluate()` and a
JSON-able `state_dict()` holding its data position.  `RUNNERS` maps a phase `kind` to its
runner class; SFT and RL register themselves from their own modules.
"""
from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from data.packing import MixtureStream, RowStream, iterate_eval_batches, rank_share, rank_slice
from trainer.config import PhaseConfig


@dataclass
class Task:
    name: str
    steps: int


def stable_seed(*parts) -> int:
    """A seed derived from names and numbers, identical across processes and runs."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def lm_split(batch: torch.Tensor):
    """A packed row holds inputs and targets shifted by one."""
    return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def mean_loss(trainer, model, batches: List[torch.Tensor], split=lm_split) -> float:
    """Mean loss per target token (targets of -100 do not count) over fixed batches,
    split across ranks and reduced.

    Every rank runs the same number of forward passes (padding with zero-weight repeats),
    which ZeRO-3 needs since each forward gathers parameters collectively.
    """
    acc = trainer.accelerator
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for batch, counts in rank_share(batches, acc.process_index, acc.num_processes):
        x, y = split(batch.to(acc.device))
        _, loss = model(x, y)
        weight = float((y != -100).sum()) if counts else 0.0
        total += torch.tensor([loss.double().item() * weight, weight], dtype=torch.float64, device=acc.device)
    total = acc.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def mean_lm_loss(trainer, model, rows: torch.Tensor, batch_size: int, max_batches: int) -> float:
    return mean_loss(trainer, model, iterate_eval_batches(rows, batch_size, max_batches))


class PhaseRunner:
    def __init__(self, trainer, name: str, cfg: PhaseConfig):
        self.trainer, self.name, self.cfg = trainer, name, cfg

    def tasks(self) -> List[Task]:
        raise NotImplementedError

    def start_task(self, idx: int) -> None: ...

    def next_batch(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        _, loss = model(batch["x"], batch["y"])
        return loss, {}

    def evaluate(self, model) -> Dict[str, float]:
        return {}

    def tokens_in(self, batch) -> int:
        return int(batch["x"].numel())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class PretrainRunner(PhaseRunner):
    """Continual: one language per task (cycled). Stationary: the mix, a boundary every K steps.

    `replay_fraction` (set by the replay mitigation) mixes rows of earlier tasks'
    languages into continual tasks.
    """

    def __init__(self, trainer, name, cfg):
        super().__init__(trainer, name, cfg)
        seed = trainer.cfg.trainer.seed
        self.streams = {lang: RowStream(trainer.data.rows(lang)[0], stable_seed(seed, name, lang))
                        for lang in cfg.languages}
        self.replay_fraction = 0.0
        self.source = None
        self.task_idx = 0
        self._mix_counter = 0

    def tasks(self) -> List[Task]:
        n = len(self.cfg.languages) * self.cfg.cycles
        if self.cfg.mode == "continual":
            return [Task(self.cfg.languages[i % len(self.cfg.languages)], self.cfg.steps_per_task) for i in range(n)]
        return [Task(f"mix{i}", self.cfg.steps_per_task) for i in range(n)]

    def _mixture(self, idx: int) -> MixtureStream:
        langs = self.cfg.languages
        if self.cfg.mode == "stationary":
            weights = list(self.cfg.weights) or [1.0] * len(langs)
            return MixtureStream(self.streams, weights, stable_seed(self.trainer.cfg.trainer.seed, self.name, "mix"))
        current = langs[idx % len(langs)]
        earlier = [l for l in dict.fromkeys(langs[j % len(langs)] for j in range(idx)) if l != current]
        f = self.replay_fraction if earlier else 0.0
        sources = {current: self.streams[current], **{l: self.streams[l] for l in earlier}}
        weights = [1.0 - f] + [f / len(earlier)] * len(earlier) if earlier else [1.0]
        return MixtureStream(sources, weights, stable_seed(self.trainer.cfg.trainer.seed, self.name, "task", idx))

    def start_task(self, idx: int) -> None:
        # A stationary phase keeps one mixture across boundaries; a continual task gets its own.
        if self.source is None or self.cfg.mode == "continual":
            resumed = self.cfg.mode == "stationary" or idx == self.task_idx
            self.source = self._mixture(idx)
            self.source.counter = self._mix_counter if resumed else 0
            self._mix_counter = 0
        self.task_idx = idx

    def next_batch(self):
        acc = self.trainer.accelerator
        mb = self.trainer.cfg.trainer.micro_batch_size
        rows = rank_slice(self.source.take(mb * acc.num_processes), acc.process_index, acc.num_processes)
        rows = rows.to(acc.device)
        return {"x": rows[:, :-1], "y": rows[:, 1:]}

    def evaluate(self, model) -> Dict[str, float]:
        tc = self.trainer.cfg.trainer
        out = {f"val/{lang}": mean_lm_loss(self.trainer, model, self.trainer.data.rows(lang)[1],
                                           tc.micro_batch_size, tc.eval_batches)
               for lang in self.cfg.languages}
        out["val/mean"] = sum(out.values()) / len(out)
        return out

    def state_dict(self) -> dict:
        return {"streams": {k: s.state_dict() for k, s in self.streams.items()},
                "task_idx": self.task_idx, "mix_counter": self.source.counter if self.source else 0}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.streams.items():
            s.load_state_dict(state["streams"][k])
        self.task_idx = int(state["task_idx"])
        self._mix_counter = int(state["mix_counter"])


RUNNERS = {"pretrain": PretrainRunner}
_RUNNER_MODULES = {"sft": "trainer.sft_phase", "rl": "trainer.rl_phase"}  # register on import


def get_runner(kind: str):
    if kind not in RUNNERS:
        importlib.import_module(_RUNNER_MODULES[kind])
    return RUNNERS[kind]
