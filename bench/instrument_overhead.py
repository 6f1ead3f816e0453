"""Overhead of the plasticity instruments on a short CPU training run, and fused vs reference neuron stats.

Run: demo-sized GPT-2 (n_layer 2, n_head 2, n_embd 128, block 128), tiny_overrides-like data settings
(vocab 512, tokenizer on en/fr/de), micro-batch 4, continual pretraining en -> fr with 100 steps per task
(so a boundary every 100 steps), evaluation only at task ends, checkpoints only at task ends. Variants:

  (a) none      no callback
  (b) boundary  the `instruments` callback (boundaries at run start and after every task: neuron stats,
                representation/weight metrics, sharpness, clones, and the probe with its default budget)
  (c) online    per-step online neuron stats (online_every: 1, and the update norm) ONLY: an Instruments
                subclass whose boundary measurement is switched off, so (c) isolates the per-step cost

The variants run interleaved (a, b, c, a, b, c, ...) and the median wall time of Trainer.run() is reported.

    python -m bench.instrument_overhead [--quick]
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import fmt, load, median, now, section_main, table

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "plasticity-bench"
STEPS_PER_TASK = 100
VARIANTS = ("none", "periodic", "boundary", "online")
PROBE = {"probe_steps": 60, "probe_batch_size": 8, "probe_eval_every": 10, "probe_eval_batches": 4}


def overrides(run_dir: Path, steps_per_task: int) -> list:
    return [f"trainer.run_dir={run_dir}", f"data.cache_dir={CACHE}", "data.vocab_size=512",
            "data.tokenizer_languages=[en,fr,de]", "data.tokenizer_sample_lines=2000",
            "model.flavour=gpt2", "model.block_size=128", "model.n_layer=2", "model.n_head=2", "model.n_embd=128",
            "trainer.micro_batch_size=16", "trainer.eval_batches=1", "trainer.log_interval=10",
            "trainer.eval_interval=100000", "trainer.ckpt_interval=0", "trainer.resume=never",
            "trainer.progress=false", "trainer.tensorboard=false",
            "phases.pre.kind=pretrain", "phases.pre.mode=continual", "phases.pre.languages=[en,fr]",
            f"phases.pre.steps_per_task={steps_per_task}", "phases.pre.optim.warmup_steps=10"]


def _no_boundary_cls():
    from trainer.instruments.callback import Instruments

    class OnlineOnly(Instruments):
        """Online / periodic measurements only, without the full boundary measurement (probe)."""

        def on_run_start(self, trainer):
            pass

        def on_task_end(self, trainer):
            pass

    return OnlineOnly


class _Timers:
    """Wall time per part of the boundary measurement, by wrapping the callback's helpers while a run lasts."""

    PARTS = {"neuron stats (hooks)": ("cb", "Instruments._neuron_stats"),
             "features + ranks + clones": ("mod", "capture_features"),
             "Hessian sharpness": ("M", "hessian_sharpness"),
             "probe (incl. fresh probe at boundary 0)": ("mod", "probe_model"),
             "write report": ("cb", "Instruments._write")}

    def __enter__(self):
        import trainer.instruments.callback as C

        self.t = {k: 0.0 for k in self.PARTS}
        self.saved = []
        for label, (where, name) in self.PARTS.items():
            if where == "cb":
                owner, attr = C.Instruments, name.split(".")[1]
            elif where == "M":
                owner, attr = C.M, name
            else:
                owner, attr = C, name
            orig = getattr(owner, attr)
            self.saved.append((owner, attr, orig))

            def wrapped(*a, _orig=orig, _label=label, **k):
                t0 = now()
                try:
                    return _orig(*a, **k)
                finally:
                    self.t[_label] += now() - t0

            setattr(owner, attr, wrapped)
        return self

    def __exit__(self, *exc):
        for owner, attr, orig in reversed(self.saved):
            setattr(owner, attr, orig)


