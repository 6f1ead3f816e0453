"""Study analysis: plasticity-loss onset, power-law vs linear fits, bootstrap CIs, weight-decay choice.

Onset (``detect_onset``), precisely:
  1. Smooth ΔAUC_0..ΔAUC_{n-1} with a centred 3-point moving average; the two endpoints use the
     2-point average with their only neighbour (``smooth3``).
  2. Walk the smoothed curve s from the left.  Index i is a *turning point* when s[i+1] > s[i]
     (the curve goes up after i) and i is a local minimum (i == 0 or s[i] <= s[i-1]).
  3. The turning point is the onset when the rise after it is *persistent*: at least ``m`` (>= 2)
     points follow it, and either s rises in each of the next ``m`` steps
     (s[i] < s[i+1] < ... < s[i+m]) or every later point stays above s[i] + eps, where
     eps = ``eps_rel`` x (max(s) - min(s)) (default 5% of the curve's range); and at least ``m`` of the
     raw (unsmoothed) points after i lie above s[i] + eps, so that one high last point, which the
     endpoint smoothing spreads over two steps, is not an onset.
  4. The first turning point that passes is the onset; the result is ``boundaries[i]`` (the boundary
     index, step or token count the caller passes; i when None).  No such point (a monotone fall, a
     flat curve, a rise only at the last boundary) -> None.
  A curve that rises from the start has its turning point at i = 0 (the initial model): onset = the
  first boundary.  Such onsets cannot enter a log-log fit; ``analyse_runs`` reports and drops them.
  With ``refine=True`` the onset is the vertex of the parabola through s[i-1], s[i], s[i+1] (clipped
  to [i-1, i+1]) interpolated on ``boundaries``: a continuous value, useful when only a handful of
  boundaries exist.

Fits: ``fit_power_law`` fits log(onset) = log(a) + b·log(P) by least squares (SE(b), R² in log space),
and compares it with the linear model onset = c + d·P by leave-one-out RMSE, both measured in log
space (a linear prediction <= 0 is clipped to 1e-12 of the smallest onset and counted as a miss).
``bootstrap_exponent`` resamples seeds with replacement within each size (every size kept), refits
the pooled points and returns the percentile CI of b.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

PAPER_EXPONENT = 0.83
CORRELATES = {
    "dormant_ratio@0.1": "neurons/overall/dormant_ratio@0.1",
    "effective_rank": "repr/overall/effective_rank",
    "mean_abs_param": "repr/mean_abs_param",
}


# --- onset ------------------------------------------------------------------------------------------
def smooth3(x: Sequence[float]) -> np.ndarray:
    """Centred 3-point moving average; endpoints average with their one neighbour."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n <= 1:
        return x.copy()
    out = np.empty(n)
    out[0], out[-1] = (x[0] + x[1]) / 2, (x[-2] + x[-1]) / 2
    if n > 2:
        out[1:-1] = (x[:-2] + x[1:-1] + x[2:]) / 3
    return out


def onset_index(delta_auc: Sequence[float], m: int = 2, eps_rel: float = 0.05) -> Optional[int]:
    """The index of the onset in the (unsmoothed) input, or None.  See the module docstring."""
    if m < 2:
        raise ValueError("m must be >= 2")
    x = np.asarray(delta_auc, dtype=float)
    s = smooth3(x)
    n = len(s)
    if n < m + 1 or not np.all(np.isfinite(s)):
        return None
    eps = eps_rel * float(s.max() - s.min())
    for i in range(n - m):
        if not (s[i + 1] > s[i] and (i == 0 or s[i] <= s[i - 1])):
            continue
        rising = all(s[i + k] < s[i + k + 1] for k in range(m))
        above = bool(np.all(s[i + 1:] > s[i] + eps))
        support = int(np.sum(x[i + 1:] > s[i] + eps)) >= m  # raw points, not smoothing spill-over
        if (rising or above) and support:
            return i
    return None


