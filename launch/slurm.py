"""Render (and optionally submit) Slurm batch scripts for training runs and study sweeps.

    plasticity slurm CONFIG --nodes 2 --gpus-per-node 8 [--time 24:00:00] [--partition P]
                     [--account A] [--accelerate-config launch/accelerate/zero2.yaml]
                     [--submit] [--out FILE] [key=value overrides ...]
    plasticity slurm STUDY --array N --max-parallel M --gpus-per-node 1 [--submit] ...

Without --submit this is a dry run: the script is printed (and written to --out if given).
The templates live in launch/slurm/*.sbatch.tmpl (string.Template; "$$" is a literal "$").
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Iterable, Sequence

from trainer.errors import ConfigError, UserError

LAUNCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = LAUNCH_DIR.parent
TEMPLATE_DIR = LAUNCH_DIR / "slurm"
TRAIN_TEMPLATE = TEMPLATE_DIR / "train.sbatch.tmpl"
SWEEP_TEMPLATE = TEMPLATE_DIR / "sweep_array.sbatch.tmpl"

DEFAULT_ACCELERATE_CONFIG = "launch/accelerate/multinode.yaml"
DEFAULT_TIME = "24:00:00"
DEFAULT_MASTER_PORT = 29500
# Work in the directory sbatch was called from (the repository root: configs and the
# deepspeed_config_file paths in launch/accelerate/*.yaml are relative to it).
DEFAULT_WORKDIR = '"${SLURM_SUBMIT_DIR:-$PWD}"'

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_LIST_RE = re.compile(r"^[A-Za-z0-9_.,+-]+$")
# Slurm --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_RE = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"slurm: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_name(name: str, value: str, pattern: re.Pattern = _NAME_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(f"slurm: {name} {value!r} may only use letters, digits and _ . + -")
    return value


def _check_time(value: str) -> str:
    if not isinstance(value, str) or not _TIME_RE.match(value):
        raise ConfigError(f"slurm: time {value!r} is not a Slurm time (HH:MM:SS, D-HH:MM:SS, or minutes)")
    return value


def _check_file(what: str, path: str | Path) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"slurm: {what} {str(path)!r} not found")
    return str(path)


def _check_accelerate_config(path: str | Path) -> str:
    # Relative paths are resolved on the cluster against the work directory (the repo root),
    # so accept one that exists relative to the current directory or to the repository.
    if not (Path(path).is_file() or (not Path(path).is_absolute() and (REPO_ROOT / path).is_file())):
        raise ConfigError(f"slurm: accelerate config {str(path)!r} not found (see launch/accelerate/)")
    return str(path)


def _sbatch_extra(partition: str | None, account: str | None) -> str:
    lines = ""
    if partition is not None:
        lines += f"#SBATCH --partition={_check_name('partition', partition, _LIST_RE)}\n"
    if account is not None:
        lines += f"#SBATCH --account={_check_name('account', account)}\n"
    return lines


def _venv_line(venv: str | Path | None) -> str:
    if venv is None:
        return "# no venv given: accelerate/python come from the PATH sbatch was called with"
    return f"source {shlex.quote(str(Path(venv) / 'bin' / 'activate'))}"


def _workdir(workdir: str | Path | None) -> str:
    return DEFAULT_WORKDIR if workdir is None else shlex.quote(str(workdir))


def _extra_args(extra_args: Iterable[str]) -> list[str]:
    if isinstance(extra_args, str):
        raise ConfigError(f"slurm: extra_args must be a list of arguments, not the string {extra_args!r}")
    return [str(a) for a in extra_args]


def _render(template: Path, **values: object) -> str:
    return Template(template.read_text(encoding="utf-8")).substitute(**values)


def render_train(
    config_path: str | Path,
    nodes: int,
    gpus_per_node: int,
    job_name: str = "plasticity",
    time: str = DEFAULT_TIME,
    partition: str | None = None,
    account: str | None = None,
    accelerate_config: str | Path = DEFAULT_ACCELERATE_CONFIG,
    extra_args: Sequence[str] = (),
    venv: str | Path | None = ".venv",
    workdir: str | Path | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
) -> str:
    """The sbatch script for `trainer.cli train CONFIG trainer.resume=auto EXTRA...` on
    `nodes` x `gpus_per_node` GPUs (one accelerate launch per node), with preemption requeue.

    Paths are written as given: relative ones are resolved on the cluster against `workdir`
    (default: the directory sbatch is run from, normally the repository root).
    """
    _check_int("nodes", nodes)
    _check_int("gpus_per_node", gpus_per_node)
    _check_int("master_port", master_port)
    config = _check_file("config file", config_path)
    train_args = [config, "trainer.resume=auto", *_extra_args(extra_args)]
    return _render(
        TRAIN_TEMPLATE,
        job_name=_check_name("job_name", job_name),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        time=_check_time(time),
        sbatch_extra=_sbatch_extra(partition, account),
        workdir=_workdir(workdir),
        venv_line=_venv_line(venv),
        master_port=master_port,
        accelerate_config=shlex.quote(_check_accelerate_config(accelerate_config)),
        train_args=" ".join(shlex.quote(a) for a in train_args),
    )


def render_sweep(
    study_config: str | Path,
    n_runs: int,
    max_parallel: int,
    job_name: str = "plasticity-sweep",
    time: str = DEFAULT_TIME,
    gpus_per_node: int = 1,
    partition: str | None = None,
    account: str | None = None,
    extra_args: Sequence[str] = (),
    venv: str | Path | None = ".venv",
    workdir: str | Path | None = None,
) -> str:
    """The sbatch array script running `trainer.cli study run STUDY --index i` for i in
    0..n_runs-1, at most `max_parallel` at a time, each on one node with `gpus_per_node` GPUs."""
    _check_int("n_runs", n_runs)
    _check_int("max_parallel", max_parallel)
    _check_int("gpus_per_node", gpus_per_node)
    study = _check_file("study config", study_config)
    extra = "".join(" " + shlex.quote(a) for a in _extra_args(extra_args))
    return _render(
        SWEEP_TEMPLATE,
        job_name=_check_name("job_name", job_name),
        last_index=n_runs - 1,
        max_parallel=max_parallel,
        n_runs=n_runs,
        gpus_per_node=gpus_per_node,
        time=_check_time(time),
        sbatch_extra=_sbatch_extra(partition, account),
        workdir=_workdir(workdir),
        venv_line=_venv_line(venv),
        study_config=shlex.quote(study),
        extra_args=extra,
    )


def submit(script: str, path: str | Path) -> str:
    """Write `script` to `path`, create logs/ (Slurm does not) and run sbatch on it.
    Returns sbatch's output ("Submitted batch job N")."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("slurm: sbatch not found on PATH (run on a Slurm login node, or drop --submit for a dry run)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script, encoding="utf-8")
    Path("logs").mkdir(exist_ok=True)
    proc = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"slurm: sbatch {path} failed (exit {proc.returncode}): {msg[-1] if msg else 'no output'}")
    return proc.stdout.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plasticity slurm",
        description="Render a Slurm batch script (dry run: print it) or submit it with --submit.",
    )
    p.add_argument("config", help="training config (or, with --array, the study config)")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed on to the trainer")
    p.add_argument("--nodes", type=int, default=1, help="nodes (train job; default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--time", default=DEFAULT_TIME, help=f"time limit (default {DEFAULT_TIME})")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--accelerate-config", default=DEFAULT_ACCELERATE_CONFIG,
                   help=f"accelerate config for the train job (default {DEFAULT_ACCELERATE_CONFIG})")
    p.add_argument("--venv", default=".venv", help="virtualenv to activate on the nodes ('' for none)")
    p.add_argument("--array", type=int, metavar="N", help="render a study sweep: N array tasks")
    p.add_argument("--max-parallel", type=int, default=4, help="sweep tasks running at once (default 4)")
    p.add_argument("--submit", action="store_true", help="write the script and run sbatch on it")
    p.add_argument("--out", help="where to write the script (default with --submit: logs/JOB_NAME.sbatch)")
    return p