class _InstrumentClock:
    """Seconds spent in the instruments during a run: the callback's events (pre_step, post_backward, post_step,
    on_run_start, on_task_end) and the forward hooks' statistics. Nested calls (hooks inside a measurement) count once. Measured
    inside the same run as the training time, so it is free of the run-to-run noise that the
    difference of two runs' totals carries on a shared machine."""

    def __enter__(self):
        import trainer.instruments.callback as C
        import trainer.instruments.hooks as H

        self.seconds, self._depth, self.saved = 0.0, 0, []
        for owner, attr in ((C.Instruments, "pre_step"), (C.Instruments, "post_backward"),
                            (C.Instruments, "post_step"), (C.Instruments, "on_run_start"), (C.Instruments, "on_task_end"),
                            (H.NeuronHooks, "_update")):
            orig = getattr(owner, attr)
            self.saved.append((owner, attr, orig))

            def wrapped(*a, _orig=orig, **k):
                self._depth += 1
                t0 = time.process_time()
                try:
                    return _orig(*a, **k)
                finally:
                    self._depth -= 1
                    if self._depth == 0:
                        self.seconds += time.process_time() - t0

            setattr(owner, attr, wrapped)
        return self

    def __exit__(self, *exc):
        for owner, attr, orig in reversed(self.saved):
            setattr(owner, attr, orig)


def one_run(variant: str, steps_per_task: int) -> dict:
    from trainer.analysis import read_boundaries
    from trainer.config import load_config
    from trainer.loop import Trainer

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-instr-{variant}-"))
    try:
        ov = overrides(tmp / "run", steps_per_task)
        extra = []
        if variant == "boundary":
            ov += ["callbacks=[{name: instruments, probe_steps: %d, probe_batch_size: %d, probe_eval_every: %d, "
                   "probe_eval_batches: %d}]" % tuple(PROBE.values())]
        elif variant == "online":
            extra = [_no_boundary_cls()(online_every=1)]
        elif variant == "periodic":
            extra = [_no_boundary_cls()(metrics_every=100)]
        cfg = load_config(None, ov)
        torch.manual_seed(0)
        trainer = Trainer(cfg, extra)
        with _Timers() as timers, _InstrumentClock() as clock:
            t0, c0 = now(), time.process_time()
            outcome = trainer.run()
            wall, cpu = now() - t0, time.process_time() - c0
        b_secs = [rec.get("seconds") or rec.get("scalars", {}).get("seconds")
                  for rec in read_boundaries(tmp / "run" / "boundaries.jsonl")]
        steps = steps_per_task * 2
        return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "outcome": outcome, "steps": steps,
                "boundaries": len(b_secs), "boundary_s": b_secs, "load_avg": load(),
                "parts_s": timers.t if variant == "boundary" else {}, "instrument_cpu_s": clock.seconds}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def agreement(fused, ref) -> str:
    """How closely fused_stats matches reference_stats: relative error of the float sums, and how many elements
    the count rows classify differently (saturation is counted against precomputed interval edges by the fused
    path and by evaluating phi' in float32 by the reference, so an element within rounding of an edge may differ)."""
    from trainer.instruments.neuron_stats import IDX, STAT_NAMES

    floats = [IDX[n] for n in ("sum_abs", "sum", "max_abs")]
    rel = float(((fused[floats] - ref[floats]).abs() / ref[floats].abs().clamp(min=1.0)).max())
    counts = [i for i, n in enumerate(STAT_NAMES) if i not in floats]
    diff = int((fused[counts] - ref[counts]).abs().sum())
    total = int(ref[IDX["count"]].sum())
    return f"float sums rel. err. {rel:.0e}; counts differ for {diff} of {total:,} elements"


