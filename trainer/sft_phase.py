"""Supervised fine-tuning phase: instruction examples, loss on responses only.

The runner builds its training set once (deterministically from the run seed and the phase
name), packs it with `data.sft.pack_sft` (shifted inputs/targets, prompt targets -100) and
streams the packed rows with a resumable `RowStream`; every global micro-batch is sliced
across ranks exactly like pretraining, so N processes with micro-batch b see the rows one
process with micro-batch N*b would.

Evaluation (held-out `split="eval"` examples, disjoint from training by construction):
`sft/accuracy` and `sft/reward` come from greedy generation on the unwrapped model; every
rank computes the same numbers on the same examples (no collective), which is correct for
a single process and DDP. Generation-based evaluation under DeepSpeed ZeRO-3 is NOT
supported (ZeRO-3 parameters are partitioned, so an unwrapped-model generate would see
empty shards). `sft/val_loss` is the response-token mean loss over the packed eval rows;
its forward passes are split across ranks with the same count on every rank (as
`trainer.phases.mean_lm_loss` does) and reduced.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from data.packing import RowStream, iterate_eval_batches, rank_slice
from data.sft import IGNORE, evaluate as evaluate_generation, pack_sft
from data.tasks import Example, load_jsonl_examples, make_examples, split_examples
from trainer.errors import ConfigError
from trainer.phases import RUNNERS, PhaseRunner, Task, mean_loss, stable_seed


def needs_parallel(families) -> bool:
    return any(str(f).split(":", 1)[0].strip() == "translate" for f in families)


def load_parallel_for(trainer, families):
    """The parallel corpus, loaded only when a translate task is requested."""
    if not needs_parallel(families):
        return None
    from data.corpus import load_parallel

    return load_parallel(trainer.cfg.data.corpus_dir or None)


def build_examples(trainer, name: str, families, n: int, split: str, data_files=()) -> List[Example]:
    """Built-in examples (`make_examples`) + the `split` share of user jsonl files."""
    seed = trainer.cfg.trainer.seed
    out: List[Example] = []
    if families and n > 0:
        key = (seed, name) if split == "train" else (seed, name, "eval")
        out = make_examples(list(families), n, seed=stable_seed(*key),
                            parallel=load_parallel_for(trainer, families), split=split)
    for path in data_files:
        out.extend(split_examples(load_jsonl_examples(path, cache_dir=trainer.cfg.data.cache_dir), split))
    return out


class SFTRunner(PhaseRunner):
    """One task ("sft", `steps` optimizer steps) over packed instruction examples."""

    def __init__(self, trainer, name, cfg):
        super().__init__(trainer, name, cfg)
        s = cfg.sft
        tok = trainer.data.tokenizer
        block = trainer.model_cfg.block_size
        seed = trainer.cfg.trainer.seed
        train = build_examples(trainer, name, s.task_families, s.num_examples, "train", s.data_files)
        if not train:
            raise ConfigError(f"config key 'phases.{name}.sft': no training examples "
                              f"(task_families and data_files are both empty)")
        packed = pack_sft(tok, train, block)
        if packed.n_rows == 0:
            raise ConfigError(f"config key 'phases.{name}.sft': every example is longer than "
                              f"model.block_size={block}")
        self.n_train = packed.n_examples
        # inputs and targets travel together as one row of 2*block tokens
        self.stream = RowStream(torch.cat([packed["input_ids"], packed["labels"]], dim=1),
                                stable_seed(seed, name, "rows"))
        self.block = block
        eval_families = s.task_families if s.eval_examples > 0 else []
        # eval_examples built-in examples, then every eval-share example of the jsonl files
        self.eval_examples = build_examples(trainer, name, eval_families, s.eval_examples, "eval", s.data_files)
        if self.eval_examples:
            ev = pack_sft(tok, self.eval_examples, block, order="input")
            self.eval_rows = torch.cat([ev["input_ids"], ev["labels"]], dim=1)
        else:
            self.eval_rows = None

    def tasks(self) -> List[Task]:
        return [Task("sft", self.cfg.steps)]

    def next_batch(self) -> Dict[str, torch.Tensor]:
        acc = self.trainer.accelerator
        mb = self.trainer.cfg.trainer.micro_batch_size
        rows = rank_slice(self.stream.take(mb * acc.num_processes), acc.process_index, acc.num_processes)
        rows = rows.to(acc.device)
        return {"x": rows[:, :self.block], "y": rows[:, self.block:]}

    def tokens_in(self, batch) -> int:
        return int((batch["y"] != IGNORE).sum())  # trained (response) tokens

    def val_loss(self, model) -> float:
        """Response-token mean loss on the eval rows; same number of forwards on every rank."""
        tc = self.trainer.cfg.trainer
        batches = iterate_eval_batches(self.eval_rows, tc.micro_batch_size, max(tc.eval_batches, 1))
        return mean_loss(self.trainer, model, batches, split=lambda b: (b[:, :self.block], b[:, self.block:]))

    def evaluate(self, model) -> Dict[str, float]:
        if not self.eval_examples:
            return {}
        tok = self.trainer.data.tokenizer
        # identical on every rank: same examples, same weights, greedy decoding (no collectives)
        res = evaluate_generation(self.trainer.unwrapped_model, tok, self.eval_examples,
                                  self.cfg.sft.max_new_tokens)
        return {"sft/accuracy": res["accuracy"], "sft/reward": res["reward"], "sft/val_loss": self.val_loss(model)}

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


RUNNERS["sft"] = SFTRunner
