"""launch/: accelerate configs, DeepSpeed configs, Slurm script rendering and the requeue trap.

Golden files: UPDATE_GOLDEN=1 pytest tests/test_launch.py rewrites tests/golden/*.sbatch
(then read the diff by eye before keeping it).
"""

from __future__ import annotations

import json
import shlex
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest

from launch import slurm
from trainer import study
from launch.deepspeed_config import (
    DEEPSPEED_DIR,
    deepspeed_config,
    fill_auto,
    find_auto,
    load_template,
    write_deepspeed_config,
)
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
ACCEL_DIR = REPO / "launch" / "accelerate"

# name -> (distributed_type, num_processes, mixed_precision, zero stage, offload optimizer, offload params)
ACCEL_EXPECTED = {
    "single": ("NO", 1, "no", None, None, None),
    "ddp": ("MULTI_GPU", 8, "no", None, None, None),
    "ddp_cpu": ("MULTI_GPU", 2, "no", None, None, None),
    "multinode": ("MULTI_GPU", 16, "no", None, None, None),
    "zero1": ("DEEPSPEED", 8, None, 1, "none", "none"),
    "zero2": ("DEEPSPEED", 8, None, 2, "none", "none"),
    "zero3": ("DEEPSPEED", 8, None, 3, "none", "none"),
    "zero2_offload": ("DEEPSPEED", 8, None, 2, "cpu", "none"),
    "zero3_offload": ("DEEPSPEED", 8, None, 3, "cpu", "cpu"),
}
DS_TEMPLATES = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False),
                "zero2_offload": (2, True), "zero3_offload": (3, True)}


# ----------------------------------------------------------------------------- accelerate

def test_every_accelerate_yaml_is_expected():
    assert sorted(p.stem for p in ACCEL_DIR.glob("*.yaml")) == sorted(ACCEL_EXPECTED)


@pytest.mark.parametrize("name", sorted(ACCEL_EXPECTED))
def test_accelerate_yaml_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    dist, nproc, mp, stage, _, _ = ACCEL_EXPECTED[name]
    cfg = load_config_from_file(str(ACCEL_DIR / f"{name}.yaml"))
    assert cfg.distributed_type.value == dist
    assert cfg.num_processes == nproc
    assert cfg.mixed_precision == mp
    assert cfg.use_cpu == (name == "ddp_cpu")
    if stage is None:
        assert cfg.deepspeed_config == {}
    else:
        ds_file = cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file == f"launch/deepspeed/{name}.json"  # relative to the repo root
        assert (REPO / ds_file).is_file()
        assert json.loads((REPO / ds_file).read_text())["zero_optimization"]["stage"] == stage
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"


