"""The instruments callback and the plasticity probe, end to end on a tiny continual run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import StopAt, tiny_overrides
from trainer.callbacks import Callback
from trainer.config import load_config
from trainer.instruments.probe import ProbeConfig, curve_auc, delta_auc, probe_model
from trainer.loop import Trainer
from models.gpt import GPT, ModelConfig

CONTINUAL = Path(__file__).parent / "data" / "continual_tiny.yaml"
INSTRUMENTS = ("[{name: instruments, probe_steps: 12, probe_eval_every: 4, sharpness_iters: 3, online_every: 4,"
               " metrics_every: 5}]")


def test_curve_auc_and_delta():
    assert curve_auc([[0, 2.0], [10, 2.0]]) == 2.0
    assert curve_auc([[0, 4.0], [5, 2.0], [10, 2.0]]) == pytest.approx((15 + 10) / 10)
    assert delta_auc(5.5, 5.0) == pytest.approx(10.0) and delta_auc(5.0, 5.0) == 0.0


def test_probe_learns_and_leaves_model_copy_semantics():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=16))
    rows = torch.arange(9).repeat(64, 1) % 16  # a trivially learnable sequence
    res = probe_model(model, rows[:48], rows[48:], ProbeConfig(steps=30, lr=1e-2, batch_size=8, eval_every=10))
    assert [s for s, _ in res["curve"]] == [0, 10, 20, 30]
    assert res["final"] < res["initial"] - 0.5
    assert min(l for _, l in res["curve"]) <= res["auc"] <= max(l for _, l in res["curve"])


class HookSpy(Callback):
    """Records how many forward hooks the MLP modules carry after each step."""

    def __init__(self):
        self.counts = []

    def post_step(self, trainer, logs):
        mods = [m for n, m in trainer.unwrapped_model.named_modules() if n.endswith("mlp.act") or n.endswith("mlp.hidden")]
        self.counts.append((trainer.global_step, sum(len(m._forward_hooks) for m in mods)))


def test_boundary_reports(tmp_path, cache_dir):
    run = tmp_path / "r"
    spy = HookSpy()
    cfg = load_config(CONTINUAL, tiny_overrides(run, cache_dir, callbacks=INSTRUMENTS))
    assert Trainer(cfg, [spy]).run() == "done"
    assert all(c == 0 for _, c in spy.counts)  # no hooks outside measurements (spy runs after online stop)
    lines = [json.loads(l) for l in (run / "boundaries.jsonl").read_text().splitlines()]
    assert [l["label"] for l in lines] == ["init", "pre-en", "pre-fr", "pre-de"]
    first = lines[1]["scalars"]["probe/auc"]
    for l in lines:
        s = l["scalars"]
        for key in ("neurons/overall/dormant_ratio@0", "neurons/overall/dormant_ratio@0.01",
                    "neurons/overall/dormant_ratio@0.1", "neurons/overall/dead", "neurons/overall/saturated_ratio",
                    "repr/overall/effective_rank", "repr/overall/srank", "repr/overall/feature_stable_rank",
                    "repr/overall/cloned_pairs", "repr/mean_abs_param", "repr/attention/entropy",
                    "repr/attention/lazy_heads", "repr/attention/collapsed_heads", "repr/sharpness",
                    "probe/auc", "probe/delta_auc", "probe/fresh_auc", "probe/transfer_gain"):
            assert key in s, key
        assert len(l["probe_curve"]) == 4
    # ΔAUC is relative to the first boundary's probe (the initial model's here)
    init_auc = lines[0]["scalars"]["probe/auc"]
    assert lines[1]["scalars"]["probe/delta_auc"] == pytest.approx(100 * (first / init_auc - 1))
    dirs = sorted((run / "boundaries").iterdir())
    assert len(dirs) == 4
    neurons = load_file(str(dirs[-1] / "neurons.safetensors"))
    assert neurons["blocks.0.mlp.hidden/score"].shape == (128,)
    online = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "online/update_norm" in l]
    assert [o["step"] for o in online] == [4, 8, 12, 16] and all(o["online/update_norm"] > 0 for o in online)
    assert all(o["online/overall/tokens"] == 4 * 32 // 4 for o in online)  # every 4th token of a 4x32 batch
    periodic = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "periodic/" in l]
    assert [p["step"] for p in periodic] == [5, 10, 15]
    assert all("periodic/repr/overall/effective_rank" in p and "periodic/probe/auc" not in p for p in periodic)


def test_boundary_state_survives_resume(tmp_path, cache_dir):
    run = tmp_path / "r"
    cfg = load_config(CONTINUAL, tiny_overrides(run, cache_dir, callbacks=INSTRUMENTS))
    assert Trainer(cfg, [StopAt(9)]).run() == "preempted"
    assert Trainer(load_config(CONTINUAL, tiny_overrides(run, cache_dir, callbacks=INSTRUMENTS))).run() == "done"
    lines = [json.loads(l) for l in (run / "boundaries.jsonl").read_text().splitlines()]
    assert [l["boundary"] for l in lines] == [0, 1, 2, 3]
    straight = tmp_path / "s"
    Trainer(load_config(CONTINUAL, tiny_overrides(straight, cache_dir, callbacks=INSTRUMENTS))).run()
    other = [json.loads(l) for l in (straight / "boundaries.jsonl").read_text().splitlines()]
    assert [l["scalars"]["probe/delta_auc"] for l in lines] == [l["scalars"]["probe/delta_auc"] for l in other]


def test_step_hooks_count_only_the_training_forward(tmp_path, cache_dir):
    """Online statistics and CBP's utility cover the step's training tokens only, also at steps where a callback
    before them runs forwards of its own on the same model in post_step (periodic metrics, ReDo's scoring)."""
    from mitigations.cbp import ContinualBackprop

    class CBPSpy(ContinualBackprop):
        def post_step(self, trainer, logs):
            self.seen.append(int(self._hooks.accumulator.per_neuron()["blocks.0.mlp.hidden/count"][0]))
            super().post_step(trainer, logs)

    cbp = CBPSpy(replacement_rate=0.05, maturity=1)
    cbp.seen = []
    run = tmp_path / "r"
    callbacks = ("[{name: instruments, online_every: 2, online_token_stride: 1, metrics_every: 2, probe: false,"
                 " at_run_start: false}, {name: redo, tau: 0.1, every: 2}]")
    cfg = load_config(CONTINUAL, tiny_overrides(run, cache_dir, callbacks=callbacks,
                                                **{"trainer.eval_interval": 100}))
    assert Trainer(cfg, [cbp]).run() == "done"
    step_tokens = 4 * 32  # micro-batch 4 x block 32
    assert cbp.seen and set(cbp.seen) == {step_tokens}
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    online = [r["online/overall/tokens"] for r in rows if "online/overall/tokens" in r]
    assert online and set(online) == {step_tokens}
    assert any("periodic/repr/overall/effective_rank" in r for r in rows) and any("redo/reset" in r for r in rows)


def test_tensorboard_gets_the_scalars(tmp_path, cache_dir):
    """trainer.tensorboard=true (the default; the other tests turn it off for speed) writes event files with
    the logged scalars and the boundary measurements."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    cfg = load_config(CONTINUAL, tiny_overrides(run, cache_dir, callbacks="[{name: instruments, probe: false}]",
                                                **{"trainer.tensorboard": "true", "phases.pre.steps_per_task": 2}))
    assert Trainer(cfg).run() == "done"
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 7))
    assert "boundary/neurons/overall/dead_ratio" in tags and "val/mean" in tags
    assert "boundary/blocks.0.mlp.hidden/score" in ea.Tags()["histograms"]
