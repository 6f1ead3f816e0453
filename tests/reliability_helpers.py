"""Shared pieces of tests/test_reliability.py: a private corpus, CLI subprocesses, fault hooks.

The tests train on a small synthetic corpus of their own (deterministic, three "languages"
en/fr/de), so they do not depend on the bundled corpus, which is rebuilt by other tools.

Subprocesses run the real CLI.  When ``RELIABILITY_HOOKS=1`` a ``sitecustomize`` module
(written by the ``hooks_path`` fixture) calls :func:`install_hooks`, which only slows
things down: a sleep after every training step (``RELIABILITY_STEP_DELAY`` seconds) and
before every checkpoint manifest is written (``RELIABILITY_CKPT_DELAY``), so that a test can
deliver SIGKILL/SIGTERM at a chosen moment (e.g. while a ``.tmp-step_*`` dir exists).
Numerics are untouched: a slowed run is bit-identical to a plain one.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONTINUAL = TESTS / "data" / "continual_tiny.yaml"
LANGS = ("en", "fr", "de")


# --- data --------------------------------------------------------------------------------
def make_corpus(root: Path, lines: int = 250) -> Path:
    """train/<lang>.txt.gz for en/fr/de: pseudo-words from disjoint syllable sets, seeded."""
    syllables = {"en": "th an er on re in ed nd ha at".split(),
                 "fr": "le la de ou qu an en es ai eu".split(),
                 "de": "sch ein ich ung der die cht ber gen auf".split()}
    (root / "train").mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        rng = random.Random(f"corpus-{lang}")
        words = ["".join(rng.choice(syllables[lang]) for _ in range(rng.randint(1, 3))) for _ in range(120)]
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + "."
                         for _ in range(lines)) + "\n"
        with open(root / "train" / f"{lang}.txt.gz", "wb") as f:
            f.write(gzip.compress(text.encode("utf-8"), mtime=0))
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    return str(make_corpus(tmp_path_factory.mktemp("rel-corpus")))


def overrides(run_dir, cache_dir, corpus_dir, **extra) -> List[str]:
    """tiny_overrides on the private corpus, checkpoints every 2 steps."""
    extra = {"data.corpus_dir": corpus_dir, "trainer.ckpt_interval": 2, **extra}
    return tiny_overrides(run_dir, cache_dir, **extra)


# --- subprocesses ------------------------------------------------------------------------
_SITECUSTOMIZE = """\
import os
if os.environ.get("RELIABILITY_HOOKS") == "1":
    import reliability_helpers
    reliability_helpers.install_hooks()
"""


@pytest.fixture(scope="session")
def hooks_path(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("rel-hooks")
    (d / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return str(d)


def install_hooks() -> None:
    """In a CLI subprocess: add delays (never numerics) so signals can be aimed."""
    import trainer.checkpoint as ckpt
    import trainer.loop as loop
    from trainer.callbacks import Callback

    step_delay = float(os.environ.get("RELIABILITY_STEP_DELAY", "0"))
    ckpt_delay = float(os.environ.get("RELIABILITY_CKPT_DELAY", "0"))

    class Sleep(Callback):
        name = "reliability-sleep"

        def post_step(self, trainer, logs):
            time.sleep(step_delay)

    if step_delay:
        real_train = loop.train
        loop.train = lambda cfg, extra=(): real_train(cfg, list(extra) + [Sleep()])
    if ckpt_delay:
        real_manifest = ckpt.write_manifest

        def slow_manifest(root):
            time.sleep(ckpt_delay)  # the temp dir exists, the manifest does not yet
            real_manifest(root)
            time.sleep(ckpt_delay / 2)  # manifest written, not yet renamed into place

        ckpt.write_manifest = slow_manifest


def cli_env(hooks_path: Optional[str] = None, step_delay: float = 0.0, ckpt_delay: float = 0.0) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    if hooks_path:
        env["PYTHONPATH"] = os.pathsep.join([hooks_path, str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
        env.update(RELIABILITY_HOOKS="1", RELIABILITY_STEP_DELAY=str(step_delay),
                   RELIABILITY_CKPT_DELAY=str(ckpt_delay))
    return env


def plasticity_cmd() -> List[str]:
    script = Path(sys.executable).parent / "plasticity"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trainer.cli"]


def start_train(config: Path, ovr: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(plasticity_cmd() + ["train", str(config), *ovr], cwd=str(REPO), env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def run_train(config: Path, ovr: List[str], env: Dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(plasticity_cmd() + ["train", str(config), *ovr], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180, poll: float = 0.002) -> bool:
    """Poll until cond() (True) or the process exits (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(poll)
    raise TimeoutError("condition not met in time")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- observations -------------------------------------------------------------------------
def metric_rows(run_dir) -> List[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def last_step(run_dir) -> int:
    return max((r["step"] for r in metric_rows(run_dir) if "train/loss" in r), default=0)


def loss_trajectory(run_dir) -> Dict[int, float]:
    """step -> train/loss, the LAST occurrence of each step (replayed steps are re-logged)."""
    out: Dict[int, float] = {}
    for r in metric_rows(run_dir):
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


def phase_weights(run_dir, phase: str = "pre") -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "phases" / phase / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tree_hashes(root) -> Dict[str, str]:
    """relative path -> sha256 of every file under root (empty if root is missing)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
