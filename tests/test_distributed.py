"""Multi-process training on CPU: DDP and DeepSpeed ZeRO-1/2/3 reproduce a single process.

Every multi-process run is `accelerate launch`ed (2 processes × micro-batch 4) on tests/dist_train.py
and compared step by step with one in-process run of micro-batch 8: the ranks take contiguous
slices of the same global micro-batch, so the losses agree up to float summation order.  The
config has two phases: a continual one (3 tasks, optimizer reset and re-warm-up at each
boundary, clipping active) and a second one with `init_from: fresh` and its own clipping /
weight decay, which exercises per-phase hyperparameters and in-place weight loads under ZeRO.

Run with `pytest -m dist tests/test_distributed.py`.  The first DeepSpeed launch JIT-compiles
DeepSpeed's CPU comm op into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, kept
between sessions).  See docs/distributed.md.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from trainer.config import load_config
from trainer.loop import Trainer

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_train.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
RTOL = 1e-5  # measured max |Δloss| ≈ 1.4e-6 on losses ≈ 5-6 for DDP and ZeRO-1/2/3 (docs/distributed.md)
PRE_CLIP, POST_CLIP = 0.3, 0.2  # below the early gradient norms (≈1), so clipping really acts

CONFIG = f"""\
trainer:
  ckpt_interval: 4
  eval_interval: 5
phases:
  pre:
    kind: pretrain
    mode: continual
    languages: [en, fr, de]
    steps_per_task: 6
    optim: {{lr: 3.0e-3, warmup_steps: 3, grad_clip: {PRE_CLIP}}}
  post:
    kind: pretrain
    mode: continual
    languages: [en]
    steps_per_task: 3
    init_from: fresh
    optim: {{lr: 3.0e-3, warmup_steps: 1, grad_clip: {POST_CLIP}, weight_decay: 0.0}}
"""
N_STEPS = 3 * 6 + 3

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
needs_launcher = pytest.mark.skipif(not ACCELERATE.is_file(), reason=f"no accelerate launcher at {ACCELERATE}")


def logged(run_dir, key) -> list:
    """[(step, value)] of every metrics.jsonl row that has `key`."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def losses(run_dir) -> list:
    return logged(run_dir, "train/loss")


def assert_same_losses(got, want, rtol=RTOL):
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, len(want) + 1))
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want))
    assert worst <= rtol, f"max relative |Δloss| {worst:.2e} > {rtol:.0e}:\n{got}\n{want}"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("dist-config") / "two_phase.yaml"
    p.write_text(CONFIG)
    return p


@pytest.fixture(scope="module")
def overrides(cache_dir):
    def make(run_dir, micro_batch, **extra):
        return tiny_overrides(run_dir, cache_dir, **{"trainer.micro_batch_size": micro_batch, **extra})
    return make


@pytest.fixture(scope="module")
def single(tmp_path_factory, config_file, overrides):
    """One process, micro-batch 8 (in-process; also builds the shared tokenizer cache before any launch)."""
    run = tmp_path_factory.mktemp("dist") / "single"
    assert Trainer(load_config(config_file, overrides(run, 8))).run() == "done"
    return run


