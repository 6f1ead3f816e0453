"""Continual backprop (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton 2024,
"Loss of plasticity in deep continual learning", Nature).

Each MLP hidden unit i keeps a running contribution utility
    u_i ← η·u_i + (1−η)·E_batch|h_i|·Σ_k |w_out[k, i]|
(|h| measured on the training forward pass with the instruments' NeuronHooks and
all-reduced across ranks) and an age a_i (steps since its last reset).  After every
optimizer step, units older than ``maturity`` are eligible; ρ·(#eligible) units per layer
(fractions accumulate across steps) with the lowest bias-corrected utility
û_i = u_i / (1 − η^{a_i}) are replaced: fresh incoming weights, zero outgoing weights,
zeroed Adam moments for those rows/columns, u_i = 0, a_i = 0.  Utility, age and the
fractional counters are in the callback state.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from trainer.callbacks import register
from trainer.errors import ConfigError
from trainer.instruments.hooks import NeuronHooks
from mitigations.base import Mitigation
from mitigations.neurons import generator, mlps, reset_units


class CBPState:
    """Utility/age bookkeeping and the replacement rule (no model access: unit-testable)."""

    def __init__(self, widths: List[int], decay: float, maturity: int, rate: float):
        self.decay, self.maturity, self.rate = decay, maturity, rate
        self.util = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.age = [torch.zeros(w, dtype=torch.long) for w in widths]
        self.accum = [0.0 for _ in widths]

    def update(self, layer: int, mean_abs_h: torch.Tensor, out_abs_sum: torch.Tensor) -> None:
        self.age[layer] += 1
        self.util[layer] = self.decay * self.util[layer] + (1 - self.decay) * (
            mean_abs_h.double().cpu() * out_abs_sum.double().cpu())

    def select(self, layer: int) -> torch.Tensor:
        age = self.age[layer]
        eligible = torch.nonzero(age > self.maturity).flatten()
        if eligible.numel() == 0:
            return eligible
        self.accum[layer] += self.rate * eligible.numel()
        n = int(self.accum[layer])
        if n == 0:
            return eligible[:0]
        self.accum[layer] -= n
        corrected = self.util[layer][eligible] / (1 - self.decay ** age[eligible].double())
        order = torch.argsort(corrected, stable=True)[:n]
        return eligible[order].sort().values

    def reset(self, layer: int, idx: torch.Tensor) -> None:
        self.util[layer][idx] = 0.0
        self.age[layer][idx] = 0


@register("cbp")
class ContinualBackprop(Mitigation):
    def __init__(self, replacement_rate: float = 1e-4, decay: float = 0.99, maturity: int = 100):
        if not 0 <= replacement_rate <= 1 or not 0 <= decay < 1 or maturity < 0:
            raise ConfigError("cbp: need 0 <= replacement_rate <= 1, 0 <= decay < 1, maturity >= 0")
        self.rate, self.decay, self.maturity = float(replacement_rate), float(decay), int(maturity)
        self.state: Optional[CBPState] = None
        self._hooks: Optional[NeuronHooks] = None
        self._loaded: Optional[dict] = None
        self.total_replaced = 0

    def _ensure(self, trainer) -> CBPState:
        if self.state is None:
            widths = [trainer.model_cfg.hidden_dim] * trainer.model_cfg.n_layer
            self.state = CBPState(widths, self.decay, self.maturity, self.rate)
            if self._loaded:
                self._load_into(self._loaded)
        return self.state

    def pre_step(self, trainer) -> None:
        self._ensure(trainer)
        self._hooks = NeuronHooks(trainer.model).start()

    def post_backward(self, trainer) -> None:
        # the utility is about the training forward passes only: detach before any other callback's
        # post_step runs forwards of its own (periodic metrics, ReDo's scoring) on the same model
        if self._hooks is not None:
            self._hooks.stop()

    def post_step(self, trainer, logs) -> None:
        if self._hooks is None:
            return
        hooks, self._hooks = self._hooks.stop(), None
        per = hooks.accumulator.all_reduce().per_neuron()
        st, access = self._ensure(trainer), self.access(trainer)
        replaced = 0
        for i, mlp in enumerate(mlps(trainer.unwrapped_model)):
            mean_abs = per.get(f"blocks.{i}.mlp.hidden/mean_abs")
            if mean_abs is None:
                continue
            (w_out, dim), = mlp.neuron_params()["outgoing"]
            out_sum = access.get_param(w_out).abs().sum(dim=1 - dim)
            st.update(i, mean_abs, out_sum)
            idx = st.select(i)
            if idx.numel():
                reset_units(access, mlp, idx, generator(self.seed(trainer), "cbp", trainer.global_step, i))
                st.reset(i, idx)
                replaced += int(idx.numel())
        self.total_replaced += replaced
        logs["cbp/replaced"] = float(replaced)
        logs["cbp/total_replaced"] = float(self.total_replaced)

    def state_dict(self) -> dict:
        if self.state is None:
            return dict(self._loaded or {})
        return {"util": list(self.state.util), "age": list(self.state.age),
                "accum": torch.tensor(self.state.accum, dtype=torch.float64),
                "total_replaced": torch.tensor(self.total_replaced)}

    def _load_into(self, state: dict) -> None:
        self.state.util = [u.double().clone() for u in state["util"]]
        self.state.age = [a.long().clone() for a in state["age"]]
        self.state.accum = [float(x) for x in state["accum"]]

    def load_state_dict(self, state: dict) -> None:
        if state and "util" in state:
            self._loaded = state
            self.total_replaced = int(state["total_replaced"])
            if self.state is not None:
                self._load_into(state)
