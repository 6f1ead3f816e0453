"""The plasticity probe (Hernandez-Garcia, Figliolia & Millidge).

At a boundary, a throw-away copy of the model is fine-tuned on held-out Vietnamese with a
fresh optimizer for a fixed budget; the validation-loss curve's area (AUC, here the mean
of the curve over the budget) measures how well the model still learns.  ΔAUC_k =
100·(AUC_k / AUC_1 − 1) compares boundary k to the first one: positive = learns worse.
The same probe from a fresh initialisation is the reference for "transfer gain".

Every rank runs the identical probe on identical batches (no communication), so it works
unchanged under DDP; the weights are gathered first, so it also works under ZeRO-3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from data.packing import RowStream, iterate_eval_batches
from models.gpt import GPT


@dataclass
class ProbeConfig:
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 8
    eval_every: int = 10
    eval_batches: int = 4
    seed: int = 0


def curve_auc(curve: List[List[float]]) -> float:
    """Trapezoidal area under (step, loss), divided by the step span: the curve's mean loss."""
    if len(curve) < 2:
        return float(curve[0][1]) if curve else float("nan")
    area = sum((s1 - s0) * (l0 + l1) / 2 for (s0, l0), (s1, l1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def delta_auc(auc: float, first_auc: float) -> float:
    return 100.0 * (auc / first_auc - 1.0)


@torch.no_grad()
def _val_loss(model: GPT, batches, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b = b.to(device)
        _, loss = model(b[:, :-1], b[:, 1:])
        total += float(loss) * b[:, 1:].numel()
        n += b[:, 1:].numel()
    model.train()
    return total / n


def probe_model(model: GPT, train_rows: torch.Tensor, val_rows: torch.Tensor, cfg: ProbeConfig,
                device: Optional[torch.device] = None, autocast=None, fused: bool = True) -> Dict[str, object]:
    """Fine-tune `model` in place (pass a copy!) and return its validation curve and AUC. `fused`: AdamW's
    kernel, as the run's own optimizer (unfused in runs resumed from checkpoints older than fused AdamW)."""
    device = device or next(model.parameters()).device
    stream = RowStream(train_rows, seed=cfg.seed)  # same batches at every boundary
    val = iterate_eval_batches(val_rows, cfg.batch_size, cfg.eval_batches)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
    model.train()
    curve = [[0, _val_loss(model, val, device)]]
    for step in range(1, cfg.steps + 1):
        batch = stream.take(cfg.batch_size).to(device)
        with autocast() if autocast else torch.autocast(device_type=device.type, enabled=False):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append([step, _val_loss(model, val, device)])
    return {"curve": curve, "auc": curve_auc(curve), "initial": curve[0][1], "final": curve[-1][1]}


def gathered_copy(trainer) -> Optional[GPT]:
    """A standalone fp32 copy of the trainer's model (collective: gathers ZeRO-3 shards).

    Under ZeRO-3 only the main process receives the gathered weights; the others get None."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    if state is None:
        return None
    copy = GPT(trainer.model_cfg).to(trainer.accelerator.device)
    copy.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return copy


def fresh_copy(trainer, seed: int) -> GPT:
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = GPT(trainer.model_cfg).to(trainer.accelerator.device)
    torch.set_rng_state(torch_state)  # the probe must not perturb the training run's RNG
    return model
