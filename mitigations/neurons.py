"""Neuron-level helpers shared by ReDo, CBP and rejuvenation.

* :func:`reset_units`: fresh incoming weights (the model's own ``mlp.reinit_incoming``
  distribution: N(0, in_std²), biases 0), zero outgoing weights, and zero Adam moments for
  exactly those incoming rows (bias entries included) and outgoing columns.
* :func:`dormancy_scores`: ReDo scores per MLP layer over some rows, measured with the
  instruments' :func:`measure_neurons` (hooks, lockstep padding, all-reduced across ranks).
* :func:`attribution_scores`: per-neuron Σ|h·∂L/∂h| over batches, summed across ranks.

Every decision is taken from reduced statistics and every random draw comes from a
generator seeded by (run seed, mitigation, step, layer), so all ranks make identical edits.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional

import torch

from mitigations.state_access import StateAccess
from trainer.instruments.hooks import measure_neurons
from trainer.phases import stable_seed

_LAYER = re.compile(r"blocks\.(\d+)\.mlp\.hidden/score$")


def mlps(model) -> List[torch.nn.Module]:
    return [blk.mlp for blk in model.blocks]


def generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded identically on every rank."""
    return torch.Generator().manual_seed(stable_seed(seed, *parts))


def reset_units(access: StateAccess, mlp, idx, gen: Optional[torch.Generator] = None) -> int:
    """Reinitialise hidden units ``idx`` of ``mlp`` (incoming fresh, outgoing zero, moments zero)."""
    idx = torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
    if idx.numel() == 0:
        return 0
    params = mlp.neuron_params()
    for p, dim in params["incoming"]:  # same draws, in the same order, as mlp.reinit_incoming
        full = access.get_param(p)
        mlp.redraw_incoming_(full, dim, idx, gen)
        access.set_param(p, full)
        access.zero_moment_slices(p, dim, idx)
    for p, dim in params["outgoing"]:
        full = access.get_param(p)
        full.index_fill_(dim, idx.to(full.device), 0.0)
        access.set_param(p, full)
        access.zero_moment_slices(p, dim, idx)
    return int(idx.numel())


def dormancy_scores(model, rows: torch.Tensor, batch_size: int, device, rank: int = 0,
                    world: int = 1) -> Dict[int, torch.Tensor]:
    """{layer index: ReDo score [H]} (E|h_i| / mean_k E|h_k|) of each MLP's hidden units."""
    per = measure_neurons(model, rows, batch_size, device, rank, world).per_neuron()
    out = {}
    for key, v in per.items():
        m = _LAYER.search(key)
        if m:
            out[int(m.group(1))] = v.float()
    return out


def attribution_scores(model, batches: Iterable, loss_fn: Callable, reduce: Callable) -> Dict[int, torch.Tensor]:
    """{layer: Σ_tokens |h·∂L/∂h|} of each MLP's hidden units, h = the input of ``mlp.hidden``.

    ``loss_fn(model, batch)`` returns a scalar loss; ``reduce(tensor)`` sums across ranks.
    Gradients of ``model``'s parameters are left as they were (use a standalone copy).
    """
    blocks = mlps(model)
    sums = [torch.zeros(0)] * len(blocks)
    handles = []

    def make_hook(i):
        def hook(mod, inp, out):
            h = inp[0]
            if h.requires_grad:
                h.register_hook(lambda g, h=h.detach(): _add(i, (h.float() * g.float()).abs()))
        return hook

    def _add(i, t):
        s = t.reshape(-1, t.shape[-1]).sum(0).detach().cpu().double()
        sums[i] = s if sums[i].numel() == 0 else sums[i] + s

    for i, mlp in enumerate(blocks):
        handles.append(mlp.hidden.register_forward_hook(make_hook(i)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            model.zero_grad(set_to_none=True)
            loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for i, s in enumerate(sums):
        if s.numel() == 0:
            s = torch.zeros(blocks[i].out_proj().weight.shape[1], dtype=torch.float64)
        out[i] = reduce(s).float()
    return out
