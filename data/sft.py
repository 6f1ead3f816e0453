"""Examples -> supervised fine-tuning tensors (loss only on responses), plus greedy accuracy evaluation.

Where the next-token shift happens
----------------------------------
``encode_example`` is UNSHIFTED: ``ids`` and ``labels`` have the same length and ``labels[t]`` is either
-100 or ``ids[t]`` (the token itself). ``pack_sft`` applies the shift, per example, before packing:

    inputs  = ids[:-1]        # bos, prompt..., response...   (the final EOS is never an input)
    targets = labels[1:]      # prompt -> -100, response... and EOS -> themselves

so ``input_ids[r, t]`` is trained to predict ``labels[r, t]`` and the model's forward must NOT shift again
(``model(input_ids, targets=labels)`` with a plain cross-entropy over positions, -100 ignored). Because
every target comes from the same example as its input, no loss ever crosses an example boundary; the
first target of each example (after its BOS) is a prompt token, hence -100.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, insort
from collections import defaultdict
from typing import Sequence

import torch

from data.tasks import Example, task_for

log = logging.getLogger(__name__)

IGNORE = -100


def encode_example(tok, ex: Example) -> tuple[list[int], list[int]]:
    """ids = [bos] + encode(prompt) + encode(answer) + [eos]; labels = -100 on bos and prompt tokens,
    the token id itself on response tokens and on eos. Unshifted (see the module docstring)."""
    p = list(tok.encode(ex.prompt))
    r = list(tok.encode(ex.answer))
    ids = [tok.bos_id] + p + r + [tok.eos_id]
    labels = [IGNORE] * (1 + len(p)) + r + [tok.eos_id]
    return ids, labels


def prompt_ids(tok, ex: Example) -> list[int]:
    """What the model is given at evaluation time: [bos] + encode(prompt) (same as in encode_example)."""
    return [tok.bos_id] + list(tok.encode(ex.prompt))


class PackedSFT(dict):
    """dict(input_ids=LongTensor[N, block_size], labels=LongTensor[N, block_size]) with packing stats as
    attributes: n_examples (packed), n_dropped (longer than the block), n_rows, n_target_tokens,
    rows (for each row, the indices into ``examples`` packed into it, in order)."""

    n_examples: int = 0
    n_dropped: int = 0
    n_rows: int = 0
    n_target_tokens: int = 0
    rows: list = []
    _used: int = 0

    @property
    def fill(self) -> float:
        """Fraction of positions holding a real (non-pad) input token."""
        ids = self["input_ids"]
        return float(self._used) / ids.numel() if ids.numel() else 0.0


def pack_sft(tok, examples: Sequence[Example], block_size: int, order: str = "decreasing") -> PackedSFT:
    """Pack shifted examples into rows of ``block_size`` positions with best-fit: each example goes into the
    existing row with the least room that still fits it (ties -> lowest row), otherwise into a new row.
    order="decreasing" (default) places examples longest first (stable sort: best-fit decreasing, the
    densest); order="input" places them in the given order (online best-fit; rows then list examples in
    input order). Deterministic either way. An example needs len(ids) - 1 positions (its last EOS is only
    a target); longer ones are dropped, counted in ``n_dropped`` and logged. Padding: input pad_id,
    label -100. Rows are in creation order; shuffle them in the data loader."""
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if order not in ("decreasing", "input"):
        raise ValueError(f"order must be 'decreasing' or 'input', got {order!r}")
    block_size = int(block_size)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    segments = []  # (example index, inputs, targets)
    dropped = 0
    for i, ex in enumerate(examples):
        ids, labels = encode_example(tok, ex)
        if len(ids) - 1 > block_size:
            dropped += 1
            continue
        segments.append((i, ids[:-1], labels[1:]))
    if dropped:
        log.warning("pack_sft: dropped %d of %d examples longer than block_size=%d (+1 for the final EOS)",
                    dropped, len(examples), block_size)

    placement = range(len(segments))
    if order == "decreasing":
        placement = sorted(placement, key=lambda si: -len(segments[si][1]))
    rows: list[list[int]] = []  # segment indices per row
    free: list[tuple[int, int]] = []  # sorted (remaining space, row index)
    for si in placement:
        need = len(segments[si][1])
        k = bisect_left(free, (need, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = block_size, len(rows)
            rows.append([])
        rows[r].append(si)
        if room - need > 0:
            insort(free, (room - need, r))

    input_ids = torch.full((len(rows), block_size), pad, dtype=torch.long)
    targets = torch.full((len(rows), block_size), IGNORE, dtype=torch.long)
    used = 0
    for r, segs in enumerate(rows):
        inp = [t for si in segs for t in segments[si][1]]
        tgt = [t for si in segs for t in segments[si][2]]
        input_ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        targets[r, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        used += len(inp)

    out = PackedSFT(input_ids=input_ids, labels=targets)
    out.n_examples = len(segments)
    out.n_dropped = dropped
    out.n_rows = len(rows)
    out.n_target_tokens = int((targets != IGNORE).sum())
    out.rows = [[segments[si][0] for si in segs] for segs in rows]
    out._used = used
    return out


# ------------------------------------------------------------------------------------------ evaluation
def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def generate_completions(model, tok, examples: Sequence[Example], max_new_tokens: int,
                         batch_size: int = 32) -> list[str]:
    """Greedy continuations (decoded, cut at the first EOS id) for each example's [bos] + prompt.
    Prompts are batched only with prompts of the same token length, so no padding is ever needed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model)
    prompts = [prompt_ids(tok, ex) for ex in examples]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    completions: list[str] = [""] * len(examples)
    for length in sorted(by_len):
        idxs = by_len[length]
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            out = model.generate(idx, max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
            for row, i in enumerate(chunk):
                new = out[row, length:].tolist()
                if tok.eos_id in new:
                    new = new[:new.index(tok.eos_id)]
                completions[i] = tok.decode(new)
    return completions


def evaluate(model, tok, examples: Sequence[Example], max_new_tokens: int, batch_size: int = 32) -> dict:
    """Greedy generation + task checkers. Returns {"accuracy", "reward" (mean), "n", "per_task":
    {task: accuracy}, "completions"}. Empty input -> accuracy/reward 0.0."""
    was_training = getattr(model, "training", None)
    if hasattr(model, "eval"):
        model.eval()
    try:
        completions = generate_completions(model, tok, examples, max_new_tokens, batch_size)
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    correct = []
    rewards = []
    per_task: dict[str, list[bool]] = defaultdict(list)
    for ex, c in zip(examples, completions):
        task = task_for(ex)
        ok = task.check(c, ex)
        correct.append(ok)
        rewards.append(task.reward(c, ex))
        per_task[ex.meta.get("task", task.name)].append(ok)
    n = len(examples)
    return {
        "accuracy": sum(correct) / n if n else 0.0,
        "reward": sum(rewards) / n if n else 0.0,
        "n": n,
        "per_task": {k: sum(v) / len(v) for k, v in per_task.items()},
        "completions": completions,
    }


def evaluate_accuracy(model, tok, examples: Sequence[Example], max_new_tokens: int, batch_size: int = 32) -> float:
    """Fraction of examples whose greedy completion passes the task checker (0.0 for no examples)."""
    return evaluate(model, tok, examples, max_new_tokens, batch_size)["accuracy"]
