"""GPT-style language models (gpt2 / llama flavours), sizes, and Hugging Face conversion.

``models.hf`` is imported lazily (it pulls in transformers).
"""

from .gpt import GPT, Block, ModelConfig
from .sizes import PRESETS, config_for_params, flops_per_token, non_embedding_params, preset

__all__ = ["GPT", "Block", "ModelConfig", "PRESETS", "preset", "config_for_params", "flops_per_token",
           "non_embedding_params"]