def detect_onset(delta_auc: Sequence[float], boundaries: Optional[Sequence[float]] = None, m: int = 2,
                 eps_rel: float = 0.05, refine: bool = False) -> Optional[float]:
    """Where the smoothed ΔAUC curve turns upward for good after its initial fall (None: no onset)."""
    i = onset_index(delta_auc, m, eps_rel)
    if i is None:
        return None
    xs = list(range(len(delta_auc))) if boundaries is None else list(boundaries)
    if len(xs) != len(delta_auc):
        raise ValueError("boundaries and delta_auc differ in length")
    if not refine or i == 0:
        return xs[i]
    s = smooth3(delta_auc)
    y0, y1, y2 = s[i - 1], s[i], s[i + 1]
    denom = y0 - 2 * y1 + y2
    off = 0.0 if denom <= 0 else float(np.clip(0.5 * (y0 - y2) / denom, -1.0, 1.0))
    j = i + off
    lo = int(math.floor(j))
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (j - lo) * (xs[hi] - xs[lo]))


# --- fits -------------------------------------------------------------------------------------------
def _ols(x: np.ndarray, y: np.ndarray):
    X = np.column_stack([np.ones_like(x), x])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    n = len(x)
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    if n > 2:
        sigma2 = ss_res / (n - 2)
        cov = sigma2 * np.linalg.inv(X.T @ X)
        se = float(math.sqrt(max(cov[1, 1], 0.0)))
    else:
        se = float("nan")
    return float(coef[0]), float(coef[1]), se, r2


# Student t 0.975 quantiles for 1-30 degrees of freedom (3 decimals)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def _t975(dof: int) -> float:
    """The t quantile for `dof`: the table up to 30, then the Cornish-Fisher expansion around the normal
    quantile (error < 1e-4 from 30 on)."""
    if dof <= 0:
        return float("nan")
    if dof in _T975:
        return _T975[dof]
    z, v = 1.959964, float(dof)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def fit_power_law(P: Sequence[float], onset: Sequence[float]) -> Dict[str, float]:
    """log(onset) = log(a) + b log(P): a, b, SE(b), a 95% t-interval for b, R² (log space), and the
    leave-one-out RMSE in log space of the power law and of the linear model onset = c + d·P."""
    P = np.asarray(P, dtype=float)
    y = np.asarray(onset, dtype=float)
    keep = (P > 0) & (y > 0) & np.isfinite(P) & np.isfinite(y)
    P, y = P[keep], y[keep]
    n = len(P)
    out: Dict[str, float] = {"n": n, "n_sizes": int(len(np.unique(P)))}
    if n < 2 or len(np.unique(P)) < 2:
        return {**out, "a": float("nan"), "b": float("nan"), "se_b": float("nan"), "r2": float("nan"),
                "loo_rmse_log_power": float("nan"), "loo_rmse_log_linear": float("nan")}
    lx, ly = np.log(P), np.log(y)
    la, b, se_b, r2 = _ols(lx, ly)
    c, d, _, r2_lin = _ols(P, y)
    t = _t975(n - 2)
    out.update({"a": math.exp(la), "b": b, "se_b": se_b, "b_ci_t": [b - t * se_b, b + t * se_b], "r2": r2,
                "c": c, "d": d, "r2_linear": r2_lin})
    floor = 1e-12 * float(y.min())
    err_p, err_l = [], []
    if n >= 3:
        for k in range(n):
            m = np.arange(n) != k
            if len(np.unique(P[m])) < 2:
                continue
            la_k, b_k, _, _ = _ols(lx[m], ly[m])
            err_p.append(ly[k] - (la_k + b_k * lx[k]))
            c_k, d_k, _, _ = _ols(P[m], y[m])
            err_l.append(ly[k] - math.log(max(c_k + d_k * P[k], floor)))
    rm = lambda e: float(np.sqrt(np.mean(np.square(e)))) if e else float("nan")  # noqa: E731
    out["loo_rmse_log_power"], out["loo_rmse_log_linear"] = rm(err_p), rm(err_l)
    if err_p:
        out["loo_preferred"] = "power" if out["loo_rmse_log_power"] <= out["loo_rmse_log_linear"] else "linear"
    return out


