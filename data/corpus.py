"""Loader for the multilingual corpus (the bundled one in ``data/corpus`` or a rebuilt one).

Layout of a corpus directory (see ``data/corpus_builder.py`` and ``docs/data.md``)::

    train/<lang>.txt.gz    one paragraph per line (UTF-8, gzip)
    probe/<lang>.txt.gz    held-out evaluation text, never trained on
    parallel.jsonl.gz      {"id": ..., "en": ..., "fr": ..., ...} per line
    manifest.json

``load_texts`` also accepts a path to a user file instead of a language code:
``.txt`` / ``.txt.gz`` (one text per non-blank line) or ``.jsonl`` / ``.jsonl.gz``
(one JSON object per line with a ``"text"`` field).

Every problem is a :class:`trainer.errors.DataError` whose one-line message names the file.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib

from trainer.errors import DataError

__all__ = [
    "DEFAULT_CORPUS_DIR",
    "SPLITS",
    "available_languages",
    "load_texts",
    "load_parallel",
    "read_lines",
]

DEFAULT_CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
SPLITS = ("train", "probe")
_USER_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


def _corpus_dir(corpus_dir) -> str:
    d = os.fspath(corpus_dir) if corpus_dir else DEFAULT_CORPUS_DIR
    if not os.path.isdir(d):
        raise DataError(f"corpus directory not found: {d}")
    return d


def _read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise DataError(f"corpus file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"corpus file is a directory, expected a file: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    if path.endswith(".gz") and data:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"corpus file {path} is not valid gzip: {msg}") from None
    return data


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = " (after gunzip)" if path.endswith(".gz") else ""
        raise DataError(f"corpus file {path} is not valid UTF-8: bad byte 0x{data[e.start]:02x} "
                        f"at byte offset {e.start}{where}") from None


def read_lines(path) -> list[str]:
    """Non-blank lines of a (possibly gzip'ed) UTF-8 text file, without newlines."""
    path = os.fspath(path)
    text = _decode(path, _read_bytes(path))
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [line.rstrip("\r") for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError(f"corpus file is empty: {path}")
    return lines


def _json_lines(path: str) -> list[tuple[int, object]]:
    out = []
    for lineno, line in enumerate(read_lines(path), 1):
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"corpus file {path}: line {lineno} is not valid JSON ({e.msg})") from None
    return out


def _load_user_file(path: str) -> list[str]:
    if path.endswith((".jsonl", ".jsonl.gz")):
        texts = []
        for lineno, obj in _json_lines(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"corpus file {path}: line {lineno} has no string \"text\" field")
            if obj["text"].strip():
                texts.append(obj["text"])
        if not texts:
            raise DataError(f"corpus file is empty: {path} (no non-blank \"text\")")
        return texts
    return read_lines(path)


def _looks_like_path(name: str) -> bool:
    return name.endswith(_USER_SUFFIXES) or os.sep in name or "/" in name


def _manifest_languages(d: str) -> list[str]:
    try:
        with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
            langs = json.load(f).get("languages", [])
        return [lang for lang in langs if isinstance(lang, str)]
    except (OSError, ValueError, AttributeError):
        return []


def available_languages(corpus_dir=None, split: str = "train") -> list[str]:
    """Languages with a ``<split>/<lang>.txt.gz`` shard: manifest order, then the rest sorted."""
    if split not in SPLITS:
        raise DataError(f"unknown corpus split {split!r} (expected one of: {', '.join(SPLITS)})")
    d = _corpus_dir(corpus_dir)
    sub = os.path.join(d, split)
    if not os.path.isdir(sub):
        return []
    present = sorted(fn[: -len(".txt.gz")] for fn in os.listdir(sub) if fn.endswith(".txt.gz"))
    ordered = [lang for lang in _manifest_languages(d) if lang in present]
    return ordered + [lang for lang in present if lang not in ordered]


def load_texts(lang, corpus_dir=None, split: str = "train") -> list[str]:
    """Paragraphs of ``lang`` in ``split`` ("train" or "probe"), one string each.

    ``lang`` may instead be a path to a user ``.txt``/``.txt.gz``/``.jsonl``/``.jsonl.gz``
    file (then ``corpus_dir`` and ``split`` are ignored).
    """
    lang = os.fspath(lang)
    if _looks_like_path(lang) or (os.path.isfile(lang) and not lang.isalpha()):
        if not lang.endswith(_USER_SUFFIXES):
            raise DataError(f"corpus file {lang}: unsupported type "
                            f"(expected one of: {', '.join(_USER_SUFFIXES)})")
        return _load_user_file(lang)
    if split not in SPLITS:
        raise DataError(f"unknown corpus split {split!r} (expected one of: {', '.join(SPLITS)})")
    d = _corpus_dir(corpus_dir)
    path = os.path.join(d, split, f"{lang}.txt.gz")
    if not os.path.exists(path):
        langs = available_languages(d, split)
        raise DataError(f"unknown language {lang!r}: no {path} "
                        f"(available {split} languages: {', '.join(langs) or 'none'})")
    return read_lines(path)


def load_parallel(corpus_dir=None) -> list[dict]:
    """Aligned paragraphs: dicts ``{"id": ..., "<lang>": text, ...}`` (>= 2 languages each).

    ``corpus_dir`` may also be a path to a ``.jsonl``/``.jsonl.gz`` file of such rows.
    """
    if corpus_dir and os.fspath(corpus_dir).endswith((".jsonl", ".jsonl.gz")):
        path = os.fspath(corpus_dir)
    else:
        path = os.path.join(_corpus_dir(corpus_dir), "parallel.jsonl.gz")
    rows = []
    for lineno, obj in _json_lines(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise DataError(f"corpus file {path}: line {lineno} is not an object with a string \"id\"")
        langs = [k for k, v in obj.items() if k != "id"]
        if len(langs) < 2 or not all(isinstance(obj[k], str) for k in langs):
            raise DataError(f"corpus file {path}: line {lineno} needs >= 2 language texts (strings)")
        rows.append(obj)
    return rows
