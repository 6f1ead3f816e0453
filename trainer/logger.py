"""Metrics to TensorBoard and to metrics.jsonl (machine-readable), main process only."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional

from trainer.fileio import write_atomic

# Dense bf16 peak FLOP/s per device, matched as whole words of the device name (longest key first, so
# "H100 NVL" before "H100"; whole words, so "L4" does not match "L40").
PEAK_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "V100": 125e12, "MI300X": 1307e12, "RTX 4090": 165e12,
}


def keep_jsonl_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines file with only the rows for which keep(row) is true, atomically; lines torn by a
    kill (not a JSON object) are dropped. Used on resume, for rows about to be logged again."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and keep(row):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """None when unknown (e.g. CPU): MFU is then reported as n/a."""
    if not device_name:
        return None
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return PEAK_FLOPS[key]
    return None


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        self._jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def scalars(self, step: int, values: Dict[str, float], **context) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **context, **clean}) + "\n")
        self._jsonl.flush()

    def position(self) -> Optional[int]:
        """Bytes of metrics.jsonl written so far (every row is flushed whole): saved with each checkpoint."""
        return self._jsonl.tell() if self.enabled else None

    def rewind(self, step: int, position: Optional[int]) -> None:
        """Resume after `step`: metrics.jsonl back to `position` bytes, what it held when the checkpoint was
        written (rows logged after the checkpoint at the same step, e.g. by a phase-start callback, would
        otherwise appear twice); without a position, the rows with step <= `step` are kept. TensorBoard
        drops its events after `step` (purge_step), so a replayed step is not drawn twice there either."""
        if not self.enabled:
            return
        path = Path(self._jsonl.name)

        def swap():
            if position is not None and path.stat().st_size >= position:
                os.truncate(path, position)
            else:
                keep_jsonl_rows(path, lambda row: row.get("step", 0) <= step)
        self.reopen(swap)
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter
            log_dir = self.tb.log_dir
            self.tb.close()
            self.tb = SummaryWriter(log_dir=log_dir, purge_step=step + 1)

    def reopen(self, swap) -> None:
        """Close metrics.jsonl, let `swap()` replace the file, and append to the new one."""
        if self.enabled:
            path = Path(self._jsonl.name)
            self._jsonl.close()
            swap()
            self._jsonl = open(path, "a", encoding="utf-8")

    def histogram(self, step: int, tag: str, values) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_histogram(tag, values, step)

    def text(self, step: int, tag: str, value: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, value, step)

    def close(self) -> None:
        if self.enabled:
            if self.tb is not None:
                self.tb.close()
            self._jsonl.close()
