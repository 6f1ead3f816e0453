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

import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from safetensors import SafetensorError

from trainer.errors import CheckpointError
from trainer.fileio import write_atomic

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
CALLBACK_STATE = "callbacks.pt"
# What a failing write raises: OSError, but on a really full disk torch.save raises RuntimeError
# ("unexpected pos ...") and safetensors its own SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class _TiedHeadNote(logging.Filter):
    """accelerate warns at every save that it dropped `lm_head.weight`, which is `wte.weight` when the
    embeddings are tied (by design); loading re-ties it and resumes are tested bit-exact, so the note is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("Removed shared tensor" in record.getMessage() and "lm_head.weight" in record.getMessage())


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNote())


def write_failure(e: BaseException, default_path) -> str:
    """'reason (path)' for a failed write, on one line."""
    if isinstance(e, OSError):
        reason = e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e) or type(e).__name__
        return f"{reason} ({e.filename or default_path})"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # torch.save / safetensors on a full disk: "unexpected pos ...", "IoError", "No space left ..."; anything
    # else (e.g. a failed collective inside accelerate's save_state) is reported as it is
    io_like = any(k in first.lower() for k in ("unexpected pos", "ioerror", "no space", "os error", "write"))
    return f"{first}{'; is the disk full?' if io_like else ''} ({default_path})"


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
    write_atomic(root / MANIFEST, json.dumps({"created": time.time(), "files": entries}, indent=1))


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
    """Collective: every rank calls it. Returns the final checkpoint path.

    A failing write (disk full, read-only or missing directory...) removes the temp dir,
    leaves every earlier checkpoint untouched (nothing is pruned) and raises a one-line
    CheckpointError naming the checkpoint and the file that failed.
    """
    acc = trainer.accelerator
    root = trainer.run_dir / "checkpoints"
    final = root / f"step_{trainer.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    try:
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
            _fsync_dir(root)
    except WRITE_ERRORS as e:
        if acc.is_main_process and tmp.parent.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {write_failure(e, tmp)}; "
                              f"earlier checkpoints in {root} are left intact") from None
    if acc.is_main_process:
        _prune(root, keep=trainer.cfg.trainer.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    for p in _files(root) + [root / MANIFEST]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(root: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    """Called only once the newest checkpoint is complete and renamed into place.

    Also removes temp/trash dirs left behind by a process killed mid-write (the run dir
    lock guarantees no other writer is active).
    """
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.iterdir():
        if stale.is_dir() and stale.name.startswith((".tmp-step_", ".trash-step_")):
            shutil.rmtree(stale, ignore_errors=True)


def _unsafe_pickle(e: BaseException) -> str:
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    return m.group(1) if m else str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _refused(path: Path, what: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: refused to load {what}: it holds pickled objects other than "
                           f"tensors ({_unsafe_pickle(e)}); only weights_only=True loading is allowed")


def _check_compatible(trainer, path: Path, state: dict) -> None:
    """Tokenizer and model shape first, so a mismatch is named as such (not as a load error)."""
    tokenizer = getattr(getattr(getattr(trainer, "data", None), "tokenizer", None), "fingerprint", None)
    if tokenizer is not None and "tokenizer" in state and state["tokenizer"] != tokenizer():
        raise CheckpointError(f"checkpoint {path} was trained with a different tokenizer than "
                              f"{trainer.run_dir / 'tokenizer.model'}")
    model_cfg = getattr(trainer, "model_cfg", None)
    if dataclasses.is_dataclass(model_cfg) and "model_config" in state:
        now = dataclasses.asdict(model_cfg)
        diff = {k: (v, now.get(k)) for k, v in state["model_config"].items() if now.get(k) != v}
        if diff:
            raise CheckpointError(f"checkpoint {path} has a different model config: {diff}")


def load(trainer, path: Path) -> Tuple[dict, dict]:
    """Restore accelerate state into the prepared objects; return (trainer_state, callback_state).

    Only complete checkpoints (manifest verified) are read, and every pickle is loaded with
    weights_only=True: a tampered file is refused, never executed.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE}: {e}") from None
    _check_compatible(trainer, path, state)
    # accelerate swallows any error while restoring RNG states (and would silently break
    # bit-exact resume): check those small files ourselves, with the same safe loader.
    from accelerate.utils import load as safe_load
    for rng_file in sorted(path.glob("random_states_*.pkl")):
        try:
            safe_load(rng_file)
        except pickle.UnpicklingError as e:
            raise _refused(path, rng_file.name, e) from None
        except Exception as e:  # noqa: BLE001 - any other failure means the file is unusable
            raise CheckpointError(f"checkpoint {path}: unreadable {rng_file.name}: {type(e).__name__}") from None
    try:
        trainer.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as e:
        what = "optimizer.bin" if (path / "optimizer.bin").is_file() else "its accelerator state"
        raise _refused(path, what, e) from None
    except (RuntimeError, KeyError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {first}") from None
    try:
        callback_state = torch.load(path / CALLBACK_STATE, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, CALLBACK_STATE, e) from None
    return state, callback_state
