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


def test_parallel_runs_filling_one_cache_entry_do_not_collide(tmp_path, monkeypatch):
    """A study's parallel runs tokenized the same language at once and shared one temporary file: the second
    rename failed (FileNotFoundError: ...tmp.npy -> ...npy) and the run was marked FAILED. Here another run
    fills the same entry while this one is writing it."""
    import numpy as np

    tok = train_tokenizer(TEXTS, 320, tmp_path)
    save, calls = np.save, []

    def save_while_another_run_saves(f, arr, *a, **kw):
        save(f, arr, *a, **kw)
        calls.append(1)
        if len(calls) == 1:  # written, not yet renamed: the other run (same texts, same entry) writes and renames
            tokenize_to_array(tok, TEXTS[:50], tmp_path)

    monkeypatch.setattr(np, "save", save_while_another_run_saves)
    got = tokenize_to_array(tok, TEXTS[:50], tmp_path)
    assert len(calls) == 2
    monkeypatch.setattr(np, "save", save)
    assert (tokenize_to_array(tok, TEXTS[:50], tmp_path) == got).all()  # the cached entry is whole
    assert not [p.name for p in (tmp_path / "tokens").iterdir() if p.suffix == ".tmp"]


def test_write_atomic_leaves_no_temporary_on_failure(tmp_path):
    from trainer.fileio import write_atomic

    target = tmp_path / "x.json"
    target.write_text("old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    write_atomic(target, "new")
    assert target.read_text() == "new"
