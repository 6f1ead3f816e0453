"""Reliability: nothing is lost under kills, preemption, NaNs, full disks and bad input.

See docs/reliability.md for the guarantees these tests prove.  The subprocess tests run the
real CLI (`plasticity train`) and deliver real signals; delays injected via sitecustomize
(tests/reliability_helpers.py) only slow the run down so that signals can be aimed.
"""
import errno
import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

import reliability_helpers
from reliability_helpers import (CONTINUAL, cli_env, last_step, loss_trajectory, metric_rows, overrides,
                                 phase_weights, run_train, same_weights, sigkill, start_train, tree_hashes, wait_for)
from conftest import StopAt
from trainer import checkpoint
from trainer.callbacks import Callback
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.errors import CheckpointError, ConfigError, UserError
from trainer.loop import NonFiniteError, Trainer
from trainer.rundir import RunLock

# Fixtures shared with reliability_helpers, requested by name (an assignment, so that pyflakes does not
# report every test argument as redefining an unused import).
corpus_dir, hooks_path = reliability_helpers.corpus_dir, reliability_helpers.hooks_path

STEPS = 18  # continual_tiny: 3 tasks x 6 steps; task boundaries after steps 6 and 12


def ckpt_dir(run, step):
    return Path(run) / "checkpoints" / f"step_{step:08d}"


# --- shared runs ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, cache_dir, corpus_dir):
    """One uninterrupted run of the CLI: the reference for every bit-exact comparison."""
    run = tmp_path_factory.mktemp("rel-straight") / "run"
    r = run_train(CONTINUAL, overrides(run, cache_dir, corpus_dir), cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    traj = loss_trajectory(run)
    assert sorted(traj) == list(range(1, STEPS + 1))
    return run


@pytest.fixture(scope="session")
def done_run(tmp_path_factory, cache_dir, corpus_dir):
    """A finished in-process run with 3 checkpoints kept (copied, never modified, by tests)."""
    run = tmp_path_factory.mktemp("rel-done") / "run"
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **{"trainer.keep_checkpoints": 3}))
    assert Trainer(cfg).run() == "done"
    return run


def copy_run(src, dst):
    """A copy of a run dir that the same config (with the new trainer.run_dir) may re-enter."""
    shutil.copytree(src, dst)
    saved = dst / "config.yaml"
    saved.write_text(saved.read_text().replace(str(src), str(dst)))
    return dst


