"""Our GPT <-> Hugging Face transformers: same logits, lossless round trip, loadable export (all offline)."""

import os

import pytest
import torch

pytest.importorskip("transformers")

from models import GPT, ModelConfig  # noqa: E402
from models.hf import export_hf, from_hf, to_hf  # noqa: E402

CASES = [(f, t) for f in ("gpt2", "llama") for t in (True, False)]


def tiny(flavour, tie):
    return ModelConfig(flavour=flavour, vocab_size=331, block_size=24, n_layer=2, n_head=2, n_embd=32,
                       tie_embeddings=tie)


def _randomise(m):
    """Non-trivial norm weights/biases too, so a wrong mapping of any tensor shows up."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.mark.parametrize("flavour,tie", CASES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_logits_match_hf(flavour, tie, dtype, atol):
    torch.manual_seed(0)
    m = _randomise(GPT(tiny(flavour, tie))).to(dtype).eval()
    hf = to_hf(m).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if flavour == "gpt2" else "LlamaForCausalLM")
    idx = torch.randint(0, 331, (2, 20))
    with torch.no_grad():
        ours, _ = m(idx)
        theirs = hf(idx).logits
    assert theirs.dtype == dtype
    assert torch.allclose(ours, theirs, atol=atol, rtol=0), (ours - theirs).abs().max()
    tied = hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()
    assert tied == tie


@pytest.mark.parametrize("flavour,tie", CASES)
def test_round_trip_from_hf(flavour, tie):
    torch.manual_seed(1)
    m = _randomise(GPT(tiny(flavour, tie))).eval()
    back = from_hf(to_hf(m))
    assert back.cfg == m.cfg
    assert (back.lm_head.weight is back.wte.weight) == tie
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


@pytest.mark.parametrize("flavour,key,value", [("gpt2", "scale_attn_by_inverse_layer_idx", True),
                                               ("gpt2", "scale_attn_weights", False),
                                               ("gpt2", "reorder_and_upcast_attn", True),
                                               ("llama", "hidden_act", "gelu")])
def test_from_hf_refuses_what_our_model_cannot_reproduce(flavour, key, value):
    """Otherwise the converted model silently computes different logits (e.g. 2.2 with layer-index scaling)."""
    from trainer.errors import ConfigError

    hf = to_hf(GPT(tiny(flavour, True)))
    setattr(hf.config, key, value)
    with pytest.raises(ConfigError, match=key):
        from_hf(hf)


@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("llama", False)])
def test_export_from_pretrained(tmp_path, flavour, tie):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    m = _randomise(GPT(tiny(flavour, tie))).eval()
    out = export_hf(m, str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    import json  # without a tokenizer no special-token ids are claimed (HF's defaults: 50256, or 1/2)
    for name in ("config.json", "generation_config.json"):
        c = json.load(open(os.path.join(out, name)))
        assert all(c.get(k) is None for k in ("bos_token_id", "eos_token_id", "pad_token_id")), (name, c)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 331, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, m(idx)[0], atol=1e-5, rtol=0)
    again = from_hf(hf)
    with torch.no_grad():
        assert torch.allclose(again(idx)[0], m(idx)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_export_with_sentencepiece_tokenizer(tmp_path, model_type):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = ["The quick brown fox jumps over the lazy dog.", "Plasticity loss: networks stop learning new tasks.",
            "Hello world, hello tokenizer! 123 456 7890", "Byte fallback handles anything."] * 20
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=prefix, vocab_size=320,
                                   model_type=model_type, byte_fallback=True, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    m = GPT(tiny("llama", True)).eval()
    out = export_hf(m, str(tmp_path / "export"), tokenizer_model_path=prefix + ".model")
    tok = AutoTokenizer.from_pretrained(out)
    for s in ["The lazy fox learns.", "Unseen ✓ 日本 chars use bytes", "hello  world"]:
        ids = sp.encode(s)
        assert tok.encode(s, add_special_tokens=False) == ids
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.eos_token == sp.id_to_piece(sp.eos_id()) and tok.bos_token == sp.id_to_piece(sp.bos_id())
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.eos_token_id == sp.eos_id()
    ids = torch.tensor([tok.encode("The quick fox", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, m(ids)[0], atol=1e-5, rtol=0)


def test_export_rejects_too_small_vocab(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from trainer.errors import ConfigError

    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some text here and there"] * 10), model_prefix=prefix,
                                   vocab_size=300, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    m = GPT(ModelConfig(flavour="llama", vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16))
    with pytest.raises(ConfigError, match="vocab_size"):
        export_hf(m, str(tmp_path / "x"), tokenizer_model_path=prefix + ".model")
