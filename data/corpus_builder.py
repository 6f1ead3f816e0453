"""Build the multilingual corpus from Debian documentation packages.

Sources (never installed: ``apt-get download`` + ``dpkg-deb -x`` into a work dir):

* training text: ``libreoffice-help-<lang>`` (MPL-2.0), HTML under
  ``usr/share/libreoffice/help/<dir>/text``;
* the held-out probe set: ``installation-guide-amd64`` and ``debian-handbook`` (GPL),
  the pages of the probe language (Vietnamese by default);
* parallel pairs: LibreOffice help pages share relative paths across languages and their
  paragraphs carry stable ``id`` attributes, so paragraphs align on (path, id).

Every paragraph (extracted by :mod:`data.html_text`) is whitespace-normalised, filtered by
:mod:`data.langid` (untranslated English is common in the help packages), and deduplicated
exactly per language. Probe paragraphs that also occur in any training text are dropped.

Output layout (the same as the bundled ``data/corpus``)::

    train/<lang>.txt.gz      one paragraph per line, UTF-8, gzip mtime=0
    probe/<lang>.txt.gz
    parallel.jsonl.gz        {"id": "<path>#<par id>", "en": ..., "fr": ..., ...}
    manifest.json            per file: sources (package, version), bytes, lines, sha256
    LICENSES.md

Command line: ``python -m data.corpus_builder --out DIR [--languages ...] [--debs DIR]
[--max-bytes-per-lang N] [--max-parallel-bytes N]`` (also ``plasticity data build``).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from data.html_text import dedup, extract_paragraphs, keep_paragraph
from data.langid import is_language
from trainer.errors import DataError

__all__ = [
    "DEFAULT_LANGUAGES",
    "DEFAULT_PROBE_LANGUAGES",
    "build_corpus",
    "main",
]

# Order of the reference protocol (en→zh→fr→ja→es→de→pt→ru), then vi (the probe
# language) and hi.
DEFAULT_LANGUAGES = ("en", "zh", "fr", "ja", "es", "de", "pt", "ru", "vi", "hi")
DEFAULT_PROBE_LANGUAGES = ("vi",)

# lang code -> (libreoffice-help package suffix, help directory name)
_LO_NAMES = {
    "en": ("en-us", "en-US"),
    "zh": ("zh-cn", "zh-CN"),
    "zh-tw": ("zh-tw", "zh-TW"),
    "pt-br": ("pt-br", "pt-BR"),
}
INSTALL_GUIDE_PKG = "installation-guide-amd64"
HANDBOOK_PKG = "debian-handbook"
# lang code -> directory name in the two probe packages
_GUIDE_DIRS = {"zh": "zh_CN"}
_HANDBOOK_DIRS = {
    "vi": "vi-VN", "en": "en-US", "fr": "fr-FR", "de": "de-DE", "es": "es-ES",
    "pt": "pt-BR", "ru": "ru-RU", "ja": "ja-JP", "zh": "zh-CN", "ar": "ar-MA",
    "fa": "fa-IR",
}

LICENSE_BY_PACKAGE = {
    "libreoffice-help": "MPL-2.0",
    INSTALL_GUIDE_PKG: "GPL-2.0-only",
    HANDBOOK_PKG: "GPL-2.0-or-later OR CC-BY-SA-3.0",
}


def lo_package(lang: str) -> str:
    return "libreoffice-help-" + _LO_NAMES.get(lang, (lang, lang))[0]


def lo_help_dir(lang: str) -> str:
    return _LO_NAMES.get(lang, (lang, lang))[1]


# ---------------------------------------------------------------- Debian packages


def _run(cmd: list[str], cwd: str | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]}: command not found (needed to build the corpus)") from None
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DataError(f"{' '.join(cmd)} failed: {msg}")
    return res.stdout


def find_deb(package: str, debs_dir: str) -> str | None:
    """Newest ``<package>_*.deb`` in ``debs_dir`` (None if there is none)."""
    cands = sorted(glob.glob(os.path.join(glob.escape(debs_dir), f"{package}_*.deb")))
    return cands[-1] if cands else None


def fetch_deb(package: str, debs_dir: str | None, download_dir: str) -> str:
    """Path of the .deb of ``package``: from ``debs_dir``, else ``apt-get download``."""
    if debs_dir:
        deb = find_deb(package, debs_dir)
        if deb:
            return deb
    os.makedirs(download_dir, exist_ok=True)
    deb = find_deb(package, download_dir)
    if deb:
        return deb
    _run(["apt-get", "download", package], cwd=download_dir)
    deb = find_deb(package, download_dir)
    if not deb:
        raise DataError(f"apt-get download {package}: no {package}_*.deb in {download_dir}")
    return deb


def deb_version(deb: str) -> str:
    return _run(["dpkg-deb", "-f", deb, "Version"]).strip()


def extract_deb(deb: str, dest: str) -> str:
    """``dpkg-deb -x`` (no install, no maintainer scripts) into ``dest``."""
    if not os.path.isdir(dest) or not os.listdir(dest):
        os.makedirs(dest, exist_ok=True)
        _run(["dpkg-deb", "-x", deb, dest])
    return dest


class PackageTree:
    """An extracted package: its root directory, name and version."""

    def __init__(self, name: str, root: str, version: str):
        self.name, self.root, self.version = name, root, version

    def source(self) -> dict:
        return {"package": self.name, "version": self.version}


def _html_files(root: str) -> list[str]:
    """Relative paths of all *.html under root, sorted (deterministic)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            if fn.endswith((".html", ".htm", ".xhtml")):
                out.append(os.path.relpath(os.path.join(dirpath, fn), root))
    return sorted(p.replace(os.sep, "/") for p in out)


