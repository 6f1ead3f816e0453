"""Built-in instruction tasks with checkable answers, for SFT and RL.

Every task family generates examples deterministically from a ``random.Random`` that the caller passes
in (the global RNG is never used), and has a checker (``check``: exact match) and a reward
(``reward``: 1.0 exactly when ``check`` passes, otherwise partial credit strictly below 1).

Prompt format (the same for every built-in task; see docs/tasks.md)::

    prompt = "Q: 12+7=\\nA:"        answer = " 19"        (the SFT encoder appends EOS)

Public API:
    Example, Task, TASKS, get_task, make_examples, load_jsonl_examples, split_examples,
    clean_completion, normalize_ws, check, reward, task_for, split_of, format_prompt
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from trainer.errors import ConfigError, DataError

PROMPT_TEMPLATE = "Q: {query}\nA:"
ANSWER_TEMPLATE = " {answer}"

# Text markers an end-of-sequence token may decode to; a completion is cut at the first one (and at the
# first newline for single-line answers). evaluate_accuracy also cuts at the EOS *id* before decoding.
EOS_MARKERS = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]")

SPLITS = ("train", "eval")
DEFAULT_EVAL_FRACTION = 0.1
PARTIAL_WEIGHT = 0.5  # wrong answers earn at most PARTIAL_WEIGHT * similarity (< 1)


@dataclass
class Example:
    """One prompt/answer pair. ``answer`` is the response text exactly as trained on (leading space
    included, EOS not included). ``meta`` holds at least ``task`` (the checker's family), ``target``
    (the answer without the leading space) and ``group`` (the key used for the train/eval split)."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


def format_prompt(query: str) -> str:
    return PROMPT_TEMPLATE.format(query=query)


def format_answer(answer: str) -> str:
    return ANSWER_TEMPLATE.format(answer=answer)


def normalize_ws(text: str) -> str:
    """Collapse runs of whitespace to one space and strip both ends."""
    return " ".join(text.split())


def clean_completion(text: str, stop_at_newline: bool = True, eos_markers: Sequence[str] = EOS_MARKERS) -> str:
    """Raw decoded continuation -> the answer the model gave: cut at the first EOS marker and (by default)
    the first newline, then strip spaces."""
    cut = len(text)
    for marker in eos_markers:
        i = text.find(marker)
        if i != -1:
            cut = min(cut, i)
    text = text[:cut]
    if stop_at_newline:
        text = text.split("\n", 1)[0]
    return text.strip()


def split_of(key: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> str:
    """Stable (process- and platform-independent) assignment of a key to "train" or "eval"."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return "eval" if h / 2.0**64 < eval_fraction else "train"


def _check_split(split: str, eval_fraction: float) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")


# ----------------------------------------------------------------------------------------- similarity
def positional_similarity(pred: str, target: str, align: str = "left") -> float:
    """Fraction of aligned positions with equal characters over the longer length (1.0 iff equal)."""
    if not pred and not target:
        return 1.0
    n = max(len(pred), len(target))
    if align == "right":
        pred, target = pred[::-1], target[::-1]
    return sum(a == b for a, b in zip(pred, target)) / n


def char_f1(pred: str, target: str) -> float:
    """Bag-of-characters F1 (spaces ignored)."""
    p, t = Counter(pred.replace(" ", "")), Counter(target.replace(" ", ""))
    if not p and not t:
        return 1.0
    overlap = sum((p & t).values())
    if overlap == 0:
        return 0.0
    prec, rec = overlap / sum(p.values()), overlap / sum(t.values())
    return 2 * prec * rec / (prec + rec)


# ----------------------------------------------------------------------------------------------- tasks
class Task:
    """A task family. Subclasses implement ``sample`` (and usually ``similarity``)."""

    name: str = "task"
    stop_at_newline: bool = True
    partial_weight: float = PARTIAL_WEIGHT
    max_tries: int = 10_000  # rejection-sampling budget for split-aware sampling

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def _example(self, query: str, target: str, group: str | None = None, **meta) -> Example:
        prompt = format_prompt(query)
        return Example(prompt, format_answer(target),
                       {"task": self.name, "target": target, "group": group or f"{self.name}|{prompt}", **meta})

    def sample_split(self, rng: random.Random, split: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> Example:
        """Sample until the example's group key falls in ``split`` (see split_of)."""
        for _ in range(self.max_tries):
            ex = self.sample(rng)
            if split_of(ex.meta["group"], eval_fraction) == split:
                ex.meta["split"] = split
                return ex
        raise DataError(f"task {self.name!r}: no {split} example found in {self.max_tries} draws "
                        f"(prompt space too small for eval_fraction={eval_fraction})")

    # -- checking
    @staticmethod
    def target(ex: Example) -> str:
        return ex.meta.get("target", ex.answer.strip())

    def prediction(self, completion: str, ex: Example) -> str:
        stop = self.stop_at_newline and "\n" not in self.target(ex)
        return normalize_ws(clean_completion(completion, stop_at_newline=stop))

    def check(self, completion: str, ex: Example) -> bool:
        return self.prediction(completion, ex) == normalize_ws(self.target(ex))

    def similarity(self, pred: str, target: str) -> float:
        return positional_similarity(pred, target)

    def reward(self, completion: str, ex: Example) -> float:
        """1.0 iff check passes, else partial_weight * similarity (in [0, partial_weight])."""
        if self.check(completion, ex):
            return 1.0
        pred, tgt = self.prediction(completion, ex), normalize_ws(self.target(ex))
        return float(min(max(self.partial_weight * self.similarity(pred, tgt), 0.0), self.partial_weight))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _int_with_digits(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


class AddTask(Task):
    """"Q: 12+7=\\nA:" -> " 19". Each operand has a uniform number of digits in 1..max_digits.
    Partial credit: digits matching right-aligned. The split key is the unordered operand pair, so
    "3+4" and "4+3" always land in the same split."""

    name = "add"

    def __init__(self, max_digits: int = 3):
        if int(max_digits) < 1:
            raise ConfigError(f"add: max_digits must be >= 1, got {max_digits!r}")
        self.max_digits = int(max_digits)

    def sample(self, rng):
        a = _int_with_digits(rng, rng.randint(1, self.max_digits))
        b = _int_with_digits(rng, rng.randint(1, self.max_digits))
        lo, hi = min(a, b), max(a, b)
        return self._example(f"{a}+{b}=", str(a + b), group=f"add|{lo}+{hi}", a=a, b=b)

    def similarity(self, pred, target):
        return positional_similarity(pred, target, align="right")


class _StringTask(Task):
    alphabet = string.ascii_lowercase

    def __init__(self, max_len: int = 8, min_len: int = 3):
        if not 1 <= int(min_len) <= int(max_len):
            raise ConfigError(f"{self.name}: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.min_len, self.max_len = int(min_len), int(max_len)

    def _string(self, rng, alphabet=None):
        alphabet = alphabet or self.alphabet
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))

    def transform(self, s: str) -> str:
        raise NotImplementedError

    def sample(self, rng):
        s = self._string(rng)
        return self._example(f"{self.name} {s}", self.transform(s), source=s)


class ReverseTask(_StringTask):
    """"Q: reverse abc\\nA:" -> " cba" (lowercase letters)."""

    name = "reverse"

    def transform(self, s):
        return s[::-1]


class CopyTask(_StringTask):
    """"Q: copy abc\\nA:" -> " abc" (repeat the string once)."""

    name = "copy"

    def transform(self, s):
        return s


class SortTask(_StringTask):
    """"Q: sort dbca\\nA:" -> " abcd" or "Q: sort 3142\\nA:" -> " 1234" (letters or digits, 50/50)."""

    name = "sort"

    def transform(self, s):
        return "".join(sorted(s))

    def sample(self, rng):
        s = self._string(rng, string.ascii_lowercase if rng.random() < 0.5 else string.digits)
        return self._example(f"sort {s}", self.transform(s), source=s)


def mine_pairs(parallel: Iterable[dict], src: str | None = None, tgt: str | None = None,
               max_chars: int = 80) -> list[tuple]:
    """Translation pairs from a parallel corpus (dicts like {"id":.., "en":.., "fr":.., "de":..}).
    Returns (row_id, src_lang, tgt_lang, src_text, tgt_text) tuples, in corpus order, for every ordered
    language pair (or just src->tgt) where both sides are non-empty strings of <= max_chars characters
    after whitespace normalization. Duplicate (src_lang, src_text) keep the first occurrence."""
    out, seen = [], set()
    for i, row in enumerate(parallel):
        if not isinstance(row, dict):
            raise DataError(f"parallel corpus: row {i} is {type(row).__name__}, expected a dict")
        rid = str(row.get("id", i))
        texts = {k: normalize_ws(v) for k, v in row.items() if k != "id" and isinstance(v, str)}
        texts = {k: v for k, v in texts.items() if 0 < len(v) <= max_chars}
        langs = sorted(texts)
        for s in langs:
            for t in langs:
                if s == t or (src is not None and s != src) or (tgt is not None and t != tgt):
                    continue
                if (s, t, texts[s]) in seen:
                    continue
                seen.add((s, t, texts[s]))
                out.append((rid, s, t, texts[s], texts[t]))
    return out


class TranslateTask(Task):
    """"Q: translate en to fr: Good morning.\\nA:" -> " Bonjour." with pairs mined from a parallel corpus.
    The split is by group of corpus rows (rows sharing any text are one group), so no paragraph appears in
    both train and eval in any direction.
    Partial credit: bag-of-characters F1."""

    name = "translate"

    def __init__(self, parallel: Sequence[dict] | None = None, src: str | None = None, tgt: str | None = None,
                 max_chars: int = 80):
        self.src, self.tgt, self.max_chars = src, tgt, int(max_chars)
        self.parallel = parallel
        self.pairs = mine_pairs(parallel, src, tgt, self.max_chars) if parallel is not None else None
        self._split_pools: dict = {}
        self._groups = None

    def with_parallel(self, parallel: Sequence[dict]) -> "TranslateTask":
        return TranslateTask(parallel, self.src, self.tgt, self.max_chars)

    def _pool(self, split: str | None, eval_fraction: float) -> list[tuple]:
        if self.pairs is None:
            raise DataError("task 'translate' needs a parallel corpus: pass parallel=[{'id':..,'en':..,'fr':..}, ..]")
        if not self.pairs:
            want = f"{self.src or '*'}->{self.tgt or '*'}"
            raise DataError(f"task 'translate': parallel corpus has no {want} pairs with both sides "
                            f"<= {self.max_chars} chars")
        if split is None:
            return self.pairs
        key = (split, eval_fraction)
        if key not in self._split_pools:
            # Rank row groups by hash; the first ceil(frac * n_groups) go to eval (at least one, and at least
            # one group stays in train when there are two or more), so tiny corpora still get both splits.
            group = self._row_groups()
            ids = sorted(set(group.values()),
                         key=lambda r: hashlib.blake2b(f"translate|{r}".encode(), digest_size=8).digest())
            n_eval = min(max(1, math.ceil(eval_fraction * len(ids))), max(len(ids) - 1, 1))
            eval_ids = set(ids[:n_eval])
            pool = [p for p in self.pairs if (group[p[0]] in eval_ids) == (split == "eval")]
            if not pool:
                raise DataError(f"task 'translate': parallel corpus too small for a {split} split "
                                f"({len(ids)} usable row groups)")
            self._split_pools[key] = pool
        return self._split_pools[key]

    def _row_groups(self) -> dict:
        """row id -> its group's smallest row id. Rows that share a text in any language (the same paragraph
        on several help pages) are one group, so no text can land in both splits."""
        if self._groups is None:
            parent: dict = {}

            def find(r):
                while parent.setdefault(r, r) != r:
                    parent[r] = parent[parent[r]]
                    r = parent[r]
                return r
            first_row = {}  # (lang, text) -> the first row that has it
            for rid, s, t, s_text, t_text in self.pairs:
                for key in ((s, s_text), (t, t_text)):
                    a, b = find(rid), find(first_row.setdefault(key, rid))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
            self._groups = {r: find(r) for r in list(parent)}
        return self._groups

    def _make(self, pair) -> Example:
        rid, s, t, s_text, t_text = pair
        return self._example(f"translate {s} to {t}: {s_text}", t_text, group=f"translate|{self._row_groups()[rid]}",
                             id=rid, src=s, tgt=t)

    def sample(self, rng):
        return self._make(rng.choice(self._pool(None, DEFAULT_EVAL_FRACTION)))

    def sample_split(self, rng, split, eval_fraction=DEFAULT_EVAL_FRACTION):
        ex = self._make(rng.choice(self._pool(split, eval_fraction)))
        ex.meta["split"] = split
        return ex

    def similarity(self, pred, target):
        return char_f1(pred, target)


class JsonlTask(Task):
    """Checker for user-supplied prompt/response examples: exact match after whitespace normalization.
    The completion is cut at the first newline only when the reference response is a single line."""

    name = "jsonl"

    def sample(self, rng):
        raise DataError("task 'jsonl' cannot generate examples; load them with load_jsonl_examples(path)")

    def similarity(self, pred, target):
        return char_f1(pred, target)


TASKS: dict[str, Task] = {
    "add": AddTask(),
    "reverse": ReverseTask(),
    "sort": SortTask(),
    "copy": CopyTask(),
    "translate": TranslateTask(),
}
_JSONL = JsonlTask()


def get_task(spec: "str | Task", parallel: Sequence[dict] | None = None) -> Task:
    """A Task from a name or "name:arg" spec: "add:5" (max_digits), "reverse:10" / "sort:10" / "copy:10"
    (max_len), "translate:en-fr" (direction). "translate" needs ``parallel``. Task instances pass through
    (a corpus-less TranslateTask gets bound to ``parallel``)."""
    if isinstance(spec, Task):
        if isinstance(spec, TranslateTask) and spec.pairs is None and parallel is not None:
            return spec.with_parallel(parallel)
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"task spec must be a string, got {spec!r}")
    name, _, arg = spec.partition(":")
    name, arg = name.strip(), arg.strip()
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    try:
        if name == "add":
            return AddTask(int(arg)) if arg else TASKS["add"]
        if name in ("reverse", "sort", "copy"):
            return type(TASKS[name])(max_len=int(arg)) if arg else TASKS[name]
    except ValueError:
        raise ConfigError(f"task spec {spec!r}: argument must be an integer") from None
    # translate
    src = tgt = None
    if arg:
        src, sep, tgt = arg.partition("-")
        if not sep or not src or not tgt:
            raise ConfigError(f"task spec {spec!r}: expected translate:SRC-TGT, e.g. translate:en-fr")
    if parallel is None:
        raise DataError(f"task {spec!r} needs a parallel corpus: pass parallel=[{{'id':..,'en':..,'fr':..}}, ..]")
    return TranslateTask(parallel, src, tgt)


def task_for(ex: Example) -> Task:
    """The checker for an example (by ex.meta["task"]; unknown/missing -> exact-match jsonl checker)."""
    return TASKS.get(ex.meta.get("task"), _JSONL)


def check(completion: str, ex: Example) -> bool:
    return task_for(ex).check(completion, ex)


def reward(completion: str, ex: Example) -> float:
    return task_for(ex).reward(completion, ex)


def make_examples(task_names: Sequence["str | Task"], n: int, seed: int, parallel: Sequence[dict] | None = None,
                  split: str = "train", eval_fraction: float = DEFAULT_EVAL_FRACTION) -> list[Example]:
    """n examples mixing the tasks round-robin (example i comes from task_names[i % len(task_names)]).

    Deterministic: each task draws from its own ``random.Random(f"{seed}|{split}|{i}|{spec}")`` stream,
    so the same arguments always give the same list. Train and eval are disjoint by construction: every
    example's ``meta["group"]`` key is assigned to one split by a stable hash (split_of) and each split
    only keeps its own keys (translate: by corpus row id)."""
    _check_split(split, eval_fraction)
    if isinstance(task_names, (str, Task)):
        task_names = [task_names]
    if not task_names:
        raise ConfigError("make_examples: task_names is empty")
    if int(n) < 0:
        raise ConfigError(f"make_examples: n must be >= 0, got {n!r}")
    tasks = [get_task(t, parallel) for t in task_names]
    rngs = [random.Random(f"{seed}|{split}|{i}|{t if isinstance(t, str) else t.name}")
            for i, t in enumerate(task_names)]
    return [tasks[i % len(tasks)].sample_split(rngs[i % len(tasks)], split, eval_fraction) for i in range(int(n))]


def split_examples(examples: Sequence[Example], split: str,
                   eval_fraction: float = DEFAULT_EVAL_FRACTION) -> list[Example]:
    """Keep the examples whose group key (default: the prompt) hashes into ``split``; useful to carve a
    disjoint eval set out of user jsonl data."""
    _check_split(split, eval_fraction)
    return [ex for ex in examples if split_of(ex.meta.get("group", ex.prompt), eval_fraction) == split]


def load_jsonl_examples(path: str, prompt_field: str = "prompt", response_field: str = "response",
                        cache_dir: str | None = None) -> list[Example]:
    """User examples from a jsonl file of {"prompt": ..., "response": ...} records, read with HF datasets.
    Prompt and response are used verbatim (no template is applied; start the response with a space if
    your prompt ends with "A:"). Checked with exact match after whitespace normalization.
    Raises DataError naming the file (and field) when the file is missing/unreadable or a field is absent."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: jsonl file not found")
    with open(path, "rb") as fh:
        if not fh.read(1 << 16).strip():
            raise DataError(f"{path}: no records (empty file)")
    try:
        import datasets
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for malformed files
        root = e  # the innermost cause usually says what is wrong (e.g. pyarrow's "JSON parse error: ...")
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        text = str(root).strip() or str(e).strip()
        msg = text.splitlines()[0] if text else type(root).__name__
        raise DataError(f"{path}: cannot read as JSON lines ({msg})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no records")
    for f in (prompt_field, response_field):
        if f not in ds.column_names:
            raise DataError(f"{path}: missing field {f!r} (found: {', '.join(ds.column_names) or 'none'})")
    out = []
    for i, (p, r) in enumerate(zip(ds[prompt_field], ds[response_field])):
        for f, v in ((prompt_field, p), (response_field, r)):
            if not isinstance(v, str):
                what = "missing" if v is None else f"not a string ({type(v).__name__})"
                raise DataError(f"{path}: record {i + 1}: field {f!r} is {what}")
        out.append(Example(p, r, {"task": "jsonl", "target": r.strip(), "group": f"jsonl|{p}",
                                  "source": path, "index": i}))
    return out
