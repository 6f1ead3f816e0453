"""RL phase: GRPO (group-relative policy optimisation) on tasks with checkable answers.

Each optimizer step (see docs/phases.md for the formulas):

1. the step's `prompts_per_step` prompts (global) are drawn with
   `make_examples(seed=stable_seed(run seed, phase, "prompts", global_step))`; rank r takes the
   contiguous share r (`prompts_per_step` must be divisible by the number of processes);
2. `group_size` completions per prompt are sampled from the CURRENT policy (unwrapped model,
   eval mode, no grad, KV-cached `GPT.generate`, the phase's temperature/top_p) with a
   `torch.Generator` seeded by `stable_seed(seed, phase, global_step, rank)`: a step's samples
   depend only on the weights, so the phase is deterministic and resumes without RNG state;
3. each completion (cut at its first EOS, which is itself a trained response token) is scored
   with the task's `reward`; advantages are group-normalised
   `A = (r - mean_group) / (std_group + 1e-4)` (population std);
4. the behaviour ("old") log-probs are computed once, at sampling time; the loss is the clipped
   surrogate `-min(ρA, clip(ρ, 1-ε, 1+ε)A)` (+ `kl_coef` × k3 KL to a frozen reference),
   averaged over the response tokens of the step (prompt and padding positions are masked).
   There is one update per batch, so ρ = 1 on this pass, but the clipped form is kept.

With `trainer.grad_accum` = G the step's samples on a rank are split into G contiguous
micro-batches; each micro-batch loss is normalised by (response tokens of the whole step)/G,
so after accelerate's 1/G scaling the gradient is exactly that of the step's token mean.

Reference model (`kl_coef > 0` only): a frozen copy of the weights at phase start, outside the
optimizer. At phase start it is also written to `RUN/phases/<phase>/reference.safetensors`;
a run resumed mid-phase reloads it from there (the weights it had at phase start are gone).

Generation uses the unwrapped model, which is correct for a single process and DDP; DeepSpeed
ZeRO-3 (partitioned parameters) is NOT supported by this phase.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from data.sft import IGNORE, evaluate as evaluate_generation, prompt_ids
from data.tasks import Example, make_examples, task_for
from trainer.config import check_rl_world
from trainer.errors import CheckpointError, ConfigError
from trainer.phases import RUNNERS, PhaseRunner, Task, stable_seed
from trainer.sft_phase import load_parallel_for

ADV_EPS = 1e-4


# ----------------------------------------------------------------------------- pure pieces
def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """rewards (num_prompts, group_size) -> (r - mean_group) / (std_group + eps), population std."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def response_sequence(prompt: Sequence[int], response: Sequence[int]) -> tuple[list, list]:
    """(inputs, targets) for prompt+response, shifted; targets are -100 on prompt positions."""
    ids = list(prompt) + list(response)
    return ids[:-1], [IGNORE] * (len(prompt) - 1) + list(response)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) per position, entropy per position); masked targets (-100) read token 0."""
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_eps: float, kl_coef: float = 0.0, ref_logp: Optional[torch.Tensor] = None,
              denom: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """Clipped GRPO surrogate, summed over response tokens (mask) and divided by `denom`
    (default: the number of response tokens, i.e. a token-level mean).

    logp, old_logp, ref_logp, mask: (B, T); adv: (B,) per sequence.
    Returns (loss, sums) with sums of clipped tokens and k3 KL over masked tokens (floats).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv.to(logp.dtype).unsqueeze(-1)
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    per_token = -surrogate
    kl_sum = 0.0
    if ref_logp is not None:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1.0  # k3 estimator of KL(pi || ref), >= 0
        kl_sum = float((kl.detach() * mask).sum())
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    n = float(mask.sum()) if denom is None else float(denom)
    loss = (per_token * mask).sum() / max(n, 1.0)
    clipped = ((ratio.detach() - 1.0).abs() > clip_eps).to(logp.dtype)
    return loss, {"clipped": float((clipped * mask).sum()), "kl": kl_sum, "tokens": float(mask.sum())}


