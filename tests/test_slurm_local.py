"""The rendered Slurm script, run for real on this machine: SIGUSR1 reaches the trainer
through srun -> accelerate launch -> torchrun, a checkpoint is written, the job requeues,
and the requeued job resumes to the end.

Only `srun` (runs its command locally) and `scontrol` (logs, answers `show hostnames`) are
stubs; accelerate, torchrun and two gloo training processes are real.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import render_train
from trainer import checkpoint

REPO = Path(__file__).resolve().parents[1]
CONTINUAL = Path(__file__).parent / "data" / "continual_tiny.yaml"

SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # drop srun's own options
exec "$@"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1" = show ]; then echo localhost; fi
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(l)["step"] for l in path.read_text().splitlines() if '"train/loss"' in l), default=0)


@pytest.mark.slow
@pytest.mark.dist
def test_sbatch_script_signal_checkpoints_requeues_and_resumes(tmp_path, cache_dir):
    run = tmp_path / "run"
    overrides = [f"trainer.run_dir={run}", f"data.cache_dir={cache_dir}", "data.vocab_size=512",
                 "data.tokenizer_languages=[en,fr,de]", "data.tokenizer_sample_lines=2000",
                 "model.block_size=32", "model.n_layer=1", "model.n_head=1", "model.n_embd=32",
                 "trainer.micro_batch_size=4", "trainer.eval_batches=1", "trainer.log_interval=1",
                 "trainer.progress=false", "trainer.tensorboard=false", "trainer.ckpt_interval=0",
                 "phases.pre.steps_per_task=400"]
    script = render_train(CONTINUAL, nodes=1, gpus_per_node=2, job_name="local",
                          accelerate_config="launch/accelerate/ddp_cpu.yaml", extra_args=overrides,
                          venv=Path(sys.executable).parents[1], workdir=REPO, master_port=_free_port())
    (tmp_path / "job.sbatch").write_text(script)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", STUB_LOG=str(log), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NODEID="0", SLURM_SUBMIT_DIR=str(REPO),
               ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    job = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _steps(run) < 3:
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        job.send_signal(signal.SIGUSR1)  # what Slurm sends two minutes before the time limit
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out
    assert "scontrol requeue 4242" in log.read_text(), out
    ckpt = checkpoint.find_latest_valid(run)
    assert ckpt is not None and checkpoint.verify(ckpt) is None, out
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert 3 <= stopped_at < 1200, stopped_at  # stopped early, by the signal, at a checkpoint
    assert not (run / "phases" / "pre" / "model.safetensors").exists()
    # the requeued job: the same script again; trainer.resume=auto continues from the checkpoint
    rerun = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {ckpt}" in rerun.stdout + rerun.stderr
    assert (run / "phases" / "pre" / "model.safetensors").exists()
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in l]
    assert steps == list(range(1, 1201))  # every step exactly once across the two jobs
