"""SFT and RL (GRPO) phases: objective pieces, deterministic sampling, resume, DDP, and the
end-to-end effect on configs/pipeline/tiny.yaml (SFT raises accuracy, RL raises reward)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import StopAt, tiny_overrides
from trainer.callbacks import Callback
from trainer.config import load_config
from trainer.loop import Trainer
from trainer.phases import stable_seed
from trainer.rl_phase import GRPORunner, group_advantages, grpo_loss, response_sequence, token_logprobs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pipeline" / "tiny.yaml"


def write_cfg(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# A chain small enough for seconds: 1 pretrain task, SFT, RL with a KL reference.
CHAIN = """
trainer: {ckpt_interval: 0, eval_interval: 1000, seed: 3}
phases:
  pre: {kind: pretrain, mode: continual, languages: [en], steps_per_task: 3}
  sft:
    kind: sft
    steps: 6
    sft: {task_families: ["add:1"], num_examples: 200, eval_examples: 8, max_new_tokens: 3}
  rl:
    kind: rl
    steps: 4
    rl: {task_families: ["add:1"], prompts_per_step: 2, group_size: 3, max_new_tokens: 3, kl_coef: 0.1,
         eval_examples: 4}
    optim: {lr: 1.0e-3, warmup_steps: 0}
"""


def losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


# ----------------------------------------------------------------------------- objective pieces
def test_advantages_are_group_normalized():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [3.0, 1.0, 2.0, 0.0]])
    a = group_advantages(r)
    assert torch.allclose(a.mean(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[1], torch.zeros(4))  # equal rewards: no signal
    std = r[0].std(unbiased=False)
    assert torch.allclose(a[0], (r[0] - r[0].mean()) / (std + 1e-4))
    assert a[2].argmax() == 0 and a[2].argmin() == 3


def test_response_sequence_masks_the_prompt():
    x, y = response_sequence([2, 10, 11, 12], [20, 21, 3])
    assert x == [2, 10, 11, 12, 20, 21] and y == [-100, -100, -100, 20, 21, 3]


def test_loss_counts_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    y = torch.tensor([[-100, -100, 4, 1, -100], [-100, 2, 3, 3, 5]])
    mask = y != -100
    logp, _ = token_logprobs(logits, y)
    old = logp.detach() + 0.05 * torch.randn(2, 5)
    adv = torch.tensor([1.0, -0.5])
    loss, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # no gradient reaches logits at prompt/padding positions
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().max() > 0
    # changing anything at masked positions leaves the loss unchanged
    old2 = torch.where(mask, old, torch.full_like(old, 99.0))
    logp2 = torch.where(mask, logp.detach(), torch.full_like(old, -50.0))
    assert torch.equal(grpo_loss(logp2, old2, adv, mask, 0.2)[0], grpo_loss(logp.detach(), old, adv, mask, 0.2)[0])


def test_clipped_objective_matches_hand_computation():
    eps = 0.2
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(1.5), math.log(0.9), 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    loss, sums = grpo_loss(logp, old, adv, mask, clip_eps=eps)
    # row 0 (A=2): ratio 1.5 -> min(3.0, 1.2*2) = 2.4; ratio 0.5 -> min(1.0, 0.8*2) = 1.0
    # row 1 (A=-1): ratio 1.5 -> min(-1.5, -1.2) = -1.5; 0.9 -> min(-0.9, -0.9) = -0.9; 1.0 -> -1.0
    expected = -(2.4 + 1.0 - 1.5 - 0.9 - 1.0) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert sums["clipped"] == 3 and sums["tokens"] == 5
    # k3 KL to a reference: exp(ref - logp) - (ref - logp) - 1, added with kl_coef
    ref = torch.zeros(2, 3)
    loss_kl, s = grpo_loss(logp, old, adv, mask, clip_eps=eps, kl_coef=0.5, ref_logp=ref)
    k3 = [math.exp(-v) + v - 1 for v in (math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.9), 0.0)]
    assert loss_kl.item() == pytest.approx(expected + 0.5 * sum(k3) / 5, abs=1e-6)
    assert s["kl"] == pytest.approx(sum(k3), abs=1e-6)
    # with ratio 1 (first pass) the surrogate is -mean(A) over tokens
    one, _ = grpo_loss(old, old, adv, mask, clip_eps=eps)
    assert one.item() == pytest.approx(-(2 * 2 - 3) / 5, abs=1e-6)


# ----------------------------------------------------------------------------- sampling
def test_sft_evaluation_holds_builtin_and_jsonl_eval_examples(tmp_path, cache_dir):
    from data.tasks import load_jsonl_examples, split_examples
    from trainer.sft_phase import SFTRunner

    data = tmp_path / "user.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: echo {i}\nA:", "response": f" {i}"}) + "\n"
                            for i in range(200)))
    cfg = load_config(write_cfg(tmp_path, CHAIN), tiny_overrides(tmp_path / "r", cache_dir, **{
        "phases.sft.sft.data_files": f"[{data}]"}))
    runner = SFTRunner(Trainer(cfg), "sft", cfg.phases["sft"])
    user_eval = split_examples(load_jsonl_examples(str(data)), "eval")
    assert 0 < len(user_eval) < 200
    assert len(runner.eval_examples) == 8 + len(user_eval)
    assert [e.prompt for e in runner.eval_examples[8:]] == [e.prompt for e in user_eval]


def test_mfu_counts_every_processed_token(tmp_path, cache_dir):
    """SFT/RL log the trained (response) tokens per second, but the forward and backward run over every
    position of the batch: MFU must use those. (On CPU no peak is known; a callback sets one.)"""
    class Peak(Callback):
        def on_run_start(self, trainer):
            trainer._peak = 1e12

    cfg = load_config(write_cfg(tmp_path, CHAIN), tiny_overrides(tmp_path / "r", cache_dir))
    t = Trainer(cfg, [Peak()])
    assert t.run() == "done"
    ratio = {}  # processed tokens per trained token, from the two logged rates
    for r in metrics(tmp_path / "r"):
        if "perf/mfu" in r:
            processed_s = r["perf/mfu"] * 1e12 / t._flops_per_token
            ratio.setdefault(r["phase"], []).append(processed_s / r["perf/tok_per_s"])
    assert all(x == pytest.approx(1.0) for x in ratio["pre"])  # pretraining trains on every token
    assert all(x > 1.5 for x in ratio["sft"] + ratio["rl"]), ratio  # prompts and padding are processed too


def test_sampling_is_deterministic_for_a_fixed_seed(tmp_path, cache_dir):
    cfg = load_config(write_cfg(tmp_path, CHAIN), tiny_overrides(tmp_path / "run", cache_dir))
    trainer = Trainer(cfg)
    try:
        runner = GRPORunner(trainer, "rl", cfg.phases["rl"])
        model = trainer.unwrapped_model
        prompts = runner.step_prompts(5)
        assert [p.prompt for p in prompts] == [p.prompt for p in runner.step_prompts(5)]

        def draw(step):
            g = torch.Generator().manual_seed(stable_seed(cfg.trainer.seed, "rl", step, 0))
            return [(s["response"], s["reward"]) for s in runner.sample(model, prompts, g)]

        a, b = draw(5), draw(5)
        assert a == b and len(a) == len(prompts) * cfg.phases["rl"].rl.group_size
        assert draw(6) != a
        assert model.training  # sampling restores train mode
    finally:
        trainer.logger.close()
        trainer.lock.release()


def test_prompts_must_split_across_ranks(tmp_path, cache_dir):
    from trainer.errors import ConfigError

    cfg = load_config(write_cfg(tmp_path, CHAIN), tiny_overrides(tmp_path / "run", cache_dir,
                                                                 **{"trainer.grad_accum": 7}))
    trainer = Trainer(cfg)
    try:
        with pytest.raises(ConfigError, match="grad_accum"):
            GRPORunner(trainer, "rl", cfg.phases["rl"])  # 2 prompts x 3 samples < 7 micro-batches
    finally:
        trainer.logger.close()
        trainer.lock.release()


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_mid_sft_and_mid_rl_replays_the_same_losses(tmp_path, cache_dir):
    cfg_path = write_cfg(tmp_path, CHAIN)

    def config(run):
        return load_config(cfg_path, tiny_overrides(tmp_path / run, cache_dir, **{"trainer.grad_accum": 2}))

    assert Trainer(config("a")).run() == "done"
    # B: stopped inside SFT (global step 3 + 3), resumed, stopped inside RL (3 + 6 + 2), resumed
    assert Trainer(config("b"), [StopAt(6)]).run() == "preempted"
    assert Trainer(config("b"), [StopAt(11)]).run() == "preempted"
    assert (tmp_path / "b" / "phases" / "rl" / "reference.safetensors").is_file()
    assert Trainer(config("b")).run() == "done"
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == list(range(1, 14))
    assert la == lb  # bit-exact on CPU
    kl = [r["train/kl"] for r in metrics(tmp_path / "b") if "train/kl" in r]
    assert len(kl) == 4 and kl[0] == pytest.approx(0.0, abs=1e-6) and all(k >= 0 for k in kl)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_rl_phase_under_two_process_ddp(tmp_path, cache_dir):
    cfg = write_cfg(tmp_path, """
