"""`plasticity report STUDY_DIR`: a Markdown report (STUDY_DIR/report/report.md) with PNG figures.

Sections: grid status; ΔAUC-vs-boundary curves per size; onset per run and onset vs size with the
power-law fit (t-interval and seed-bootstrap CI) against the linear alternative (LOO RMSE); dormancy,
effective rank and mean |θ| against onset and against ΔAUC; stationary vs continual; weight decay.
Anything the study did not include is stated as "not in this study" rather than failing.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence

from trainer.analysis import CORRELATES, PAPER_EXPONENT, analyse_study_dir, load_runs
from trainer.errors import UserError

NOT_IN_STUDY = "_not in this study_"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{nd}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def _psize(p) -> str:
    if not p:
        return "?"
    return f"{p / 1e6:.2f}M" if p >= 1e6 else f"{p / 1e3:.0f}k"


def markdown_table(header: Sequence[str], rows: List[Sequence], cell=str) -> str:
    """A GitHub markdown table; ``cell`` formats each body cell (also used by bench/)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _table(header: Sequence[str], rows: List[Sequence]) -> str:
    return markdown_table(header, rows, cell=_f)


def _fig_curves(per_run, mode: str, path: Path) -> bool:
    runs = [e for e in per_run if e["mode"] == mode]
    if not runs:
        return False
    plt = _plt()
    sizes = sorted({e["P"] for e in runs if e["P"]})
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for e in runs:
        i = sizes.index(e["P"]) if e["P"] in sizes else 0
        color = cmap(i / max(1, len(sizes) - 1))
        ls = "-" if e["weight_decay"] in (None, max((r["weight_decay"] or 0) for r in runs)) else "--"
        ax.plot(range(len(e["smoothed"])), e["smoothed"], ls, color=color, alpha=0.8,
                label=f"{_psize(e['P'])} wd={e['weight_decay']} s{e['seed']}")
        if e["onset_boundary"] is not None:
            k = e["onset_boundary"]
            ax.plot([k], [e["smoothed"][k]], "o", color=color)
    ax.axhline(0, color="grey", lw=0.5)
    labels = runs[0]["labels"]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([l.split("-")[-1] for l in labels], fontsize=8)
    ax.set_xlabel("boundary (task just finished)")
    ax.set_ylabel("ΔAUC (%), 3-point smoothed")
    ax.set_title(f"probe ΔAUC per boundary — {mode} (dots: onset)")
    if len(runs) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_onset(fit_entries, per_run, path: Path) -> bool:
    pts = [e for e in per_run if e["onset"] is not None and e["onset"] > 0 and e["P"]]
    if not pts:
        return False
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for j, f in enumerate(fit_entries):
        sel = [e for e in pts if (e["mode"], e["weight_decay"], e["mitigation"]) ==
               (f["mode"], f["weight_decay"], f["mitigation"])]
        if not sel:
            continue
        c = f"C{j}"
        lab = f"{f['mode']} wd={f['weight_decay']} {f['mitigation']}"
        ax.scatter([e["P"] for e in sel], [e["onset"] for e in sel], color=c, s=18, label=lab)
        fit = f["fit"]
        if fit.get("b") is not None and not math.isnan(fit.get("b", float("nan"))):
            xs = np.geomspace(min(e["P"] for e in sel), max(e["P"] for e in sel), 50)
            ax.plot(xs, fit["a"] * xs ** fit["b"], color=c, lw=1,
                    label=f"  fit b={fit['b']:.2f}" + (f" [{f['bootstrap']['lo']:.2f}, {f['bootstrap']['hi']:.2f}]"
                                                       if f.get("bootstrap") else ""))
            if f.get("bootstrap") and not f["bootstrap"].get("degenerate"):
                for bb in (f["bootstrap"]["lo"], f["bootstrap"]["hi"]):
                    # pivot the CI exponents around the geometric centre of the data
                    x0 = math.exp(np.mean(np.log([e["P"] for e in sel])))
                    y0 = fit["a"] * x0 ** fit["b"]
                    ax.plot(xs, y0 * (xs / x0) ** bb, ":", color=c, lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters P")
    ax.set_ylabel("onset (boundary index, interpolated)")
    ax.set_title(f"onset vs size (paper: onset ∝ P^{PAPER_EXPONENT})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_correlates(per_run, path: Path) -> bool:
    have = [s for s in CORRELATES if any(e.get(f"{s}/series") and any(v is not None for v in e[f"{s}/series"])
                                         for e in per_run)]
    if not have:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(4 * len(have), 3.6), squeeze=False)
    for ax, s in zip(axes[0], have):
        for e in per_run:
            xs = [v for v in e.get(f"{s}/series", [])]
            ys = e["delta_auc"][:len(xs)]
            pairs = [(x, y) for x, y in zip(xs, ys) if x is not None]
            if pairs:
                ax.plot(*zip(*pairs), ".-" if e["mode"] == "continual" else ".:", alpha=0.6, lw=0.7)
        ax.set_xlabel(s)
        ax.set_ylabel("ΔAUC (%)")
    fig.suptitle("correlates vs ΔAUC (one line per run, boundary order)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_modes(per_run, path: Path) -> bool:
    modes = sorted({e["mode"] for e in per_run})
    if len(modes) < 2:
        return False
    plt = _plt()
    sizes = sorted({e["P"] for e in per_run if e["P"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 3.2), squeeze=False, sharey=True)
    for ax, P in zip(axes[0], sizes):
        for e in per_run:
            if e["P"] == P:
                ax.plot(e["delta_auc"], "-" if e["mode"] == "continual" else "--",
                        color="C0" if e["mode"] == "continual" else "C1", alpha=0.7, lw=0.9)
        ax.set_title(_psize(P), fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("boundary")
    axes[0][0].set_ylabel("ΔAUC (%) — solid continual, dashed stationary")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_wd(wd, path: Path) -> bool:
    if not wd or all(len(v["by_wd"]) < 2 for v in wd.values()):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for j, (size, row) in enumerate(sorted(wd.items(), key=lambda kv: float(kv[0]))):
        wds = sorted(row["by_wd"], key=float)
        for ax, key in zip(axes, ("pretrain_loss", "final_delta_auc")):
            ys = [row["by_wd"][w].get(key) for w in wds]
            ax.plot([float(w) for w in wds], ys, "o-", label=_psize(float(size)), color=f"C{j}")
    axes[0].set_ylabel("final pretraining val loss")
    axes[1].set_ylabel("final ΔAUC (%)")
    for ax in axes:
        ax.set_xlabel("weight decay")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(study_dir: str | Path, out: Optional[str | Path] = None, n_boot: int = 1000) -> Path:
    study_dir = Path(study_dir)
    if not (study_dir / "runs").is_dir():
        raise UserError(f"report: {study_dir} is not a study dir (no runs/ inside)")
    out = Path(out) if out else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(study_dir)
    res = analyse_study_dir(study_dir, n_boot=n_boot)
    per_run, fits, wd = res["per_run"], res["fits"], res["weight_decay"]
    manifest = json.loads((study_dir / "study.json").read_text()) if (study_dir / "study.json").is_file() else {}
    lines = [f"# Plasticity scaling study: {manifest.get('name') or study_dir.name}", ""]
    states = defaultdict(int)
    for r in runs:
        states[r["state"]] += 1
    planned = len(manifest.get("runs", [])) or len(runs)
    secs = [r["seconds"] for r in runs if r.get("seconds")]
    lines += ["## Grid", "",
              f"{planned} planned runs; {states['done']} done, {states['failed']} failed, "
              f"{planned - states['done'] - states['failed']} pending/not started; {len(per_run)} with ≥ 3 probe "
              f"boundaries analysed (finished runs only)." + (f" Run time (sum over finished runs): {sum(secs) / 60:.1f} min." if secs else ""),
              ""]
    if per_run:
        lines += [_table(["run", "P", "mode", "wd", "seed", "onset (boundary)", "onset (interp.)", "min ΔAUC",
                          "final ΔAUC", "final val loss"],
                         [[e["name"], _psize(e["P"]), e["mode"], e["weight_decay"], e["seed"],
                           e["labels"][e["onset_boundary"]] if e["onset_boundary"] is not None else "none",
                           e["onset"], e["min_delta_auc"], e["final_delta_auc"], e["pretrain_loss"]]
                          for e in sorted(per_run, key=lambda e: (e["P"] or 0, e["name"]))]),  # by size, not name
                  ""]
    # curves
    lines += ["## ΔAUC vs boundary", ""]
    any_curve = False
    for mode in ("continual", "stationary"):
        if _fig_curves(per_run, mode, out / f"delta_auc_{mode}.png"):
            lines += [f"![ΔAUC {mode}](delta_auc_{mode}.png)", ""]
            any_curve = True
    if not any_curve:
        lines += [NOT_IN_STUDY + " (no run with probe boundaries yet)", ""]
    else:
        u = [e for e in per_run if e["mode"] == "continual"]
        ushape = [e for e in u if e["onset"] is not None and e["onset_boundary"] and e["onset_boundary"] > 0]
        lines += [f"U-shape (initial fall, then a persistent rise) in {len(ushape)} of {len(u)} continual runs.", ""]
    # onset vs size
    lines += ["## Onset vs size", ""]
    if _fig_onset(fits, per_run, out / "onset_vs_size.png"):
        lines += ["![onset vs size](onset_vs_size.png)", ""]
    rows = []
    for f in fits:
        fit, boot = f["fit"], f["bootstrap"]
        rows.append([f["mode"], f["weight_decay"], f["mitigation"], f"{f['with_onset']}/{f['runs']}",
                     fit.get("n_sizes"), fit.get("b"), fit.get("se_b"),
                     "–" if not boot else f"[{_f(boot['lo'])}, {_f(boot['hi'])}]" + (" (1 seed: degenerate)"
                                                                                      if boot.get("degenerate") else ""),
                     fit.get("r2"), fit.get("loo_rmse_log_power"), fit.get("loo_rmse_log_linear"),
                     fit.get("loo_preferred", "–")])
    if any(f["with_onset"] >= 2 for f in fits):
        lines += [_table(["mode", "wd", "mitigation", "runs w/ onset", "sizes", "b", "SE(b)", "bootstrap 95% CI",
                          "R² (log)", "LOO RMSE log (power)", "LOO RMSE log (linear)", "LOO prefers"], rows), "",
                  f"Paper: b = {PAPER_EXPONENT}. Fit on log(onset) = log a + b log P over runs with an onset > 0; "
                  f"CI: seeds resampled within each size ({n_boot}×).", ""]
    else:
        lines += [NOT_IN_STUDY + ": fewer than two runs with an onset, no fit.", ""]
    for f in fits:
        if f["no_onset"] or f["onset_at_start"]:
            lines.append(f"- {f['mode']} wd={f['weight_decay']} {f['mitigation']}: no onset in "
                         f"{', '.join(f['no_onset']) or '–'}; rise from the first boundary on (onset 0, excluded from the "
                         f"log-log fit) in {', '.join(f['onset_at_start']) or '–'}.")
    lines.append("")
    # correlates
    lines += ["## Correlates of plasticity loss", ""]
    if _fig_correlates(per_run, out / "correlates.png"):
        lines += ["![correlates](correlates.png)", ""]
        crow = []
        for s, c in res["correlates"].items():
            crow.append([s, c["vs_onset_final"]["n"], c["vs_onset_final"]["spearman"], c["vs_onset_final"]["pearson"],
                         c["vs_onset_change"]["spearman"], c["vs_delta_auc_pooled"]["n"],
                         c["vs_delta_auc_pooled"]["spearman"], c["vs_delta_auc_pooled"]["pearson"]])
        lines += [_table(["metric", "runs", "ρ_S(final, onset)", "r(final, onset)", "ρ_S(change, onset)",
                          "boundaries", "ρ_S(value, ΔAUC)", "r(value, ΔAUC)"], crow), "",
                  "final = value at the last pretraining boundary; change = last − init; pooled = every boundary "
                  "of every run.", ""]
    else:
        lines += [NOT_IN_STUDY, ""]
    # stationary vs continual
    lines += ["## Stationary vs continual", ""]
    if _fig_modes(per_run, out / "stationary_vs_continual.png"):
        lines += ["![modes](stationary_vs_continual.png)", ""]
        by = defaultdict(list)
        for e in per_run:
            by[(e["P"], e["mode"])].append(e)
        mrow = []
        for P in sorted({e["P"] for e in per_run if e["P"]}):
            c, s = by.get((P, "continual"), []), by.get((P, "stationary"), [])
            mean = lambda es, k: sum(e[k] for e in es) / len(es) if es else None  # noqa: E731
            mrow.append([_psize(P), mean(c, "final_delta_auc"), mean(s, "final_delta_auc"),
                         f"{sum(e['onset'] is not None for e in c)}/{len(c)}",
                         f"{sum(e['onset'] is not None for e in s)}/{len(s)}"])
        lines += [_table(["P", "final ΔAUC continual", "final ΔAUC stationary", "onset or rise from start (cont.)",
                          "onset or rise from start (stat.)"], mrow), ""]
    else:
        lines += [NOT_IN_STUDY + " (needs both modes)", ""]
    # weight decay
    lines += ["## Weight decay", ""]
    if _fig_wd(wd, out / "weight_decay.png"):
        lines += ["![weight decay](weight_decay.png)", ""]
        wrow = [[_psize(float(s)), ", ".join(f"{w}: {_f(m.get('pretrain_loss'))}" for w, m in r["by_wd"].items()),
                 ", ".join(f"{w}: {_f(m.get('final_delta_auc'))}" for w, m in r["by_wd"].items()),
                 r["best_for_pretrain"], r["best_for_plasticity"],
                 r["best_after_sft"] if r["best_after_sft"] is not None else "no SFT phase"]
                for s, r in sorted(wd.items(), key=lambda kv: float(kv[0]))]
        lines += [_table(["P", "val loss by wd", "final ΔAUC by wd", "best wd (pretrain loss)",
                          "best wd (plasticity)", "best wd (after SFT)"], wrow), ""]
    else:
        lines += [NOT_IN_STUDY + " (needs ≥ 2 weight decays, continual)", ""]
    failed = [r for r in runs if r["state"] == "failed"]
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            err = json.loads((Path(r["dir"]) / "FAILED").read_text()).get("error", "")
            lines.append(f"- {r['name']}: {err.splitlines()[-1] if err else '?'}")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="plasticity report", description=__doc__.splitlines()[0])
    p.add_argument("study_dir", help="a study's out_dir (holds runs/), or the study's YAML file")
    p.add_argument("overrides", nargs="*", help="with a study YAML: its key=value overrides (e.g. out_dir=...)")
    p.add_argument("--out", default=None, help="output folder (default STUDY_DIR/report)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = p.parse_args(argv)
    study_dir = args.study_dir
    if Path(study_dir).is_file():  # a study config: report its out_dir
        from trainer.study import load_study

        study_dir = load_study(study_dir, args.overrides).out_dir
    elif args.overrides:
        p.error("key=value overrides need a study YAML, not a directory")
    path = write_report(study_dir, args.out, args.bootstrap)
    print(f"report written to {path}")
    return 0
