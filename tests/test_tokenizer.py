"""Tokenizer training and the token cache: deterministic bytes, unambiguous cache keys, clear errors."""
import pytest

from data.packing import tokenize_to_array
from data.tokenizer import train_tokenizer
from trainer.errors import ConfigError

TEXTS = [f"zz{i} yy{i % 7} qq the quick brown fox" for i in range(300)]


def test_same_text_gives_byte_identical_tokenizers(tmp_path):
    """The model file does not embed where it was trained, so identical runs write identical files."""
    a = train_tokenizer(TEXTS, 320, tmp_path / "a")
    b = train_tokenizer(TEXTS, 320, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes() and a.fingerprint() == b.fingerprint()
    assert str(tmp_path).encode() not in a.path.read_bytes()


def test_token_cache_keeps_document_boundaries(tmp_path):
    tok = train_tokenizer(TEXTS, 320, tmp_path)
    one = tokenize_to_array(tok, ["zz1 qq\nyy2 qq"], tmp_path)  # cached first: must not answer the next call
    two = tokenize_to_array(tok, ["zz1 qq", "yy2 qq"], tmp_path)
    assert (one == tok.eos_id).sum() == 1 and (two == tok.eos_id).sum() == 2


def test_too_small_vocabulary_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.vocab_size.*Vocabulary size is smaller than required_chars"):
        train_tokenizer([chr(0x4E00 + i) * 3 for i in range(400)], 64, tmp_path)
