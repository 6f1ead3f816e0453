"""Forward hooks that feed MLP activations into a NeuronStatsAccumulator, and a helper to
capture per-layer MLP feature matrices for the rank / clone metrics.

Model contract (models/gpt.py): every block has ``mlp.act`` (nn.GELU(approximate="tanh")
for gpt2, nn.SiLU() for llama; its hook sees the pre-activation x as input[0] and φ(x) as
output) and ``mlp.hidden`` (nn.Identity on the hidden vector h that feeds the output
projection: φ(x) for gpt2, silu(gate) * up for llama).

Entries recorded per block prefix P (e.g. "blocks.0.mlp"):
  * non-gated (gpt2):  "P.hidden"  h = act output, x = act input  (role "hidden")
  * gated (llama):     "P.hidden"  h = gated product, no pre-activation (role "hidden")
                       "P.act"     h = silu(gate), x = gate           (role "gate")
Gating is detected at run time (the tensor entering ``hidden`` is not the act output) or
forced with ``gated=``. "_orig_mod." (torch.compile) and "module." (DDP) name components are
stripped from entry names.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from data.packing import rank_share_rows

from .neuron_stats import DEFAULT_DELTA, DEFAULT_EPS, NeuronStatsAccumulator, normalize_act_kind

_STRIP = ("_orig_mod", "module")


def clean_name(name: str) -> str:
    """Drop wrapper components ("_orig_mod", "module") from a module name."""
    return ".".join(p for p in name.split(".") if p not in _STRIP)


def find_mlp_modules(model: nn.Module) -> List[Tuple[str, nn.Module, Optional[nn.Module]]]:
    """[(clean block prefix "blocks.i.mlp", act module, hidden module or None)], in model order."""
    mods = dict(model.named_modules())
    out = []
    for name, mod in mods.items():
        if name == "mlp.act" or name.endswith(".mlp.act"):
            prefix = name[: -len(".act")]
            out.append((clean_name(prefix), mod, mods.get(prefix + ".hidden")))
    return out


class NeuronHooks:
    """Collect per-neuron stats of every ``*.mlp.act`` / ``*.mlp.hidden`` while started.

    Hooks exist only between start() and stop() (or inside ``with NeuronHooks(...)``), so
    there is zero overhead otherwise. Works in train or eval mode, with or without grad
    (tensors are detached). act_kind: activation for the saturation statistic (None =
    from each act module's type; also "gpt2"/"llama" aliases).
    """

    def __init__(
        self,
        model: nn.Module,
        act_kind=None,
        accumulator: Optional[NeuronStatsAccumulator] = None,
        *,
        gated: Optional[bool] = None,
        eps: float = DEFAULT_EPS,
        delta: float = DEFAULT_DELTA,
        use_triton="auto",
        token_stride: int = 1,
        record_pre_activation: bool = True,
    ):
        self.model = model
        # >1: only every k-th token is counted (the online mode's cheap estimate)
        self.token_stride = int(token_stride)
        # False: skip the saturation statistic (it needs the pre-activation), for cheap online use
        self.record_pre_activation = record_pre_activation
        self.acc = accumulator if accumulator is not None else NeuronStatsAccumulator(eps=eps, delta=delta, use_triton=use_triton)
        self.gated = gated
        self.blocks = find_mlp_modules(model)
        if not self.blocks:
            raise ValueError("NeuronHooks: the model has no '*.mlp.act' modules")
        forced = normalize_act_kind(act_kind) if act_kind is not None else None
        self.kinds = {p: (forced if act_kind is not None else normalize_act_kind(act)) for p, act, _ in self.blocks}
        self._handles: list = []
        self._stash: Dict[str, tuple] = {}

    @property
    def accumulator(self) -> NeuronStatsAccumulator:
        return self.acc

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _update(self, name, h, x, kind, role) -> None:
        if not self.record_pre_activation:
            x = None
        if self.token_stride > 1:
            h = h.reshape(-1, h.shape[-1])[:: self.token_stride]
            x = x.reshape(-1, x.shape[-1])[:: self.token_stride] if x is not None else None
        self.acc.update(name, h, x, kind, role=role)

    # -- hook bodies ------------------------------------------------------------------
    def _act_hook(self, prefix: str, has_hidden: bool):
        def hook(mod, inp, out):
            x = inp[0].detach()
            a = out.detach()
            if has_hidden:
                self._stash[prefix] = (x, a, out)
            else:
                self._update(prefix + ".hidden", a, x, self.kinds[prefix], role="hidden")

        return hook

    def _hidden_hook(self, prefix: str):
        def hook(mod, inp, out):
            h_in = inp[0]
            h = h_in.detach()
            st = self._stash.pop(prefix, None)
            kind = self.kinds[prefix]
            if st is None:  # act did not run in this forward: record h alone
                self._update(prefix + ".hidden", h, None, kind, role="hidden")
                return
            x, a, a_raw = st
            if self.gated is None:
                same = h_in is a_raw or (
                    h.shape == a.shape and h.data_ptr() == a.data_ptr() and h.stride() == a.stride()
                )
                gated = not same
            else:
                gated = self.gated
            if gated:
                self._update(prefix + ".hidden", h, None, kind, role="hidden")
                self._update(prefix + ".act", a, x, kind, role="gate")
            else:
                self._update(prefix + ".hidden", h, x if x.shape == h.shape else None, kind, role="hidden")

        return hook

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "NeuronHooks":
        if self._handles:
            return self
        for prefix, act, hidden in self.blocks:
            self._handles.append(act.register_forward_hook(self._act_hook(prefix, hidden is not None)))
            if hidden is not None:
                self._handles.append(hidden.register_forward_hook(self._hidden_hook(prefix)))
        return self

    def stop(self) -> "NeuronHooks":
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stash.clear()
        return self

    def __enter__(self) -> "NeuronHooks":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass

    def summary(self, **kw) -> dict:
        return self.acc.summary(**kw)


@torch.no_grad()
def measure_neurons(model: nn.Module, rows: torch.Tensor, batch_size: int, device, rank: int = 0,
                    world: int = 1) -> NeuronStatsAccumulator:
    """Per-neuron statistics of ``model`` (eval mode) on packed ``rows`` (inputs = row[:-1]): each rank
    measures its share of the batches, padding forwards keep ranks in lockstep without being counted, and
    the returned accumulator is summed across ranks."""
    was_training = model.training
    model.eval()
    hooks = NeuronHooks(model)
    for batch, counts in rank_share_rows(rows, batch_size, rank, world):
        with hooks if counts else contextlib.nullcontext():
            model(batch[:, :-1].to(device))
    model.train(was_training)
    return hooks.accumulator.all_reduce()


def _batch_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for k in ("idx", "input_ids", "x", "inputs"):
            if k in batch:
                return batch[k]
        raise ValueError(f"capture_features: batch dict has none of idx/input_ids/x/inputs (keys {list(batch)})")
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise ValueError(f"capture_features: cannot take model input from a {type(batch).__name__}")


@torch.no_grad()
def capture_features(
    model: nn.Module,
    batches: Iterable,
    max_rows: int = 4096,
    *,
    seed: int = 0,
    min_rows_per_neuron: bool = True,
) -> Dict[str, torch.Tensor]:
    """Per-layer MLP feature matrices F (rows = tokens, cols = neurons), float32 on CPU.

    Runs ``model(idx)`` for each batch (a tensor, a (idx, targets) tuple or a dict with
    "idx"/"input_ids") in eval mode under no_grad (the training mode is restored).
    The feature of block P is the input of ``P.hidden`` (the vector feeding the output
    projection), or the act output when there is no hidden module; keys are "P.hidden".
    Rows are subsampled uniformly at random (seeded) to at most
    target = max(max_rows, H) when min_rows_per_neuron (so rank metrics get ≥ H rows
    whenever enough tokens were seen), else max_rows.
    """
    g = torch.Generator().manual_seed(seed)
    blocks = find_mlp_modules(model)
    if not blocks:
        raise ValueError("capture_features: the model has no '*.mlp.act' modules")
    rows: Dict[str, List[torch.Tensor]] = {p + ".hidden": [] for p, _, _ in blocks}

    def target(H: int) -> int:
        return max(max_rows, H) if min_rows_per_neuron else max_rows

    def sub(t: torch.Tensor, n: int) -> torch.Tensor:
        if t.shape[0] <= n:
            return t
        idx = torch.randperm(t.shape[0], generator=g)[:n]
        return t[idx.to(t.device)]

    def make_hook(key: str, take_input: bool):
        def hook(mod, inp, out):
            t = (inp[0] if take_input else out).detach()
            t = t.reshape(-1, t.shape[-1])
            rows[key].append(sub(t, target(t.shape[1])).float().cpu())

        return hook

    handles = []
    was_training = model.training
    try:
        for prefix, act, hidden in blocks:
            key = prefix + ".hidden"
            if hidden is not None:
                handles.append(hidden.register_forward_hook(make_hook(key, True)))
            else:
                handles.append(act.register_forward_hook(make_hook(key, False)))
        model.eval()
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        for batch in batches:
            x = _batch_input(batch)
            model(x.to(dev) if isinstance(x, torch.Tensor) else x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for key, lst in rows.items():
        if not lst:
            continue
        F = torch.cat(lst, 0)
        out[key] = sub(F, target(F.shape[1]))
    return out
