"""Mitigations: exact neuron/optimizer-state edits, the math of each rule, tiny end-to-end
runs, `plasticity compare`, and identical ReDo resets on two DDP ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from models.gpt import GPT, ModelConfig
from mitigations.cbp import CBPState
from mitigations.l2_init import L2Init
from mitigations.neurons import attribution_scores, mlps
from mitigations.redo import redo_reset
from mitigations.rejuvenation import interpolate, reset_by_attribution
from mitigations.shrink_perturb import fresh_init, shrink_perturb
from mitigations.state_access import StateAccess
from mitigations.wd_schedule import wd_factor
from trainer.config import load_config
from trainer.errors import ConfigError, UserError
from trainer.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONTINUAL = Path(__file__).parent / "data" / "continual_tiny.yaml"
REPO = Path(__file__).resolve().parents[1]
INSTR = "{name: instruments, probe_steps: 4, probe_eval_every: 2, probe_eval_batches: 1, measure_batches: 1, sharpness_iters: 0, feature_rows: 64}"


def tiny_model_and_opt(flavour="gpt2", steps=3):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=1, n_embd=16, flavour=flavour))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 32, (4, 9))
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in model.named_parameters()}
    return params, moments


def check_reset(model, opt, before, chosen):
    """Chosen units: new incoming rows, zero outgoing columns, zero moments; everything else untouched."""
    params, moments = before
    named = dict(model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    touched = set()
    for i, mlp in enumerate(mlps(model)):
        idx = chosen.get(i, torch.zeros(0, dtype=torch.long))
        keep = torch.ones(mlp.out_proj().weight.shape[1], dtype=torch.bool)
        keep[idx] = False
        np_ = mlp.neuron_params()
        for (p, dim), kind in [(x, "in") for x in np_["incoming"]] + [(x, "out") for x in np_["outgoing"]]:
            n = name_of[id(p)]
            touched.add(n)
            new, old = p.detach().movedim(dim, 0), params[n].movedim(dim, 0)
            assert torch.equal(new[keep], old[keep]), n
            for k in ("exp_avg", "exp_avg_sq"):
                m_new, m_old = opt.state[p][k].movedim(dim, 0), moments[n][k].movedim(dim, 0)
                assert torch.equal(m_new[keep], m_old[keep]), (n, k)
                assert torch.all(m_new[~keep] == 0), (n, k)
            if len(idx):
                if kind == "out":
                    assert torch.all(new[~keep] == 0), n
                elif p.ndim == 1:
                    assert torch.all(new[~keep] == 0), n
                else:
                    assert not torch.equal(new[~keep], old[~keep]), n
                    assert float(new[~keep].std()) == pytest.approx(mlp.in_std, rel=0.6)
    for n, p in named.items():
        if n not in touched:
            assert torch.equal(p.detach(), params[n]), n
            assert all(torch.equal(opt.state[p][k], moments[n][k]) for k in ("exp_avg", "exp_avg_sq")), n


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_redo_resets_exactly_the_dormant_units(flavour):
    model, opt, _ = tiny_model_and_opt(flavour)
    before = snapshot(model, opt)
    H = mlps(model)[0].out_proj().weight.shape[1]
    scores = {0: torch.ones(H), 1: torch.ones(H)}
    scores[0][[1, 5, 7]] = 0.05
    scores[1][[0]] = 0.1  # ≤ τ is dormant
    scores[1][[2]] = 0.11
    done = redo_reset(model, StateAccess(opt), scores, tau=0.1, seed=0, step=1)
    assert done[0].tolist() == [1, 5, 7] and done[1].tolist() == [0]
    check_reset(model, opt, before, done)
    # same seed -> same draws (what makes DDP ranks agree)
    model2, opt2, _ = tiny_model_and_opt(flavour)
    redo_reset(model2, StateAccess(opt2), scores, tau=0.1, seed=0, step=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_cbp_replaces_lowest_utility_mature_units():
    model, opt, _ = tiny_model_and_opt()
    H = mlps(model)[0].out_proj().weight.shape[1]
    st = CBPState([H, H], decay=0.9, maturity=2, rate=0.05)
    h = torch.linspace(1, 2, H)
    h[[3, 9]] = 0.0
    for _ in range(2):
        st.update(0, h, torch.ones(H))
        assert st.select(0).numel() == 0  # not mature yet
    st.update(0, h, torch.ones(H))
    # bias correction: u/(1-η^a) of a constant signal is the signal itself
    assert torch.allclose(st.util[0] / (1 - 0.9 ** 3), h.double() * 1, atol=1e-9)
    chosen = st.select(0)  # 0.05 * 64 eligible = 3.2 -> 3 units, fraction carried over
    assert chosen.numel() == 3 and {3, 9} <= set(chosen.tolist())
    assert st.accum[0] == pytest.approx(0.2)
    before = snapshot(model, opt)
    from mitigations.neurons import reset_units
    reset_units(StateAccess(opt), mlps(model)[0], chosen, torch.Generator().manual_seed(0))
    st.reset(0, chosen)
    assert torch.all(st.age[0][chosen] == 0) and torch.all(st.util[0][chosen] == 0)
    check_reset(model, opt, before, {0: chosen})


def test_rejuvenation_interpolates_and_resets_lowest_attribution():
    model, opt, x = tiny_model_and_opt()
    base = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    interpolate(model, StateAccess(opt), base, 0.25)
    assert all(torch.allclose(p, 0.25 * ref[n]) for n, p in model.named_parameters())
    scores = attribution_scores(model, [x], lambda m, b: m(b[:, :-1], b[:, 1:])[1], lambda t: t)
    assert set(scores) == {0, 1} and all(float(s.sum()) > 0 for s in scores.values())
    assert all(p.grad is None for p in model.parameters())
    before = snapshot(model, opt)
    chosen = reset_by_attribution(model, StateAccess(opt), scores, 0.1, seed=0, step=0)
    for i, s in scores.items():
        assert len(chosen[i]) == int(0.1 * len(s))
        assert float(s[chosen[i]].max()) <= float(s[[j for j in range(len(s)) if j not in chosen[i].tolist()]].min())
    check_reset(model, opt, before, chosen)


def test_l2_init_pulls_toward_initial_weights():
    def run(coef):
        model, _, x = tiny_model_and_opt(steps=0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
        trainer = SimpleNamespace(unwrapped_model=model, optimizer=opt)
        cb = L2Init(coef=coef)
        cb.on_phase_start(trainer)
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(10):
            _, loss = model(x[:, :-1], x[:, 1:])
            term = cb.loss_term(trainer, model)
            (loss if term is None else loss + term).backward()
            opt.step()
            opt.zero_grad()
        state = cb.state_dict()
        assert torch.equal(state["theta0"]["wte.weight"], theta0["wte.weight"])
        return sum(float((p.detach() - theta0[n]).pow(2).sum()) for n, p in model.named_parameters())

    assert run(1.0) < 0.8 * run(0.0)


def test_shrink_perturb_math():
    model, opt, _ = tiny_model_and_opt()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    shrink_perturb(model, StateAccess(opt), shrink=0.4, sigma=0.0, noise="init", seed=1)
    assert all(torch.allclose(p, 0.4 * ref[n]) for n, p in model.named_parameters())
    model, opt, _ = tiny_model_and_opt()
    init = fresh_init(model.cfg, 7)
    shrink_perturb(model, StateAccess(opt), shrink=0.5, sigma=0.1, noise="init", seed=7)
    assert all(torch.allclose(p, 0.5 * ref[n] + 0.1 * init[n], atol=1e-7) for n, p in model.named_parameters())
    model, opt, _ = tiny_model_and_opt()
    shrink_perturb(model, StateAccess(opt), shrink=1.0, sigma=0.01, noise="normal", seed=3, matrices_only=True)
    for n, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.equal(p, ref[n])
        else:
            assert float((p.detach() - ref[n]).std()) == pytest.approx(0.01, rel=0.3)


def test_wd_schedule_values():
    assert wd_factor("constant", 0.7, 1.0, 0.0) == 1.0
    assert wd_factor("linear", 0.25, 1.0, 0.0) == pytest.approx(0.75)
    assert wd_factor("cosine", 0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert wd_factor("cosine", 0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert wd_factor("cosine", 1.0, 2.0, 0.5) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        from mitigations.wd_schedule import WeightDecaySchedule
        WeightDecaySchedule(schedule="exp")


def test_replay_mixes_earlier_languages_and_refuses_other_phases(tmp_path, cache_dir):
    from trainer.callbacks import Callback

    class Spy(Callback):
        def __init__(self):
            self.weights = {}

        def post_step(self, trainer, logs):
            src = trainer.runner.source
            self.weights[trainer.task_idx] = dict(zip(src.streams, src.weights.tolist()))

    spy = Spy()
    cfg = load_config(CONTINUAL, tiny_overrides(tmp_path / "r", cache_dir, callbacks="[{name: replay, fraction: 0.3}]",
                                                **{"phases.pre.steps_per_task": 2}))
    assert Trainer(cfg, [spy]).run() == "done"
    assert spy.weights[0] == {"en": pytest.approx(1.0)}
    assert spy.weights[1] == {"fr": pytest.approx(0.7), "en": pytest.approx(0.3)}
    assert spy.weights[2] == {"de": pytest.approx(0.7), "en": pytest.approx(0.15), "fr": pytest.approx(0.15)}
    bad = load_config(CONTINUAL, tiny_overrides(tmp_path / "b", cache_dir, callbacks="[{name: replay, fraction: 0.3}]",
                                                **{"phases.pre.mode": "stationary"}))
    with pytest.raises(ConfigError, match="replay"):
        Trainer(bad).run()


def _run(run_dir, cache_dir, mitigation):
    entries = [INSTR] + ([mitigation] if mitigation else [])
    cfg = load_config(CONTINUAL, tiny_overrides(run_dir, cache_dir, callbacks="[" + ", ".join(entries) + "]",
                                                **{"phases.pre.steps_per_task": 4, "trainer.ckpt_interval": 0,
                                                   "trainer.eval_interval": 100}))
    assert Trainer(cfg).run() == "done"
    return [json.loads(l) for l in (run_dir / "boundaries.jsonl").read_text().splitlines()]


MITIGATIONS = {
    "redo": "{name: redo, tau: 0.5, every: 2}",
    "cbp": "{name: cbp, replacement_rate: 0.05, maturity: 1}",
    "l2_init": "{name: l2_init, coef: 0.01}",
    "shrink_perturb": "{name: shrink_perturb, shrink: 0.8, sigma: 0.01}",
    "replay": "{name: replay, fraction: 0.25}",
    "wd_schedule": "{name: wd_schedule, schedule: linear}",
    "rejuvenation": "{name: rejuvenation, alpha: 1.0, reset_fraction: 0.1, batches: 1, at: [task_start]}",
}


# what each mitigation must have done in the run: (logged key, test on its values); shrink & perturb's effect on the
# weights is checked in test_shrink_perturb_callback_shrinks_the_weights
EFFECT = {"redo": ("redo/reset", lambda v: sum(v) > 0), "cbp": ("cbp/replaced", lambda v: sum(v) > 0),
          "l2_init": ("l2_init/sq_dist", lambda v: max(v) > 0),
          "shrink_perturb": ("shrink_perturb/applied", lambda v: v == [1.0, 2.0, 3.0]),  # once per task end
          "replay": ("replay/fraction", lambda v: set(v) == {0.25}),
          "wd_schedule": ("train/weight_decay", lambda v: v == sorted(v, reverse=True) and v[0] > v[-1]),
          "rejuvenation": ("rejuvenation/reset", lambda v: sum(v) > 0)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_end_to_end_each_mitigation(tmp_path, cache_dir, name):
    lines = _run(tmp_path / name, cache_dir, MITIGATIONS[name])
    assert [l["label"] for l in lines] == ["init", "pre-en", "pre-fr", "pre-de"]
    assert all("probe/delta_auc" in l["scalars"] for l in lines)
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    key, acted = EFFECT[name]
    values = [r[key] for r in rows if key in r]
    assert values and acted(values), (key, values)


def test_shrink_perturb_callback_shrinks_the_weights(tmp_path, cache_dir):
    """At each task end θ <- 0.8 θ + 0.01 θ_init: the weights right after the callback are 0.8 x those before,
    up to the small perturbation."""
    from trainer.callbacks import Callback
    from mitigations.shrink_perturb import ShrinkPerturb

    class Snapshot(Callback):
        def __init__(self):
            self.seen = []

        def on_task_end(self, trainer):
            self.seen.append(torch.cat([p.detach().flatten().clone() for p in trainer.unwrapped_model.parameters()]))

    before, after = Snapshot(), Snapshot()
    cfg = load_config(CONTINUAL, tiny_overrides(tmp_path / "r", cache_dir, **{"phases.pre.steps_per_task": 2}))
    assert Trainer(cfg, [before, ShrinkPerturb(shrink=0.8, sigma=0.01), after]).run() == "done"
    assert len(before.seen) == len(after.seen) == 3
    for b, a in zip(before.seen, after.seen):
        assert (a - 0.8 * b).norm() < 0.05 * b.norm()  # the perturbation is small...
        assert (a - b).norm() > 0.15 * b.norm()  # ...the shrink is not


def test_compare_table_and_plot(tmp_path, cache_dir, capsys):
    from trainer.cli import main as cli_main

    _run(tmp_path / "base", cache_dir, None)
    _run(tmp_path / "redo", cache_dir, MITIGATIONS["redo"])
    assert cli_main(["compare", str(tmp_path / "base"), str(tmp_path / "redo"), "--out", str(tmp_path / "cmp")]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.split()[:2] == ["run", "mitigations"])  # after any library chatter
    rows = {l.split()[0]: l.split() for l in lines[start + 2:start + 4]}
    assert sorted(rows) == ["base", "redo"] and rows["base"][1] == "none" and rows["redo"][1] == "redo"
    for name in ("base", "redo"):  # every column recomputed from the run's own files
        bounds = [json.loads(l)["scalars"] for l in (tmp_path / name / "boundaries.jsonl").read_text().splitlines()]
        vals = [json.loads(l)["val/mean"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if "val/mean" in l]
        later = [b["probe/delta_auc"] for b in bounds[1:]]
        assert rows[name][2:] == [f"{vals[-1]:.3f}", f"{sum(later) / len(later):.2f}", f"{later[-1]:.2f}",
                                  f"{bounds[-1]['neurons/overall/dormant_ratio@0.1']:.3f}"], rows[name]
    png = tmp_path / "cmp" / "compare.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["compare", str(tmp_path / "missing")]) == 2
    from trainer.compare import load_run
    with pytest.raises(UserError, match="boundaries.jsonl"):
        load_run(str(tmp_path / "cmp"))


def test_unsupported_combinations_are_refused(tmp_path, cache_dir):
    from trainer.callbacks import build_callbacks

    with pytest.raises(ConfigError, match="shrink"):
        build_callbacks([{"name": "shrink_perturb", "shrink": 2.0}])
    with pytest.raises(ConfigError, match="base_phase"):
        build_callbacks([{"name": "rejuvenation", "alpha": 0.5}])
    with pytest.raises(ConfigError, match="at="):
        build_callbacks([{"name": "redo", "at": ["sometimes"]}])
    cfg = load_config(CONTINUAL, tiny_overrides(tmp_path / "r", cache_dir,
                                                callbacks="[{name: rejuvenation, base_phase: pre, phases: [pre]}]"))
    with pytest.raises(ConfigError, match="does not come after"):
        Trainer(cfg).run()


def test_rejuvenation_at_the_start_of_a_pretraining_phase(tmp_path, cache_dir, monkeypatch):
    """The shipped config resets at the start of pretraining phase c, before c's data stream exists: the
    attribution uses held-out validation text of c's languages."""
    import mitigations.rejuvenation as R

    asked = []

    def spy(trainer, langs, n):
        asked.append(list(langs))
        return real(trainer, langs, n)
    real = R.validation_rows
    monkeypatch.setattr(R, "validation_rows", spy)
    steps = [f"phases.{p}.steps_per_task=3" for p in "abc"]
    cfg = load_config(REPO / "configs" / "mitigations" / "rejuvenation.yaml",
                      [f"trainer.run_dir={tmp_path / 'r'}", f"data.cache_dir={cache_dir}", *steps,
                       "callbacks=[{name: rejuvenation, phases: [c], base_phase: a, reset_fraction: 0.05, batches: 2}]"])
    assert Trainer(cfg).run() == "done"
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    (rej,) = [r for r in rows if "rejuvenation/reset" in r]
    assert rej["phase"] == "c" and rej["rejuvenation/reset"] > 0 and rej["rejuvenation/interpolated"] > 0
    assert asked == [["de"]]  # phase c's language, the held-out (validation) rows