def launch(launcher_args, config_file, overrides, run_dir, *extra, timeout=300):
    """`accelerate launch` tests/dist_train.py on 2 CPU processes; returns the main process's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               CUDA_VISIBLE_DEVICES="")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    if "--multi_gpu" in launcher_args:
        env["ACCELERATE_USE_CPU"] = "true"  # the MULTI_GPU launcher does not pass use_cpu on
    else:
        env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed into plain MULTI_CPU
    cmd = [str(ACCELERATE), "launch", *launcher_args, "--num_processes", "2", "--main_process_port", "0",
           str(SCRIPT), str(config_file), *overrides(run_dir, 4), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}:\n{out[-6000:]}"
    return out


DDP = ["--multi_gpu"]
ZERO = {1: ["--use_deepspeed", "--zero_stage", "1"],  # flags, and the shipped accelerate/DeepSpeed files:
        2: ["--config_file", "launch/accelerate/zero2.yaml"],
        3: None}  # the shipped zero3 files with every parameter partitioned (set by partitioned_zero3)
SHIPPED = {"zero2_offload": ["--config_file", "launch/accelerate/zero2_offload.yaml"], "zero3_offload": None}


def partitioned(name: str, out_dir: Path) -> list:
    """Launcher args for a copy of the shipped ZeRO-3 config `name` with stage3_param_persistence_threshold 0.
    The shipped threshold (1e5 elements) keeps every weight of the tiny test model whole on each rank, so
    without this ZeRO-3's sharding, its empty placeholders and its gathers would go untested."""
    ds = json.loads((REPO / "launch" / "deepspeed" / f"{name}.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (out_dir / f"{name}.json").write_text(json.dumps(ds))
    acc = (REPO / "launch" / "accelerate" / f"{name}.yaml").read_text()
    assert f"launch/deepspeed/{name}.json" in acc
    (out_dir / f"{name}.yaml").write_text(acc.replace(f"launch/deepspeed/{name}.json", str(out_dir / f"{name}.json")))
    return ["--config_file", str(out_dir / f"{name}.yaml")]


@pytest.fixture(scope="module", autouse=True)
def partitioned_zero3(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("zero3-partitioned")
    ZERO[3], SHIPPED["zero3_offload"] = partitioned("zero3", out_dir), partitioned("zero3_offload", out_dir)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, config_file, overrides, single):
    run = tmp_path_factory.mktemp("dist") / "zero3"
    out = launch(ZERO[3], config_file, overrides, run, timeout=600)
    return run, out


@needs_launcher
def test_ddp_matches_single_process(tmp_path, config_file, overrides, single):
    out = launch(DDP, config_file, overrides, tmp_path / "ddp")
    assert "backend: MULTI_CPU processes=2" in out and "outcome: done" in out
    assert_same_losses(losses(tmp_path / "ddp"), losses(single))


@needs_launcher
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single_process(stage, request, tmp_path, config_file, overrides, single):
    if stage == 3:
        run, out = request.getfixturevalue("zero3")
    else:
        run = tmp_path / f"zero{stage}"
        out = launch(ZERO[stage], config_file, overrides, run, timeout=600)
    assert "backend: DEEPSPEED processes=2" in out and "outcome: done" in out
    if stage == 3:  # every parameter really is sharded (see partitioned())
        n = re.search(r"sharded_params=(\d+)/(\d+)", out)
        assert n and n.group(1) == n.group(2) != "0", out[-2000:]
    # The last phase's clipping reached DeepSpeed's ZeRO optimizer (it clips inside its own step).
    assert f"clip_grad={POST_CLIP}" in out
    ref = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert next(r["train/grad_norm"] for r in ref if "train/grad_norm" in r) > PRE_CLIP  # clipping acts
    assert_same_losses(losses(run), losses(single))


@needs_launcher
@needs_deepspeed
def test_zero3_resumes_from_its_own_checkpoint(tmp_path, config_file, overrides, single, zero3):
    from models.gpt import GPT, ModelConfig
    from safetensors.torch import load_file
    from trainer import checkpoint
    from trainer.loop import load_weights

    straight, _ = zero3
    split = tmp_path / "split"
    # Stop inside the second task (steps 7-12): after a task boundary and an optimizer reset.
    out = launch(ZERO[3], config_file, overrides, split, "--stop-at", "9")
    assert "outcome: preempted" in out and len(losses(split)) == 9
    ckpt = checkpoint.find_latest_valid(split)
    assert ckpt is not None and ckpt.name == "step_00000009" and (ckpt / "pytorch_model").is_dir()
    out = launch(ZERO[3], config_file, overrides, split, "trainer.resume=auto")
    assert "resumed from" in out and "step_00000009" in out and "outcome: done" in out
    assert_same_losses(losses(split), losses(straight))
    assert len(losses(split)) == N_STEPS
    # Consolidated (gathered) phase exports load into a plain GPT and match the single process.
    for phase in ("pre", "post"):
        out_dir = split / "phases" / phase
        model = GPT(ModelConfig(**json.loads((out_dir / "model_config.json").read_text())))
        load_weights(model, out_dir)
        got, want = load_file(str(out_dir / "model.safetensors")), load_file(str(single / "phases" / phase /
                                                                                   "model.safetensors"))
        assert set(got) - {"lm_head.weight"} == set(want) - {"lm_head.weight"}
        for k in set(got) & set(want):
            assert torch.allclose(got[k], want[k], rtol=0, atol=1e-4), (phase, k, (got[k] - want[k]).abs().max())


def test_grad_accum_matches_larger_micro_batch(tmp_path, config_file, overrides, single):
    run = tmp_path / "accum"
    cfg = load_config(config_file, overrides(run, 4, **{"trainer.grad_accum": 2}))
    assert Trainer(cfg).run() == "done"
    assert_same_losses(losses(run), losses(single))


INSTRUMENTS = "[{name: instruments, probe_steps: 4, probe_eval_every: 2, probe_batch_size: 4, sharpness_iters: 2}]"


def boundary_scalars(run_dir) -> list:
    return [json.loads(line)["scalars"] for line in (Path(run_dir) / "boundaries.jsonl").read_text().splitlines()]


def single_run_with(tmp_path_factory, config_file, overrides, name: str, callbacks: str) -> Path:
    """The single-process reference (micro-batch 8) of a run with the given callbacks."""
    run = tmp_path_factory.mktemp("dist") / name
    assert Trainer(load_config(config_file, overrides(run, 8, callbacks=callbacks))).run() == "done"
    return run


@pytest.fixture(scope="module")
def single_instrumented(tmp_path_factory, config_file, overrides, single):
    return single_run_with(tmp_path_factory, config_file, overrides, "single-instr", INSTRUMENTS)


@needs_launcher
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_boundary_instruments_under_multiple_processes(backend, tmp_path, config_file, overrides,
                                                       single_instrumented):
    """Neuron statistics are summed over the ranks' shares of the measurement set and the probe runs
    on gathered weights, so 2 processes report what one process reports."""
    if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    run = tmp_path / backend
    launch(DDP if backend == "ddp" else ZERO[3], config_file, overrides, run, f"callbacks={INSTRUMENTS}",
           timeout=600)
    got, want = boundary_scalars(run), boundary_scalars(single_instrumented)
    assert len(got) == len(want) == 1 + 3 + 1  # run start + 3 continual tasks + the second phase
    for g, w in zip(got, want):
        assert g["neurons/overall/tokens"] == w["neurons/overall/tokens"]  # every measured token, once
        for key in ("neurons/overall/mean_abs", "neurons/overall/active_freq", "repr/mean_abs_param",
                    "repr/overall/effective_rank", "probe/auc", "probe/delta_auc"):
            assert g[key] == pytest.approx(w[key], rel=1e-3, abs=1e-3), (key, g[key], w[key])


MITIGATIONS = ("[{name: redo, tau: 0.3, every: 4, at: [task_end]}, {name: l2_init, coef: 0.01, params: decay},"
               " {name: shrink_perturb, shrink: 0.9, sigma: 0.001, at: [task_end]}]")


@pytest.fixture(scope="module")
def single_mitigated(tmp_path_factory, config_file, overrides, single):
    return single_run_with(tmp_path_factory, config_file, overrides, "single-mit", MITIGATIONS)


MITIGATIONS_Z3 = ("[{name: redo, tau: 0.3, every: 4, at: [task_end]},"
                  " {name: shrink_perturb, shrink: 0.9, sigma: 0.001, at: [task_end]}]")  # l2_init: refused


@pytest.fixture(scope="module")
def single_mitigated_z3(tmp_path_factory, config_file, overrides, single):
    return single_run_with(tmp_path_factory, config_file, overrides, "single-mit-z3", MITIGATIONS_Z3)


@needs_launcher
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_mitigations_under_zero_match_single_process(stage, request, tmp_path, config_file, overrides):
    """ReDo (weights + Adam moments of chosen units), L2-Init and Shrink & Perturb edit parameters and
    optimizer state through DeepSpeed's full-state accessors under ZeRO-1/2/3: same resets, same losses."""
    callbacks = MITIGATIONS if stage < 3 else MITIGATIONS_Z3
    single_mitigated = request.getfixturevalue("single_mitigated" if stage < 3 else "single_mitigated_z3")
    run = tmp_path / f"zero{stage}"
    out = launch(ZERO[stage], config_file, overrides, run, f"callbacks={callbacks}", timeout=600)
    assert "backend: DEEPSPEED processes=2" in out and "outcome: done" in out
    want = logged(single_mitigated, "redo/reset")
    assert want and sum(n for _, n in want) > 0  # units were really reset
    assert logged(run, "redo/reset") == want
    assert_same_losses(losses(run), losses(single_mitigated), rtol=1e-4)
    if stage < 3:  # L2-Init's decay group is found on the model, not in ZeRO's flat optimizer groups
        got, want = logged(run, "l2_init/sq_dist"), logged(single_mitigated, "l2_init/sq_dist")
        assert len(got) == len(want) == N_STEPS and sum(v for _, v in want) > 0
        assert [g for _, g in got] == pytest.approx([w for _, w in want], rel=1e-3, abs=1e-9)


CBP = "{name: cbp, replacement_rate: 0.02, maturity: 3, decay: 0.9}"
CBP_WD = f"[{CBP}, {{name: wd_schedule, schedule: linear, start_factor: 100.0, end_factor: 0.0}}]"


@pytest.fixture(scope="module")
def single_cbp_wd(tmp_path_factory, config_file, overrides, single):
    return single_run_with(tmp_path_factory, config_file, overrides, "single-cbp-wd", CBP_WD)


@needs_launcher
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_cbp_and_wd_schedule_under_zero_match_single_process(stage, tmp_path_factory, tmp_path, config_file,
                                                              overrides, single_cbp_wd):
    """Continual backprop (utility from all-reduced hooks, unit resets through DeepSpeed's accessors) and a
    weight-decay schedule (written into the ZeRO optimizer's group 0 before every step) under ZeRO-2/3."""
    run = tmp_path / f"zero{stage}-cbp"
    out = launch(ZERO[stage], config_file, overrides, run, f"callbacks={CBP_WD}", timeout=600)
    assert "backend: DEEPSPEED processes=2" in out and "outcome: done" in out
    want = logged(single_cbp_wd, "cbp/replaced")
    assert sum(n for _, n in want) > 0  # units were really replaced
    assert logged(run, "cbp/replaced") == want
    assert logged(run, "train/weight_decay") == logged(single_cbp_wd, "train/weight_decay")
    assert_same_losses(losses(run), losses(single_cbp_wd), rtol=1e-4)
    # the schedule matters: without it (CBP alone) the single-process losses differ far more than ZeRO's do
    if stage == 2:
        cbp_only = single_run_with(tmp_path_factory, config_file, overrides, "single-cbp", f"[{CBP}]")
        rel = lambda a, b: max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(losses(a), losses(b)))  # noqa: E731
        assert rel(cbp_only, single_cbp_wd) > 20 * rel(run, single_cbp_wd), (rel(cbp_only, single_cbp_wd),
                                                                             rel(run, single_cbp_wd))


@needs_launcher
@needs_deepspeed
@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_offload_configs_match_single_process(config, tmp_path, config_file, overrides, single):
    """The shipped optimizer-offload configs (optimizer state and step on the host) give the same losses."""
    run = tmp_path / config
    out = launch(SHIPPED[config], config_file, overrides, run, timeout=600)
    assert "backend: DEEPSPEED processes=2" in out and "offload=True" in out and "outcome: done" in out
    assert_same_losses(losses(run), losses(single))


@needs_launcher
@needs_deepspeed
def test_bf16_under_zero2_tracks_float32(tmp_path, config_file, overrides, single):
    """DeepSpeed bf16 (bf16 weights and activations, fp32 master weights in the optimizer) on CPU: the losses
    follow the float32 single-process run within bf16 precision, and the fused loss path runs in bf16."""
    run = tmp_path / "zero2-bf16"
    out = launch(ZERO[2], config_file, overrides, run, "trainer.mixed_precision=bf16", timeout=600)
    assert "backend: DEEPSPEED processes=2" in out and "param_dtype=torch.bfloat16" in out and "outcome: done" in out
    got, want = losses(run), losses(single)
    assert [s for s, _ in got] == [s for s, _ in want]
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want))
    assert 0 < worst < 5e-3, worst  # measured 7.5e-5: near-uniform logits of this tiny model hide bf16 error


ONLINE = "[{name: instruments, online_every: 2, at_run_start: false, probe: false}]"


@pytest.fixture(scope="module")
def single_online(tmp_path_factory, config_file, overrides, single):
    return single_run_with(tmp_path_factory, config_file, overrides, "single-online", ONLINE)


@needs_launcher
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_online_stats_under_multiple_processes(backend, tmp_path, config_file, overrides, single_online):
    """Per-step online neuron statistics are summed over the ranks' micro-batches and the update norm covers
    the whole model (under ZeRO-3 each rank holds a shard), so 2 processes log what one process logs."""
    if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    run = tmp_path / backend
    launch(DDP if backend == "ddp" else ZERO[3], config_file, overrides, run, f"callbacks={ONLINE}", timeout=600)
    for key in ("online/update_norm", "online/overall/mean_abs", "online/overall/active_freq",
                "online/overall/tokens"):
        got, want = logged(run, key), logged(single_online, key)
        assert [s for s, _ in got] == [s for s, _ in want] == list(range(2, N_STEPS + 1, 2)), key
        assert all(w > 0 for _, w in want), (key, want)
        for (_, g), (_, w) in zip(got, want):
            assert g == pytest.approx(w, rel=1e-3), (key, got, want)