# --- 1. SIGKILL anywhere --------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_anywhere_resumes_bit_exact(tmp_path, cache_dir, corpus_dir, hooks_path, straight_run):
    run = tmp_path / "run"
    ovr = overrides(run, cache_dir, corpus_dir)
    env = cli_env(hooks_path, step_delay=0.05, ckpt_delay=0.25)
    rng = random.Random(20240607)
    kills = [("step", rng.randint(1, 5)),        # mid-task
             ("tmp", 6),                         # while the task-boundary checkpoint is being written
             ("step", rng.randint(7, 11)),       # just after a boundary (Adam reset, new warm-up)
             ("tmp", rng.choice([14, 16])),      # while an interval checkpoint is being written
             ("tmp", STEPS)]                     # phase end: after the export, during the last checkpoint
    ckroot = run / "checkpoints"
    expected_resume = None
    for i, (kind, target) in enumerate(kills):
        log = tmp_path / f"attempt{i}.log"
        seen = len(metric_rows(run))
        proc = start_train(CONTINUAL, ovr, env, log)
        if kind == "step":
            cond = lambda: any(r.get("step", 0) >= target and "train/loss" in r  # noqa: E731
                               for r in metric_rows(run)[seen:])
        else:
            cond = lambda: (ckroot / f".tmp-step_{target:08d}").is_dir()  # noqa: E731
        assert wait_for(cond, proc), f"attempt {i}: run ended before kill point {kind} {target}: {log.read_text()}"
        sigkill(proc)
        text = log.read_text()
        if expected_resume is not None:
            assert f"resumed from {expected_resume}" in text, text
        if kind == "tmp":  # it really died mid-write: a half-written temp dir, no final dir
            assert (ckroot / f".tmp-step_{target:08d}").is_dir()
            assert not ckpt_dir(run, target).exists()
        latest = checkpoint.find_latest_valid(run, log=lambda m: None)
        assert latest is not None and checkpoint.verify(latest) is None
        assert not latest.name.startswith(".tmp")
        if kind == "tmp":
            assert int(latest.name.split("_")[1]) < target
        expected_resume = latest
    r = run_train(CONTINUAL, ovr, cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {expected_resume}" in r.stdout
    assert same_weights(phase_weights(run), phase_weights(straight_run))
    assert loss_trajectory(run) == loss_trajectory(straight_run)  # last occurrence of each step
    assert not [p for p in ckroot.iterdir() if p.name.startswith((".tmp", ".trash"))]  # stale temp dirs pruned
    assert all(checkpoint.verify(c) is None for c in checkpoint.checkpoint_dirs(run))


# --- 2. graceful stop -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_and_exits_0(tmp_path, cache_dir, corpus_dir, hooks_path, straight_run, sig):
    run = tmp_path / "run"
    ovr = overrides(run, cache_dir, corpus_dir)
    log = tmp_path / "stop.log"
    proc = start_train(CONTINUAL, ovr, cli_env(hooks_path, step_delay=0.15), log)
    assert wait_for(lambda: last_step(run) >= 3, proc)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert "preempted:" in log.read_text()
    stopped = last_step(run)
    assert 3 <= stopped < STEPS
    ckpt = ckpt_dir(run, stopped)
    assert checkpoint.verify(ckpt) is None, f"no valid checkpoint at the stop step {stopped}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stopped
    assert checkpoint.find_latest_valid(run, log=lambda m: None) == ckpt
    r = run_train(CONTINUAL, ovr, cli_env())
    assert r.returncode == 0 and "done:" in r.stdout, r.stderr[-3000:]
    assert f"resumed from {ckpt}" in r.stdout
    assert same_weights(phase_weights(run), phase_weights(straight_run))
    assert loss_trajectory(run) == loss_trajectory(straight_run)


# --- 3. integrity -----------------------------------------------------------------------------
def test_corrupt_and_truncated_checkpoints_fall_back(tmp_path, cache_dir, corpus_dir, done_run, straight_run,
                                                     capsys):
    run = copy_run(done_run, tmp_path / "run")
    c14, c16, c18 = (ckpt_dir(run, s) for s in (14, 16, 18))
    assert [c.name for c in checkpoint.checkpoint_dirs(run)] == [c14.name, c16.name, c18.name]
    blob = c18 / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: same size, different hash
    blob.write_bytes(bytes(data))
    opt = c16 / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # truncated
    assert "checksum mismatch in model.safetensors" in checkpoint.verify(c18)
    assert "checksum mismatch in optimizer.bin" in checkpoint.verify(c16)
    capsys.readouterr()
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **{"trainer.keep_checkpoints": 3}))
    assert Trainer(cfg).run() == "done"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {c18}: checksum mismatch in model.safetensors" in out
    assert f"skipping checkpoint {c16}: checksum mismatch in optimizer.bin" in out
    assert f"resumed from {c14}" in out
    assert same_weights(phase_weights(run), phase_weights(straight_run))
    assert loss_trajectory(run) == loss_trajectory(straight_run)
    assert all(checkpoint.verify(c) is None for c in checkpoint.checkpoint_dirs(run))  # rewritten cleanly


def test_half_written_checkpoints_are_never_valid(tmp_path, done_run):
    run = copy_run(done_run, tmp_path / "run")
    good = ckpt_dir(run, 18)
    shutil.copytree(good, run / "checkpoints" / ".tmp-step_00000020")  # complete, but never renamed
    no_manifest = shutil.copytree(good, ckpt_dir(run, 22))
    (no_manifest / "manifest.json").unlink()
    bad_manifest = shutil.copytree(good, ckpt_dir(run, 24))
    (bad_manifest / "manifest.json").write_text('{"files": {"model.safe')
    missing = shutil.copytree(good, ckpt_dir(run, 26))
    (missing / "optimizer.bin").unlink()
    msgs = []
    assert checkpoint.find_latest_valid(run, log=msgs.append) == good
    assert [m.rsplit(": ", 1)[1] for m in msgs] == ["missing file optimizer.bin", "unreadable manifest",
                                                  "no manifest (incomplete write)"]
    with pytest.raises(CheckpointError, match="step_00000022.*no manifest"):
        checkpoint.load(None, no_manifest)