def test_rejuvenation_peeks_sft_batches_without_consuming_them():
    from data.packing import RowStream
    from mitigations.rejuvenation import Rejuvenation

    class Runner:  # the SFT runner's stream interface
        def __init__(self):
            self.stream = RowStream(torch.arange(40).reshape(20, 2), seed=0)

        def next_batch(self):
            return self.stream.take(4)

        def state_dict(self):
            return {"stream": self.stream.state_dict()}

        def load_state_dict(self, state):
            self.stream.load_state_dict(state["stream"])

    runner = Runner()
    trainer = SimpleNamespace(runner=runner, phase_cfg=SimpleNamespace(kind="sft"),
                              cfg=SimpleNamespace(trainer=SimpleNamespace(micro_batch_size=4)))
    batches, _ = Rejuvenation(alpha=1.0, batches=3)._batches(trainer)
    assert len(batches) == 3
    for b in batches:  # training then gets exactly the batches the attribution looked at
        assert torch.equal(runner.next_batch(), b)


@pytest.mark.parametrize("callback,match", [
    ("{name: replay, phases: [post]}", "replay needs a continual"),
    ("{name: rejuvenation, phases: [post], base_phase: post}", "does not come after"),
])
def test_checks_of_a_callback_scoped_to_a_later_phase_run_at_the_start(tmp_path, cache_dir, callback, match):
    """A misfit in a later phase fails before the first phase trains, not when that phase starts."""
    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(CONTINUAL.read_text() + "  post:\n    kind: pretrain\n    mode: stationary\n"
                        "    languages: [en]\n    steps_per_task: 2\n")
    cfg = load_config(cfg_file, tiny_overrides(tmp_path / "r", cache_dir, callbacks=f"[{callback}]"))
    with pytest.raises(ConfigError, match=match):
        Trainer(cfg).run()
    assert not (tmp_path / "r" / "metrics.jsonl").is_file() or not (tmp_path / "r" / "metrics.jsonl").read_text()


