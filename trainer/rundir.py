"""Run directory guard: one run at a time (lock file), never silently reuse a different config."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import yaml

from trainer.checkpoint import checkpoint_dirs, verify
from trainer.config import RunConfig, to_dict, to_yaml
from trainer.errors import CheckpointError, ConfigError, UserError
from trainer.fileio import write_atomic

# Keys that may change between a run and its resumption without --force.
_VOLATILE = {("trainer", "resume"), ("trainer", "force"), ("trainer", "progress")}


def _comparable(d: dict) -> dict:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for section, key in _VOLATILE:
        d.get(section, {}).pop(key, None)
    if isinstance(d.get("phases"), dict):  # the order of the phases is their execution order
        d["phases"] = list(d["phases"].items())
    return d


class RunLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"run dir {path.parent} is in use by another process (lock {path})") from None

    def record_owner(self) -> None:
        """Write our pid into the lock file (only once the run dir is accepted: a refusal changes nothing)."""
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _never_trained(run_dir: Path) -> bool:
    """Nothing to protect yet: no checkpoint, no logged row, no phase export - a run that stopped during start-up
    (e.g. on its data or tokenizer), whose corrected config may take the dir over."""
    metrics = run_dir / "metrics.jsonl"
    return (not checkpoint_dirs(run_dir) and not (run_dir / "phases").exists()
            and not (metrics.is_file() and metrics.stat().st_size))


def prepare(run_dir: Path, cfg: RunConfig, accelerator=None) -> RunLock:
    """Create or re-enter a run dir (main process). Raises before writing anything on conflict."""
    resume = cfg.trainer.resume
    if resume not in ("auto", "never"):  # an explicit checkpoint that cannot be loaded changes nothing
        problem = verify(Path(resume))
        if problem is not None:
            raise CheckpointError(f"trainer.resume: checkpoint {resume} is not usable: {problem}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config key 'trainer.run_dir': {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config key 'trainer.run_dir': cannot create {run_dir}: "
                          f"{e.strerror or e} ({e.filename or run_dir})") from None
    lock = RunLock(run_dir / ".lock")
    try:
        saved = run_dir / "config.yaml"
        if saved.is_file() and not cfg.trainer.force:
            old = _comparable(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
            new = _comparable(to_dict(cfg))
            if old != new:
                if not _never_trained(run_dir):
                    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise ConfigError(f"run dir {run_dir} holds a run with a different config (sections differ: "
                                      f"{', '.join(changed)}); use a new trainer.run_dir or trainer.force=true")
                stale = run_dir / "tokenizer.model"  # made from the old config's data settings
                if stale.is_file():
                    stale.unlink()
        if cfg.trainer.resume == "never" and checkpoint_dirs(run_dir):
            raise ConfigError(f"run dir {run_dir} already has checkpoints and trainer.resume=never; "
                              f"use trainer.resume=auto or a new trainer.run_dir")
        text = to_yaml(cfg)
        if not (saved.is_file() and saved.read_text(encoding="utf-8") == text):
            write_atomic(saved, text)
        lock.record_owner()
    except BaseException:
        lock.release()
        raise
    return lock
