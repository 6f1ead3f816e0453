"""Checkpoints that are either complete or invisible.

Layout: RUN/checkpoints/step_00000123/ holding accelerate's state (model.safetensors,
optimizer.bin or DeepSpeed shards, per-rank RNG), trainer_state.json (phase/task/step,
data positions), callbacks.pt (plug-in state, tensors only), config.yaml, and
manifest.json with a sha256 for every file.  Everything is written into a hidden temp dir
which is renamed into place only after the manifest is written, so a kill at any moment
leaves either the old set of checkpoints or the old set plus one complete new one.
Loading verifies the manifest and falls back to the previous checkpoint when a file is
missing or corrupt.  Older checkpoints are pruned only after the new one is in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from trainer.errors import CheckpointError

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
CALLBACK_STATE = "callbacks.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    entries = {str(p.relative_to(root)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in _files(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"created": time.time(), "files": entries}, indent=1))
    os.replace(tmp, root / MANIFEST)


def verify(root: Path) -> Optional[str]:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def checkpoint_dirs(run_dir: Path) -> List[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=lambda p: p.name)


def find_latest_valid(run_dir: Path, log=print) -> Optional[Path]:
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log(f"warning: skipping checkpoint {ckpt}: {problem}")
    return None


def save(trainer, state: dict, callback_state: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    acc = trainer.accelerator
    root = trainer.run_dir / "checkpoints"
    final = root / f"step_{trainer.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        torch.save(callback_state, tmp / CALLBACK_STATE)
        shutil.copy2(trainer.run_dir / "config.yaml", tmp / "config.yaml")
        write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # a stale checkpoint of the same step (e.g. after falling back): replace it
            trash = root / f".trash-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _prune(root, keep=trainer.cfg.trainer.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    for p in _files(root) + [root / MANIFEST]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _prune(root: Path, keep: int) -> None:
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(trainer, path: Path) -> Tuple[dict, dict]:
    """Restore accelerate state into the prepared objects; return (trainer_state, callback_state)."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    try:
        trainer.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {first}") from None
    state = json.loads((path / STATE).read_text())
    callback_state = torch.load(path / CALLBACK_STATE, weights_only=True)
    return state, callback_state