def bootstrap_exponent(groups: Mapping[float, Sequence[float]], n: int = 1000, seed: int = 0,
                       ci: float = 0.95) -> Dict[str, object]:
    """Percentile CI for b: resample the seeds (onsets) with replacement within each size, refit.

    `groups` maps a size P to the onsets of its seeds (None / <= 0 are dropped).  With one seed per
    size every resample is the original data and the CI collapses to a point: `degenerate` says so.
    """
    clean = {float(P): [float(v) for v in vs if v is not None and v > 0] for P, vs in groups.items() if P > 0}
    clean = {P: vs for P, vs in clean.items() if vs}
    sizes = sorted(clean)
    if len(sizes) < 2:
        return {"b": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "degenerate": True}
    full = fit_power_law([P for P in sizes for _ in clean[P]], [v for P in sizes for v in clean[P]])["b"]
    rng = np.random.default_rng(seed)
    bs = []
    for _ in range(n):
        Ps, ys = [], []
        for P in sizes:
            vs = clean[P]
            pick = rng.integers(0, len(vs), size=len(vs))
            Ps += [P] * len(vs)
            ys += [vs[i] for i in pick]
        lx, ly = np.log(Ps), np.log(ys)
        bs.append(_ols(lx, ly)[1])
    bs = np.asarray(bs)
    alpha = (1 - ci) / 2
    return {"b": full, "lo": float(np.quantile(bs, alpha)), "hi": float(np.quantile(bs, 1 - alpha)),
            "n": n, "ci": ci, "degenerate": all(len(clean[P]) == 1 for P in sizes) or float(bs.std()) == 0.0}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    def rank(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # average ties
            idx = v == val
            r[idx] = r[idx].mean()
        return r
    return pearson(rank(x), rank(y))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# --- weight decay -----------------------------------------------------------------------------------
def best_weight_decay(records: Iterable[Mapping[str, object]]) -> Dict[float, Dict[str, object]]:
    """Per size: the weight decay minimising the final pretraining val loss, the one minimising the
    post-SFT metric (a loss: lower is better; only where present) and the one minimising the final
    probe ΔAUC (the most plastic).  Records: {size, weight_decay, pretrain_loss, [sft_loss], [final_delta_auc]}
    (seeds of one (size, wd) are averaged first)."""
    acc: Dict[float, Dict[float, Dict[str, List[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if r.get("weight_decay") is None:
            continue
        for key in ("pretrain_loss", "sft_loss", "final_delta_auc"):
            v = r.get(key)
            if v is not None and np.isfinite(v):
                acc[float(r["size"])][float(r["weight_decay"])][key].append(float(v))
    out: Dict[float, Dict[str, object]] = {}
    for size, by_wd in sorted(acc.items()):
        means = {wd: {k: float(np.mean(v)) for k, v in d.items()} for wd, d in sorted(by_wd.items())}
        row: Dict[str, object] = {"by_wd": means}
        for key, label in (("pretrain_loss", "best_for_pretrain"), ("sft_loss", "best_after_sft"),
                           ("final_delta_auc", "best_for_plasticity")):
            cands = {wd: m[key] for wd, m in means.items() if key in m}
            row[label] = min(cands, key=cands.get) if len(cands) >= 1 else None
        out[size] = row
    return out


# --- reading a study dir ------------------------------------------------------------------------------
def read_boundaries(path: Path) -> List[dict]:
    """boundaries.jsonl, de-duplicated by boundary index (a resumed run may rewrite a line: last wins)."""
    if not path.is_file():
        return []
    by_idx: Dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        by_idx[int(rec.get("boundary", len(by_idx)))] = rec
    return [by_idx[k] for k in sorted(by_idx)]


def load_runs(study_dir: Path) -> List[dict]:
    """Every run dir under STUDY/runs with its metadata (study_run.json), state and boundaries."""
    runs = []
    root = Path(study_dir) / "runs"
    if not root.is_dir():
        return runs
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        meta_path = d / "study_run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"name": d.name}
        state = "done" if (d / "DONE").is_file() else "failed" if (d / "FAILED").is_file() else "pending"
        done = json.loads((d / "DONE").read_text()) if state == "done" else {}
        runs.append({**meta, "name": meta.get("name", d.name), "dir": str(d), "state": state,
                     "seconds": done.get("seconds"), "boundaries": read_boundaries(d / "boundaries.jsonl")})
    return runs


def _curve(run: dict, phase_kind_pretrain: bool = True) -> tuple:
    """(labels, ΔAUC, global steps) over the init + pretraining boundaries (ΔAUC vs the first boundary)."""
    bs = [b for b in run["boundaries"] if "probe/auc" in (b.get("scalars") or {})]
    if phase_kind_pretrain and bs:
        pre = bs[0].get("phase") if bs[0].get("label") != "init" else (bs[1].get("phase") if len(bs) > 1 else None)
        bs = [b for b in bs if b.get("label") == "init" or b.get("phase") == pre]
    if not bs:
        return [], [], []
    first = bs[0]["scalars"]["probe/auc"]
    d = [100.0 * (b["scalars"]["probe/auc"] / first - 1.0) for b in bs]
    return [b["label"] for b in bs], d, [b.get("global_step", i) for i, b in enumerate(bs)]


def analyse_runs(runs: List[dict], n_boot: int = 1000, seed: int = 0, refine: bool = True,
                 include_unfinished: bool = False) -> dict:
    """Per-run onset and correlates; per (mode, wd, mitigation) group the onset-vs-size fits.
    Only finished (DONE) runs count unless include_unfinished: a partial curve has a biased onset."""
    per_run = []
    for r in runs:
        if r["state"] != "done" and not include_unfinished:
            continue
        labels, d, steps = _curve(r)
        if len(d) < 3:
            continue
        k = onset_index(d)
        on = detect_onset(d, list(range(len(d))), refine=refine)
        bs = [b for b in r["boundaries"] if b["label"] in labels]
        last = bs[-1]
        entry = {"name": r["name"], "size": r.get("size"), "P": r.get("non_embedding_params"),
                 "weight_decay": r.get("weight_decay"), "mitigation": r.get("mitigation", "none"),
                 "mode": r.get("mode"), "seed": r.get("seed"), "state": r["state"], "labels": labels,
                 "delta_auc": d, "smoothed": smooth3(d).tolist(), "steps": steps,
                 "onset": on, "onset_boundary": k, "onset_step": steps[k] if k is not None else None,
                 "final_delta_auc": d[-1], "min_delta_auc": float(min(d)),
                 "pretrain_loss": (last.get("eval") or {}).get("val/mean")}
        for short, key in CORRELATES.items():
            vals = [(b.get("scalars") or {}).get(key) for b in bs]
            entry[f"{short}/series"] = vals
            if vals and vals[-1] is not None and vals[0] is not None:
                entry[f"{short}/final"] = vals[-1]
                entry[f"{short}/change"] = vals[-1] - vals[0]
        sft = [b for b in r["boundaries"] if b.get("phase") not in (None, last.get("phase")) and b["label"] != "init"
               and any(k.startswith("sft/") or k.startswith("val/") for k in (b.get("eval") or {}))]
        if sft:
            ev = sft[-1]["eval"]
            losses = [v for k, v in ev.items() if "loss" in k] or [v for k, v in ev.items() if k.startswith("val/")]
            entry["sft_loss"] = float(np.mean(losses)) if losses else None
        per_run.append(entry)
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for e in per_run:
        groups[(e["mode"], e["weight_decay"], e["mitigation"])].append(e)
    fits = []
    for (mode, wd, mit), es in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        with_on = [e for e in es if e["onset"] is not None and e["onset"] > 0 and e["P"]]
        by_size: Dict[float, List[float]] = defaultdict(list)
        for e in with_on:
            by_size[float(e["P"])].append(float(e["onset"]))
        fit = fit_power_law([e["P"] for e in with_on], [e["onset"] for e in with_on]) if with_on else {"n": 0}
        boot = bootstrap_exponent(by_size, n=n_boot, seed=seed) if len(by_size) >= 2 else None
        fits.append({"mode": mode, "weight_decay": wd, "mitigation": mit, "runs": len(es),
                     "with_onset": len(with_on), "no_onset": [e["name"] for e in es if e["onset"] is None],
                     "onset_at_start": [e["name"] for e in es if e["onset"] is not None and e["onset"] <= 0],
                     "fit": fit, "bootstrap": boot, "by_size": {str(int(k)): v for k, v in sorted(by_size.items())}})
    corr = {}
    onset_runs = [e for e in per_run if e["onset"] is not None]
    for short in CORRELATES:
        xs = [e for e in onset_runs if e.get(f"{short}/final") is not None]
        pooled_x, pooled_y = [], []
        for e in per_run:
            for v, dv in zip(e.get(f"{short}/series", []), e["delta_auc"]):
                if v is not None:
                    pooled_x.append(v)
                    pooled_y.append(dv)
        corr[short] = {
            "vs_onset_final": {"n": len(xs), "spearman": spearman([e[f"{short}/final"] for e in xs], [e["onset"] for e in xs]),
                               "pearson": pearson([e[f"{short}/final"] for e in xs], [e["onset"] for e in xs])},
            "vs_onset_change": {"n": len(xs), "spearman": spearman([e[f"{short}/change"] for e in xs], [e["onset"] for e in xs]),
                                "pearson": pearson([e[f"{short}/change"] for e in xs], [e["onset"] for e in xs])},
            "vs_delta_auc_pooled": {"n": len(pooled_x), "spearman": spearman(pooled_x, pooled_y),
                                    "pearson": pearson(pooled_x, pooled_y)},
        }
    wd = best_weight_decay([{"size": e["P"], "weight_decay": e["weight_decay"], "pretrain_loss": e["pretrain_loss"],
                             "sft_loss": e.get("sft_loss"), "final_delta_auc": e["final_delta_auc"]}
                            for e in per_run if e["mode"] == "continual" and e["P"]])
    summary = {"runs": len(runs), "analysed": len(per_run),
               "fits": [{k: f[k] for k in ("mode", "weight_decay", "mitigation", "with_onset")} |
                        {"b": f["fit"].get("b"), "se_b": f["fit"].get("se_b"), "r2": f["fit"].get("r2"),
                         "boot_ci": None if not f["bootstrap"] else [f["bootstrap"]["lo"], f["bootstrap"]["hi"]],
                         "loo_power": f["fit"].get("loo_rmse_log_power"),
                         "loo_linear": f["fit"].get("loo_rmse_log_linear")} for f in fits]}
    return {"per_run": per_run, "fits": fits, "correlates": corr,
            "weight_decay": {str(int(k)): v for k, v in wd.items()}, "summary": summary}


def analyse_study_dir(study_dir: str | Path, n_boot: int = 1000, seed: int = 0, write: bool = True) -> dict:
    study_dir = Path(study_dir)
    res = analyse_runs(load_runs(study_dir), n_boot=n_boot, seed=seed)
    if write:
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir / "analysis.json").write_text(json.dumps(res, indent=1, default=_json_default))
    return res


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
