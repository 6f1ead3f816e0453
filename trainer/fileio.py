"""Atomic file writes that concurrent writers of one path cannot break.

Parallel runs (a study's `--parallel`, Slurm array tasks, DDP ranks) fill shared caches (tokenized text,
tokenizers) and shared study files at the same moment. A fixed temporary name ("x.tmp") is then shared: one
writer renames it away and the other's rename fails (FileNotFoundError), or renames a file the first one
truncated. Each writer here gets its own temporary in the target's directory.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Union


def write_atomic(path: Union[str, Path], data: Union[bytes, str, Callable[[BinaryIO], object]]) -> None:
    """Write `data` (bytes, UTF-8 text, or a function that writes to a binary file) to `path`: readers see the
    old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
