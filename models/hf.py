"""Conversion to / from Hugging Face transformers, and export to a ``from_pretrained``-loadable folder.

* gpt2 flavour  <-> ``GPT2LMHeadModel`` (HF uses Conv1D, whose weight is (in, out): we transpose).
* llama flavour <-> ``LlamaForCausalLM`` (our fused c_attn is split into q/k/v_proj; same rotate_half RoPE).

Models are always built from a config object, never downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import torch

from trainer.errors import CheckpointError, ConfigError

from .gpt import GPT, ModelConfig


def _hf_config(cfg: ModelConfig):
    # no special-token ids: HF's defaults (GPT-2's 50256, Llama's 1/2) mean nothing for our vocabulary; export_hf
    # sets them from the tokenizer
    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.flavour == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.hidden_dim, activation_function="gelu_new",
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
            **no_ids,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=cfg.dropout, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        **no_ids,
    )


def _name_map(cfg: ModelConfig):
    """Yield (our_name, hf_name, kind); kind: "same", "T" (transpose), or ("rows", i) = i-th third of c_attn."""
    if cfg.flavour == "gpt2":
        yield "wte.weight", "transformer.wte.weight", "same"
        yield "wpe.weight", "transformer.wpe.weight", "same"
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                yield o + ours + ".weight", h + theirs + ".weight", "same"
                yield o + ours + ".bias", h + theirs + ".bias", "same"
            for ours, theirs in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                                 ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
                yield o + ours + ".weight", h + theirs + ".weight", "T"
                yield o + ours + ".bias", h + theirs + ".bias", "same"
        yield "norm_f.weight", "transformer.ln_f.weight", "same"
        yield "norm_f.bias", "transformer.ln_f.bias", "same"
    else:
        yield "wte.weight", "model.embed_tokens.weight", "same"
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            yield o + "norm1.weight", h + "input_layernorm.weight", "same"
            for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
                yield o + "attn.c_attn.weight", h + f"self_attn.{p}.weight", ("rows", j)
            yield o + "attn.c_proj.weight", h + "self_attn.o_proj.weight", "same"
            yield o + "norm2.weight", h + "post_attention_layernorm.weight", "same"
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                yield o + f"mlp.{ours}.weight", h + f"mlp.{theirs}.weight", "same"
        yield "norm_f.weight", "model.norm.weight", "same"
    yield "lm_head.weight", "lm_head.weight", "same"


def _is_tied(hf_model) -> bool:
    a, b = hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight
    return a is b or a.data_ptr() == b.data_ptr()


@torch.no_grad()
def to_hf(model: GPT):
    """A transformers model (GPT2LMHeadModel / LlamaForCausalLM) with the same weights, dtype and device."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = model.cfg
    hf_cls = GPT2LMHeadModel if cfg.flavour == "gpt2" else LlamaForCausalLM
    ref = model.wte.weight
    hf = hf_cls(_hf_config(cfg)).to(device=ref.device, dtype=ref.dtype)
    if cfg.tie_embeddings and not _is_tied(hf):
        hf.tie_weights()
    ours = dict(model.named_parameters(remove_duplicate=False))
    covered = set()
    d = cfg.n_embd
    for our_name, hf_name, kind in _name_map(cfg):
        src = ours[our_name]
        if kind == "T":
            src = src.t()
        elif isinstance(kind, tuple):
            src = src[kind[1] * d:(kind[1] + 1) * d]
        dst = hf.get_parameter(hf_name)
        dst.copy_(src)
        covered.add(hf_name)
    missing = {n for n, _ in hf.named_parameters()} - covered
    if missing:
        raise RuntimeError(f"to_hf: HF parameters not filled: {sorted(missing)[:5]}")
    return hf.eval() if not model.training else hf


