"""SentencePiece tokenizer trained locally (no hub), byte fallback, cached by content hash."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, List, Sequence

import sentencepiece as spm

from trainer.errors import ConfigError, DataError
from trainer.fileio import write_atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_TRAINER_VERSION = "spm-unigram-v2"  # bump when training options change so caches are not reused


class Tokenizer:
    """Thin wrapper with the interface the rest of the code uses."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]


def texts_digest(h, texts: Sequence[str]):
    """Feed texts into hash `h` unambiguously: each one length-prefixed, so ["a\nb"] != ["a", "b"]."""
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h


def _content_hash(texts: Sequence[str], vocab_size: int) -> str:
    return texts_digest(hashlib.sha256(f"{_TRAINER_VERSION}|{vocab_size}|".encode()), texts).hexdigest()[:20]


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """Train (or reuse from cache) a unigram model with byte fallback on `texts`.

    The cache key is a hash of the exact training text and options, so two runs on the same
    data share one tokenizer and any change retrains.  Written to a temp file and renamed,
    so concurrent runs never see a half-written model.
    """
    if not texts:
        raise DataError("no text to train the tokenizer on")
    cache = Path(cache_dir) / "tokenizers"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{_content_hash(texts, vocab_size)}.model"
    if target.is_file():
        return Tokenizer(target)
    model = io.BytesIO()  # written to memory, not to a temp path that would end up inside the model file
    spm.set_random_generator_seed(1234)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            byte_fallback=True,  # any UTF-8 text (e.g. the held-out Vietnamese probe) is encodable
            character_coverage=0.995,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            hard_vocab_limit=False,
            num_threads=1,
            max_sentence_length=8192,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 512 vs 969"
        raise ConfigError(f"config key 'data.vocab_size': {vocab_size} does not fit the tokenizer's training text: "
                          f"{str(e).split('] ')[-1].splitlines()[0]}") from None
    write_atomic(target, model.getvalue())
    return Tokenizer(target)
