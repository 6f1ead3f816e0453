"""`plasticity compare RUN_DIR... [--out DIR]`: mitigations side by side.

Reads each run's boundaries.jsonl (written by the `instruments` callback), metrics.jsonl
and config.yaml; prints one table row per run (mitigations = the run's callbacks other than
the instruments, final validation loss, mean/last probe ΔAUC over the boundaries after the
first, last dormant ratio) and writes OUT/compare.png: ΔAUC and dormant ratio vs boundary
for every run.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import List, Optional

import yaml

from trainer.errors import UserError

DORMANT_KEY = "neurons/overall/dormant_ratio@0.1"
DELTA_KEY = "probe/delta_auc"


def _read_jsonl(path: Path) -> List[dict]:
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    out = []
    for i, line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == lines[-1][0]:  # the last line, torn by a kill mid-write (as trainer.analysis reads it)
                break
            raise UserError(f"{path}:{i}: not valid JSON") from None
    return out


def load_run(run_dir: str) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"compare: run dir not found: {run}")
    bfile = run / "boundaries.jsonl"
    if not bfile.is_file():
        raise UserError(f"compare: {bfile} missing (enable the instruments callback in that run)")
    boundaries = _read_jsonl(bfile)
    if not boundaries:
        raise UserError(f"compare: {bfile} holds no boundaries")
    mitigations = []
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        try:
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"compare: {cfg_file} is not valid YAML") from None
        for cb in cfg.get("callbacks") or []:
            if isinstance(cb, dict) and cb.get("name") not in (None, "instruments"):
                mitigations.append(str(cb["name"]))
    final_val = None
    mfile = run / "metrics.jsonl"
    if mfile.is_file():
        for rec in _read_jsonl(mfile):
            if "val/mean" in rec:
                final_val = float(rec["val/mean"])
    deltas = [b.get("scalars", {}).get(DELTA_KEY) for b in boundaries]
    dormant = [b.get("scalars", {}).get(DORMANT_KEY) for b in boundaries]
    return {"run": run.name or str(run), "path": str(run), "mitigations": mitigations or ["none"],
            "final_val": final_val, "labels": [b.get("label", str(i)) for i, b in enumerate(boundaries)],
            "delta_auc": deltas, "dormant": dormant}


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summarize(r: dict) -> dict:
    later = [d for d in r["delta_auc"][1:] if d is not None]
    dorm = [d for d in r["dormant"] if d is not None]
    return {"mean_delta": sum(later) / len(later) if later else None, "last_delta": later[-1] if later else None,
            "last_dormant": dorm[-1] if dorm else None}


def table(runs: List[dict]) -> str:
    header = ["run", "mitigations", "final val", "mean ΔAUC", "last ΔAUC", "last dormant@0.1"]
    rows = []
    for r in runs:
        s = summarize(r)
        rows.append([r["run"], ",".join(r["mitigations"]), _fmt(r["final_val"]), _fmt(s["mean_delta"], ".2f"),
                     _fmt(s["last_delta"], ".2f"), _fmt(s["last_dormant"])])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(runs: List[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        label = f"{r['run']} ({','.join(r['mitigations'])})"
        for ax, key in zip(axes, ("delta_auc", "dormant")):
            pts = [(i, v) for i, v in enumerate(r[key]) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    axes[0].set_title("probe ΔAUC (%) vs boundary")
    axes[1].set_title("dormant ratio (τ=0.1) vs boundary")
    for ax in axes:
        ax.set_xlabel("boundary")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="plasticity compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="where to write compare.png (default: the first run dir)")
    args = p.parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    print(table(runs))
    path = plot(runs, Path(args.out) if args.out else Path(args.runs[0]))
    print(f"plot: {path}")
    return 0
