"""Train one run config under whatever `accelerate launch` set up (tests/test_distributed.py).

    accelerate launch [...] tests/dist_train.py CONFIG [key=value ...] [--stop-at STEP]

--stop-at STEP asks the loop to stop after global step STEP, exactly as SIGTERM would
(checkpoint, exit "preempted"); a later launch with trainer.resume=auto continues the run.
Prints "outcome: <done|preempted>" on the main process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

from trainer.callbacks import Callback  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def post_step(self, trainer, logs):
        if trainer.global_step == self.step:
            trainer._stop_requested = True


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stop-at", type=int, default=0)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, [StopAt(args.stop_at)] if args.stop_at else [])
    outcome = trainer.run()
    if trainer.is_main:
        acc = trainer.accelerator
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        params = list(trainer.model.parameters())
        # ZeRO-3 leaves an empty placeholder in a parameter whose values live in shards across the ranks
        sharded = sum(hasattr(q, "ds_tensor") and q.numel() == 0 for q in params)
        print(f"backend: {acc.distributed_type.value} processes={acc.num_processes} "
              f"optimizer={type(inner).__name__} clip_grad={getattr(inner, 'clip_grad', None)} "
              f"offload={bool(getattr(inner, 'cpu_offload', False) or getattr(inner, 'offload_optimizer', False))} "
              f"param_dtype={params[0].dtype} sharded_params={sharded}/{len(params)}",
              flush=True)
        print(f"outcome: {outcome}", flush=True)
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