trainer: {ckpt_interval: 0, eval_interval: 1000}
phases:
  rl:
    kind: rl
    steps: 2
    rl: {task_families: ["add:1"], prompts_per_step: 4, group_size: 2, max_new_tokens: 3, kl_coef: 0.1,
         eval_examples: 4}
""")
    # the tokenizer is trained once (in this process) and shared through the cache
    Trainer(load_config(cfg, tiny_overrides(tmp_path / "warm", cache_dir))).lock.release()
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           str(REPO / "tests" / "dist_rl_script.py"), str(cfg),
           *tiny_overrides(tmp_path / "ddp", cache_dir, **{"trainer.grad_accum": 2})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world=2 rewards=" in proc.stdout
    rows = metrics(tmp_path / "ddp")
    assert any("rl/eval_reward" in r for r in rows)
    assert len([r for r in rows if "train/reward_mean" in r]) == 2
    # the two ranks split each step's global prompt list: disjoint halves, together all of it, in order
    from data.tasks import make_examples
    used = [json.loads((tmp_path / "ddp" / f"prompts_rank{r}.json").read_text()) for r in range(2)]
    seed = load_config(cfg, tiny_overrides(tmp_path / "ddp", cache_dir)).trainer.seed
    assert sorted(used[0]) == sorted(used[1]) and len(used[0]) == 2  # one entry per step
    for step in used[0]:
        everyone = [e.prompt for e in make_examples(["add:1"], 4, seed=stable_seed(seed, "rl", "prompts", int(step)),
                                                    split="train")]
        assert used[0][step] + used[1][step] == everyone and len(used[0][step]) == 2, (step, used, everyone)


# ----------------------------------------------------------------------------- the effect
class PhaseEvals(Callback):
    """Evaluates the model at each phase start (e.g. the pretrained model before SFT)."""

    def __init__(self):
        self.at_start, self.evals = {}, []

    def on_phase_start(self, trainer):
        if trainer.phase_cfg.kind != "pretrain":
            self.at_start[trainer.phase_name] = trainer.runner.evaluate(trainer.model)

    def on_eval(self, trainer, metrics):
        self.evals.append((trainer.phase_name, trainer.global_step, dict(metrics)))


@pytest.mark.slow
def test_tiny_pipeline_sft_raises_accuracy_and_rl_raises_reward(tmp_path, cache_dir):
    cfg = load_config(TINY, [f"trainer.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                             "trainer.progress=false"])
    cb = PhaseEvals()
    assert Trainer(cfg, [cb]).run() == "done"
    before = cb.at_start["sft"]["sft/accuracy"]
    after = [m for phase, _, m in cb.evals if phase == "sft"][-1]["sft/accuracy"]
    assert after > before, (before, after)
    rewards = [r["train/reward_mean"] for r in metrics(tmp_path / "run") if "train/reward_mean" in r]
    assert len(rewards) == cfg.phases["rl"].steps
    k = 10
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last > first, (first, last)
