"""The `instruments` callback: plasticity indicators and the probe at every boundary.

Enable it in a config with
    callbacks:
      - {name: instruments, probe_steps: 60, online_every: 0}
At run start (boundary 0, the initial model) and after every task (so also at every phase
end) it measures, over a fixed frozen measurement set: per-neuron statistics (fused hooks,
reduced across ranks), representation metrics of the MLP features, weight metrics,
attention entropy, cloned units, Hessian sharpness, and runs the plasticity probe.  It
writes RUN/boundaries/NNN-phase-task/{report.json,neurons.safetensors}, one line per
boundary to RUN/boundaries.jsonl, and scalars + histograms to TensorBoard.
With `online_every: N` the neuron statistics of every `online_token_stride`-th token (and
the update norm) are also logged from the training forward pass every N steps; with
`metrics_every: N` the boundary metrics without probe and sharpness run every N steps
(logged as periodic/...). Between measurements no hook is attached.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.callbacks import Callback, register
from trainer.errors import ConfigError
from trainer.instruments import metrics as M
from trainer.instruments.hooks import NeuronHooks, capture_features, measure_neurons
from trainer.instruments.neuron_stats import flatten_summary
from trainer.logger import keep_jsonl_rows
from trainer.optim import innermost, zero_stage
from trainer.instruments.probe import ProbeConfig, delta_auc, fresh_copy, gathered_copy, probe_model
from trainer.phases import stable_seed


def pretraining_languages(cfg) -> List[str]:
    """Every language any pretraining phase of the run trains on, in order (["en"] if none)."""
    return list(dict.fromkeys(l for p in cfg.phases.values() if p.kind == "pretrain" for l in p.languages)) or ["en"]


def validation_rows(trainer, langs: List[str], batches_per_language: int) -> torch.Tensor:
    """The first validation rows of each language, `batches_per_language` global micro-batches each
    (global: the same rows whatever the number of processes)."""
    mb = trainer.cfg.trainer.micro_batch_size * trainer.accelerator.num_processes
    return torch.cat([trainer.data.rows(l)[1][: mb * batches_per_language] for l in langs])


def spread(rows: torch.Tensor, n: int) -> torch.Tensor:
    """n rows evenly spaced over ``rows`` (which are grouped by language: every language keeps its share)."""
    return rows[torch.linspace(0, len(rows) - 1, min(len(rows), n)).round().long()]


def measurement_rows(trainer, batches_per_language: int) -> torch.Tensor:
    """A fixed set of validation rows from every pretraining language of the run."""
    return validation_rows(trainer, pretraining_languages(trainer.cfg), batches_per_language)


@register("instruments")
class Instruments(Callback):
    one_per_run = ("entries would share RUN/boundaries.jsonl and its boundary numbers (scope one entry with "
                   "phases: [...])")

    def __init__(self, measure_batches: int = 4, taus: List[float] = (0.0, 0.01, 0.1), sat_threshold: float = 0.99,
                 feature_rows: int = 1024, sharpness_iters: int = 10, clone_threshold: float = 0.95,
                 probe: bool = True, probe_steps: int = 60, probe_lr: float = 1e-3, probe_batch_size: int = 8,
                 probe_eval_every: int = 10, probe_eval_batches: int = 4, online_every: int = 0,
                 online_token_stride: int = 4, metrics_every: int = 0, periodic_rows: int = 16,
                 at_run_start: bool = True):
        if measure_batches < 1 or probe_steps < 1 or min(online_every, metrics_every) < 0 or online_token_stride < 1:
            raise ConfigError("instruments: measure_batches, probe_steps and online_token_stride must be >= 1, "
                              "online_every and metrics_every >= 0")
        self.measure_batches, self.taus, self.sat_threshold = measure_batches, tuple(taus), sat_threshold
        self.feature_rows, self.sharpness_iters, self.clone_threshold = feature_rows, sharpness_iters, clone_threshold
        self.probe_cfg = ProbeConfig(probe_steps, probe_lr, probe_batch_size, probe_eval_every, probe_eval_batches)
        self.probe_enabled, self.online_every, self.at_run_start = probe, online_every, at_run_start
        self.online_token_stride, self.metrics_every = online_token_stride, metrics_every
        self.periodic_rows = periodic_rows
        self.boundary = 0
        self.first_auc: Optional[float] = None
        self.fresh_auc: Optional[float] = None
        self._online: Optional[NeuronHooks] = None
        self._online_hooks: Optional[NeuronHooks] = None  # built once, attached only for online steps
        self._before: Optional[List[torch.Tensor]] = None  # parameters at the start of an online step
        self._params: List[torch.Tensor] = []
        self._sharded = False  # ZeRO-3: each rank snapshots only its own shards

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        as_t = lambda v: torch.tensor(float("nan") if v is None else v, dtype=torch.float64)  # noqa: E731
        return {"boundary": torch.tensor(self.boundary), "first_auc": as_t(self.first_auc),
                "fresh_auc": as_t(self.fresh_auc)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.boundary = int(state["boundary"])
            nan_to_none = lambda t: None if torch.isnan(t) else float(t)  # noqa: E731
            self.first_auc, self.fresh_auc = nan_to_none(state["first_auc"]), nan_to_none(state["fresh_auc"])

    # --- events -------------------------------------------------------------------------------
    def on_run_start(self, trainer) -> None:
        path = trainer.run_dir / "boundaries.jsonl"
        if trainer.is_main and path.is_file():  # rows at or after the restored counter will be measured again
            # (all of them on a start from step 0, e.g. after a kill before the first checkpoint)
            keep_jsonl_rows(path, lambda row: isinstance(row.get("boundary"), (int, float))
                            and row["boundary"] < self.boundary)
        if self.boundary == 0 and trainer.global_step == 0 and self.at_run_start and self.active(trainer):
            self.measure(trainer, label="init")

    def on_task_end(self, trainer) -> None:
        self.measure(trainer, label=f"{trainer.phase_name}-{trainer.task_name}")

    def pre_step(self, trainer) -> None:
        if self.online_every and (trainer.global_step + 1) % self.online_every == 0:
            if self._online_hooks is None:
                self._online_hooks = NeuronHooks(trainer.model, token_stride=self.online_token_stride,
                                                 record_pre_activation=False)
                self._sharded = zero_stage(trainer) == 3
                self._params = list(trainer.unwrapped_model.parameters())  # unwrapping costs ~1 ms: once
            self._online = self._online_hooks.start()
            held = self._held_params()
            if self._before is None or [t.shape for t in self._before] != [t.shape for t in held]:
                self._before = [t.clone() for t in held]
            else:
                torch._foreach_copy_(self._before, held)  # into the same buffers every step: no allocation

    def _held_params(self) -> List[torch.Tensor]:
        """This rank's values of every parameter, detached: the whole tensor, or under ZeRO-3 only its own
        shard (outside a forward pass a ZeRO-3 parameter itself is an empty placeholder)."""
        return [p.ds_tensor.detach() if self._sharded else p.detach() for p in self._params]

    def _update_norm(self, trainer) -> float:
        """‖θ_after − θ_before‖ of this step, float64 sum of squares; summed over the shards under ZeRO-3
        (each rank holds a disjoint shard; shard padding is zero before and after)."""
        torch._foreach_sub_(self._before, self._held_params())
        sq = M.sum_of_squares(self._before, trainer.accelerator.device)
        if self._sharded:
            sq = trainer.accelerator.reduce(sq, reduction="sum")
        return float(sq.sqrt())

    def post_backward(self, trainer) -> None:
        if self._online is not None:  # online statistics cover this step's training forward passes only
            self._online.stop()

    def post_step(self, trainer, logs: Dict[str, float]) -> None:
        if self.metrics_every and trainer.global_step % self.metrics_every == 0:
            self.measure(trainer, label=f"step{trainer.global_step}", periodic=True)
        if self._online is None:
            return
        hooks, self._online = self._online.stop(), None
        acc = hooks.accumulator.all_reduce()
        values = flatten_summary(acc.summary(self.taus, self.sat_threshold), prefix="online/", include_layers=False)
        acc.reset()
        values["online/update_norm"] = self._update_norm(trainer)
        trainer.log(values)

    # --- the measurement ------------------------------------------------------------------------
    def _neuron_stats(self, trainer, rows: torch.Tensor):
        """All ranks: their share of the measurement rows, equal batch counts, summed across ranks."""
        acc = trainer.accelerator
        return measure_neurons(trainer.model, rows, trainer.cfg.trainer.micro_batch_size, acc.device,
                               acc.process_index, acc.num_processes)

    def _model_metrics(self, model, rows: torch.Tensor, sharpness: bool = True) -> Dict[str, float]:
        model.eval()  # no dropout in what is measured (a fresh copy starts in train mode)
        rows = rows.to(next(model.parameters()).device)
        out: Dict[str, float] = {"mean_abs_param": M.mean_abs_param(model)}
        # enough sequences for 2x feature_rows tokens, spread evenly over the languages
        feature_rows = spread(rows, max(1, -(-2 * self.feature_rows // (rows.shape[1] - 1))))
        batches = [feature_rows[i:i + 8][:, :-1] for i in range(0, len(feature_rows), 8)]
        feats = capture_features(model, batches, max_rows=self.feature_rows)
        for name, feat in feats.items():
            sv = M.singular_values(feat)
            out[f"{name}/effective_rank"] = M.effective_rank(sv=sv)
            out[f"{name}/srank"] = float(M.srank(sv=sv))
            out[f"{name}/feature_stable_rank"] = M.stable_rank(sv=sv)
            out[f"{name}/cloned_pairs"] = float(M.cloned_units(feat, self.clone_threshold)["cloned_pairs"])
        for i, block in enumerate(model.blocks):
            for pname, p in block.mlp.named_parameters():
                if p.dim() == 2:
                    out[f"blocks.{i}.mlp.{pname}/weight_stable_rank"] = M.stable_rank(p.detach())
        for key in ("effective_rank", "srank", "feature_stable_rank", "cloned_pairs"):
            vals = [v for k, v in out.items() if k.endswith("/" + key) and k.startswith("blocks.")]
            out[f"overall/{key}"] = sum(vals) / len(vals)
        with torch.no_grad():
            _, _, attn = model(batches[0], return_attn=True)
        ent = M.attention_entropy(attn)
        out.update({"attention/entropy": ent["mean"], "attention/lazy_heads": float(ent["lazy"]),
                    "attention/collapsed_heads": float(ent["collapsed"])})
        if self.sharpness_iters and sharpness:
            batch = rows[:8]
            params = [p for p in model.parameters() if p.requires_grad]
            # through the logits: the fused loss (models/lm_head.py) has no second derivative
            loss_fn = lambda: F.cross_entropy(model(batch[:, :-1])[0].flatten(0, 1).float(),  # noqa: E731
                                              batch[:, 1:].flatten())
            # Hessian-vector products need double backward, which only the math SDPA kernel has.
            with sdpa_kernel(SDPBackend.MATH):
                out["sharpness"] = M.hessian_sharpness(loss_fn, params, iters=self.sharpness_iters,
                                                       generator=torch.Generator().manual_seed(0))
        return out

    def _probe(self, trainer, model) -> Dict[str, float]:
        train_rows, val_rows = trainer.data.probe_rows()
        device = trainer.accelerator.device
        fused = bool(innermost(trainer.optimizer).param_groups[0].get("fused"))  # probes compare across resumes
        if self.fresh_auc is None:
            fresh = fresh_copy(trainer, stable_seed(trainer.cfg.trainer.seed, "probe-fresh"))
            self.fresh_auc = probe_model(fresh, train_rows, val_rows, self.probe_cfg, device, fused=fused)["auc"]
        res = probe_model(copy.deepcopy(model), train_rows, val_rows, self.probe_cfg, device, fused=fused)
        if self.first_auc is None:
            self.first_auc = res["auc"]
        return {"probe/auc": res["auc"], "probe/delta_auc": delta_auc(res["auc"], self.first_auc),
                "probe/initial_loss": res["initial"], "probe/final_loss": res["final"],
                "probe/fresh_auc": self.fresh_auc, "probe/transfer_gain": 1.0 - res["auc"] / self.fresh_auc,
                "_curve": res["curve"]}

    def measure(self, trainer, label: str, periodic: bool = False) -> dict:
        """A boundary measurement; `periodic` ones (every `metrics_every` steps) skip the probe and
        the sharpness, are only logged (prefix periodic/) and do not count as boundaries."""
        t0 = time.perf_counter()
        rows = measurement_rows(trainer, 1 if periodic else self.measure_batches)
        if periodic:  # a small fixed subset
            rows = spread(rows, self.periodic_rows)
        acc = self._neuron_stats(trainer, rows)
        model = gathered_copy(trainer)  # collective under ZeRO-3; a plain copy otherwise
        report = None
        if trainer.is_main:
            rng = torch.get_rng_state()  # measurements must not change the training run
            summary = acc.summary(self.taus, self.sat_threshold)
            scalars = flatten_summary(summary, prefix="neurons/", include_layers=True)
            scalars.update({f"repr/{k}": v for k, v in self._model_metrics(model, rows, not periodic).items()})
            curve = None
            if periodic:
                trainer.log({f"periodic/{k}": v for k, v in scalars.items()})
            elif self.probe_enabled:
                probe = self._probe(trainer, model)
                curve = probe.pop("_curve")
                scalars.update(probe)
            torch.set_rng_state(rng)
            if not periodic:
                report = self._write(trainer, label, summary, scalars, curve, acc.per_neuron(),
                                     time.perf_counter() - t0)
        if not periodic:
            self.boundary += 1
        trainer.accelerator.wait_for_everyone()
        return report

    def _write(self, trainer, label, summary, scalars, curve, per_neuron, seconds) -> dict:
        out_dir = trainer.run_dir / "boundaries" / f"{self.boundary:03d}-{label}"
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {"boundary": self.boundary, "label": label, "phase": trainer.phase_name,
                  "task": trainer.task_name if label != "init" else "", "global_step": trainer.global_step,
                  "seconds": seconds, "eval": trainer.last_eval, "scalars": scalars,
                  "neurons": summary, "probe_curve": curve}
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        save_file({k: v.contiguous() for k, v in per_neuron.items()}, str(out_dir / "neurons.safetensors"))
        with open(trainer.run_dir / "boundaries.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in report.items() if k != "neurons"}) + "\n")
        trainer.log({f"boundary/{k}": v for k, v in scalars.items()})
        for k, v in per_neuron.items():
            if k.endswith("/score"):
                trainer.logger.histogram(trainer.global_step, f"boundary/{k}", v)
        return report