def _read_html(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def page_paragraphs(root: str, lang: str, counts: dict | None = None):
    """Yield ``(relpath, par_id, text)`` of language-``lang`` paragraphs under ``root``.

    Keeps only paragraphs long enough and identified as ``lang``; no dedup here.
    ``counts`` (optional) receives "html_files", "extracted" (all non-empty paragraphs),
    "long_enough" and "right_language" totals.
    """
    counts = {} if counts is None else counts
    for key in ("html_files", "extracted", "long_enough", "right_language"):
        counts.setdefault(key, 0)
    for rel in _html_files(root):
        counts["html_files"] += 1
        for pid, text in extract_paragraphs(_read_html(os.path.join(root, rel))):
            counts["extracted"] += 1
            if not keep_paragraph(text):
                continue
            counts["long_enough"] += 1
            if is_language(text, lang):
                counts["right_language"] += 1
                yield rel, pid, text


# ------------------------------------------------------------------- writing files


def _stable_key(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


def write_gz_lines(path: str, lines) -> dict:
    """Write lines (one per line, UTF-8) gzip'ed reproducibly; return stats."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    raw = "".join(line + "\n" for line in lines).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return {
        "bytes": len(data),
        "raw_bytes": len(raw),
        "lines": raw.count(b"\n"),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _cap(items: list[tuple[str, str]], max_bytes: int | None) -> list[str]:
    """Deterministic cap: items are (order key, line); keep in key order until full."""
    items = sorted(items)
    out, total = [], 0
    for _, line in items:
        n = len(line.encode("utf-8")) + 1
        if max_bytes is not None and total + n > max_bytes:
            if total == 0:
                continue
            break
        out.append(line)
        total += n
    return out


def _licenses_md(trees: dict[str, PackageTree], probe_langs) -> str:
    lines = [
        "# Licences of the bundled corpus",
        "",
        "All text here was extracted from Debian (bookworm) binary packages with",
        "`apt-get download` + `dpkg-deb -x` (nothing installed) by `data/corpus_builder.py`.",
        "",
        "| package | version | licence | used for |",
        "|---|---|---|---|",
    ]
    for name in sorted(trees):
        t = trees[name]
        if name.startswith("libreoffice-help-"):
            lic, use = LICENSE_BY_PACKAGE["libreoffice-help"], "train/, parallel.jsonl.gz"
        else:
            lic, use = LICENSE_BY_PACKAGE.get(name, "see package copyright"), "probe/ only"
        lines.append(f"| {name} | {t.version} | {lic} | {use} |")
    lines += [
        "",
        "* **LibreOffice help** (`libreoffice-help-*`): Mozilla Public License 2.0",
        "  (https://mozilla.org/MPL/2.0/), copyright The Document Foundation and the",
        "  LibreOffice contributors; full terms in each package's",
        "  `/usr/share/doc/libreoffice-help-*/copyright`. The training shards and the",
        "  parallel pairs are paragraphs of this help text, unmodified except for",
        "  whitespace normalisation.",
        "* **Debian Installation Guide** (`installation-guide-amd64`): GNU General Public",
        "  License, version 2, copyright Bruce Perens, Sven Rudolph, Igor Grobman, James",
        "  Treacy, Adam Di Carlo, Chris Tillman and the Debian Installer team (1996-2023).",
        "* **The Debian Administrator's Handbook** (`debian-handbook`): GNU General Public",
        "  License version 2 or later, or CC-BY-SA 3.0, copyright Raphaël Hertzog and",
        "  Roland Mas (and translators).",
        "",
        f"The probe set (`probe/{'/'.join(probe_langs)}.txt.gz`) is GPL text taken from the",
        "Installation Guide and the Handbook. It is used **for evaluation only** (measuring",
        "loss on held-out text), is never mixed into training data, and is redistributed",
        "here under the GPL; its source is the Debian source packages of the same names",
        "and versions (`apt-get source installation-guide debian-handbook`).",
        "",
        "Full licence texts: `licenses/MPL-2.0` and `licenses/GPL-2` (copied from Debian's",
        "`/usr/share/common-licenses`).",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------- build


def _open_tree(package: str, debs_dir, work_dir, download_dir, trees) -> PackageTree:
    if package in trees:
        return trees[package]
    deb = fetch_deb(package, debs_dir, download_dir)
    root = extract_deb(deb, os.path.join(work_dir, "extract", package))
    tree = PackageTree(package, root, deb_version(deb))
    trees[package] = tree
    return tree


def build_corpus(
    out_dir: str,
    languages=DEFAULT_LANGUAGES,
    debs_dir: str | None = None,
    work_dir: str | None = None,
    max_bytes_per_lang: int | None = None,
    *,
    probe_languages=DEFAULT_PROBE_LANGUAGES,
    max_parallel_bytes: int | None = None,
    extracted: dict[str, str] | None = None,
    versions: dict[str, str] | None = None,
    log=None,
) -> dict:
    """Build the corpus into ``out_dir`` and return the manifest (also written).

    ``debs_dir``: directory of pre-downloaded ``<package>_*.deb`` files; packages not
    found there are fetched with ``apt-get download`` into ``work_dir/debs``.
    ``work_dir``: where packages are extracted (a temporary dir, removed afterwards, if
    None). ``max_bytes_per_lang`` caps each training shard (raw UTF-8 bytes; whole
    paragraphs, chosen deterministically by a hash of page path then paragraph order)
    and ``max_parallel_bytes`` the parallel file; the probe set is never capped.
    ``extracted`` maps package name -> already-extracted root (skips apt/dpkg; used by
    tests), with optional ``versions`` for them.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    languages = list(dict.fromkeys(languages))
    probe_languages = list(dict.fromkeys(probe_languages))
    if not languages:
        raise DataError("build_corpus: no languages given")
    tmp = None
    if work_dir is None:
        tmp = work_dir = tempfile.mkdtemp(prefix="plasticity-corpus-")
    download_dir = os.path.join(work_dir, "debs")
    trees: dict[str, PackageTree] = {}
    for name, root in (extracted or {}).items():
        trees[name] = PackageTree(name, root, (versions or {}).get(name, "unknown"))
    try:
        return _build(out_dir, languages, probe_languages, debs_dir, work_dir,
                      download_dir, trees, max_bytes_per_lang, max_parallel_bytes, log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _build(out_dir, languages, probe_languages, debs_dir, work_dir, download_dir, trees,
           max_bytes_per_lang, max_parallel_bytes, log) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    manifest: dict = {
        "format": "one paragraph per line, UTF-8, gzip (mtime=0)",
        "languages": languages,
        "probe_languages": probe_languages,
        "max_bytes_per_lang": max_bytes_per_lang,
        "max_parallel_bytes": max_parallel_bytes,
        "stats": {},
        "files": {},
    }
    # ---- training text (LibreOffice help), keeping (path, id) for the parallel pairs
    all_train: set[str] = set()
    aligned: dict[tuple[str, str], dict[str, str]] = {}
    for lang in languages:
        pkg = lo_package(lang)
        tree = _open_tree(pkg, debs_dir, work_dir, download_dir, trees)
        text_root = os.path.join(tree.root, "usr/share/libreoffice/help", lo_help_dir(lang), "text")
        if not os.path.isdir(text_root):
            raise DataError(f"{pkg}: no help text directory {text_root}")
        seen: set[str] = set()
        items = []
        counts: dict = {}
        for rel, pid, text in page_paragraphs(text_root, lang, counts):
            if pid:
                aligned.setdefault((rel, pid), {}).setdefault(lang, text)
            if text in seen:
                continue
            seen.add(text)
            items.append(((_stable_key(rel), rel, len(items)), text))
        all_train |= seen
        full_bytes = sum(len(t.encode("utf-8")) + 1 for _, t in items)
        lines = _cap([((k[0], k[1], k[2]), t) for k, t in items], max_bytes_per_lang)
        rel_out = f"train/{lang}.txt.gz"
        stats = write_gz_lines(os.path.join(out_dir, rel_out), lines)
        manifest["files"][rel_out] = {"sources": [tree.source()], **stats}
        manifest["stats"][f"train/{lang}"] = {
            **counts,
            "paragraphs_after_dedup": len(items),
            "bytes_after_dedup": full_bytes,
            "paragraphs_after_cap": len(lines),
            "bytes_after_cap": stats["raw_bytes"],
        }
        log(f"train/{lang}: {len(items)} paragraphs, {full_bytes} B after dedup; "
            f"{len(lines)} paragraphs, {stats['raw_bytes']} B written")

    # ---- probe set (installation guide + handbook), disjoint from all training text
    for lang in probe_languages:
        sources = []
        paras: list[str] = []
        counts = {}
        guide = _open_tree(INSTALL_GUIDE_PKG, debs_dir, work_dir, download_dir, trees)
        book = _open_tree(HANDBOOK_PKG, debs_dir, work_dir, download_dir, trees)
        for tree, sub in (
            (guide, f"usr/share/doc/{INSTALL_GUIDE_PKG}/{_GUIDE_DIRS.get(lang, lang)}"),
            (book, f"usr/share/doc/{HANDBOOK_PKG}/html/{_HANDBOOK_DIRS.get(lang, lang)}"),
        ):
            root = os.path.join(tree.root, sub)
            if not os.path.isdir(root):
                log(f"probe/{lang}: {tree.name} has no {sub}, skipped")
                continue
            sources.append(tree.source())
            paras.extend(text for _, _, text in page_paragraphs(root, lang, counts))
        uniq = dedup(paras)
        probe = [p for p in uniq if p not in all_train]
        if not probe:
            raise DataError(f"probe/{lang}: no {lang} paragraphs found in the probe packages")
        rel_out = f"probe/{lang}.txt.gz"
        stats = write_gz_lines(os.path.join(out_dir, rel_out), probe)
        manifest["files"][rel_out] = {"sources": sources, **stats}
        manifest["stats"][f"probe/{lang}"] = {
            **counts,
            "paragraphs_after_dedup": len(uniq),
            "dropped_as_in_training": len(uniq) - len(probe),
            "paragraphs_written": len(probe),
            "bytes_written": stats["raw_bytes"],
        }
        log(f"probe/{lang}: {len(probe)} paragraphs, {stats['raw_bytes']} B "
            f"({len(uniq) - len(probe)} dropped as also in training)")

    # ---- parallel pairs: (path, id) present in >= 2 languages
    order = {lang: i for i, lang in enumerate(languages)}
    records = []
    for (rel, pid), by_lang in aligned.items():
        if len(by_lang) < 2:
            continue
        rid = f"{rel}#{pid}"
        rec = {"id": rid}
        for lang in sorted(by_lang, key=order.__getitem__):
            rec[lang] = by_lang[lang]
        records.append((_stable_key(rid), json.dumps(rec, ensure_ascii=False, sort_keys=False)))
    n_full = len(records)
    full_bytes = sum(len(r.encode("utf-8")) + 1 for _, r in records)
    lines = _cap(records, max_parallel_bytes)
    stats = write_gz_lines(os.path.join(out_dir, "parallel.jsonl.gz"), lines)
    manifest["files"]["parallel.jsonl.gz"] = {
        "sources": [trees[lo_package(lang)].source() for lang in languages], **stats,
    }
    manifest["stats"]["parallel"] = {
        "records_before_cap": n_full, "bytes_before_cap": full_bytes,
        "records_after_cap": len(lines), "bytes_after_cap": stats["raw_bytes"],
    }
    log(f"parallel: {n_full} records ({full_bytes} B); {len(lines)} written")

    # ---- licences + manifest
    lic = _licenses_md(trees, probe_languages).encode("utf-8")
    with open(os.path.join(out_dir, "LICENSES.md"), "wb") as f:
        f.write(lic)
    texts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "licenses")
    if os.path.abspath(out_dir) != os.path.dirname(texts):  # the full licence texts LICENSES.md points to
        shutil.copytree(texts, os.path.join(out_dir, "licenses"), dirs_exist_ok=True)
    manifest["files"]["LICENSES.md"] = {
        "sources": [], "bytes": len(lic), "raw_bytes": len(lic),
        "lines": lic.count(b"\n"), "sha256": hashlib.sha256(lic).hexdigest(),
    }
    manifest["files"] = dict(sorted(manifest["files"].items()))
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return manifest


# --------------------------------------------------------------------------- CLI


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="plasticity data build",
        description="Build the multilingual corpus from Debian documentation packages "
                    "(apt-get download + dpkg-deb -x; nothing is installed).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES),
                   help="training languages (default: %(default)s)")
    p.add_argument("--probe-languages", nargs="+", default=list(DEFAULT_PROBE_LANGUAGES),
                   help="held-out probe languages (default: %(default)s)")
    p.add_argument("--debs", default=None, help="directory of pre-downloaded .deb files")
    p.add_argument("--work-dir", default=None,
                   help="where to download/extract packages (default: a temp dir)")
    p.add_argument("--max-bytes-per-lang", type=int, default=None,
                   help="cap on raw UTF-8 bytes per training shard (default: no cap)")
    p.add_argument("--max-parallel-bytes", type=int, default=None,
                   help="cap on raw bytes of parallel.jsonl (default: no cap)")
    return p


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        build_corpus(args.out, args.languages, debs_dir=args.debs, work_dir=args.work_dir,
                     max_bytes_per_lang=args.max_bytes_per_lang,
                     probe_languages=args.probe_languages,
                     max_parallel_bytes=args.max_parallel_bytes)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