@pytest.mark.parametrize("name", sorted(ACCEL_EXPECTED))
def test_accelerate_launch_accepts_yaml(name, monkeypatch):
    """Run accelerate's own launch validation (no processes started); for DeepSpeed also build the
    DeepSpeedPlugin exactly as a launched process would (this is where a mixed_precision key
    next to deepspeed_config_file would be refused)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    monkeypatch.chdir(REPO)
    dist, nproc, mp, stage, off_opt, off_param = ACCEL_EXPECTED[name]
    args = launch_command_parser().parse_args(
        ["--config_file", f"launch/accelerate/{name}.yaml", "--main_process_ip", "127.0.0.1", "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.num_processes == nproc
    assert args.use_deepspeed == (dist == "DEEPSPEED")
    assert args.multi_gpu == (dist == "MULTI_GPU")
    if stage is None:
        return
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    assert plugin.offload_optimizer_device == off_opt
    assert plugin.offload_param_device == off_param


# ----------------------------------------------------------------------------- deepspeed

@pytest.mark.parametrize("name", sorted(DS_TEMPLATES))
def test_deepspeed_json_valid_and_fillable(name):
    stage, offload = DS_TEMPLATES[name]
    raw = json.loads((DEEPSPEED_DIR / f"{name}.json").read_text())
    assert raw == load_template(stage, offload)
    assert raw["zero_optimization"]["stage"] == stage
    assert set(find_auto(raw)) == {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                   "gradient_clipping", "bf16.enabled", "fp16.enabled"}
    assert ("offload_optimizer" in raw["zero_optimization"]) == offload
    assert ("offload_param" in raw["zero_optimization"]) == (offload and stage == 3)
    filled = fill_auto(raw, micro_batch_size=4, grad_accum=2, grad_clip=1.0, precision="bf16")
    assert find_auto(filled) == []
    assert "auto" not in json.dumps(filled)
    assert raw["train_micro_batch_size_per_gpu"] == "auto"  # template not mutated


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32", "no"])
def test_deepspeed_config_is_concrete(stage, offload, precision):
    cfg = deepspeed_config(stage, offload, micro_batch_size=8, grad_accum=4, grad_clip=0.5,
                           precision=precision)
    assert find_auto(cfg) == []
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["fp16"]["enabled"] is (precision == "fp16")
    assert "train_batch_size" not in cfg  # DeepSpeed derives it from the world size
    if offload:
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    json.dumps(cfg)


def test_deepspeed_config_is_accepted_by_deepspeed():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage, offload in DS_TEMPLATES.values():
        cfg = deepspeed_config(stage, offload, 2, 1, 1.0, "bf16")
        zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])
        assert int(zero.stage) == stage


def test_fill_auto_train_batch_size_needs_world_size():
    tmpl = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 3}
    assert fill_auto(tmpl, micro_batch_size=2, grad_accum=3, world_size=4) == {
        "train_batch_size": 24, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}
    with pytest.raises(ConfigError, match="world_size"):
        fill_auto(tmpl, micro_batch_size=2, grad_accum=3)


def test_write_deepspeed_config(tmp_path):
    path = write_deepspeed_config(tmp_path / "ds" / "z2.json", stage=2, offload=False,
                                  micro_batch_size=1, grad_accum=1, grad_clip=1.0, precision="no")
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("call,match", [
    (lambda: deepspeed_config(4, False, 1, 1, 1.0, "bf16"), "unknown ZeRO stage 4"),
    (lambda: deepspeed_config(0, False, 1, 1, 1.0, "bf16"), "unknown ZeRO stage 0"),
    (lambda: deepspeed_config("2", False, 1, 1, 1.0, "bf16"), "unknown ZeRO stage"),
    (lambda: deepspeed_config(1, True, 1, 1, 1.0, "bf16"), "offload needs ZeRO stage 2 or 3"),
    (lambda: deepspeed_config(2, False, 1, 1, 1.0, "fp8"), "unknown precision 'fp8'"),
    (lambda: deepspeed_config(2, False, 0, 1, 1.0, "bf16"), "micro_batch_size must be"),
    (lambda: deepspeed_config(2, False, 1, 0, 1.0, "bf16"), "grad_accum must be"),
    (lambda: deepspeed_config(2, False, 1, 1, -1.0, "bf16"), "grad_clip must be"),
    (lambda: fill_auto({"bf16": {"enabled": "auto"}}), r"'bf16.enabled' is \"auto\"; pass precision"),
    (lambda: fill_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, precision="bf16"),
     "cannot fill 'zero_optimization.reduce_bucket_size'"),
    (lambda: fill_auto({}, batch=3), "unknown value"),
])
def test_deepspeed_config_errors_are_one_line(call, match):
    with pytest.raises(ConfigError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- slurm rendering

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("phases:\n  p: {kind: pretrain}\n")
    (tmp_path / "configs" / "study.yaml").write_text(
        "base: {phases: {p: {kind: pretrain}}}\nout_dir: runs/s\ngrid: {sizes: [nano, micro, tiny], seeds: [0, 1]}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _golden_train():
    return slurm.render_train(
        "configs/tiny.yaml", 2, 8, job_name="golden", time="02:00:00", partition="gpu",
        account="proj", accelerate_config="launch/accelerate/zero2.yaml",
        extra_args=("trainer.max_steps=100", "model.name=a b"), venv=".venv")


def _golden_sweep():
    return slurm.render_sweep(
        "configs/study.yaml", 8, 2, job_name="golden-sweep", time="01:00:00", gpus_per_node=1,
        partition="gpu", venv=".venv")


@pytest.mark.parametrize("name,render", [("train.sbatch", _golden_train), ("sweep_array.sbatch", _golden_sweep)])
def test_golden(name, render, workdir):
    text = render()
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"rendered script differs from {path} (UPDATE_GOLDEN=1 to rewrite)"


@pytest.mark.parametrize("render", [_golden_train, _golden_sweep])
def test_rendered_scripts_pass_bash_n(render, workdir):
    script = workdir / "job.sbatch"
    script.write_text(render())
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_train_script_contents(workdir):
    text = slurm.render_train("configs/tiny.yaml", 4, 8)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --output=logs/%x-%j.out", "MASTER_PORT=29500",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                 "PLASTICITY_ACCELERATE_CONFIG=launch/accelerate/multinode.yaml",
                 'scontrol requeue "$SLURM_JOB_ID"', "trap 'on_signal USR1' USR1",
                 "trap 'on_signal TERM' TERM", "source .venv/bin/activate"]:
        assert line in [x.strip() for x in text.splitlines()], line
    assert "--partition" not in text and "--account" not in text
    assert "configs/tiny.yaml trainer.resume=auto &" in text
    assert slurm.render_train("configs/tiny.yaml", 1, 1, venv=None).count("activate") == 0


def test_sweep_script_contents(workdir):
    text = slurm.render_sweep("configs/study.yaml", 5, 3, extra_args=["out_dir=/scratch/s", "--retry-failed"])
    assert "#SBATCH --array=0-4%3" in text.splitlines()
    line = next(x.strip() for x in text.splitlines() if x.strip().startswith("srun "))
    assert line == ('srun --kill-on-bad-exit=1 python -m trainer.cli study run configs/study.yaml '
                    '--index "$SLURM_ARRAY_TASK_ID" out_dir=/scratch/s --retry-failed &')
    # the words after "trainer.cli study" parse: the overrides after --index reach the study
    words = shlex.split(line.replace('"$SLURM_ARRAY_TASK_ID"', "3"))[6:-1]
    args = study.parse_args(words)
    assert (args.action, args.study, args.index, args.overrides, args.retry_failed) == \
        ("run", "configs/study.yaml", 3, ["out_dir=/scratch/s"], True)
    with pytest.raises(SystemExit):
        study.parse_args(["run", "configs/study.yaml", "--index", "3", "stray"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(nodes=0), "nodes must be an integer >= 1"),
    (dict(gpus_per_node=0), "gpus_per_node must be an integer >= 1"),
    (dict(nodes=1.5), "nodes must be"),
    (dict(config_path="configs/missing.yaml"), "config file 'configs/missing.yaml' not found"),
    (dict(accelerate_config="launch/accelerate/nope.yaml"), "accelerate config"),
    (dict(time="two hours"), "not a Slurm time"),
    (dict(job_name="my job"), "job_name"),
    (dict(partition="gpu;rm"), "partition"),
    (dict(extra_args="trainer.lr=1"), "list of arguments"),
])
def test_render_train_errors(kwargs, match, workdir):
    args = dict(config_path="configs/tiny.yaml", nodes=1, gpus_per_node=1) | kwargs
    with pytest.raises(ConfigError, match=match) as err:
        slurm.render_train(**args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,match", [
    (("configs/study.yaml", 0, 1), "n_runs"),
    (("configs/study.yaml", 3, 0), "max_parallel"),
    (("configs/nope.yaml", 3, 1), "study config"),
])
def test_render_sweep_errors(args, match, workdir):
    with pytest.raises(ConfigError, match=match):
        slurm.render_sweep(*args)


# ----------------------------------------------------------------------------- CLI

def test_cli_dry_run_prints_script(workdir, capsys):
    rc = slurm.main(["configs/tiny.yaml", "--nodes", "2", "--gpus-per-node", "8", "trainer.seed=3",
                     "--partition", "gpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out == slurm.render_train("configs/tiny.yaml", 2, 8, partition="gpu", extra_args=["trainer.seed=3"])
    assert not (workdir / "logs").exists()


@pytest.mark.parametrize("argv,culprit", [
    (["configs/tiny.yaml", "--gpus-per-node", "8", "trainer.lr=3e-4"], "trainer.lr"),
    (["configs/tiny.yaml", "--gpus-per-node", "8", "callbacks=[{name: nosuch}]"], "unknown callback 'nosuch'"),
    (["configs/study.yaml", "--gpus-per-node", "1"], "is a study config: render its sweep with --array N"),
    (["configs/study.yaml", "--array", "6", "--gpus-per-node", "1", "grid.sizez=[nano]"], "sizez"),
    (["configs/study.yaml", "--array", "5", "--gpus-per-node", "1"], "--array 5, but the study"),
    (["configs/study.yaml", "--array", "12", "--gpus-per-node", "1", "grid.mitigations={x: [{name: nosuch}]}"],
     "unknown callback 'nosuch'"),
])
def test_cli_validates_the_config_before_rendering(workdir, capsys, argv, culprit):
    """A key the trainer would refuse fails here (exit 2, one line), not on the nodes after queueing."""
    assert slurm.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and culprit in err


def test_cli_out_writes_file(workdir, capsys):
    assert slurm.main(["configs/study.yaml", "--array", "6", "--max-parallel", "2",
                       "--gpus-per-node", "1", "--out", "jobs/s.sbatch"]) == 0
    assert "#SBATCH --array=0-5%2" in (workdir / "jobs" / "s.sbatch").read_text()


def test_cli_bad_input_exits_2_with_one_line(workdir, capsys):
    assert slurm.main(["configs/tiny.yaml", "--nodes", "0", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nodes must be" in err


def test_cli_submit_without_sbatch(workdir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(workdir / "empty"))
    assert slurm.main(["configs/tiny.yaml", "--gpus-per-node", "1", "--submit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sbatch not found on PATH" in err


def test_cli_submit_calls_sbatch(workdir, capsys, monkeypatch):
    bindir = workdir / "bin"
    _stub(bindir / "sbatch", f'echo "$@" > {workdir}/sbatch.args\necho "Submitted batch job 77"\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert slurm.main(["configs/tiny.yaml", "--gpus-per-node", "1", "--submit", "--job-name", "t1"]) == 0
    assert "Submitted batch job 77" in capsys.readouterr().out
    assert (workdir / "sbatch.args").read_text().strip() == "logs/t1.sbatch"
    assert (workdir / "logs" / "t1.sbatch").read_text().startswith("#!/bin/bash")


# ----------------------------------------------------------------------------- requeue trap

def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


STUB_SRUN = r'''echo "srun $*" >> "$STUB_LOG"
if [ "${STUB_MODE:-}" = exec ]; then
    # like srun on the second node: run the task with that node's environment
    shift  # --kill-on-bad-exit=1
    SLURM_NODEID=1 "$@"
    exit $?
fi
if [ "${STUB_MODE:-}" = fail ]; then exit 3; fi
trap 'echo "srun got USR1" >> "$STUB_LOG"; kill $child 2>/dev/null; exit 0' USR1
trap 'echo "srun got TERM" >> "$STUB_LOG"; kill $child 2>/dev/null; exit 0' TERM
sleep 30 &
child=$!
wait $child
'''
STUB_SCONTROL = r'''echo "$*" >> "$SCONTROL_LOG"
if [ "$1 $2" = "show hostnames" ]; then echo node-a; echo node-b; fi
'''
STUB_ACCELERATE = r'''printf '%s\n' "$@" > "$ACCEL_ARGS"
'''


@pytest.fixture
def cluster(workdir):
    bindir = workdir / "bin"
    _stub(bindir / "srun", STUB_SRUN)
    _stub(bindir / "scontrol", STUB_SCONTROL)
    _stub(bindir / "accelerate", STUB_ACCELERATE)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", STUB_LOG=str(workdir / "srun.log"),
               SCONTROL_LOG=str(workdir / "scontrol.log"), ACCEL_ARGS=str(workdir / "accel.args"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_NODEID="0",
               SLURM_SUBMIT_DIR=str(workdir))
    script = workdir / "job.sbatch"
    script.write_text(slurm.render_train("configs/tiny.yaml", 2, 4, venv=None,
                                         extra_args=["trainer.max_steps=5"]))
    return workdir, script, env


def _start_and_signal(script, env, workdir, sig):
    with open(workdir / "job.out", "w") as out:
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=out, stderr=subprocess.STDOUT)
        log = workdir / "srun.log"
        deadline = time.monotonic() + 15
        while not (log.exists() and "srun " in log.read_text()):
            assert proc.poll() is None, (workdir / "job.out").read_text()
            assert time.monotonic() < deadline, "stub srun never started"
            time.sleep(0.05)
        time.sleep(0.2)  # let the stub install its traps
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
    return rc, log.read_text(), (workdir / "scontrol.log").read_text(), (workdir / "job.out").read_text()


@pytest.mark.parametrize("sig,name", [(signal.SIGUSR1, "USR1"), (signal.SIGTERM, "TERM")])
def test_trap_forwards_signal_and_requeues(cluster, sig, name):
    workdir, script, env = cluster
    rc, srun_log, scontrol_log, out = _start_and_signal(script, env, workdir, sig)
    assert rc == 0, out
    assert f"srun got {name}" in srun_log, out
    assert scontrol_log.splitlines() == ["show hostnames node-[a-b]", "requeue 4242"], out
    assert "master node-a:29500" in out


def test_trap_norequeue_file(cluster):
    workdir, script, env = cluster
    (workdir / "logs").mkdir()
    (workdir / "logs" / "4242.norequeue").touch()
    rc, srun_log, scontrol_log, out = _start_and_signal(script, env, workdir, signal.SIGUSR1)
    assert rc == 0 and "srun got USR1" in srun_log
    assert "requeue" not in scontrol_log and "not requeueing" in out


def test_no_signal_no_requeue_and_exit_code_passes_through(cluster):
    workdir, script, env = cluster
    proc = subprocess.run(["bash", str(script)], env=dict(env, STUB_MODE="fail"), capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 3
    assert "requeue" not in (workdir / "scontrol.log").read_text()


def test_accelerate_command_expands_on_each_node(cluster):
    workdir, script, env = cluster
    proc = subprocess.run(["bash", str(script)], env=dict(env, STUB_MODE="exec"), capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (workdir / "accel.args").read_text().splitlines() == [
        "launch", "--config_file", "launch/accelerate/multinode.yaml",
        "--num_machines", "2", "--num_processes", "8", "--machine_rank", "1",
        "--main_process_ip", "node-a", "--main_process_port", "29500",
        "-m", "trainer.cli", "train", "configs/tiny.yaml", "trainer.resume=auto", "trainer.max_steps=5"]
