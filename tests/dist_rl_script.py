"""Launched by tests/test_sft_rl.py under `accelerate launch --num_processes 2` (CPU, gloo).

usage: dist_rl_script.py CONFIG.yaml key=value ...
Runs the config (an RL phase) and, on the main process, checks that rewards were logged; every rank writes
the prompts it trained on per step.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.callbacks import Callback  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


class RecordPrompts(Callback):
    """Which prompts this rank trained on, per step (written to RUN/prompts_rank<R>.json for the test)."""

    def __init__(self):
        self.used = {}

    def on_phase_start(self, trainer):
        original = trainer.runner.step_prompts

        def recorded(step):
            examples = original(step)
            self.used[step] = [e.prompt for e in examples]
            return examples
        trainer.runner.step_prompts = recorded


def main() -> int:
    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1], sys.argv[2:])
    record = RecordPrompts()
    trainer = Trainer(cfg, [record])
    outcome = trainer.run()
    assert outcome == "done", outcome
    world = trainer.accelerator.num_processes
    rank = trainer.accelerator.process_index
    (Path(cfg.trainer.run_dir) / f"prompts_rank{rank}.json").write_text(json.dumps(record.used))
    if trainer.is_main:
        rows = [json.loads(line) for line in open(Path(cfg.trainer.run_dir) / "metrics.jsonl")]
        rewards = [r["train/reward_mean"] for r in rows if "train/reward_mean" in r]
        assert rewards, "no reward logged"
        print(f"world={world} rewards={rewards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