def _validate(config: str, overrides: Sequence[str], array: int | None) -> None:
    """Load the config, its overrides and its callbacks as the job will, so that a typo fails here and not on
    the nodes after queueing; for a sweep, N must be the study's number of runs."""
    import tempfile

    import yaml

    from trainer.callbacks import build_callbacks
    from trainer.config import load_config
    from trainer.study import load_study, parse_args

    if array is None:
        try:
            raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if Path(config).is_file() else None
        except yaml.YAMLError:
            raw = None  # load_config names the problem
        if isinstance(raw, dict) and "grid" in raw and "base" in raw:
            raise ConfigError(f"slurm: {config} is a study config: render its sweep with --array N "
                              f"(N = its number of runs, see `plasticity study list {config}`)")
        build_callbacks(load_config(config, list(overrides)).callbacks)
        return
    parsed = parse_args(["run", config, *overrides])
    study = load_study(parsed.study, parsed.overrides)
    if array != len(study.runs):
        raise ConfigError(f"slurm: --array {array}, but the study {config} has {len(study.runs)} runs "
                          f"(one array task per run)")
    with tempfile.TemporaryDirectory() as tmp:
        base = study.base_path
        if not base.is_file():  # an inline base, written to OUT_DIR/base.yaml only when the study runs
            base = Path(tmp) / "base.yaml"
            base.write_text(yaml.safe_dump(study.cfg.base), encoding="utf-8")
        for run in study.runs:
            build_callbacks(load_config(base, run.overrides).callbacks)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        _validate(args.config, args.overrides, args.array)
        venv = args.venv or None
        if args.array is not None:
            job_name = args.job_name or "plasticity-sweep"
            script = render_sweep(
                args.config, args.array, args.max_parallel, job_name=job_name, time=args.time,
                gpus_per_node=args.gpus_per_node, partition=args.partition, account=args.account,
                extra_args=args.overrides, venv=venv,
            )
        else:
            job_name = args.job_name or "plasticity"
            script = render_train(
                args.config, args.nodes, args.gpus_per_node, job_name=job_name, time=args.time,
                partition=args.partition, account=args.account,
                accelerate_config=args.accelerate_config, extra_args=args.overrides, venv=venv,
            )
        if args.submit:
            out = args.out or f"logs/{job_name}.sbatch"
            print(submit(script, out))
            print(f"script: {out}", file=sys.stderr)
        else:
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(script, encoding="utf-8")
                print(f"wrote {args.out} (dry run: not submitted)", file=sys.stderr)
            sys.stdout.write(script)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
