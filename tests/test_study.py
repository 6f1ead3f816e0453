"""Scaling studies: grid expansion, the idempotent runner, onset detection, fits, report."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer import study as S
from trainer.analysis import (best_weight_decay, bootstrap_exponent, detect_onset, fit_power_law, onset_index,
                              smooth3)
from trainer.errors import ConfigError, UserError
from trainer.study_report import write_report

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"block_size": 32}, "phases": {"pre": {"kind": "pretrain", "mode": "continual",
                                                        "languages": ["en", "fr"], "steps_per_task": 4}}}


def _study(tmp_path, **grid):
    g = {"sizes": ["nano", "200k"], "weight_decay": [0.0, 0.1], "mitigations": {"none": [], "redo": [{"name": "redo"}]},
         "modes": ["continual", "stationary"], "seeds": [0, 1]}
    g.update(grid)
    return S.build_study({"name": "t", "base": BASE, "out_dir": str(tmp_path / "study"), "grid": g,
                          "instruments": {"name": "instruments", "probe_steps": 5}})


# --- grid ---------------------------------------------------------------------------------------------
def test_grid_expansion_is_deterministic_and_complete(tmp_path):
    st = _study(tmp_path)
    assert len(st.runs) == 2 * 2 * 2 * 2 * 2
    names = [r.name for r in st.runs]
    assert len(set(names)) == len(names) and names == [r.name for r in _study(tmp_path).runs]
    assert names[0] == "nano-wd0-none-continual-s0" and names[1] == "nano-wd0-none-continual-s1"
    assert names[-1] == "200k-wd0.1-redo-stationary-s1"
    assert [r.index for r in st.runs] == list(range(32))
    r = st.runs[-1]
    assert r.run_dir == tmp_path / "study" / "runs" / r.name
    ov = dict(o.split("=", 1) for o in r.overrides)
    assert ov["model_size"] == "200k" and ov["phases.pre.mode"] == "stationary"
    assert ov["phases.pre.optim.weight_decay"] == "0.1" and ov["trainer.seed"] == "1"
    assert json.loads(ov["callbacks"]) == [{"name": "instruments", "probe_steps": 5}, {"name": "redo"}]
    assert ov["trainer.run_dir"] == str(r.run_dir)
    assert st.runs[0].non_embedding_params < r.non_embedding_params
    assert abs(r.non_embedding_params / 200e3 - 1) < 0.15


def test_grid_overrides_load_as_run_configs(tmp_path):
    from trainer.config import load_config

    st = _study(tmp_path, mitigations={"none": []})
    S._prepare_dirs(st)  # writes the inline base to OUT/base.yaml
    cfg = load_config(st.base_path, st.runs[-1].overrides)
    assert cfg.model_size == "200k" and cfg.phases["pre"].mode == "stationary" and cfg.trainer.seed == 1
    assert cfg.phases["pre"].optim.weight_decay == 0.1 and cfg.callbacks[0]["name"] == "instruments"


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_recorded_parameter_count_is_the_trained_models(tmp_path, flavour):
    """P of a preset or numeric size is counted on the model the run builds (the base config's flavour and
    block size with the size's layer shapes), not on the preset's own config."""
    from models.gpt import GPT
    from trainer.config import load_config
    from trainer.model_setup import resolve_model_config

    base = {**BASE, "model": {"block_size": 32, "flavour": flavour}}
    st = S.build_study({"name": "t", "base": base, "out_dir": str(tmp_path / "study"),
                        "grid": {"sizes": ["nano", "tiny", "200k"]}})
    S._prepare_dirs(st)
    for r in st.runs:
        cfg = load_config(st.base_path, r.overrides)
        model = GPT(resolve_model_config(cfg, vocab_size=cfg.data.vocab_size))
        assert r.non_embedding_params == model.num_params(), r.name


def test_more_grids_union_and_errors(tmp_path):
    raw = {"base": BASE, "out_dir": str(tmp_path), "grid": {"sizes": ["nano"], "seeds": [0, 1]},
           "more_grids": [{"sizes": ["nano", "micro"], "modes": ["stationary"], "seeds": [0]},
                          {"sizes": ["nano"], "seeds": [0]}]}  # the last adds nothing new
    st = S.build_study(raw)
    assert [r.name for r in st.runs] == ["nano-wdbase-none-continual-s0", "nano-wdbase-none-continual-s1",
                                         "nano-wdbase-none-stationary-s0", "micro-wdbase-none-stationary-s0"]
    assert not any("weight_decay" in o for o in st.runs[0].overrides)
    with pytest.raises(ConfigError, match="modes"):
        S.build_study({**raw, "more_grids": [], "grid": {"modes": ["sideways"]}})
    with pytest.raises(ConfigError, match="bogus"):
        S.build_study({**raw, "bogus": 1})
    with pytest.raises(ConfigError, match="base"):
        S.build_study({**raw, "base": str(tmp_path / "nope.yaml")})


def test_study_configs_in_repo_expand():
    tiny = S.load_study(ROOT / "configs/study/tiny.yaml")
    assert len(tiny.runs) == 3 and len({r.size for r in tiny.runs}) == 3
    cpu = S.load_study(ROOT / "configs/study/cpu.yaml")
    P = sorted({r.non_embedding_params for r in cpu.runs})
    assert len(P) >= 5 and P[0] <= 0.06e6 and 4.5e6 <= P[-1] <= 5.5e6
    assert {r.mode for r in cpu.runs} == {"continual", "stationary"}
    assert len({r.weight_decay for r in cpu.runs}) == 2 and len({r.seed for r in cpu.runs}) >= 2
    base = yaml.safe_load((ROOT / "configs/study/cpu.yaml").read_text())["base"]
    assert base["phases"]["pretrain"]["languages"] == ["en", "zh", "fr", "ja", "es", "de", "pt", "ru"]


# --- runner ---------------------------------------------------------------------------------------------
def test_rerun_skips_done_runs(tmp_path):
    st = _study(tmp_path, sizes=["nano"], weight_decay=[0.1], mitigations={"none": []}, modes=["continual"])
    calls = []
    runner = lambda study, spec: calls.append(spec.name)  # noqa: E731
    assert S.run_study(st, runner=runner, log=lambda *_: None) == {"done": 2, "failed": 0}
    assert all((r.run_dir / "DONE").is_file() and (r.run_dir / "study_run.json").is_file() for r in st.runs)
    assert S.run_study(st, runner=runner, log=lambda *_: None) == {"done": 0, "failed": 0}
    assert len(calls) == 2
    assert len((st.out_dir / "study_log.jsonl").read_text().splitlines()) == 2
    assert json.loads((st.out_dir / "study.json").read_text())["runs"][1]["seed"] == 1


def test_failure_is_recorded_and_retried(tmp_path, capsys):
    st = _study(tmp_path, sizes=["nano"], weight_decay=[0.1], mitigations={"none": []}, modes=["continual"])
    broken = {st.runs[1].name}

    def runner(study, spec):
        if spec.name in broken:
            raise RuntimeError("boom: out of cheese")

    assert S.run_study(st, runner=runner, log=lambda *_: None) == {"done": 1, "failed": 1}
    failed = st.runs[1].run_dir / "FAILED"
    assert "out of cheese" in json.loads(failed.read_text())["error"]
    assert S.run_study(st, runner=runner, log=lambda *_: None) == {"done": 0, "failed": 0}  # skipped
    assert {k: len(v) for k, v in S.status(st).items()} == {"done": 1, "failed": 1, "pending": 0}
    broken.clear()
    assert S.run_study(st, retry_failed=True, runner=runner, log=lambda *_: None) == {"done": 1, "failed": 0}
    assert not failed.exists() and (st.runs[1].run_dir / "DONE").is_file()


def test_preempted_run_stays_pending(tmp_path):
    st = _study(tmp_path, sizes=["nano"], weight_decay=[0.1], mitigations={"none": []}, modes=["continual"])

    def runner(study, spec):
        raise S.Preempted(spec.name)

    assert S.run_study(st, runner=runner, log=lambda *_: None) == {"done": 0, "failed": 0}
    assert [S.run_state(r) for r in st.runs] == ["pending", "pending"]
    assert not (st.runs[1].run_dir / "study_run.json").exists()  # not started after the preemption


def test_run_locked_by_another_process_is_left_alone(tmp_path):
    from trainer.rundir import RunLock

    st = _study(tmp_path, sizes=["nano"], weight_decay=[0.1], mitigations={"none": []}, modes=["continual"],
                seeds=[0])
    st.runs[0].run_dir.mkdir(parents=True)
    lock = RunLock(st.runs[0].run_dir / ".lock")
    try:
        assert S.run_study(st, runner=lambda s, r: None, log=lambda *_: None) == {"done": 0, "failed": 0}
        assert S.run_state(st.runs[0]) == "pending"
    finally:
        lock.release()
    assert S.run_study(st, runner=lambda s, r: None, log=lambda *_: None) == {"done": 1, "failed": 0}


def test_index_and_cli(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"base": BASE, "out_dir": str(tmp_path / "out"),
                                 "grid": {"sizes": ["nano", "micro"], "seeds": [0]}}))
    st = S.load_study(p)
    calls = []
    S.run_study(st, index=1, runner=lambda s, r: calls.append(r.index), log=lambda *_: None)
    assert calls == [1]
    S.run_study(st, index=[0, 1], runner=lambda s, r: calls.append(r.index), log=lambda *_: None)
    assert calls == [1, 0]
    with pytest.raises(UserError, match="out of range"):
        S.run_study(st, index=5, runner=lambda s, r: None, log=lambda *_: None)
    assert S.main(["status", str(p)]) == 0
    assert "2 runs: 2 done, 0 failed, 0 pending" in capsys.readouterr().out
    assert S.main(["list", str(p), f"out_dir={tmp_path / 'other'}"]) == 0
    assert str(tmp_path / "other") in capsys.readouterr().out


def test_subprocess_runner_records_a_real_failure(tmp_path):
    """A run config error in the child process ends as FAILED with the child's message."""
    st = S.build_study({"base": BASE, "out_dir": str(tmp_path / "o"), "overrides": ["trainer.micro_batch_size=0"],
                        "grid": {"sizes": ["nano"], "seeds": [0]}})
    assert S.run_study(st, parallel=2, runner=S.subprocess_runner, log=lambda *_: None) == {"done": 0, "failed": 1}
    assert "micro_batch_size" in (st.runs[0].run_dir / "FAILED").read_text()


# --- onset ------------------------------------------------------------------------------------------------
def test_smooth3():
    np.testing.assert_allclose(smooth3([0, 3, 6, 3]), [1.5, 3, 4, 4.5])
    assert smooth3([2.0]).tolist() == [2.0]


def test_onset_u_shape():
    d = [0, -5, -8, -9, -7, -4, 0, 4, 8]  # minimum at index 3
    assert onset_index(d) == 3
    assert detect_onset(d) == 3
    assert detect_onset(d, boundaries=[10 * i for i in range(9)]) == 30
    r = detect_onset(d, refine=True)
    assert 2.5 <= r <= 3.5


def test_onset_none_for_monotone_fall_and_late_blip():
    assert detect_onset([0, -1, -2, -3, -4, -5, -6, -7]) is None
    assert detect_onset([0, -2, -4, -6, -8, -9, -9.5, -5]) is None  # rises only at the last boundary
    assert detect_onset([0.0, 0.0, 0.0, 0.0, 0.0]) is None


def test_onset_noisy_u_ignores_a_transient_blip():
    rng = np.random.default_rng(0)
    base = [0, -6, -10, -12, -13, -12, -9, -5, 0, 5]  # true minimum at 4
    found = []
    for _ in range(50):
        d = np.array(base) + rng.normal(0, 0.4, len(base))
        found.append(onset_index(d))
    assert sum(f in (3, 4, 5) for f in found) >= 45
    # a one-step bump during the fall is not an onset: the curve falls again afterwards
    d = [0, -4, -8, -6, -10, -14, -16, -17, -12, -6, 0]
    assert onset_index(d) in (6, 7)


def test_onset_rise_from_start_is_first_boundary():
    assert detect_onset([0, 2, 4, 6, 8]) == 0


# --- fits -------------------------------------------------------------------------------------------------
def _power_data(b=0.83, a=2e-4, seeds=4, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(5e4, 5e6, 5)
    return {float(P): list(a * P ** b * np.exp(rng.normal(0, noise, seeds))) for P in sizes}


def test_fit_recovers_exponent_within_bootstrap_ci():
    groups = _power_data()
    P = [p for p, vs in groups.items() for _ in vs]
    y = [v for vs in groups.values() for v in vs]
    fit = fit_power_law(P, y)
    assert abs(fit["b"] - 0.83) < 0.1 and fit["r2"] > 0.9 and fit["se_b"] > 0
    assert fit["b_ci_t"][0] < 0.83 < fit["b_ci_t"][1]
    boot = bootstrap_exponent(groups, n=300, seed=1)
    assert boot["hi"] - boot["lo"] < 0.3 and not boot["degenerate"] and boot["lo"] <= fit["b"] <= boot["hi"]
    covered = 0
    for data_seed in range(10):  # a 95% CI: covers the true exponent in (nearly) every data set
        b = bootstrap_exponent(_power_data(seed=100 + data_seed, seeds=5), n=300, seed=data_seed)
        covered += b["lo"] < 0.83 < b["hi"]
    assert covered >= 8
    one = bootstrap_exponent({P: vs[:1] for P, vs in groups.items()}, n=50)
    assert one["degenerate"] and one["lo"] == pytest.approx(one["hi"])


def test_t_quantile():
    from trainer.analysis import _t975

    # from t tables (3 decimals)
    exact = {1: 12.706, 8: 2.306, 11: 2.201, 13: 2.160, 16: 2.120, 25: 2.060, 30: 2.042, 31: 2.040, 40: 2.021,
             45: 2.014, 60: 2.000, 120: 1.980, 200: 1.972, 10**6: 1.960}
    assert all(_t975(d) == pytest.approx(t, abs=6e-4) for d, t in exact.items())
    assert math.isnan(_t975(0))


def test_loo_prefers_the_true_model():
    groups = _power_data(b=0.5, noise=0.05)
    P = [p for p, vs in groups.items() for _ in vs]
    y = [v for vs in groups.values() for v in vs]
    f = fit_power_law(P, y)
    assert f["loo_preferred"] == "power" and f["loo_rmse_log_power"] < f["loo_rmse_log_linear"]
    Pl = np.geomspace(1e4, 1e7, 8)
    lin = fit_power_law(Pl, 1.0 + 1e-6 * Pl)  # flat, then linear: curved in log-log
    assert lin["loo_preferred"] == "linear" and lin["loo_rmse_log_linear"] < 1e-6
    assert math.isnan(fit_power_law([1e5], [3.0])["b"])


def test_best_weight_decay():
    recs = [{"size": 1e5, "weight_decay": 0.0, "pretrain_loss": 3.0, "sft_loss": 2.0, "final_delta_auc": 5.0},
            {"size": 1e5, "weight_decay": 0.1, "pretrain_loss": 3.1, "sft_loss": 1.5, "final_delta_auc": 1.0},
            {"size": 1e6, "weight_decay": 0.0, "pretrain_loss": 2.5},
            {"size": 1e6, "weight_decay": 0.1, "pretrain_loss": 2.4}]
    out = best_weight_decay(recs)
    assert out[1e5]["best_for_pretrain"] == 0.0 and out[1e5]["best_after_sft"] == 0.1
    assert out[1e5]["best_for_plasticity"] == 0.1
    assert out[1e6]["best_for_pretrain"] == 0.1 and out[1e6]["best_after_sft"] is None


# --- report from synthetic runs ------------------------------------------------------------------------------
def _fake_run(root, name, P, mode, wd, seed, onset, n=9, rng=None):
    d = root / "runs" / name
    d.mkdir(parents=True)
    meta = {"name": name, "size": str(P), "non_embedding_params": P, "mode": mode, "weight_decay": wd,
            "seed": seed, "mitigation": "none"}
    (d / "study_run.json").write_text(json.dumps(meta))
    (d / "DONE").write_text(json.dumps({"seconds": 1.0}))
    lines = []
    for k in range(n):
        dauc = -8 + 1.5 * (k - onset) ** 2 if mode == "continual" else -8 * k / n
        dauc += 0 if rng is None else rng.normal(0, 0.2)
        auc = 5.0 * (1 + dauc / 100) if k else 5.0
        lines.append({"boundary": k, "label": "init" if k == 0 else f"pre-l{k}", "phase": "pre",
                      "global_step": 10 * k, "eval": {"val/mean": 4 - 0.1 * k - wd},
                      "scalars": {"probe/auc": auc, "probe/delta_auc": dauc,
                                  "neurons/overall/dormant_ratio@0.1": 0.01 * k,
                                  "repr/overall/effective_rank": 30 - k, "repr/mean_abs_param": 0.02 + 0.001 * k}})
    (d / "boundaries.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")


def test_report_from_synthetic_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "study"
    for P, onset in ((50_000, 2), (500_000, 4), (5_000_000, 6)):  # named 50k, 500k, 5000k: reversed as text
        for seed in (0, 1):
            _fake_run(root, f"{P // 1000}k-c-s{seed}", P, "continual", 0.1, seed, onset, rng=rng)
        _fake_run(root, f"{P // 1000}k-st", P, "stationary", 0.1, 0, onset)
        _fake_run(root, f"{P // 1000}k-wd0", P, "continual", 0.0, 0, onset)
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "FAILED").write_text(json.dumps({"error": "RuntimeError: boom"}))
    md = write_report(root, n_boot=100)
    text = md.read_text()
    for png in ("delta_auc_continual.png", "delta_auc_stationary.png", "onset_vs_size.png", "correlates.png",
                "stationary_vs_continual.png", "weight_decay.png"):
        assert (md.parent / png).stat().st_size > 1000, png
        assert png in text
    assert "## Onset vs size" in text and "bootstrap 95% CI" in text and "broken: RuntimeError: boom" in text
    res = json.loads((root / "analysis.json").read_text())
    cont = next(f for f in res["fits"] if f["mode"] == "continual" and f["weight_decay"] == 0.1)
    assert cont["fit"]["b"] > 0.2  # onset grows with size in the synthetic data
    assert "not in this study" not in text
    # the per-run table lists runs by size (as text, "5000k-c-s0" would come before "50k-c-s0")
    names = [l.split("|")[1].strip() for l in text.splitlines() if l.startswith("| ") and "-c-s" in l.split("|")[1]]
    assert names == ["50k-c-s0", "50k-c-s1", "500k-c-s0", "500k-c-s1", "5000k-c-s0", "5000k-c-s1"], names


def test_report_handles_a_sparse_study(tmp_path):
    root = tmp_path / "study"
    _fake_run(root, "only", 50_000, "continual", 0.1, 0, 3)
    text = write_report(root, n_boot=10).read_text()
    assert text.count("not in this study") >= 3
    with pytest.raises(UserError):
        write_report(tmp_path / "nothing")


# --- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, cache_dir):
    from trainer import study_report

    raw = yaml.safe_load((ROOT / "configs/study/tiny.yaml").read_text())
    raw["out_dir"] = str(tmp_path / "tiny")
    raw["overrides"] = [f"data.cache_dir={cache_dir}"]
    st = S.build_study(raw, ROOT / "configs/study/tiny.yaml")
    assert S.run_study(st, log=lambda *_: None) == {"done": 3, "failed": 0}
    for r in st.runs:
        lines = (r.run_dir / "boundaries.jsonl").read_text().splitlines()
        assert len(lines) == 5  # init + 4 tasks
    assert S.run_study(st, log=lambda *_: None) == {"done": 0, "failed": 0}
    assert study_report.main([str(st.out_dir)]) == 0
    report = (st.out_dir / "report" / "report.md").read_text()
    assert "3 planned runs; 3 done" in report and (st.out_dir / "report" / "delta_auc_continual.png").is_file()
    # the same report from the study YAML (what `make study` runs) with its out_dir override
    assert study_report.main([str(ROOT / "configs/study/tiny.yaml"), f"out_dir={st.out_dir}",
                              "--out", str(tmp_path / "again")]) == 0
    assert "3 planned runs; 3 done" in (tmp_path / "again" / "report.md").read_text()