def test_pruning_happens_only_after_the_new_checkpoint_is_complete(tmp_path, cache_dir, corpus_dir,
                                                                  monkeypatch):
    run = tmp_path / "run"
    seen = []
    real_prune = checkpoint._prune

    def spy(root, keep):
        dirs = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
        seen.append((dirs[-1].name, checkpoint.verify(dirs[-1]), len(dirs),
                     [p.name for p in root.iterdir() if p.name.startswith(".tmp")]))
        real_prune(root, keep)
        assert len(list(root.glob("step_*"))) == min(keep, len(dirs))

    monkeypatch.setattr(checkpoint, "_prune", spy)
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **{"trainer.keep_checkpoints": 1}))
    assert Trainer(cfg).run() == "done"
    assert [s[0] for s in seen] == [f"step_{s:08d}" for s in range(2, STEPS + 1, 2)]
    assert all(problem is None and n == 2 and not tmps for _, problem, n, tmps in seen[1:])


class Evil:
    """Unpickling this creates a marker file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["optimizer.bin", "callbacks.pt", "random_states_0.pkl"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, cache_dir, corpus_dir, victim):
    run = tmp_path / "run"
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir))
    assert Trainer(cfg, [StopAt(4)]).run() == "preempted"
    ckpt = ckpt_dir(run, 4)
    marker = tmp_path / "pwned"
    torch.save({"state": Evil(marker), "param_groups": []}, ckpt / victim)
    checkpoint.write_manifest(ckpt)  # fix the checksums: only the pickle defence is tested
    assert checkpoint.verify(ckpt) is None
    with pytest.raises(CheckpointError, match=f"step_00000004.*{victim if victim != 'optimizer.bin' else 'optimizer'}"
                                              r".*pickled objects other than tensors"):
        Trainer(load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir))).run()
    assert not marker.exists()
    pickle.loads(pickle.dumps(Evil(marker)))  # sanity: the payload does work when unpickled freely
    assert marker.exists()


# --- 4. numerics ------------------------------------------------------------------------------
class NaNAt(Callback):
    """Adds a NaN loss term at the given (1-based) steps; snapshots weights around them."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.unchanged = {}

    def loss_term(self, trainer, model):
        # A NaN that reaches the gradients (a constant NaN term, e.g. torch.tensor(nan), would
        # have zero gradient: the step would be finite and is rightly not skipped).
        if trainer.global_step + 1 in self.steps:
            return next(model.parameters()).sum() * torch.tensor(float("nan"))
        return None

    def pre_step(self, trainer):
        self._before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}

    def post_step(self, trainer, logs):
        if trainer.global_step in self.steps:
            after = trainer.unwrapped_model.state_dict()
            self.unchanged[trainer.global_step] = all(torch.equal(self._before[k], after[k]) for k in after)


def test_nan_steps_are_skipped_and_counted(tmp_path, cache_dir, corpus_dir):
    run = tmp_path / "run"
    nan = NaNAt([3, 8])
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **{"trainer.max_nonfinite_steps": 2}))
    assert Trainer(cfg, [nan]).run() == "done"
    assert nan.unchanged == {3: True, 8: True}
    rows = {r["step"]: r for r in metric_rows(run) if "train/loss" in r}
    counts = [rows[s]["train/nonfinite_steps"] for s in range(1, STEPS + 1)]
    assert counts == [0, 0] + [1] * 5 + [2] * 11
    assert all(torch.isfinite(w).all() for w in phase_weights(run).values())