def _cfg_from_hf(c) -> ModelConfig:
    mt = getattr(c, "model_type", None)
    if mt == "gpt2":
        if getattr(c, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"from_hf: unsupported GPT-2 activation_function {c.activation_function!r}")
        # our attention always scales by 1/sqrt(head_dim), in the model's dtype
        for key, ours in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False)):
            if bool(getattr(c, key, ours)) != ours:
                raise ConfigError(f"from_hf: unsupported GPT-2 setting {key}={getattr(c, key)!r}")
        return ModelConfig(flavour="gpt2", vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, mlp_hidden=c.n_inner or 4 * c.n_embd,
                           tie_embeddings=bool(c.tie_word_embeddings), dropout=float(c.resid_pdrop),
                           norm_eps=float(c.layer_norm_epsilon))
    if mt == "llama":
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ConfigError(f"from_hf: unsupported Llama hidden_act {c.hidden_act!r} (ours is SwiGLU with SiLU)")
        if c.num_key_value_heads != c.num_attention_heads or c.attention_bias or getattr(c, "mlp_bias", False):
            raise ConfigError("from_hf: only Llama configs without GQA and without biases are supported")
        if c.head_dim != c.hidden_size // c.num_attention_heads:
            raise ConfigError(f"from_hf: Llama head_dim {c.head_dim} != hidden_size/num_attention_heads")
        rp = c.rope_parameters or {}
        if rp.get("rope_type", "default") != "default":
            raise ConfigError(f"from_hf: unsupported rope_type {rp.get('rope_type')!r}")
        return ModelConfig(flavour="llama", vocab_size=c.vocab_size, block_size=c.max_position_embeddings,
                           n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                           mlp_hidden=c.intermediate_size, tie_embeddings=bool(c.tie_word_embeddings),
                           dropout=float(c.attention_dropout or 0.0), norm_eps=float(c.rms_norm_eps),
                           rope_theta=float(rp.get("rope_theta", 10000.0)))
    raise ConfigError(f"from_hf: unsupported model_type {mt!r} (expected gpt2 or llama)")


@torch.no_grad()
def from_hf(hf_model) -> GPT:
    """Our GPT with the weights of a GPT2LMHeadModel / LlamaForCausalLM (same dtype and device)."""
    cfg = _cfg_from_hf(hf_model.config)
    cfg.tie_embeddings = _is_tied(hf_model)
    if cfg.mlp_hidden == dataclasses.replace(cfg, mlp_hidden=0).hidden_dim:
        cfg.mlp_hidden = 0  # the flavour default: keep configs comparable with the originals
    ref = hf_model.get_input_embeddings().weight
    model = GPT(cfg).to(device=ref.device, dtype=ref.dtype)
    ours = dict(model.named_parameters(remove_duplicate=False))
    d = cfg.n_embd
    for our_name, hf_name, kind in _name_map(cfg):
        src = hf_model.get_parameter(hf_name)
        dst = ours[our_name]
        if kind == "T":
            dst.copy_(src.t())
        elif isinstance(kind, tuple):
            dst[kind[1] * d:(kind[1] + 1) * d].copy_(src)
        else:
            dst.copy_(src)
    return model.train(hf_model.training)


def _tokenizer_from_spm(model_path: str):
    """A tokenizers-backed fast tokenizer converted from a sentencepiece .model (offline)."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(model_path):
        raise CheckpointError(f"export_hf: tokenizer model not found: {model_path}")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    special = {}
    for key, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                   ("pad_token", sp.pad_id())):
        if 0 <= i < sp.get_piece_size():
            special[key] = sp.id_to_piece(i)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_path, os.path.join(tmp, "tokenizer.model"))
        tok = PreTrainedTokenizerFast.from_pretrained(tmp, **special)
    return tok, sp


def export_hf(model: GPT, out_dir: str, tokenizer_model_path: str | None = None, dtype: torch.dtype | None = None):
    """Write ``save_pretrained`` output (config.json + model.safetensors) loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``; with a sentencepiece .model also a tokenizer loadable
    with ``AutoTokenizer.from_pretrained(out_dir)`` (tokenizer.json converted offline; the .model is copied
    alongside as tokenizer.model). Returns out_dir."""
    hf = to_hf(model).cpu()
    if dtype is not None:
        hf = hf.to(dtype)
    tok = None
    if tokenizer_model_path is not None:
        tok, sp = _tokenizer_from_spm(tokenizer_model_path)
        if sp.get_piece_size() > model.cfg.vocab_size:
            raise ConfigError(f"export_hf: tokenizer has {sp.get_piece_size()} pieces but model.vocab_size="
                              f"{model.cfg.vocab_size}")
        for attr, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id())):
            v = i if i >= 0 else None
            setattr(hf.config, attr, v)
            if getattr(hf, "generation_config", None) is not None:
                setattr(hf.generation_config, attr, v)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out_dir)
        shutil.copyfile(tokenizer_model_path, os.path.join(out_dir, "tokenizer.model"))
    return out_dir
