"""The one callback interface that instruments and mitigations plug into (OLMo-core style).

Every hook receives the Trainer, which exposes `accelerator`, `model` (wrapped),
`unwrapped_model`, `optimizer`, `cfg`, `phase_name`, `phase_cfg`, `task_idx`, `global_step`,
`run_dir` and `log(...)`.  A callback that needs state across a resume implements
`state_dict`/`load_state_dict`; it is stored in the checkpoint under the callback's name.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from trainer.errors import ConfigError


class Callback:
    name: str = "callback"
    # Phases this callback is active in ([] = all). Set from the config entry's `phases`.
    phases: List[str] = []
    # Why a second entry of this callback would break the run (e.g. two writers of one log), or "" if it may repeat.
    one_per_run: str = ""

    def active(self, trainer) -> bool:
        return not self.phases or trainer.phase_name in self.phases

    def check(self, trainer) -> None:
        """Once per run, before anything is trained, for every callback whatever its `phases`: refuse a setup
        it cannot handle here (a ConfigError), so a callback scoped to a later phase fails at the start."""
    def on_run_start(self, trainer) -> None:
        """Once per process, after any resume, for every callback whatever its `phases`: a run start lies
        outside every phase (e.g. trim a log of rows about to be measured again)."""
    def on_phase_start(self, trainer) -> None: ...
    def on_phase_resume(self, trainer) -> None:
        """A run resumed in the middle of this phase (on_phase_start fired in the earlier process)."""
    def on_task_start(self, trainer) -> None: ...
    def pre_step(self, trainer) -> None: ...
    def loss_term(self, trainer, model) -> Optional[Any]:
        """Extra differentiable term added to the loss (e.g. L2-Init); None for nothing."""
        return None
    def post_backward(self, trainer) -> None: ...
    def post_step(self, trainer, logs: Dict[str, float]) -> None: ...
    def on_eval(self, trainer, metrics: Dict[str, float]) -> None: ...
    def on_task_end(self, trainer) -> None: ...
    def on_phase_end(self, trainer) -> None: ...
    def on_checkpoint(self, trainer, path) -> None: ...
    def on_run_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


CALLBACKS: Dict[str, Callable[..., Callback]] = {}


def register(name: str):
    """Class decorator: make a callback constructible from a config entry `{name: ...}`."""
    def wrap(cls):
        cls.name = name
        CALLBACKS[name] = cls
        return cls
    return wrap


def build_callbacks(entries: List[dict]) -> List[Callback]:
    """Config entries -> callback instances. Unknown names and bad arguments are config errors."""
    out = []
    if entries:
        import mitigations  # noqa: F401  (registers the mitigation plug-ins)
        import trainer.instruments.callback  # noqa: F401  (registers the instruments)
    for i, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name")
        phases = entry.pop("phases", [])
        if name not in CALLBACKS:
            raise ConfigError(f"callbacks.{i}: unknown callback '{name}' (known: {', '.join(sorted(CALLBACKS))})")
        try:
            cb = CALLBACKS[name](**entry)
        except TypeError as e:
            raise ConfigError(f"callbacks.{i} ({name}): {e}") from None
        cb.phases = list(phases)
        if cb.one_per_run and any(type(o) is type(cb) for o in out):
            raise ConfigError(f"callbacks.{i} ({name}): only one '{name}' entry per run: {cb.one_per_run}")
        out.append(cb)
    return out