def test_too_many_nan_steps_stop_with_last_good_checkpoint(tmp_path, cache_dir, corpus_dir):
    run = tmp_path / "run"
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **{"trainer.max_nonfinite_steps": 2}))
    with pytest.raises(NonFiniteError) as info:
        Trainer(cfg, [NaNAt([3, 4, 5])]).run()
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert "non-finite" in msg and "trainer.max_nonfinite_steps=2" in msg
    assert str(run / "checkpoints") in msg
    latest = checkpoint.find_latest_valid(run, log=lambda m: None)
    assert latest == ckpt_dir(run, 4) and checkpoint.verify(latest) is None
    from safetensors.torch import load_file
    assert all(torch.isfinite(w).all() for w in load_file(str(latest / "model.safetensors")).values())
    assert not (run / "checkpoints" / ".tmp-step_00000005").exists()
    RunLock(run / ".lock").release()  # the lock was released on the way out


# --- 5. disk full / unwritable ----------------------------------------------------------------
def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["torch.save", "safetensors", "os.replace"])
def test_failed_checkpoint_write_keeps_previous(tmp_path, cache_dir, corpus_dir, monkeypatch, capsys, where):
    import accelerate.utils.other as acc_other
    run = tmp_path / "run"
    target = "step_00000008"

    def failing(real, path_arg):
        def fake(*args, **kwargs):
            path = args[path_arg] if len(args) > path_arg else kwargs.get("f") or kwargs.get("filename")
            if target in str(path):
                raise _enospc(path)
            return real(*args, **kwargs)
        return fake

    if where == "torch.save":
        monkeypatch.setattr(torch, "save", failing(torch.save, 1))
    elif where == "safetensors":
        monkeypatch.setattr(acc_other, "safe_save_file", failing(acc_other.safe_save_file, 1))
    else:
        monkeypatch.setattr(os, "replace", failing(os.replace, 1))
    ovr = overrides(run, cache_dir, corpus_dir)
    capsys.readouterr()
    assert cli_main(["train", str(CONTINUAL), *ovr]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("plasticity:")]
    assert len(err) == 1 and target in err[0] and "No space left on device" in err[0], err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006"]  # nothing pruned, no temp dir left
    assert all(checkpoint.verify(c) is None for c in checkpoint.checkpoint_dirs(run))
    monkeypatch.undo()
    assert cli_main(["train", str(CONTINUAL), *ovr]) == 0  # space freed: resumes from step 6
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["torch.save", "safetensors"])
def test_full_disk_non_oserror_is_a_clear_error(tmp_path, cache_dir, corpus_dir, monkeypatch, capsys, where):
    """On a really full disk torch.save raises RuntimeError and safetensors a SafetensorError."""
    import accelerate.utils.other as acc_other
    from safetensors import SafetensorError
    run = tmp_path / "run"
    target = "step_00000008"
    real, exc = (torch.save, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 70784")) \
        if where == "torch.save" else (acc_other.safe_save_file, SafetensorError("Error while serializing: IoError"))

    def fake(obj, path, *args, **kwargs):
        if target in str(path):
            raise exc
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(*(torch, "save") if where == "torch.save" else (acc_other, "safe_save_file"), fake)
    capsys.readouterr()
    assert cli_main(["train", str(CONTINUAL), *overrides(run, cache_dir, corpus_dir)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("plasticity: error: could not write checkpoint"), err
    assert target in err[0] and "is the disk full?" in err[0], err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006"]  # no .tmp-step_00000008 left behind


def test_write_failure_hints_at_the_disk_only_for_io_errors():
    assert "is the disk full?" in checkpoint.write_failure(RuntimeError("unexpected pos 70784 vs 70676"), "/p")
    assert "disk" not in checkpoint.write_failure(RuntimeError("NCCL error: unhandled system error"), "/p")


def test_failed_phase_export_write_is_a_clear_error(tmp_path, cache_dir, corpus_dir, monkeypatch):
    import trainer.loop as loop
    from safetensors import SafetensorError

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")  # a real full disk leaves a partial temp file
        raise SafetensorError("Error while serializing: IoError")

    monkeypatch.setattr(loop, "save_file", full)
    run = tmp_path / "run"
    cfg = load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir))
    with pytest.raises(CheckpointError, match=r"could not write the model of phase 'pre'.*IoError"):
        Trainer(cfg).run()
    assert not list((run / "phases" / "pre").iterdir())  # no temp file left
    assert checkpoint.verify(ckpt_dir(run, 16)) is None  # the last checkpoint is intact


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path, cache_dir, corpus_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")  # runs as root: chmod would not stop writes
    capsys.readouterr()
    assert cli_main(["train", str(CONTINUAL), *overrides(run, cache_dir, corpus_dir)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("plasticity:")]
    assert len(err) == 1 and "could not write checkpoint" in err[0] and str(run / "checkpoints") in err[0], err
    assert (run / "checkpoints").read_text() == "not a directory"


# --- 6. bad input -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def midway_run(tmp_path_factory, cache_dir, corpus_dir):
    """A run preempted at step 4 whose languages are user data files (copied by each case)."""
    root = tmp_path_factory.mktemp("rel-midway")
    files = []
    for lang in ("en", "fr", "de"):
        import gzip
        text = gzip.decompress((Path(corpus_dir) / "train" / f"{lang}.txt.gz").read_bytes())
        (root / f"{lang}.txt").write_bytes(text)
        files.append(str(root / f"{lang}.txt"))
    cfg_path = root / "files.yaml"
    cfg_path.write_text(CONTINUAL.read_text().replace("languages: [en, fr, de]", f"languages: [{', '.join(files)}]"))
    run = root / "run"
    assert Trainer(load_config(cfg_path, overrides(run, cache_dir, corpus_dir)), [StopAt(4)]).run() == "preempted"
    return root


def _prep_midway(tmp_path, midway_run):
    """Copy the mid-way run + its data files; return (config path, run dir, data dir)."""
    root = tmp_path / "m"
    shutil.copytree(midway_run, root)
    cfg = (root / "files.yaml")
    cfg.write_text(cfg.read_text().replace(str(midway_run), str(root)))
    run = root / "run"
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(midway_run), str(root)))
    for c in checkpoint.checkpoint_dirs(run):
        (c / "config.yaml").write_text((run / "config.yaml").read_text())
        checkpoint.write_manifest(c)
    return cfg, run, root


