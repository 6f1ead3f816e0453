"""From the run config to a concrete ModelConfig (size presets and parameter targets)."""
from __future__ import annotations

import dataclasses
import re

from models.gpt import ModelConfig
from models.sizes import PRESETS, config_for_params
from trainer.config import RunConfig
from trainer.errors import ConfigError

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}


def parse_count(text: str) -> int:
    """'50k' -> 50000, '1.5M' -> 1500000, '5e6' -> 5000000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmb]?)\s*", text.lower())
    if not m:
        raise ConfigError(f"config key 'model_size': '{text}' is neither a preset ({', '.join(PRESETS)}) "
                          f"nor a parameter count like 50k or 1M")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def resolve_model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    mc = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    if cfg.model_size:
        if cfg.model_size in PRESETS:
            sized = PRESETS[cfg.model_size]
        else:
            sized = config_for_params(parse_count(cfg.model_size), flavour=mc.flavour,
                                      vocab_size=vocab_size, block_size=mc.block_size)
        mc = dataclasses.replace(mc, n_layer=sized.n_layer, n_head=sized.n_head, n_embd=sized.n_embd,
                                 mlp_hidden=sized.mlp_hidden)
    mc.validate()
    return mc
