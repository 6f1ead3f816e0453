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


def sized(mc: ModelConfig, size: str) -> ModelConfig:
    """`mc` with the layer shapes of preset `size` or of a parameter target like '1M' (built for mc's
    flavour, vocabulary and block size); everything else (flavour, norms, tying...) stays mc's."""
    if size in PRESETS:
        shape = PRESETS[size]
    else:
        shape = config_for_params(parse_count(size), flavour=mc.flavour, vocab_size=mc.vocab_size,
                                  block_size=mc.block_size)
    return dataclasses.replace(mc, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                               mlp_hidden=shape.mlp_hidden)


def resolve_model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    mc = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    if cfg.model_size:
        mc = sized(mc, cfg.model_size)
    mc.validate()
    return mc
