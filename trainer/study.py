"""Scaling studies: a grid of runs (sizes x weight decay x mitigation x mode x seed), run idempotently.

    plasticity study run STUDY.yaml [--index I] [--parallel N] [--retry-failed]
    plasticity study status STUDY.yaml
    plasticity study analyse STUDY.yaml        (writes OUT_DIR/analysis.json, prints the fit)
    plasticity report OUT_DIR                  (Markdown + PNGs, see trainer/study_report.py)

A study YAML (schema: `StudyConfig` below)::

    name: cpu
    base: ../pipeline/x.yaml        # a run config path (relative to this file) or an inline mapping
    out_dir: runs/study/cpu
    pretrain_phase: ""              # "" = the first pretrain phase of the base config
    instruments: {name: instruments, probe_steps: 30}   # the first callback of every run
    overrides: [trainer.micro_batch_size=8]             # applied to every run, before the grid's
    grid:
      sizes: [50k, 200k, 1M]        # non-embedding parameter counts or presets (models/sizes.py)
      weight_decay: [0.0, 0.1]      # [] = the base config's
      mitigations: {none: []}       # name -> list of extra callback entries
      modes: [continual, stationary]
      seeds: [0, 1]

The grid expands in that nesting order (sizes outermost, seeds innermost) into runs named
`<size>-wd<wd>-<mitigation>-<mode>-s<seed>` with run dir OUT_DIR/runs/<name>.  A run that
finishes writes RUN/DONE (JSON: seconds, finished_at); a run that raises writes RUN/FAILED (the
error) and is skipped by later invocations unless --retry-failed.  Re-running a study skips DONE
runs, so `study run` is idempotent and resumable (an interrupted run resumes from its checkpoint).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import ConfigError, UserError
from trainer.fileio import write_atomic

DONE, FAILED = "DONE", "FAILED"


class Preempted(Exception):
    """The run stopped on a signal (checkpoint written): it stays pending, neither DONE nor FAILED."""


_CHILDREN: set = set()  # live subprocess runs, to forward SIGTERM/SIGUSR1 to
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GridConfig:
    sizes: List[str] = field(default_factory=lambda: ["nano"])
    weight_decay: List[float] = field(default_factory=list)  # [] = keep the base config's value
    mitigations: Dict[str, Any] = field(default_factory=lambda: {"none": []})
    modes: List[str] = field(default_factory=lambda: ["continual"])
    seeds: List[int] = field(default_factory=lambda: [0])


@dataclass
class StudyConfig:
    name: str = ""
    base: Any = MISSING  # path to a run config (relative to the study file) or an inline mapping
    out_dir: str = MISSING
    pretrain_phase: str = ""  # "" = the first phase of kind pretrain in the base config
    instruments: Any = field(default_factory=lambda: {"name": "instruments"})  # None/{} = no instruments
    overrides: List[str] = field(default_factory=list)  # key=value for every run (before the grid's)
    grid: GridConfig = field(default_factory=GridConfig)
    # further grids whose runs are added to `grid`'s (duplicates dropped): e.g. stationary or a second
    # weight decay for a subset of sizes/seeds only, to keep a study within its budget
    more_grids: List[GridConfig] = field(default_factory=list)


@dataclass
class RunSpec:
    index: int
    name: str
    size: str
    weight_decay: Optional[float]
    mitigation: str
    mode: str
    seed: int
    overrides: List[str]
    run_dir: Path
    non_embedding_params: int = 0
    cpu_seconds: Optional[float] = None  # set by the runner: CPU time of the run (all its threads)

    def meta(self) -> dict:
        return {"index": self.index, "name": self.name, "size": self.size, "weight_decay": self.weight_decay,
                "mitigation": self.mitigation, "mode": self.mode, "seed": self.seed,
                "non_embedding_params": self.non_embedding_params, "overrides": self.overrides}


@dataclass
class Study:
    cfg: StudyConfig
    path: Optional[Path]  # the study YAML (None when built in code)
    base_path: Path  # the run config every run starts from (written to OUT_DIR/base.yaml if inline)
    out_dir: Path
    runs: List[RunSpec]


# --- loading and expansion ------------------------------------------------------------------------
def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in study config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study config {path} must hold a mapping at top level")
    return build_study(raw, path, overrides)


def build_study(raw: dict, path: Optional[Path] = None, overrides: Sequence[str] = ()) -> Study:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(StudyConfig), raw)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        scfg: StudyConfig = OmegaConf.to_object(cfg)
    except yaml.YAMLError as e:  # a dotlist value that is not YAML, e.g. grid.mitigations={a:[...]}
        raise ConfigError(f"study config{f' {path}' if path else ''}: an override is not valid YAML: "
                          f"{str(e).splitlines()[0]} (write 'key: value' with a space)") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise ConfigError(f"study config{f' {path}' if path else ''}: bad or unknown key '{key}': "
                          f"{str(e).splitlines()[0]}") from None
    here = path.parent if path else Path.cwd()
    out_dir = Path(scfg.out_dir)
    if isinstance(scfg.base, str):
        base_path = Path(scfg.base)
        if not base_path.is_absolute():
            cand = here / base_path
            base_path = cand if cand.is_file() or not base_path.is_file() else base_path
        if not base_path.is_file():
            raise ConfigError(f"study key 'base': run config not found: {scfg.base}")
        base_dict = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
    elif isinstance(scfg.base, dict):
        base_dict = scfg.base
        base_path = out_dir / "base.yaml"
    else:
        raise ConfigError("study key 'base': must be a run config path or a mapping")
    runs = expand_grid(scfg, base_dict, out_dir)
    return Study(scfg, path, base_path, out_dir, runs)


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _pretrain_phase(scfg: StudyConfig, base: dict) -> str:
    if scfg.pretrain_phase:
        return scfg.pretrain_phase
    for name, p in (base.get("phases") or {}).items():
        if (p or {}).get("kind", "pretrain") == "pretrain":
            return name
    raise ConfigError("study: the base config has no pretrain phase (set pretrain_phase)")


def _params_of(size: str, base: dict) -> int:
    """Non-embedding parameters of the model a run of `size` trains: the base config's model section
    with the layer shapes of `size` (as trainer.model_setup.resolve_model_config builds it)."""
    from models.gpt import ModelConfig
    from models.sizes import non_embedding_params
    from trainer.model_setup import sized

    try:
        mc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), base.get("model") or {}))
    except OmegaConfBaseException as e:
        raise ConfigError(f"study: the base config's model section: {str(e).splitlines()[0]}") from None
    return non_embedding_params(sized(mc, size))


def expand_grid(scfg: StudyConfig, base: dict, out_dir: Path) -> List[RunSpec]:
    """`grid` then each of `more_grids`, each in a fixed order: sizes > weight_decay > mitigations > modes
    > seeds; a run already produced by an earlier grid is not repeated.  Indices are positions in this list."""
    runs: List[RunSpec] = []
    seen = set()
    for g in [scfg.grid, *scfg.more_grids]:
        for r in _expand_one(scfg, g, base, out_dir):
            if r.name not in seen:
                seen.add(r.name)
                r.index = len(runs)
                runs.append(r)
    return runs


def _expand_one(scfg: StudyConfig, g: GridConfig, base: dict, out_dir: Path) -> List[RunSpec]:
    phase = _pretrain_phase(scfg, base)
    for mode in g.modes:
        if mode not in ("continual", "stationary"):
            raise ConfigError(f"study key 'grid.modes': '{mode}' is not continual or stationary")
    if not g.sizes or not g.modes or not g.seeds or not g.mitigations:
        raise ConfigError("study key 'grid': sizes, modes, seeds and mitigations must be non-empty")
    instruments = scfg.instruments
    if instruments and not (isinstance(instruments, dict) and "name" in instruments):
        raise ConfigError("study key 'instruments': a callback entry like {name: instruments, ...} (or null)")
    wds: List[Optional[float]] = list(g.weight_decay) or [None]
    runs: List[RunSpec] = []
    for size in g.sizes:
        size = str(size)
        params = _params_of(size, base)
        for wd in wds:
            for mit, extra in g.mitigations.items():
                if not isinstance(extra, list):
                    raise ConfigError(f"study key 'grid.mitigations.{mit}': must be a list of callback entries")
                for mode in g.modes:
                    for seed in g.seeds:
                        name = f"{size}-wd{_fmt(wd) if wd is not None else 'base'}-{mit}-{mode}-s{seed}"
                        callbacks = ([instruments] if instruments else []) + list(extra)
                        ov = list(scfg.overrides) + [f"model_size={size}", f"phases.{phase}.mode={mode}"]
                        if wd is not None:
                            ov.append(f"phases.{phase}.optim.weight_decay={_fmt(float(wd))}")
                        ov += [f"trainer.seed={seed}", f"callbacks={json.dumps(callbacks)}",
                               f"trainer.run_dir={out_dir / 'runs' / name}"]
                        runs.append(RunSpec(len(runs), name, size, None if wd is None else float(wd), str(mit),
                                            mode, int(seed), ov, out_dir / "runs" / name, params))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("study: the grid has duplicate entries")
    return runs


# --- state ------------------------------------------------------------------------------------------
def run_state(spec: RunSpec) -> str:
    if (spec.run_dir / DONE).is_file():
        return "done"
    if (spec.run_dir / FAILED).is_file():
        return "failed"
    return "pending"


def _prepare_dirs(study: Study) -> None:
    study.out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(study.cfg.base, dict):
        text = yaml.safe_dump(study.cfg.base, sort_keys=False)
        if not study.base_path.is_file() or study.base_path.read_text(encoding="utf-8") != text:
            write_atomic(study.base_path, text)  # array tasks start together and all write it
    manifest = {"name": study.cfg.name, "study_config": str(study.path) if study.path else None,
                "base": str(study.base_path), "runs": [r.meta() for r in study.runs]}
    _write_json(study.out_dir / "study.json", manifest)


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=str))


# --- executing one run ---------------------------------------------------------------------------
def in_process_runner(study: Study, spec: RunSpec) -> None:
    """Train in this process (raises on failure)."""
    from trainer.config import load_config
    from trainer.loop import train

    import resource

    cfg = load_config(study.base_path, spec.overrides + ["trainer.progress=false"])
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    outcome = train(cfg)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    spec.cpu_seconds = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if outcome == "preempted":
        raise Preempted(spec.name)
    if outcome != "done":
        raise RuntimeError(f"run stopped: {outcome}")


def subprocess_runner(study: Study, spec: RunSpec) -> None:
    """`python -m trainer.cli train BASE overrides...`, one thread, output to RUN/train.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "trainer.cli", "train", str(study.base_path), *spec.overrides,
           "trainer.progress=false"]
    log = spec.run_dir / "train.log"
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _CHILDREN.add(proc)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # like proc.wait(), plus the child's CPU time
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            _CHILDREN.discard(proc)
    spec.cpu_seconds = usage.ru_utime + usage.ru_stime
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}; last lines of {log}:\n" + "\n".join(tail))
    if tail and tail[-1].startswith("preempted:"):  # `plasticity train` prints "<outcome>: <run dir>"
        raise Preempted(spec.name)


