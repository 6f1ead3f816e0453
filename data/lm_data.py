"""Per-language language-modelling data for a run: tokenizer + packed train/val rows."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from data import corpus
from data.packing import pack_rows, split_rows, tokenize_to_array
from data.tokenizer import Tokenizer, train_tokenizer


class LanguageData:
    """Loads each language once, lazily, and keeps its packed rows."""

    def __init__(self, corpus_dir: str, vocab_size: int, seq_len: int, val_fraction: float,
                 cache_dir: str, tokenizer_languages: Sequence[str] = (), tokenizer_sample_lines: int = 20000,
                 tokenizer_path: Optional[Path] = None):
        self.corpus_dir = corpus_dir or None
        self.seq_len, self.val_fraction, self.cache_dir = seq_len, val_fraction, cache_dir
        self._rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        if tokenizer_path is not None:  # resuming or reusing: never retrain
            self.tokenizer = Tokenizer(tokenizer_path)
        else:
            langs = list(tokenizer_languages) or corpus.available_languages(self.corpus_dir)
            sample: List[str] = []
            for lang in langs:
                sample.extend(corpus.load_texts(lang, self.corpus_dir)[:tokenizer_sample_lines])
            self.tokenizer = train_tokenizer(sample, vocab_size, cache_dir)

    def rows(self, lang: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(train_rows, val_rows) for a language, each of shape (N, seq_len + 1)."""
        if lang not in self._rows:
            texts = corpus.load_texts(lang, self.corpus_dir)
            tokens = tokenize_to_array(self.tokenizer, texts, self.cache_dir)
            self._rows[lang] = split_rows(pack_rows(tokens, self.seq_len), self.val_fraction)
        return self._rows[lang]

    def probe_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Held-out Vietnamese (never trained on outside the probe): (train, val) rows."""
        if "__probe__" not in self._rows:
            texts = corpus.load_texts("vi", self.corpus_dir, split="probe")
            tokens = tokenize_to_array(self.tokenizer, texts, self.cache_dir)
            self._rows["__probe__"] = split_rows(pack_rows(tokens, self.seq_len), 0.2)
        return self._rows["__probe__"]
