"""Config loading, schedules, parameter groups, checkpoints and bit-exact resume."""
import json
from pathlib import Path

import pytest
import torch

from conftest import StopAt, tiny_overrides
from trainer import checkpoint
from trainer.callbacks import Callback
from trainer.cli import main as cli_main
from trainer.config import OptimConfig, load_config
from trainer.errors import ConfigError
from trainer.loop import Trainer
from trainer.optim import lr_at, param_groups

CONTINUAL = Path(__file__).parent / "data" / "continual_tiny.yaml"


def write_cfg(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


# --- config -------------------------------------------------------------------------------
def test_unknown_key_names_the_key(tmp_path):
    p = write_cfg(tmp_path, "trainer:\n  learning_rate: 0.1\nphases:\n  p: {kind: pretrain}\n")
    with pytest.raises(ConfigError, match="trainer.learning_rate"):
        load_config(p)


def test_override_unknown_key_and_bad_type(tmp_path):
    p = write_cfg(tmp_path, "phases:\n  p: {kind: pretrain}\n")
    with pytest.raises(ConfigError, match="trainer.nope"):
        load_config(p, ["trainer.nope=1"])
    with pytest.raises(ConfigError, match="trainer.micro_batch_size"):
        load_config(p, ["trainer.micro_batch_size=many"])


def test_overrides_reach_phase_sections(tmp_path):
    p = write_cfg(tmp_path, "phases:\n  pre: {kind: pretrain}\n  sft: {kind: sft, steps: 3}\n")
    cfg = load_config(p, ["phases.sft.optim.lr=1e-4", "phases.pre.languages=[en,ja]"])
    assert list(cfg.phases) == ["pre", "sft"]
    assert cfg.phases["sft"].optim.lr == 1e-4 and cfg.phases["pre"].languages == ["en", "ja"]


@pytest.mark.parametrize("override,key", [
    ("phases.p.optim.lr=-1", "phases.p.optim.lr"),
    ("phases.p.kind=dpo", "phases.p.kind"),
    ("phases.p.mode=random", "phases.p.mode"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("phases.p.weights=[1.0]", "phases.p.weights"),
    ("trainer.log_interval=0", "trainer.log_interval"),
    ("phases.p.kind=rl phases.p.steps=2 phases.p.rl.max_new_tokens=0", "phases.p.rl.max_new_tokens"),
    ("phases.p.kind=rl phases.p.steps=2 phases.p.rl.clip_eps=-0.5", "phases.p.rl.clip_eps"),
    ("phases.p.kind=rl phases.p.steps=2 phases.p.rl.kl_coef=-1", "phases.p.rl.kl_coef"),
    ("phases.p.kind=sft phases.p.steps=2 phases.p.sft.max_new_tokens=0", "phases.p.sft.max_new_tokens"),
    ("model_size=10", "model_size"),
])
def test_impossible_values(tmp_path, override, key):
    p = write_cfg(tmp_path, "phases:\n  p: {kind: pretrain, languages: [en, fr]}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p, override.split())


def test_cli_bad_key_exit_2_one_line(tmp_path, capsys):
    p = write_cfg(tmp_path, "phases:\n  p: {kind: pretrain}\n")
    rc = cli_main(["train", str(p), "trainer.lr=1", f"trainer.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "trainer.lr" in err
    assert not (tmp_path / "run").exists()


def test_duplicate_yaml_key_is_refused(tmp_path):
    p = write_cfg(tmp_path, "phases:\n  pre: {kind: pretrain}\n  sft: {kind: sft, steps: 3}\n  pre: {kind: pretrain}\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: duplicate key 'phases\.pre' \(line 4\)"):
        load_config(p)


def test_later_phase_no_decay_must_match_the_first(tmp_path):
    p = write_cfg(tmp_path, "phases:\n  a: {kind: pretrain, optim: {no_decay: [norm]}}\n  b: {kind: sft, steps: 3}\n")
    with pytest.raises(ConfigError, match=r"phases\.b\.optim\.no_decay.*fixed for the whole run"):
        load_config(p)
    assert load_config(p, ["phases.b.optim.no_decay=[norm]"]).phases["b"].optim.no_decay == ["norm"]
    # the same categories in another order are the same groups
    assert load_config(p, ["phases.a.optim.no_decay=[norm,bias]", "phases.b.optim.no_decay=[bias,norm]"])


def test_model_size_too_small_fails_before_the_run_dir_exists(tmp_path, capsys):
    p = write_cfg(tmp_path, "phases:\n  p: {kind: pretrain}\n")
    assert cli_main(["train", str(p), "model_size=10", f"trainer.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_size" in err[0], err
    assert not (tmp_path / "run").exists()


def test_malformed_yaml(tmp_path, capsys):
    p = write_cfg(tmp_path, "phases: [unclosed\n")
    assert cli_main(["train", str(p)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


# --- schedules and groups -----------------------------------------------------------------
def test_lr_schedules():
    o = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, o) == pytest.approx(0.1) and lr_at(9, 100, o) == pytest.approx(1.0)
    assert lr_at(99, 100, o) == pytest.approx(0.1)
    assert lr_at(10, 100, o) > lr_at(50, 100, o) > lr_at(90, 100, o)
    w = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, 100, w) == 1.0 and lr_at(99, 100, w) == pytest.approx(0.0) and 0 < lr_at(90, 100, w) < 1
    c = OptimConfig(lr=0.5, warmup_steps=2, schedule="constant")
    assert lr_at(1, 10, c) == 0.5 and lr_at(9, 10, c) == 0.5


def test_param_groups_skip_norms_biases_embeddings():
    from models.gpt import GPT, ModelConfig
    m = GPT(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16))
    decay, keep = param_groups(m, 0.1, ["norm", "bias", "embedding"])
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.dim() == 2 and "wte" not in names[id(p)] and "wpe" not in names[id(p)] for p in decay["params"])
    assert any("bias" in names[id(p)] for p in keep["params"]) and any("wte" in names[id(p)] for p in keep["params"])
    assert len(decay["params"]) + len(keep["params"]) == len(list(m.parameters()))
    decay_all, _ = param_groups(m, 0.1, [])
    assert len(decay_all["params"]) == len(list(m.parameters()))
    untied = GPT(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, tie_embeddings=False))
    decay, keep = param_groups(untied, 0.1, ["norm", "bias", "embedding"])
    assert any(p is untied.lm_head.weight for p in decay["params"])  # an untied head decays, as in nanoGPT
    assert any(p is untied.wte.weight for p in keep["params"])


# --- training, checkpoints, resume ----------------------------------------------------------
def losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def continual_cfg(run_dir, cache_dir, **extra):
    return load_config(CONTINUAL, tiny_overrides(run_dir, cache_dir, **extra))


def test_resume_is_bit_exact(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    assert Trainer(continual_cfg(straight, cache_dir)).run() == "done"
    split = tmp_path / "split"
    # Stop inside the second task (steps 1-6 are task 0, 7-12 task 1): crosses a boundary and a reset.
    assert Trainer(continual_cfg(split, cache_dir), [StopAt(9)]).run() == "preempted"
    assert len(losses(split)) == 9
    assert Trainer(continual_cfg(split, cache_dir)).run() == "done"
    a, b = losses(straight), losses(split)
    assert [s for s, _ in a] == list(range(1, 19)) and a == b
    from safetensors.torch import load_file
    fa, fb = (load_file(str(d / "phases" / "pre" / "model.safetensors")) for d in (straight, split))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


class Unfused(Callback):
    """The optimizer as built by the code before fused AdamW (what an old checkpoint restores)."""
    def on_run_start(self, trainer):
        for g in trainer.optimizer.param_groups:
            g["fused"] = None


def test_optimizer_is_fused_and_an_unfused_checkpoint_resumes_unfused(tmp_path, cache_dir):
    """AdamW is fused; a checkpoint from before (param_groups with fused=None) keeps stepping unfused, so an old
    run resumes bit-exactly (fused and unfused AdamW round differently)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert Trainer(continual_cfg(straight, cache_dir), [Unfused()]).run() == "done"
    assert Trainer(continual_cfg(split, cache_dir), [Unfused(), StopAt(9)]).run() == "preempted"
    resumed = Trainer(continual_cfg(split, cache_dir))  # today's code: built fused, then the checkpoint loads
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    assert resumed.run() == "done"
    assert losses(straight) == losses(split)
    fused = tmp_path / "fused"
    assert Trainer(continual_cfg(fused, cache_dir)).run() == "done"
    assert losses(fused) != losses(straight)  # the setting matters: unfused and fused AdamW round differently


def test_the_probe_steps_adamw_like_the_run(tmp_path, cache_dir, monkeypatch):
    """Probe results of an old run resumed with today's code stay comparable with its earlier ones."""
    import trainer.instruments.callback as instruments
    from trainer.callbacks import build_callbacks

    seen, real = [], instruments.probe_model
    monkeypatch.setattr(instruments, "probe_model", lambda *a, **kw: seen.append(kw["fused"]) or real(*a, **kw))
    entry = [{"name": "instruments", "probe_steps": 2, "sharpness_iters": 0}]
    for run, extra, fused in (("old", [Unfused()], False), ("new", [], True)):
        seen.clear()
        assert Trainer(continual_cfg(tmp_path / run, cache_dir), extra + build_callbacks(entry)).run() == "done"
        assert seen and all(f is fused for f in seen), (run, seen)


def test_fp16_overflow_lowers_the_loss_scale_and_training_goes_on(tmp_path, cache_dir):
    """fp16 on a GPU: accelerate steps through a GradScaler. An overflowed step must still reach the scaler (it
    skips the update and halves its scale); skipping it made the next clip raise "unscale_() has already been
    called". accelerate builds no scaler on CPU, so the test installs the one it builds on a GPU."""
    from accelerate.optimizer import patch_optimizer_step
    from accelerate.state import AcceleratorState

    class Overflow(Callback):
        def post_backward(self, trainer):
            if trainer.global_step + 1 == 3:  # the 3rd step's gradients overflow
                for p in trainer.model.parameters():
                    p.grad.fill_(float("inf"))

    class Recorder(Callback):
        def pre_step(self, trainer):
            self.before = [p.detach().clone() for p in trainer.model.parameters()]

        def post_step(self, trainer, logs):
            if trainer.global_step == 3:
                self.unchanged = all(torch.equal(a, p) for a, p in zip(self.before, trainer.model.parameters()))

    AcceleratorState._reset_state()  # accelerate keeps one precision per process; earlier tests set "no"
    try:
        t = Trainer(continual_cfg(tmp_path / "r", cache_dir, **{"trainer.mixed_precision": "fp16"}),
                    [Overflow(), rec := Recorder()])
        t.accelerator.native_amp, t.accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        o = t.optimizer  # what AcceleratedOptimizer.__init__ sets up when it gets a scaler
        o.scaler, o._accelerate_step_called = t.accelerator.scaler, False
        o._optimizer_original_step_method = o.optimizer.step
        o._optimizer_patched_step_method = patch_optimizer_step(o, o.optimizer.step)
        assert t.run() == "done"
    finally:
        AcceleratorState._reset_state()  # later tests build their accelerators without fp16
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss_scale" in r]
    assert [r["train/loss_scale"] for r in rows[:4]] == [1024.0, 1024.0, 512.0, 512.0]
    assert rec.unchanged and all(r["train/nonfinite_steps"] == 0 for r in rows) and len(rows) == 18
    assert rows[0]["train/grad_norm"] < 100  # clipped after unscaling (the scaled norm is ~1000x larger)


def test_continual_tasks_and_optimizer_reset(tmp_path, cache_dir):
    seen = []

    class Probe(Callback):
        def on_task_start(self, trainer):
            from trainer.optim import innermost
            state = innermost(trainer.optimizer).state.values()
            seen.append((trainer.task_name, sum(float(v.abs().sum()) for st in state for v in st.values())))

        def post_step(self, trainer, logs):
            seen.append(("lr", logs["train/lr"]))

    Trainer(continual_cfg(tmp_path / "r", cache_dir), [Probe()]).run()
    starts = [s for s in seen if s[0] != "lr"]
    assert [name for name, _ in starts] == ["en", "fr", "de"]
    assert all(total == 0 for _, total in starts)  # Adam moments and step counts zero at each task start
    lrs = [v for k, v in seen if k == "lr"]
    assert lrs[0] == lrs[6] == lrs[12] and lrs[1] > lrs[0]  # warm-up restarts every task


def test_no_reset_keeps_state_and_schedule(tmp_path, cache_dir):
    seen, lrs = [], []

    class Probe(Callback):
        def on_task_start(self, trainer):
            from trainer.optim import innermost
            state = innermost(trainer.optimizer).state.values()
            seen.append(sum(float(v.abs().sum()) for st in state for v in st.values()))

        def post_step(self, trainer, logs):
            lrs.append(logs["train/lr"])

    cfg = continual_cfg(tmp_path / "r", cache_dir, **{"phases.pre.reset_optimizer_per_task": "false",
                                                       "phases.pre.reset_warmup_per_task": "false"})
    Trainer(cfg, [Probe()]).run()
    assert seen[0] == 0 and seen[1] > 0 and seen[2] > 0  # Adam state carried across tasks
    # one schedule over the whole phase (18 steps), no re-warm-up at the task starts (steps 7 and 13)
    optim = cfg.phases["pre"].optim
    assert lrs == pytest.approx([lr_at(i, 18, optim) for i in range(18)])
    assert lrs[6] != lrs[0] and lrs[12] != lrs[0]  # a re-warm-up would start again at lrs[0]


def test_checkpoint_integrity_fallback(tmp_path, cache_dir):
    run = tmp_path / "r"
    Trainer(continual_cfg(run, cache_dir, **{"trainer.keep_checkpoints": 3})).run()
    ckpts = checkpoint.checkpoint_dirs(run)
    assert len(ckpts) == 3 and all(checkpoint.verify(c) is None for c in ckpts)
    newest = ckpts[-1]
    blob = newest / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert "checksum mismatch" in checkpoint.verify(newest)
    messages = []
    assert checkpoint.find_latest_valid(run, log=messages.append) == ckpts[-2]
    assert "model.safetensors" in messages[0]


def test_run_dir_with_other_config_is_refused(tmp_path, cache_dir):
    run = tmp_path / "r"
    Trainer(continual_cfg(run, cache_dir)).run()
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="different config"):
        Trainer(continual_cfg(run, cache_dir, **{"phases.pre.optim.lr": 0.5}))
    assert (run / "config.yaml").read_text() == before


def test_reordered_phases_are_a_different_config(tmp_path, cache_dir, capsys):
    a = "  a: {kind: pretrain, mode: continual, languages: [en], steps_per_task: 3, optim: {lr: 0.01}}\n"
    b = "  b: {kind: pretrain, mode: continual, languages: [fr], steps_per_task: 3, optim: {lr: 0.001}}\n"
    ab, ba = tmp_path / "ab.yaml", tmp_path / "ba.yaml"
    ab.write_text("phases:\n" + a + b)
    ba.write_text("phases:\n" + b + a)
    run = tmp_path / "r"
    assert Trainer(load_config(ab, tiny_overrides(run, cache_dir)), [StopAt(2)]).run() == "preempted"
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli_main(["train", str(ba), *tiny_overrides(run, cache_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sections differ: phases" in err[0], err
    assert (run / "config.yaml").read_text() == before


def test_demo_config_loads():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert cfg.phases["pretrain"].mode == "stationary" and len(cfg.phases["pretrain"].languages) >= 3


def test_rank_share_strides_and_pads_for_lockstep():
    from data.packing import rank_share
    a, b, c = (torch.full((1, 2), v) for v in (1, 2, 3))
    assert [(int(x[0, 0]), n) for x, n in rank_share([a, b, c], 0, 2)] == [(1, True), (3, True)]
    assert [(int(x[0, 0]), n) for x, n in rank_share([a, b, c], 1, 2)] == [(2, True), (1, False)]  # padding
    assert [(int(x[0, 0]), n) for x, n in rank_share([a, b, c], 0, 1)] == [(1, True), (2, True), (3, True)]


def test_rank_share_rows_cuts_consecutive_batches():
    from data.packing import rank_share_rows
    rows = torch.arange(5).view(5, 1)  # batches of 2 rows: [0, 1], [2, 3], [4]
    got = lambda rank: [(x.flatten().tolist(), n) for x, n in rank_share_rows(rows, 2, rank, 2)]  # noqa: E731
    assert got(0) == [([0, 1], True), ([4], True)]
    assert got(1) == [([2, 3], True), ([0, 1], False)]


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12),
                                       ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None), (None, None)])
def test_peak_flops_by_device_name(name, peak):
    """Whole-word matching: "L4" must not match "NVIDIA L40", nor "H100" the H100 NVL."""
    from trainer.logger import peak_flops

    assert peak_flops(name) == peak


@pytest.mark.parametrize("command", ["compare", "study", "report", "slurm"])
def test_subcommand_help(command, capsys):
    """Sub-commands with their own parsers answer --help themselves (exit 0, their usage)."""
    with pytest.raises(SystemExit) as info:
        cli_main([command, "--help"])
    assert info.value.code == 0 and f"usage: plasticity {command}" in capsys.readouterr().out