Runner = Callable[[Study, RunSpec], None]


def _locked_elsewhere(run_dir: Path) -> bool:
    """True while another process trains this run (it holds RUN/.lock, see trainer/rundir.py)."""
    import fcntl

    lock = run_dir / ".lock"
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we got
    return False


def execute(study: Study, spec: RunSpec, runner: Runner) -> str:
    """Run one grid point, writing DONE or FAILED. Returns the new state ("busy": another process
    is training it right now, e.g. a second `study run` or an array task; nothing is written)."""
    if _locked_elsewhere(spec.run_dir):
        return "busy"
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(spec.run_dir / "study_run.json", spec.meta())
    (spec.run_dir / FAILED).unlink(missing_ok=True)
    t0 = time.time()
    try:
        runner(study, spec)
    except Preempted:
        return "preempted"
    except BaseException as e:  # noqa: BLE001 - recorded, the study goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        err = "".join(traceback.format_exception_only(type(e), e)).strip()
        _write_json(spec.run_dir / FAILED, {"error": err, "seconds": time.time() - t0,
                                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return "failed"
    _write_json(spec.run_dir / DONE, {"seconds": time.time() - t0, "cpu_seconds": spec.cpu_seconds,
                                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    (spec.run_dir / FAILED).unlink(missing_ok=True)  # e.g. a concurrent invocation found the run locked
    return "done"


def run_study(study: Study, index: Optional[int | Sequence[int]] = None, parallel: int = 1, retry_failed: bool = False,
              runner: Optional[Runner] = None, log=print) -> Dict[str, int]:
    """Run the pending (and, with retry_failed, the failed) grid points. Returns state counts."""
    if parallel < 1:
        raise UserError("study: --parallel must be >= 1")
    _prepare_dirs(study)
    if index is not None:
        indices = [index] if isinstance(index, int) else list(index)
        for i in indices:
            if not 0 <= i < len(study.runs):
                raise UserError(f"study: --index {i} is out of range (the grid has {len(study.runs)} runs)")
        todo_all = [study.runs[i] for i in indices]
    else:
        todo_all = study.runs
    todo = [r for r in todo_all if run_state(r) == "pending" or (retry_failed and run_state(r) == "failed")]
    skipped = {s: sum(run_state(r) == s for r in todo_all if r not in todo) for s in ("done", "failed")}
    log(f"study {study.cfg.name or study.out_dir}: {len(todo)} to run, {skipped['done']} done, "
        f"{skipped['failed']} failed skipped" + (" (use --retry-failed)" if skipped["failed"] else ""))
    if runner is None:
        runner = subprocess_runner if parallel > 1 else in_process_runner
    t0 = time.time()
    counts = {"done": 0, "failed": 0}
    stopping: List[int] = []

    def forward(signum, frame):  # subprocess runs: pass the signal on; start no new run
        stopping.append(signum)
        for proc in list(_CHILDREN):
            proc.send_signal(signum)

    if runner is subprocess_runner and threading_main():
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, forward)

    def one(spec: RunSpec) -> str:
        if stopping or run_state(spec) == "done":  # finished meanwhile by another invocation
            return "skipped"
        state = execute(study, spec, runner)
        if state == "preempted":
            stopping.append(0)
        extra = ""
        if state == "failed":
            extra = ": " + json.loads((spec.run_dir / FAILED).read_text())["error"].splitlines()[-1][:200]
        log(f"[{time.time() - t0:7.1f}s] {spec.index:3d} {spec.name}: {state}{extra}")
        return state

    if parallel == 1 or len(todo) <= 1:
        for spec in todo:
            state = one(spec)
            counts[state] = counts.get(state, 0) + 1
    else:
        with cf.ThreadPoolExecutor(max_workers=parallel) as pool:
            for state in pool.map(one, todo):
                counts[state] = counts.get(state, 0) + 1
    wall = time.time() - t0
    with open(study.out_dir / "study_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": wall,
                            "index": index, "parallel": parallel, "ran": len(todo), **counts}) + "\n")
    stopped = counts.pop("preempted", 0), counts.pop("skipped", 0), counts.pop("busy", 0)
    log(f"study finished in {wall:.1f}s: {counts['done']} done, {counts['failed']} failed"
        + (f", {stopped[0]} preempted (pending), {stopped[1]} not started, {stopped[2]} running elsewhere"
           if any(stopped) else ""))
    return counts


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def status(study: Study) -> Dict[str, List[RunSpec]]:
    out: Dict[str, List[RunSpec]] = {"done": [], "failed": [], "pending": []}
    for r in study.runs:
        out[run_state(r)].append(r)
    return out


# --- CLI ---------------------------------------------------------------------------------------------
def _indices(text: str):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an index or a comma-separated list of indices") from None
    return vals[0] if len(vals) == 1 else vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plasticity study", description="Run, inspect and analyse a scaling study.")
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="run the grid (skips DONE runs)")
    r.add_argument("study")
    r.add_argument("overrides", nargs="*", help="key=value overrides of the study config (e.g. out_dir=...)")
    r.add_argument("--index", type=_indices, default=None,
                   help="run only grid point I (a Slurm array task id), or a list I,J,K")
    r.add_argument("--parallel", type=int, default=1, help="runs at once, each a 1-thread subprocess")
    r.add_argument("--retry-failed", action="store_true", help="also rerun runs marked FAILED")
    r.add_argument("--subprocess", action="store_true", help="use a subprocess even with --parallel 1")
    s = sub.add_parser("status", help="done / failed / pending runs")
    s.add_argument("study")
    s.add_argument("overrides", nargs="*")
    s.add_argument("-v", "--verbose", action="store_true", help="list every run")
    a = sub.add_parser("analyse", aliases=["analyze"], help="onsets + scaling fit -> OUT_DIR/analysis.json")
    a.add_argument("study")
    a.add_argument("overrides", nargs="*")
    lst = sub.add_parser("list", help="print the expanded grid (index, name, overrides)")
    lst.add_argument("study")
    lst.add_argument("overrides", nargs="*")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """build_parser().parse_args, but key=value overrides may also follow the options (the Slurm array script
    appends them after --index); argparse alone stops collecting positionals at the first option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    study = load_study(args.study, args.overrides)
    if args.action == "run":
        runner = subprocess_runner if args.subprocess else None
        counts = run_study(study, args.index, args.parallel, args.retry_failed, runner=runner)
        return 1 if counts["failed"] else 0
    if args.action == "status":
        st = status(study)
        print(f"{study.out_dir}: {len(study.runs)} runs: {len(st['done'])} done, {len(st['failed'])} failed, "
              f"{len(st['pending'])} pending")
        for r in st["failed"]:
            err = json.loads((r.run_dir / FAILED).read_text()).get("error", "")
            print(f"  FAILED {r.index:3d} {r.name}: {err.splitlines()[-1] if err else ''}")
        if args.verbose:
            for r in study.runs:
                print(f"  {run_state(r):7s} {r.index:3d} {r.name}")
        return 0
    if args.action == "list":
        for r in study.runs:
            print(f"{r.index:3d} {r.name} P={r.non_embedding_params} " + " ".join(r.overrides))
        return 0
    from trainer.analysis import analyse_study_dir

    res = analyse_study_dir(study.out_dir)
    print(json.dumps(res.get("summary", {}), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
