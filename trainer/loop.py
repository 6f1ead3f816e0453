"""The training loop: phases → tasks → steps, on one accelerate.Accelerator.

The same loop serves every phase kind (the phase's runner supplies data, loss and
evaluation) and every backend accelerate supports (single process, DDP, DeepSpeed ZeRO),
and fires the callback events that instruments and mitigations use.  All randomness in
data order comes from (seed, position) counters saved in checkpoints, so a resumed run
replays the uninterrupted run exactly on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from data.lm_data import LanguageData
from models.gpt import GPT, ModelConfig
from models.sizes import flops_per_token
from trainer import checkpoint, rundir
from trainer.callbacks import Callback, build_callbacks
from trainer.config import PhaseConfig, RunConfig
from trainer.errors import CheckpointError, ConfigError, UserError
from trainer.fileio import write_atomic
from trainer.logger import RunLogger, peak_flops
from trainer.model_setup import resolve_model_config
from trainer.optim import apply_hyperparams, lr_at, param_groups, reset_state, set_lr, wrapper_chain
from trainer.phases import PhaseRunner, get_runner, stable_seed


class NonFiniteError(UserError):
    """Too many non-finite steps; the last good checkpoint is left in place."""


def make_accelerator(cfg: RunConfig) -> Accelerator:
    no_cuda = not torch.cuda.is_available()
    # `cpu=True` would silently turn a DeepSpeed launch into plain MULTI_CPU DDP; DeepSpeed on a
    # CPU box picks its CPU accelerator itself (DS_ACCELERATOR=cpu).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if no_cuda and distributed else []
    acc = Accelerator(gradient_accumulation_steps=cfg.trainer.grad_accum,
                      mixed_precision=cfg.trainer.mixed_precision, cpu=no_cuda and not deepspeed,
                      kwargs_handlers=kwargs)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config, cfg, acc.num_processes)
    return acc


def fill_deepspeed_config(ds: dict, cfg: RunConfig, world_size: int) -> None:
    """Our config is the source of truth for what DeepSpeed would otherwise guess or default.

    accelerate fills "auto" batch sizes only from a DataLoader (we have none) and "auto"
    clipping with 1.0; ZeRO-3 must gather weights for the consolidated phase export.  Explicit
    DeepSpeed values that contradict the run config are refused.  Clipping follows the phase
    (trainer.optim.apply_hyperparams updates it per phase), so the file's value is overridden.
    """
    tc = cfg.trainer

    def put(key: str, value) -> None:
        current = ds.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(f"DeepSpeed config {key}={current} contradicts the run config ({value}); "
                              f"set it to \"auto\"")
        ds[key] = value

    put("train_micro_batch_size_per_gpu", tc.micro_batch_size)
    put("gradient_accumulation_steps", tc.grad_accum)
    put("train_batch_size", tc.micro_batch_size * tc.grad_accum * world_size)
    ds["gradient_clipping"] = float(next(iter(cfg.phases.values())).optim.grad_clip)
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights from a phase export or checkpoint dir (tied duplicates may be absent)."""
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no model weights at {file}")
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {file} do not fit the model: {str(e).splitlines()[0]}") from None
    model_cfg = getattr(model, "cfg", None) or getattr(model, "config", None)  # GPT keeps its config in .cfg
    tied = {"lm_head.weight"} if getattr(model_cfg, "tie_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"weights in {file} do not fit the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")


class Trainer:
    def __init__(self, cfg: RunConfig, extra_callbacks: List[Callback] = ()):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self._stop_requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # from the start: a signal during set-up is a clean stop too
            signal.signal(sig, self._request_stop)
        self.accelerator = make_accelerator(cfg)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.callbacks = build_callbacks(cfg.callbacks) + list(extra_callbacks)
        self.lock = rundir.prepare(self.run_dir, cfg, acc) if self.is_main else None
        acc.wait_for_everyone()
        tok_file = self.run_dir / "tokenizer.model"
        d = cfg.data
        self.data = LanguageData(d.corpus_dir, d.vocab_size, cfg.model.block_size, d.val_fraction, d.cache_dir,
                                 d.tokenizer_languages, d.tokenizer_sample_lines,
                                 tokenizer_path=tok_file if tok_file.is_file() else None)
        if self.is_main and not tok_file.is_file():
            write_atomic(tok_file, self.data.tokenizer.path.read_bytes())
        self.model_cfg: ModelConfig = resolve_model_config(cfg, self.data.tokenizer.vocab_size)
        set_seed(cfg.trainer.seed)
        model = GPT(self.model_cfg)
        first = next(iter(cfg.phases.values())).optim
        # fused: one kernel per step instead of ~10 passes over the weights (CPU, llama 10M: 15 ms vs 68 ms per
        # step); the default of HF's Trainer too.  Old checkpoints restore their own (unfused) setting.
        opt = torch.optim.AdamW(param_groups(model, first.weight_decay, first.no_decay), lr=first.lr,
                                betas=tuple(first.betas), eps=first.eps, fused=True)
        self.model, self.optimizer = acc.prepare(model, opt)
        self.logger = RunLogger(self.run_dir, self.is_main, cfg.trainer.tensorboard)
        self.phase_names = list(cfg.phases)
        self.phase_idx = self.task_idx = self.step_in_task = self.global_step = 0
        self.nonfinite_steps = 0
        self.runner: Optional[PhaseRunner] = None
        self.tasks = []
        self.last_eval: Dict[str, float] = {}
        self._flops_per_token = flops_per_token(self.model_cfg, self.model_cfg.block_size)
        self._peak = peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)

    # --- conveniences for callbacks -------------------------------------------------------
    @property
    def unwrapped_model(self) -> GPT:
        return self.accelerator.unwrap_model(self.model)

    @property
    def phase_name(self) -> str:
        return self.phase_names[min(self.phase_idx, len(self.phase_names) - 1)]

    @property
    def phase_cfg(self) -> PhaseConfig:
        return self.cfg.phases[self.phase_name]

    @property
    def task_name(self) -> str:
        return self.tasks[self.task_idx].name if self.task_idx < len(self.tasks) else ""

    def log(self, values: Dict[str, float]) -> None:
        self.logger.scalars(self.global_step, values, phase=self.phase_name, task=self.task_idx)

    def _fire(self, event: str, *args) -> None:
        for cb in self.callbacks:
            if cb.active(self):
                getattr(cb, event)(self, *args)

    # --- state ----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"phase_idx": self.phase_idx, "task_idx": self.task_idx, "step_in_task": self.step_in_task,
                "global_step": self.global_step, "nonfinite_steps": self.nonfinite_steps,
                "runner": self.runner.state_dict() if self.runner else {},
                "tokenizer": self.data.tokenizer.fingerprint(),
                "model_config": dataclasses.asdict(self.model_cfg), "log_position": self.logger.position()}

    def save_checkpoint(self) -> Path:
        cb_state = {cb.name + f"#{i}": cb.state_dict() for i, cb in enumerate(self.callbacks)}
        path = checkpoint.save(self, self._state(), cb_state)
        self._fire("on_checkpoint", path)
        return path

    def _resume(self) -> Optional[dict]:
        mode = self.cfg.trainer.resume
        if mode == "never":  # (run dir checks refuse "never" where checkpoints exist)
            self._drop_logs_of_lost_start()
            return None
        path = checkpoint.find_latest_valid(self.run_dir, log=self._print) if mode == "auto" else Path(mode)
        if path is None:
            self._drop_logs_of_lost_start()
            return None
        state, cb_state = checkpoint.load(self, path)
        if state["tokenizer"] != self.data.tokenizer.fingerprint():
            raise CheckpointError(f"checkpoint {path} was trained with a different tokenizer than {self.run_dir}")
        if state["model_config"] != dataclasses.asdict(self.model_cfg):
            diff = {k: (v, getattr(self.model_cfg, k)) for k, v in state["model_config"].items()
                    if getattr(self.model_cfg, k, None) != v}
            raise CheckpointError(f"checkpoint {path} has a different model config: {diff}")
        for i, cb in enumerate(self.callbacks):
            cb.load_state_dict(cb_state.get(cb.name + f"#{i}", {}))
        for key in ("phase_idx", "task_idx", "step_in_task", "global_step", "nonfinite_steps"):
            setattr(self, key, state[key])
        if self.is_main:  # rows logged after the checkpoint are about to be logged again: drop them
            self.logger.rewind(self.global_step, state.get("log_position"))
        where = ("every phase already done" if self.phase_idx >= len(self.phase_names)
                 else f"phase {self.phase_name}, task {self.task_idx}")
        self._print(f"resumed from {path} ({where}, step {self.global_step})")
        return state

    def _drop_logs_of_lost_start(self) -> None:
        """Starting from step 0 in a run dir that already has logs (a run killed before its first
        checkpoint): every row is about to be logged again (the instruments callback does the same
        for boundaries.jsonl)."""
        if self.is_main and self.logger.position():
            self.logger.rewind(-1, 0)

    # --- phase set-up ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _writable_weights(self):
        """Around in-place weight loads: under DeepSpeed, gather ZeRO-3 partitions (every rank loads
        the same weights; rank 0's are kept) and afterwards refresh ZeRO's fp32 master copy, which
        the next optimizer step would otherwise copy back over the loaded weights."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            yield
            return
        import deepspeed
        stage3 = self.accelerator.state.deepspeed_plugin.zero_stage == 3
        params = list(self.unwrapped_model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if stage3 else contextlib.nullcontext():
            yield
        for layer in wrapper_chain(self.optimizer):
            if hasattr(layer, "refresh_fp32_params"):
                layer.refresh_fp32_params()

    def _begin_phase(self, p: PhaseConfig) -> None:
        model = self.unwrapped_model
        if p.init_from == "fresh":
            torch.manual_seed(stable_seed(self.cfg.trainer.seed, self.phase_name, "init"))
            fresh = GPT(self.model_cfg).state_dict()
            with self._writable_weights():
                model.load_state_dict(fresh)
        elif p.init_from != "previous":
            try:
                with self._writable_weights():
                    load_weights(model, Path(p.init_from))
            except CheckpointError as e:  # checked only now: it may name an export of this very run
                raise CheckpointError(f"config key 'phases.{self.phase_name}.init_from': {e}") from None
        if self.phase_idx == 0 or not p.load_optimizer_state:
            reset_state(self.optimizer)

    def _begin_task(self, p: PhaseConfig) -> None:
        if self.task_idx > 0 and p.reset_optimizer_per_task:
            reset_state(self.optimizer)

    def _horizon_and_step(self, p: PhaseConfig) -> tuple[int, int]:
        """(schedule length, position in it): per task when warm-up is reset per task."""
        if p.reset_warmup_per_task:
            return self.tasks[self.task_idx].steps, self.step_in_task
        done = sum(t.steps for t in self.tasks[:self.task_idx])
        return sum(t.steps for t in self.tasks), done + self.step_in_task

    def export_phase_model(self) -> Path:
        """Consolidated weights at a phase end (gathered under ZeRO-3): RUN/phases/NAME/."""
        out = self.run_dir / "phases" / self.phase_name
        sd = self.accelerator.get_state_dict(self.model)
        if self.is_main:
            tmp = out / "model.safetensors.tmp"
            try:
                out.mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().float().contiguous().clone() for k, v in sd.items()}, str(tmp))
                os.replace(tmp, out / "model.safetensors")
                (out / "model_config.json.tmp").write_text(json.dumps(dataclasses.asdict(self.model_cfg), indent=1))
                os.replace(out / "model_config.json.tmp", out / "model_config.json")
            except checkpoint.WRITE_ERRORS as e:
                for leftover in (tmp, out / "model_config.json.tmp"):
                    if leftover.is_file():
                        leftover.unlink()
                raise CheckpointError(f"could not write the model of phase '{self.phase_name}' to {out}: "
                                      f"{checkpoint.write_failure(e, tmp)}; the last checkpoint is left intact") \
                    from None
        self.accelerator.wait_for_everyone()
        return out

    # --- the step -------------------------------------------------------------------------
    def _clip(self, max_norm: float) -> float:
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm or float("inf"))
        if norm is None:  # DeepSpeed clips inside its own step
            norm = getattr(self.model, "get_global_grad_norm", lambda: float("nan"))()
        return float(norm) if norm is not None else float("nan")

    def _train_step(self, p: PhaseConfig) -> Dict[str, float]:
        acc = self.accelerator
        scaler = acc.scaler  # fp16 loss scaling (GPU only): None in fp32/bf16, on CPU and under DeepSpeed
        horizon, pos = self._horizon_and_step(p)
        lr = lr_at(pos, horizon, p.optim)
        set_lr(self.optimizer, lr)
        self._fire("pre_step")
        t0 = time.perf_counter()
        losses, tokens, processed, extra_logs, grad_norm = [], 0, 0, {}, float("nan")
        for _ in range(self.cfg.trainer.grad_accum):
            batch = self.runner.next_batch()
            with acc.accumulate(self.model):
                loss, extra_logs = self.runner.loss(self.model, batch)
                total = loss
                for cb in self.callbacks:
                    term = cb.loss_term(self, self.model) if cb.active(self) else None
                    if term is not None:
                        total = total + term
                acc.backward(total)
                if acc.sync_gradients:
                    self._fire("post_backward")
                    grad_norm = self._clip(p.optim.grad_clip)
                    # fp16 (GradScaler, GPU): the scaler itself skips an overflowed step and lowers its scale
                    # in step(); without that call it stays "unscaled" and the next clip raises
                    if math.isfinite(grad_norm) or scaler is not None:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            tokens += self.runner.tokens_in(batch)  # trained tokens (SFT/RL: response tokens only)
            processed += batch["x"].numel()  # every position runs forward and backward
        mean_loss = float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))
        # an fp16 overflow (loss finite, gradients not) is the loss-scale search, not a failing run
        if not (math.isfinite(mean_loss) and (math.isfinite(grad_norm) or scaler is not None)):
            self.nonfinite_steps += 1
            if self.nonfinite_steps > self.cfg.trainer.max_nonfinite_steps:
                raise NonFiniteError(
                    f"non-finite loss/gradients in {self.nonfinite_steps} steps (limit "
                    f"trainer.max_nonfinite_steps={self.cfg.trainer.max_nonfinite_steps}) at step "
                    f"{self.global_step + 1}; last good checkpoint kept in {self.run_dir / 'checkpoints'}")
        dt = time.perf_counter() - t0
        tok_s = tokens * acc.num_processes / max(dt, 1e-9)
        logs = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "perf/tok_per_s": tok_s, "train/nonfinite_steps": self.nonfinite_steps,
                **{f"train/{k}": v for k, v in extra_logs.items()}}
        if scaler is not None:
            logs["train/loss_scale"] = float(scaler.get_scale())
        if self._peak:
            processed_s = processed * acc.num_processes / max(dt, 1e-9)
            logs["perf/mfu"] = self._flops_per_token * processed_s / (self._peak * acc.num_processes)
        return logs

    def _evaluate(self) -> Dict[str, float]:
        metrics = self.runner.evaluate(self.model)
        self.last_eval = metrics
        self.log(metrics)
        self._fire("on_eval", metrics)
        return metrics

    def _print(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)

    # --- signals --------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # --- the run --------------------------------------------------------------------------
    def run(self) -> str:
        """Train every remaining phase. Returns "done" or "preempted"."""
        for cb in self.callbacks:  # whatever their phases: a misfit fails now, not after hours of training
            cb.check(self)
        resumed = self._resume()
        if self._peak is None:
            self.logger.text(self.global_step, "perf/mfu", "n/a: no peak FLOP/s known for this device (CPU?)")
        for cb in self.callbacks:  # outside every phase: all callbacks hear it (see Callback.on_run_start)
            cb.on_run_start(self)
        total_steps = sum(self._phase_steps(p) for p in self.cfg.phases.values())
        bar = tqdm(total=total_steps, initial=self.global_step, disable=not (self.is_main and self.cfg.trainer.progress),
                   dynamic_ncols=True)
        try:
            while self.phase_idx < len(self.phase_names):
                p = self.phase_cfg
                self.runner = get_runner(p.kind)(self, self.phase_name, p)
                self.tasks = self.runner.tasks()
                mid_phase = resumed is not None and (self.task_idx > 0 or self.step_in_task > 0)
                apply_hyperparams(self.optimizer, p.optim)  # before on_phase_start: callbacks may adjust
                if mid_phase:
                    self.runner.load_state_dict(resumed["runner"])
                    self._fire("on_phase_resume")
                else:
                    self._begin_phase(p)
                    self._fire("on_phase_start")
                resumed = None
                if self._run_tasks(p, bar) == "preempted":
                    return "preempted"
                self._fire("on_phase_end")
                self.export_phase_model()
                self.phase_idx, self.task_idx, self.step_in_task = self.phase_idx + 1, 0, 0
                self.save_checkpoint()
            self._fire("on_run_end")
            return "done"
        finally:
            bar.close()
            self.logger.close()
            if self.lock is not None:
                self.lock.release()

    def _phase_steps(self, p: PhaseConfig) -> int:
        return p.steps if p.kind != "pretrain" else len(p.languages) * p.cycles * p.steps_per_task

    def _run_tasks(self, p: PhaseConfig, bar) -> str:
        tc = self.cfg.trainer
        while self.task_idx < len(self.tasks):
            task = self.tasks[self.task_idx]
            self.runner.start_task(self.task_idx)
            if self.step_in_task == 0:
                self._begin_task(p)
                self._fire("on_task_start")
            while self.step_in_task < task.steps:
                logs = self._train_step(p)
                self.step_in_task += 1
                self.global_step += 1
                bar.update(1)
                self._fire("post_step", logs)
                if self.global_step % tc.log_interval == 0:
                    self.log(logs)
                    bar.set_postfix(loss=f"{logs['train/loss']:.3f}", phase=self.phase_name, task=task.name)
                last = self.step_in_task == task.steps
                if self.global_step % tc.eval_interval == 0 and not last:
                    self._evaluate()
                if self._stop_agreed():
                    path = self.save_checkpoint()
                    self._print(f"stop requested: checkpoint written to {path}")
                    return "preempted"
                if tc.ckpt_interval and self.global_step % tc.ckpt_interval == 0 and not last:
                    self.save_checkpoint()
            self._evaluate()
            self._fire("on_task_end")
            self.task_idx, self.step_in_task = self.task_idx + 1, 0
            if self.task_idx < len(self.tasks):  # the phase end checkpoints the last task
                self.save_checkpoint()
        return "done"


def train(cfg: RunConfig, extra_callbacks: List[Callback] = ()) -> str:
    return Trainer(cfg, extra_callbacks).run()