def pad_batch(rows: List[list], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


# ----------------------------------------------------------------------------- the runner
class GRPORunner(PhaseRunner):
    def __init__(self, trainer, name, cfg):
        super().__init__(trainer, name, cfg)
        r = cfg.rl
        acc = trainer.accelerator
        world = acc.num_processes
        check_rl_world(name, cfg, world)  # also checked at config load, from WORLD_SIZE
        self.prompts_per_rank = r.prompts_per_step // world
        ga = trainer.cfg.trainer.grad_accum
        if self.prompts_per_rank * r.group_size < ga:
            raise ConfigError(f"config key 'phases.{name}.rl': {self.prompts_per_rank * r.group_size} samples per "
                              f"process per step cannot fill trainer.grad_accum={ga} micro-batches")
        if not r.task_families:
            raise ConfigError(f"config key 'phases.{name}.rl.task_families': at least one task is required")
        self.parallel = load_parallel_for(trainer, r.task_families)
        seed = trainer.cfg.trainer.seed
        self.eval_examples = (make_examples(list(r.task_families), r.eval_examples,
                                            seed=stable_seed(seed, name, "eval"), parallel=self.parallel,
                                            split="eval") if r.eval_examples > 0 else [])
        self.ref: Optional[torch.nn.Module] = None
        self._resumed = False
        self._queue: List[dict] = []
        self._step_logs: Dict[str, float] = {}
        self._sums = defaultdict(float)

    def tasks(self) -> List[Task]:
        return [Task("rl", self.cfg.steps)]

    # -- reference model
    @property
    def reference_path(self):
        return self.trainer.run_dir / "phases" / self.name / "reference.safetensors"

    def start_task(self, idx: int) -> None:
        if self.cfg.rl.kl_coef > 0 and self.ref is None:
            self.ref = self._build_reference()

    def _build_reference(self) -> torch.nn.Module:
        from models.gpt import GPT
        from trainer.loop import load_weights  # the loop imports the runners

        t, acc = self.trainer, self.trainer.accelerator
        ref = GPT(t.model_cfg)
        path = self.reference_path
        if self._resumed:
            if not path.is_file():
                raise CheckpointError(f"cannot rebuild the RL reference model: {path} is missing")
            load_weights(ref, path)
        else:
            state = {k: v.detach().float().clone().cpu() for k, v in t.unwrapped_model.state_dict().items()}
            ref.load_state_dict(state)
            if acc.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"
                           or not t.model_cfg.tie_embeddings}, str(tmp))
                os.replace(tmp, path)
            acc.wait_for_everyone()
        ref.to(device=acc.device, dtype=next(t.unwrapped_model.parameters()).dtype)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    # -- sampling
    def step_prompts(self, step: int) -> List[Example]:
        """This rank's prompts for a global step (the global list is the same on every rank)."""
        r, acc = self.cfg.rl, self.trainer.accelerator
        prompts = make_examples(list(r.task_families), r.prompts_per_step,
                                seed=stable_seed(self.trainer.cfg.trainer.seed, self.name, "prompts", step),
                                parallel=self.parallel, split="train")
        k = self.prompts_per_rank
        return prompts[acc.process_index * k:(acc.process_index + 1) * k]

    @torch.no_grad()
    def sample(self, model, examples: Sequence[Example], generator: torch.Generator) -> List[dict]:
        """group_size completions per example with the model as it is now. Returns, per prompt then per
        sample, dicts {prompt, response (token ids incl. EOS if produced), text, reward, correct}."""
        r, tok = self.cfg.rl, self.trainer.data.tokenizer
        device = self.trainer.accelerator.device
        block = self.trainer.model_cfg.block_size
        G = r.group_size
        pids = [prompt_ids(tok, ex) for ex in examples]
        for i, p in enumerate(pids):
            if len(p) >= block:
                raise ConfigError(f"RL prompt of {len(p)} tokens does not fit model.block_size={block}: "
                                  f"{examples[i].prompt!r}")
        by_len: Dict[int, List[int]] = defaultdict(list)
        for i, p in enumerate(pids):
            by_len[len(p)].append(i)
        out: List[Optional[dict]] = [None] * (len(examples) * G)
        was_training = model.training
        model.eval()
        try:
            for length in sorted(by_len):
                idxs = by_len[length]
                idx = torch.tensor([pids[i] for i in idxs for _ in range(G)], dtype=torch.long, device=device)
                gen = model.generate(idx, r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                     eos_id=tok.eos_id, generator=generator)
                new = gen[:, length:].tolist()
                for row, toks in enumerate(new):
                    i, j = idxs[row // G], row % G
                    if tok.eos_id in toks:
                        toks = toks[:toks.index(tok.eos_id) + 1]
                    toks = toks[:block + 1 - length]  # the training sequence must fit the block
                    text = tok.decode([t for t in toks if t != tok.eos_id])
                    task = task_for(examples[i])
                    out[i * G + j] = {"prompt": pids[i], "response": toks, "text": text,
                                      "reward": task.reward(text, examples[i]),
                                      "correct": task.check(text, examples[i])}
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]

    def _prepare_step(self) -> None:
        """Sample, score and split this rank's share of the step into grad_accum micro-batches."""
        t, r, acc = self.trainer, self.cfg.rl, self.trainer.accelerator
        step, seed = t.global_step, t.cfg.trainer.seed
        model = t.unwrapped_model
        device = acc.device
        gen = torch.Generator(device=device).manual_seed(stable_seed(seed, self.name, step, acc.process_index))
        samples = self.sample(model, self.step_prompts(step), gen)
        G = r.group_size
        rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float32).view(-1, G)
        adv = group_advantages(rewards).view(-1)
        # step statistics over every rank's samples (same count everywhere)
        local = torch.tensor([[s["reward"], float(s["correct"]), float(len(s["response"]))] for s in samples],
                             dtype=torch.float64, device=device)
        allv = acc.gather(local)
        self._step_logs = {"reward_mean": float(allv[:, 0].mean()), "reward_std": float(allv[:, 0].std(unbiased=False)),
                           "accuracy": float(allv[:, 1].mean()), "response_len": float(allv[:, 2].mean())}
        pad = t.data.tokenizer.pad_id
        n_tokens = sum(len(s["response"]) for s in samples)
        ga = t.cfg.trainer.grad_accum
        denom = max(n_tokens, 1) / ga
        self._queue = []
        self._sums = defaultdict(float)
        was_training = model.training
        model.eval()
        for chunk in torch.arange(len(samples)).tensor_split(ga):
            ids = chunk.tolist()
            seqs = [response_sequence(samples[i]["prompt"], samples[i]["response"]) for i in ids]
            x = pad_batch([s[0] for s in seqs], pad).to(device)
            y = pad_batch([s[1] for s in seqs], IGNORE).to(device)
            logits, _ = model(x)
            old_logp, _ = token_logprobs(logits, y)
            batch = {"x": x, "y": y, "adv": adv[ids].to(device), "old_logp": old_logp.detach(),
                     "denom": denom}
            if self.ref is not None:
                ref_logits, _ = self.ref(x)
                batch["ref_logp"] = token_logprobs(ref_logits, y)[0].detach()
            self._queue.append(batch)
        model.train(was_training)

    def next_batch(self) -> Dict[str, torch.Tensor]:
        if not self._queue:
            with torch.no_grad():
                self._prepare_step()
        return self._queue.pop(0)

    def loss(self, model, batch):
        r, acc = self.cfg.rl, self.trainer.accelerator
        logits, _ = model(batch["x"])
        logp, entropy = token_logprobs(logits, batch["y"])
        mask = batch["y"] != IGNORE
        loss, sums = grpo_loss(logp, batch["old_logp"], batch["adv"], mask, r.clip_eps, r.kl_coef,
                               batch.get("ref_logp"), denom=float(batch["denom"]))
        self._sums["entropy"] += float((entropy.detach() * mask).sum())
        for k, v in sums.items():
            self._sums[k] += v
        if self._queue:  # not the step's last micro-batch: the loop logs only the last one's dict
            return loss, {}
        s = self._sums
        tot = acc.reduce(torch.tensor([s["tokens"], s["entropy"], s["clipped"], s["kl"]], dtype=torch.float64,
                                      device=acc.device), reduction="sum").tolist()
        n = max(tot[0], 1.0)
        logs = dict(self._step_logs, entropy=tot[1] / n, clip_frac=tot[2] / n)
        if self.ref is not None:
            logs["kl"] = tot[3] / n
        return loss, logs

    def tokens_in(self, batch) -> int:
        return int((batch["y"] != IGNORE).sum())

    def evaluate(self, model) -> Dict[str, float]:
        if not self.eval_examples:
            return {}
        # greedy, same examples and weights on every rank: identical results, no collectives
        res = evaluate_generation(self.trainer.unwrapped_model, self.trainer.data.tokenizer, self.eval_examples,
                                  self.cfg.rl.max_new_tokens)
        return {"rl/eval_reward": res["reward"], "rl/eval_accuracy": res["accuracy"]}

    def state_dict(self) -> dict:
        # Samples are a function of (seed, phase, global_step, rank) and the weights: no data position.
        return {"kind": "rl"}

    def load_state_dict(self, state: dict) -> None:
        self._resumed = True  # mid-phase: the reference is reloaded from reference_path


RUNNERS["rl"] = GRPORunner