def _yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def _case_other_tokenizer(tmp_path, run, cache_dir):
    from data.tokenizer import train_tokenizer
    tok = train_tokenizer([f"zz{i} yy{i % 7} qq" for i in range(300)], 320, cache_dir)
    (run / "tokenizer.model").write_bytes(tok.path.read_bytes())


# id -> (config: "continual" | "midway" | yaml text, extra overrides, culprit, setup(tmp_path, run, data, cache))
BAD = {
    "malformed_yaml": ("phases: [unclosed\n", [], "bad.yaml", None),
    "yaml_not_mapping": ("- just\n- a list\n", [], "bad.yaml", None),
    "unknown_key": ("trainer:\n  learning_rate: 0.1\nphases:\n  p: {kind: pretrain}\n", [],
                    "trainer.learning_rate", None),
    "mistyped_nested_key": ("continual", ["phases.pre.optim.lrr=0.1"], "phases.pre.optim.lrr", None),
    "wrong_type": ("continual", ["trainer.micro_batch_size=many"], "trainer.micro_batch_size", None),
    "negative_lr": ("continual", ["phases.pre.optim.lr=-1e-3"], "phases.pre.optim.lr", None),
    "zero_steps_per_task": ("continual", ["phases.pre.steps_per_task=0"], "phases.pre.steps_per_task", None),
    "negative_sft_steps": ("phases:\n  s: {kind: sft, steps: -3}\n", [], "phases.s.steps", None),
    "unknown_phase_kind": ("continual", ["phases.pre.kind=dpo"], "phases.pre.kind", None),
    "unknown_mode": ("continual", ["phases.pre.mode=random"], "phases.pre.mode", None),
    "no_phases": ("trainer: {seed: 1}\n", [], "phases", None),
    "weights_length": ("continual", ["phases.pre.weights=[1.0,2.0]"], "phases.pre.weights", None),
    "bad_schedule": ("continual", ["phases.pre.optim.schedule=linear"], "phases.pre.optim.schedule", None),
    "bad_precision": ("continual", ["trainer.mixed_precision=fp8"], "trainer.mixed_precision", None),
    "keep_zero_ckpts": ("continual", ["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints", None),
    "n_embd_vs_n_head": ("continual", ["model.n_head=3"], "model.n_embd", None),
    "bad_model_size": ("continual", ["model_size=huge"], "model_size", None),
    "zero_model_size": ("continual", ["model_size=0"], "model_size", None),
    "missing_corpus_dir": ("continual", ["data.corpus_dir=/nonexistent/corpus"], "/nonexistent/corpus", None),
    "missing_data_file": ("continual", ["phases.pre.languages=[en,/nonexistent/xx.txt]"], "/nonexistent/xx.txt",
                          None),
    "unsupported_data_file": ("continual", ["phases.pre.languages=[en,/tmp/x.csv]"], "/tmp/x.csv", None),
    "unknown_language": ("continual", ["phases.pre.languages=[en,xx]"], "'xx'", None),
    "bad_resume_path": ("continual", ["trainer.resume=/nonexistent/step_00000004"], "trainer.resume", None),
    "override_without_eq": ("continual", ["trainer.seed"], "trainer.seed", None),
    "unknown_callback": ("continual", ["callbacks=[{name: nope}]"], "nope", None),
    "rl_prompts_vs_world": ("phases:\n  r: {kind: rl, steps: 2, rl: {prompts_per_step: 8}}\n", [],
                            "phases.r.rl.prompts_per_step", "world3"),
    "missing_config_file": ("missing", [], "nope.yaml", None),
    "phases_as_list": ("phases:\n  - {kind: pretrain}\n", [], "'phases'", None),
    "callbacks_as_mapping": ("continual", ["callbacks={name: redo}"], "'callbacks'", None),
    "unresolvable_interpolation": ("continual", ["trainer.run_dir={tmp}/r_${nope}"], "trainer.run_dir", None),
    "run_dir_is_a_file": ("continual", [], "trainer.run_dir", "run_is_file"),
    "init_from_not_safetensors": ("continual", ["phases.pre.init_from={tmp}/junk.safetensors"], "junk.safetensors",
                                  "junk"),
    "model_size_too_small": ("continual", ["model_size=10"], "model_size", None),
    "duplicate_yaml_key": ("phases:\n  p: {kind: pretrain}\n  q: {kind: sft, steps: 2}\n  p: {kind: pretrain}\n",
                           [], "phases.p", None),
    "callback_unknown_phase": ("continual", ["callbacks=[{name: redo, phases: [pretrian]}]"],
                               "callbacks.0.phases", None),
    "later_phase_no_decay": ("phases:\n  a: {kind: pretrain}\n  b: {kind: pretrain, optim: {no_decay: []}}\n", [],
                             "phases.b.optim.no_decay", None),
    "zero_log_interval": ("continual", ["trainer.log_interval=0"], "trainer.log_interval", None),
    "two_instruments": ("continual", ["callbacks=[{name: instruments, phases: [pre]}, {name: instruments}]"],
                        "callbacks.1 (instruments): only one", None),
    # cases against an existing run dir (a run stopped at step 4, languages given as files)
    "other_config_no_force": ("midway", ["phases.pre.optim.lr=0.5"], "different config", None),
    "resume_never_with_ckpts": ("midway", ["trainer.resume=never"], "trainer.resume=never", None),
    "locked_run_dir": ("midway", [], "in use by another process", "lock"),
    "empty_data_file": ("midway", [], "fr.txt", "empty"),
    "non_utf8_data_file": ("midway", [], "fr.txt", "latin1"),
    "data_file_vanished": ("midway", [], "fr.txt", "remove"),
    "tokenizer_mismatch": ("midway", [], "different tokenizer", "tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_changed(case, tmp_path, cache_dir, corpus_dir, midway_run,
                                                   capsys, monkeypatch):
    source, extra, culprit, setup = BAD[case]
    run = tmp_path / "run"
    if source == "midway":
        cfg, run, data = _prep_midway(tmp_path, midway_run)
    elif source == "continual":
        cfg = CONTINUAL
    elif source == "missing":
        cfg = tmp_path / "nope.yaml"
    else:
        cfg = _yaml(tmp_path, source)
    ovr = overrides(run, cache_dir, corpus_dir) + [e.replace("{tmp}", str(tmp_path)) for e in extra]
    lock = None
    if setup == "world3":
        monkeypatch.setenv("WORLD_SIZE", "3")
    elif setup == "lock":
        lock = RunLock(run / ".lock")
    elif setup == "empty":
        (data / "fr.txt").write_text("\n \n")
    elif setup == "latin1":
        (data / "fr.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50)
    elif setup == "remove":
        (data / "fr.txt").unlink()
    elif setup == "tokenizer":
        _case_other_tokenizer(tmp_path, run, cache_dir)
    elif setup == "run_is_file":
        run.write_text("not a run dir")
    elif setup == "junk":
        (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01junk")
    before = tree_hashes(run)
    capsys.readouterr()
    try:
        rc = cli_main(["train", str(cfg), *ovr])
    finally:
        if lock is not None:
            lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("plasticity: error: "), err
    assert culprit in err[0], err
    after = tree_hashes(run)
    assert {k: after.get(k) for k in before} == before  # every file already there is byte-identical
    if source != "midway":
        assert not checkpoint.checkpoint_dirs(run)
    if setup == "run_is_file":
        assert run.read_text() == "not a run dir"


def test_corrupt_explicit_resume_changes_nothing(tmp_path, cache_dir, corpus_dir, done_run, capsys):
    run = copy_run(done_run, tmp_path / "run")
    (run / ".lock").write_text("4242")  # as left by the process that wrote the run
    bad = ckpt_dir(run, 18)
    blob = bad / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = tree_hashes(run)
    capsys.readouterr()
    ovr = overrides(run, cache_dir, corpus_dir, **{"trainer.keep_checkpoints": 3, "trainer.resume": bad})
    assert cli_main(["train", str(CONTINUAL), *ovr]) == 2
    assert tree_hashes(run) == before  # config.yaml, .lock and every other file untouched, nothing new
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.resume" in err[0] and str(bad) in err[0] and "checksum" in err[0], err


def test_bad_export_out_is_a_clear_error(tmp_path, done_run, capsys):
    out = tmp_path / "model.bin"
    out.write_text("precious")
    capsys.readouterr()
    assert cli_main(["export", str(done_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and str(out) in err[0], err
    assert out.read_text() == "precious"


@pytest.mark.slow
def test_bad_input_through_a_real_process(tmp_path, cache_dir, corpus_dir):
    """The same contract across the process boundary: exit status 2, one line on stderr."""
    r = run_train(CONTINUAL, overrides(tmp_path / "run", cache_dir, corpus_dir) + ["phases.pre.optim.lr=-1"],
                  cli_env())
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "phases.pre.optim.lr" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_during_start_up_can_be_rerun_corrected(tmp_path, cache_dir, corpus_dir, capsys):
    """An error found only when the data is read comes after config.yaml (and the tokenizer) are written; the
    corrected config may take over such a never-trained run dir, but not one that has trained."""
    run = tmp_path / "run"
    bad = overrides(run, cache_dir, corpus_dir, **{"phases.pre.languages": "[en,xx]"})
    assert cli_main(["train", str(CONTINUAL), *bad]) == 2
    assert "xx" in capsys.readouterr().err and (run / "config.yaml").is_file()
    cfg = lambda **kw: load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **kw))  # noqa: E731
    assert Trainer(cfg(), [StopAt(2)]).run() == "preempted"
    with pytest.raises(ConfigError, match="different config"):  # now it has trained: protected again
        Trainer(cfg(**{"phases.pre.optim.lr": 0.5}))
