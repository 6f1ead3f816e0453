"""DeepSpeed ZeRO configs: the JSON templates in launch/deepspeed/ and concrete dicts made from them.

The templates leave batch size, gradient accumulation, clipping and precision as "auto". Under
`accelerate launch` accelerate fills those from the training script (Accelerator arguments and the
prepared dataloader), so the trainer and DeepSpeed cannot disagree. For a launch without
accelerate's auto-fill, `deepspeed_config(...)` returns the same template with every "auto" replaced.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"

STAGES = (1, 2, 3)
# "no" and "fp32" both mean full precision (accelerate says "no", DeepSpeed users say "fp32").
PRECISIONS = ("bf16", "fp16", "fp32", "no")

# fill_auto keyword -> how it fills each "auto" DeepSpeed key (dotted path).
_AUTO_KEYS = {
    "train_micro_batch_size_per_gpu": ("micro_batch_size",),
    "gradient_accumulation_steps": ("grad_accum",),
    "gradient_clipping": ("grad_clip",),
    "bf16.enabled": ("precision",),
    "fp16.enabled": ("precision",),
    "train_batch_size": ("micro_batch_size", "grad_accum", "world_size"),
}
_KNOWN_VALUES = ("micro_batch_size", "grad_accum", "grad_clip", "precision", "world_size")


def template_path(stage: int, offload: bool = False) -> Path:
    """Path of the JSON template for a ZeRO stage (offload: optimizer, and for stage 3 params, on CPU)."""
    if isinstance(stage, bool) or stage not in STAGES:
        raise ConfigError(f"deepspeed: unknown ZeRO stage {stage!r} (choose one of 1, 2, 3)")
    if offload and stage == 1:
        raise ConfigError("deepspeed: CPU offload needs ZeRO stage 2 or 3, not stage 1")
    return DEEPSPEED_DIR / f"zero{stage}{'_offload' if offload else ''}.json"


def load_template(stage: int, offload: bool = False) -> dict:
    """The template for `stage` as a dict, "auto" values and all."""
    with open(template_path(stage, offload), encoding="utf-8") as f:
        return json.load(f)


def _check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"deepspeed: unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})"
        )
    return precision


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"deepspeed: {name} must be an integer >= 1, got {value!r}")
    return value


def _check_values(values: dict) -> None:
    unknown = sorted(set(values) - set(_KNOWN_VALUES))
    if unknown:
        raise ConfigError(
            f"deepspeed: fill_auto got unknown value(s) {', '.join(unknown)} "
            f"(known: {', '.join(_KNOWN_VALUES)})"
        )
    for name in ("micro_batch_size", "grad_accum", "world_size"):
        if name in values:
            _check_positive_int(name, values[name])
    if "grad_clip" in values:
        clip = values["grad_clip"]
        if (
            isinstance(clip, bool)
            or not isinstance(clip, (int, float))
            or not math.isfinite(clip)
            or clip < 0
        ):
            raise ConfigError(f"deepspeed: grad_clip must be a number >= 0 (0 = off), got {clip!r}")
    if "precision" in values:
        _check_precision(values["precision"])


def _value_for(key: str, values: dict) -> Any:
    if key == "train_micro_batch_size_per_gpu":
        return values["micro_batch_size"]
    if key == "gradient_accumulation_steps":
        return values["grad_accum"]
    if key == "gradient_clipping":
        return float(values["grad_clip"])
    if key == "bf16.enabled":
        return values["precision"] == "bf16"
    if key == "fp16.enabled":
        return values["precision"] == "fp16"
    if key == "train_batch_size":
        return values["micro_batch_size"] * values["grad_accum"] * values["world_size"]
    raise AssertionError(key)


def fill_auto(template: dict, **values: Any) -> dict:
    """A copy of `template` with every "auto" value replaced.

    values: micro_batch_size, grad_accum, grad_clip, precision ("bf16", "fp16", "fp32"/"no") and,
    only if the template has train_batch_size "auto", world_size. Raises ConfigError for an
    unknown value name, a bad value, or an "auto" that the given values cannot fill.
    """
    _check_values(values)
    out = copy.deepcopy(template)

    def walk(node: dict, prefix: str) -> None:
        for key, val in node.items():
            path = f"{prefix}{key}"
            if isinstance(val, dict):
                walk(val, path + ".")
            elif isinstance(val, str) and val == "auto":
                needs = _AUTO_KEYS.get(path)
                if needs is None:
                    raise ConfigError(f"deepspeed: cannot fill {path!r}: \"auto\" is only supported "
                                      f"for {', '.join(_AUTO_KEYS)}")
                missing = [n for n in needs if n not in values]
                if missing:
                    raise ConfigError(f"deepspeed: {path!r} is \"auto\"; pass {', '.join(missing)} to fill it")
                node[key] = _value_for(path, values)

    walk(out, "")
    return out


def find_auto(config: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every value that is still "auto"."""
    found = []
    for key, val in config.items():
        if isinstance(val, dict):
            found += find_auto(val, f"{prefix}{key}.")
        elif isinstance(val, str) and val == "auto":
            found.append(f"{prefix}{key}")
    return found


def deepspeed_config(
    stage: int,
    offload: bool,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    precision: str,
) -> dict:
    """A fully concrete DeepSpeed config (no "auto") for a launch without accelerate's auto-fill.

    train_batch_size is left out: DeepSpeed derives it as micro_batch_size * grad_accum * world size.
    """
    config = fill_auto(
        load_template(stage, offload),
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        grad_clip=grad_clip,
        precision=precision,
    )
    left = find_auto(config)
    if left:  # a template gained an "auto" key that fill_auto does not know
        raise ConfigError(f"deepspeed: template for stage {stage} still has \"auto\" at {', '.join(left)}")
    return config


def write_deepspeed_config(path: str | Path, **kwargs: Any) -> Path:
    """Write `deepspeed_config(**kwargs)` as JSON to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(deepspeed_config(**kwargs), indent=2) + "\n", encoding="utf-8")
    return path
