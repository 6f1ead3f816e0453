"""Tokenize with HF `datasets`, pack into fixed-length rows, and stream batches resumably.

Every batch is a pure function of (seed, position), and the position is a small dict that
goes into the checkpoint, so a resumed run sees exactly the batches an uninterrupted run
would.  Ranks take contiguous slices of one global micro-batch, which makes N processes
with micro-batch b see the same rows as one process with micro-batch N*b.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from datasets import Dataset, disable_progress_bars

from data.tokenizer import Tokenizer, texts_digest
from trainer.errors import DataError
from trainer.fileio import write_atomic


def tokenize_to_array(tok: Tokenizer, texts: Sequence[str], cache_dir: str | Path | None = None) -> np.ndarray:
    """All texts as one token stream, each document followed by EOS (int32), cached on disk."""
    key = texts_digest(hashlib.sha256(tok.fingerprint().encode()), texts)
    path = Path(cache_dir) / "tokens" / f"{key.hexdigest()[:20]}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    disable_progress_bars()  # one bar per language is noise in logs
    ds = Dataset.from_dict({"text": list(texts)})
    ds = ds.map(lambda b: {"ids": [ids + [tok.eos_id] for ids in tok.encode_batch(b["text"])]},
                batched=True, remove_columns=["text"], keep_in_memory=True)
    flat = np.fromiter((i for ids in ds["ids"] for i in ids), dtype=np.int32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: np.save(f, flat))  # parallel runs may fill the same entry at once
    return flat


def pack_rows(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut the stream into rows of seq_len+1 tokens (inputs and shifted targets share a row)."""
    n = len(tokens) // (seq_len + 1)
    if n == 0:
        raise DataError(f"only {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    return torch.from_numpy(tokens[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)


def split_rows(rows: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Last fraction of rows is validation (at least one row each side)."""
    n_val = max(1, int(round(len(rows) * val_fraction)))
    if len(rows) - n_val < 1:
        raise DataError(f"only {len(rows)} sequences: too few to split off validation")
    return rows[:-n_val], rows[-n_val:]


class RowStream:
    """Endless shuffled epochs over a fixed set of rows; state = (epoch, cursor)."""

    def __init__(self, rows: torch.Tensor, seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.rows), generator=g)

    def take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.cursor >= len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            k = min(n, len(self.rows) - self.cursor)
            out.append(self.rows[self._perm[self.cursor:self.cursor + k]])
            self.cursor += k
            n -= k
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)


class MixtureStream:
    """Rows drawn from several named RowStreams with fixed weights.

    Each global batch's per-source row counts come from a generator seeded by
    (seed, batch counter), so the mixture is reproducible and resumable; rows are then
    shuffled within the batch so every rank sees the mixture.
    """

    def __init__(self, streams: Dict[str, RowStream], weights: Sequence[float], seed: int):
        if len(streams) != len(weights):
            raise DataError("mixture needs one weight per source")
        self.streams, self.seed, self.counter = streams, seed, 0
        w = torch.tensor(list(weights), dtype=torch.float64)
        self.weights = w / w.sum()

    def take(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.counter)
        self.counter += 1
        picks = torch.multinomial(self.weights, n, replacement=True, generator=g)
        counts = torch.bincount(picks, minlength=len(self.streams)).tolist()
        rows = torch.cat([s.take(c) for s, c in zip(self.streams.values(), counts) if c > 0])
        return rows[torch.randperm(n, generator=g)]

    def state_dict(self) -> dict:
        return {"counter": self.counter, "streams": {k: s.state_dict() for k, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])
        for k, s in self.streams.items():
            s.load_state_dict(state["streams"][k])


def rank_slice(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Contiguous share of one global micro-batch for this rank."""
    per = len(global_batch) // world
    return global_batch[rank * per:(rank + 1) * per]


def rank_share(batches: Sequence, rank: int, world: int) -> List[tuple]:
    """This rank's share of a fixed list of batches: [(batch, counts)], strided over ranks and padded with
    (batches[0], False) so that every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively in each one); padding batches must not be counted."""
    per_rank = -(-len(batches) // world)
    share = []
    for i in range(per_rank):
        j = rank + i * world
        share.append((batches[j], True) if j < len(batches) else (batches[0], False))
    return share


def rank_share_rows(rows, batch_size: int, rank: int, world: int) -> List[tuple]:
    """rank_share of ``rows`` cut into consecutive batches of ``batch_size`` rows."""
    return rank_share([rows[i:i + batch_size] for i in range(0, len(rows), batch_size)], rank, world)


def iterate_eval_batches(rows: torch.Tensor, batch_size: int, max_batches: int) -> List[torch.Tensor]:
    """Fixed, unshuffled validation batches (the same every evaluation)."""
    return [rows[i:i + batch_size] for i in range(0, min(len(rows), batch_size * max_batches), batch_size)]