def neuron_stats_speed(repeats: int = 5) -> list:
    """fused_stats (torch path) vs reference_stats, CPU, interleaved, median seconds per call."""
    from trainer.instruments.neuron_stats import fused_stats, reference_stats

    shapes = [("demo gpt2 mlp (16x128 tok, H=512)", (16, 128, 512), "gelu_tanh"),
              ("demo llama mlp gate (16x128 tok, H=352)", (16, 128, 352), "silu"),
              ("124M mlp per micro-batch (8x1024 tok, H=3072)", (8, 1024, 3072), "gelu_tanh")]
    out = []
    for label, shape, kind in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        h = torch.nn.functional.gelu(x, approximate="tanh") if kind == "gelu_tanh" else torch.nn.functional.silu(x)
        same = agreement(fused_stats(h, x, kind), reference_stats(h, x, kind))
        tf, tr = [], []
        for _ in range(repeats):
            t0 = now(); fused_stats(h, x, kind); tf.append(now() - t0)
            t0 = now(); reference_stats(h, x, kind); tr.append(now() - t0)
        out.append({"shape": label, "act": kind, "fused_ms": 1e3 * median(tf), "reference_ms": 1e3 * median(tr),
                    "speedup": median(tr) / median(tf), "agreement": same, "load_avg": load()})
    return out


def run(quick: bool = False, log=print) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    repeats = 2 if quick else 4
    log(f"instrument overhead: warm-up run (tokenizer/data cache in {CACHE}) (load {load()})")
    one_run("none", 5)
    runs = []
    for r in range(repeats):
        for v in VARIANTS:
            log(f"  repeat {r} variant {v} (load {load()})")
            runs.append(one_run(v, STEPS_PER_TASK))
            log(f"    wall {runs[-1]['wall_s']:.1f}s")
    med = {v: median([x["wall_s"] for x in runs if x["variant"] == v]) for v in VARIANTS}
    cpu = {v: median([x["cpu_s"] for x in runs if x["variant"] == v]) for v in VARIANTS}
    direct = {v: median([100 * x["instrument_cpu_s"] / (x["cpu_s"] - x["instrument_cpu_s"])
                         for x in runs if x["variant"] == v]) for v in VARIANTS}
    b_runs = [x for x in runs if x["variant"] == "boundary"]
    per_boundary = median([s for x in b_runs for s in x["boundary_s"] if s is not None]) if b_runs else None
    res = {"runs": runs, "median_wall_s": med, "median_cpu_s": cpu, "direct_overhead_pct": direct,
           "cpu_overhead_boundary_pct": 100 * (cpu["boundary"] / cpu["none"] - 1),
           "cpu_overhead_online_pct": 100 * (cpu["online"] / cpu["none"] - 1),
           "cpu_overhead_periodic_pct": 100 * (cpu["periodic"] / cpu["none"] - 1), "steps": 2 * STEPS_PER_TASK, "steps_per_task": STEPS_PER_TASK,
           "probe": PROBE, "per_boundary_s": per_boundary,
           "overhead_boundary_pct": 100 * (med["boundary"] / med["none"] - 1),
           "overhead_online_pct": 100 * (med["online"] / med["none"] - 1),
           "step_s": cpu["none"] / (2 * STEPS_PER_TASK),
           "neuron_stats": neuron_stats_speed(3 if quick else 5), "threads": torch.get_num_threads()}
    if per_boundary:
        # steps between boundaries at which the boundary cost would be 3 % of training time
        res["steps_for_3pct"] = per_boundary / (0.03 * res["step_s"])
    return res


