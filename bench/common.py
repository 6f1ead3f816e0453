"""Small helpers shared by the benchmark scripts (timing, machine description, markdown)."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time


def load() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch
    try:
        import transformers
        tv = transformers.__version__
    except Exception:  # pragma: no cover
        tv = "n/a"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": load(), "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": tv, "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def now() -> float:
    return time.perf_counter()


def table(header, rows) -> str:
    from trainer.study_report import markdown_table

    return markdown_table(header, rows)


def fmt(x, nd=0):
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:,.{nd}f}"


def section_main(run, markdown, argv=None) -> int:
    """`python -m bench.X [--quick] [--json FILE]` for a benchmark section: run, print, save."""
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    res = run(a.quick)
    print(markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