REDO_HASH = '''
import hashlib, sys, torch
sys.path.insert(0, "tests")
from trainer.callbacks import Callback
from trainer.loop import Trainer
from trainer.config import load_config

class Hash(Callback):
    def on_run_end(self, trainer):
        h = hashlib.sha256()
        for n, p in trainer.unwrapped_model.state_dict().items():
            h.update(n.encode()); h.update(p.detach().float().contiguous().numpy().tobytes())
        open(f"{OUT}/rank{trainer.accelerator.process_index}.txt", "w").write(h.hexdigest())

cfg = load_config(sys.argv[1], sys.argv[2:])
t = Trainer(cfg, [Hash()])
t.run()
t.accelerator.end_training()
'''


@pytest.mark.slow
def test_ddp_redo_identical_on_both_ranks(tmp_path, cache_dir):
    run = tmp_path / "ddp"
    script = tmp_path / "redo_hash.py"
    script.write_text(REDO_HASH.replace("{OUT}", str(tmp_path)))
    overrides = tiny_overrides(run, cache_dir, callbacks="[{name: redo, tau: 0.5, every: 2}]",
                               **{"phases.pre.steps_per_task": 3, "phases.pre.languages": "[en,fr]",
                                  "trainer.ckpt_interval": 0})
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), str(CONTINUAL), *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    h0, h1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert h0 == h1
    resets = [json.loads(l).get("redo/reset") for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r for r in resets if r) > 0
    exported = load_file(str(run / "phases" / "pre" / "model.safetensors"))
    assert set(exported)


def test_compare_reads_a_run_whose_last_line_was_torn(tmp_path):
    from trainer.compare import _read_jsonl

    f = tmp_path / "boundaries.jsonl"
    f.write_text('{"boundary": 0}\n{"boundary": 1}\n{"bound')  # killed mid-write
    assert _read_jsonl(f) == [{"boundary": 0}, {"boundary": 1}]
    f.write_text('{"boundary": 0}\n{"bound\n{"boundary": 2}\n')  # damage elsewhere is still an error
    with pytest.raises(UserError, match=r"boundaries\.jsonl:2"):
        _read_jsonl(f)
