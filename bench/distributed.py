"""2-process DDP and DeepSpeed ZeRO-2 vs a single process, on CPU (gloo), through `accelerate launch`.

Each configuration trains the demo-sized GPT-2 (n_layer 2, n_embd 128, block 128, micro-batch 4 per
process) for a few dozen steps with the project's normal entry point (`-m trainer.cli train`), and the
throughput is the median of RUN/metrics.jsonl `perf/tok_per_s` (global tokens / step wall time) over the
steps after the first WARMUP. Configurations run interleaved (single, ddp, zero2, single, ...).
Environment: ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu, --main_process_port 0.
Scaling efficiency = tok/s(2 processes) / (2 x tok/s(1 process)). The machine has few cores shared with
other jobs, so the efficiency is a property of this machine's load as much as of the code.

    python -m bench.distributed [--quick]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import fmt, load, median, now, section_main, table

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3
CONFIGS = {
    "single (1 process)": ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no"],
    "DDP (2 processes, gloo)": ["--config_file", "launch/accelerate/ddp_cpu.yaml", "--num_processes", "2"],
    "ZeRO-2 (2 processes)": ["--config_file", "launch/accelerate/zero2.yaml", "--num_processes", "2"],
}


def _yaml(steps: int) -> str:
    return f"""model: {{flavour: gpt2, block_size: 128, n_layer: 2, n_head: 2, n_embd: 128}}
data: {{vocab_size: 512, tokenizer_languages: [en, fr, de], tokenizer_sample_lines: 2000, cache_dir: {REPO / '.cache' / 'plasticity-bench'}}}
trainer: {{micro_batch_size: 4, eval_batches: 1, log_interval: 1, eval_interval: 100000, ckpt_interval: 0,
          resume: never, progress: false, tensorboard: false}}
phases:
  pre: {{kind: pretrain, mode: continual, languages: [en], steps_per_task: {steps}, optim: {{warmup_steps: 5}}}}
"""


def one(name: str, steps: int, timeout: int = 600) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        cfg = tmp / "cfg.yaml"
        cfg.write_text(_yaml(steps))
        run_dir = tmp / "run"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *CONFIGS[name], "--main_process_port", "0",
               "-m", "trainer.cli", "train", str(cfg), f"trainer.run_dir={run_dir}"]
        env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
        t0 = now()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"config": name, "error": f"timed out after {timeout}s", "load_avg": load()}
        wall = now() - t0
        mj = run_dir / "metrics.jsonl"
        toks = []
        if mj.exists():
            for line in mj.read_text().splitlines():
                rec = json.loads(line)
                if "perf/tok_per_s" in rec and rec.get("step", 0) > WARMUP:
                    toks.append(rec["perf/tok_per_s"])
        if p.returncode != 0 or not toks:
            tail = [l for l in (p.stderr or "").strip().splitlines() if l.strip()][-3:]
            return {"config": name, "error": f"rc={p.returncode}: " + " | ".join(tail)[-400:], "load_avg": load()}
        return {"config": name, "tok_s": median(toks), "steps_measured": len(toks), "wall_s": wall,
                "load_avg": load()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = False, log=print) -> dict:
    steps, repeats = (25, 1) if quick else (40, 3)
    runs = []
    for r in range(repeats):
        for name in CONFIGS:
            log(f"distributed: {name} repeat {r} (load {load()})")
            runs.append(one(name, steps))
            log("    " + (f"{runs[-1]['tok_s']:.0f} tok/s" if "tok_s" in runs[-1] else runs[-1]["error"]))
    med = {}
    for name in CONFIGS:
        v = [x["tok_s"] for x in runs if x["config"] == name and "tok_s" in x]
        med[name] = median(v) if v else None
    single = med["single (1 process)"]
    eff = {n: (t / (2 * single) if t and single else None) for n, t in med.items() if n != "single (1 process)"}
    return {"runs": runs, "median_tok_s": med, "efficiency": eff, "steps": steps, "repeats": repeats,
            "cores": os.cpu_count()}


def markdown(res: dict) -> str:
    single = res["median_tok_s"]["single (1 process)"]
    rows = []
    for n, t in res["median_tok_s"].items():
        errs = [x["error"] for x in res["runs"] if x["config"] == n and "error" in x]
        eff = res["efficiency"].get(n)
        rows.append([n, fmt(t), f"{t / single:.2f}x" if t and single else "n/a",
                     f"{100 * eff:.0f}%" if eff is not None else ("-" if n.startswith("single") else "n/a"),
                     ("error: " + errs[0]) if errs else ""])
    txt = table(["configuration", "median tok/s (global)", "vs single", "scaling efficiency", "notes"], rows)
    txt += (f"\n\n{res['steps']} steps per run (first {WARMUP} excluded), {res['repeats']} interleaved repeat(s), "
            f"micro-batch 4 per process, {res['cores']} logical cores shared with other jobs: two processes "
            f"compete with each other and with the rest of the machine, so efficiency well below 100% is expected "
            f"here and says little about a multi-GPU node.\n\n")
    txt += table(["config", "tok/s", "steps", "wall s (incl. startup)", "load avg after"],
                 [[x["config"], fmt(x.get("tok_s")), x.get("steps_measured", "-"), fmt(x.get("wall_s"), 1),
                   x["load_avg"]] for x in res["runs"]])
    return txt


def main(argv=None):
    return section_main(run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
