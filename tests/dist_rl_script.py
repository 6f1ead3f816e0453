"""Launched by tests/test_sft_rl.py under `accelerate launch --num_processes 2` (CPU, gloo).

usage: dist_rl_script.py CONFIG.yaml key=value ...
Runs the config (an RL phase) and, on the main process, checks that rewards were logged.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    outcome = trainer.run()
    assert outcome == "done", outcome
    world = trainer.accelerator.num_processes
    if trainer.is_main:
        rows = [json.loads(line) for line in open(Path(cfg.trainer.run_dir) / "metrics.jsonl")]
        rewards = [r["train/reward_mean"] for r in rows if "train/reward_mean" in r]
        assert rewards, "no reward logged"
        print(f"world={world} rewards={rewards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