def markdown(res: dict) -> str:
    med, cpu = res["median_wall_s"], res["median_cpu_s"]
    ob, oo = res["cpu_overhead_boundary_pct"], res["cpu_overhead_online_pct"]
    op = res["cpu_overhead_periodic_pct"]
    d = res["direct_overhead_pct"]
    wall = lambda v: f"{100 * (med[v] / med['none'] - 1):+.1f}%"  # noqa: E731
    rows = [["(a) no instruments", fmt(med["none"], 1), "-", fmt(cpu["none"], 1), "-", "-", "-"],
            ["(b) boundary metrics every 100 steps (metrics_every: 100: neuron stats, ranks, clones, attention; "
             "no probe, no sharpness)", fmt(med["periodic"], 1), wall("periodic"), fmt(cpu["periodic"], 1),
             f"{op:+.1f}%", f"{d['periodic']:.1f}%", "<= 3%: " + ("met" if d["periodic"] <= 3 else "NOT met")],
            ["(b') full `instruments` at task boundaries (every %d steps + run start, incl. probe and sharpness)"
             % res["steps_per_task"], fmt(med["boundary"], 1), wall("boundary"), fmt(cpu["boundary"], 1),
             f"{ob:+.1f}%", f"{d['boundary']:.1f}%", "(no goal: the probe is a fine-tuning run)"],
            ["(c) online neuron stats every step (online_every: 1, every 4th token), boundary off",
             fmt(med["online"], 1), wall("online"), fmt(cpu["online"], 1), f"{oo:+.1f}%", f"{d['online']:.1f}%",
             "<= 10%: " + ("met" if d["online"] <= 10 else "NOT met")]]
    p = res["probe"]
    txt = table(["variant", f"median wall s ({res['steps']} steps)", "overhead (wall, vs (a))", "median CPU s",
                 "overhead (CPU, vs (a))", "overhead (in-run clock)", "goal (judged on the in-run clock)"], rows)
    txt += ("\n\nThe run-to-run spread of identical runs (see 'All runs' below: ±5% even in CPU time) is larger "
            "than the 3% being judged, so the goals are judged on the in-run clock: CPU seconds spent inside the "
            "instruments (the callback's events, which include every measurement, and the forward "
            "hooks' statistics) divided by the rest of the same run's CPU time, median over runs. The two "
            "columns before it are the plain differences to (a), for reference.")
    txt += (f"\n\nProbe budget per boundary: {p['probe_steps']} fine-tuning steps x batch {p['probe_batch_size']}, "
            f"validation every {p['probe_eval_every']} steps on {p['probe_eval_batches']} batches (+ one probe of a "
            f"fresh initialisation at the first boundary). Boundaries in (b): 3 (run start, after task en, after task fr).")
    if res.get("per_boundary_s"):
        txt += (f" Median boundary measurement: {res['per_boundary_s']:.1f} s wall; training without instruments: "
                f"{1e3 * res['step_s']:.0f} ms CPU per step (incl. the two task-end evals/checkpoints), so a "
                f"boundary costs 3% only with >= {res['steps_for_3pct']:,.0f} steps between boundaries at this model size.")
    b_runs = [r for r in res["runs"] if r["variant"] == "boundary" and r.get("parts_s")]
    if b_runs:
        parts = list(b_runs[0]["parts_s"])
        txt += ("\n\nWhere the boundary time goes (seconds summed over the 3 boundaries of a run, median over runs; "
                "features+ranks+clones, sharpness and the attention entropy make up the representation metrics):\n\n")
        txt += table(["part", "s per run (3 boundaries)"],
                     [[k, fmt(median([r["parts_s"][k] for r in b_runs]), 1)] for k in parts])
    txt += "\n\nAll runs (interleaved):\n\n" + table(
        ["variant", "wall s", "CPU s", "instruments CPU s", "boundary s (wall)", "load avg after"],
        [[r["variant"], fmt(r["wall_s"], 1), fmt(r["cpu_s"], 1), fmt(r.get("instrument_cpu_s", 0), 2),
          ", ".join(fmt(s, 1) for s in r["boundary_s"]) or "-", r["load_avg"]]
         for r in res["runs"]])
    txt += "\n\nNeuron statistics, CPU, `fused_stats` (torch path) vs `reference_stats`, median of interleaved calls:\n\n"
    txt += table(["activations", "act", "fused ms", "reference ms", "reference/fused", "fused vs reference", "load avg"],
                 [[n["shape"], n["act"], fmt(n["fused_ms"], 1), fmt(n["reference_ms"], 1), f"{n['speedup']:.2f}x",
                   n["agreement"], n["load_avg"]] for n in res["neuron_stats"]])
    return txt


def main(argv=None):
    return section_main(run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
