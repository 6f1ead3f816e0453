"""Paragraph text from HTML help pages: extraction, whitespace normalisation, length filter, exact dedup.

Used by :mod:`data.corpus_builder` on the LibreOffice help and Debian documentation pages; stdlib only.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["normalize_ws", "extract_paragraphs", "keep_paragraph", "dedup"]

_WS_RE = re.compile(r"\s+")


def normalize_ws(text: str) -> str:
    """Collapse every whitespace run (incl. NBSP, newlines, tabs) to one space; strip."""
    return _WS_RE.sub(" ", text.replace("\u00a0", " ")).strip()


# Elements whose text is boilerplate or code, skipped with everything inside them.
_SKIP_TAGS = frozenset({
    "script", "style", "nav", "header", "footer", "aside", "noscript", "head",
    "title", "pre", "button", "select", "textarea", "svg", "math", "template",
})
# Classes/ids of navigation boilerplate in the DocBook / Publican / LibreOffice pages.
_SKIP_CLASSES = frozenset({
    "navheader", "navfooter", "docnav", "toc", "banner", "debug", "list-of-tables",
    "list-of-figures", "list-of-examples", "bascode", "programlisting", "screen",
})
# Elements that start a new paragraph.
_BLOCK_TAGS = frozenset({
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th", "dt", "dd", "div",
    "blockquote", "caption", "figcaption", "section", "article", "main", "body",
    "table", "tr", "ul", "ol", "dl", "form", "fieldset", "legend", "address",
})
# Void elements never get an end tag.
_VOID_TAGS = frozenset({
    "br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed",
    "param", "source", "track", "wbr",
})


class _ParagraphParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str | None, str]] = []
        # stack of [tag, id, text parts, skipping]
        self._stack: list[list] = []
        self._skip_depth = 0  # >0 while inside a skipped element

    def _flush(self, frame: list) -> None:
        text = normalize_ws("".join(frame[2]))
        frame[2] = []
        if text:
            self.paragraphs.append((frame[1], text))

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_TAGS:
            if tag == "br" and self._stack and not self._skip_depth:
                self._stack[-1][2].append(" ")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").lower().split())
        elem_id = (a.get("id") or "").lower()
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) or elem_id in _SKIP_CLASSES
        if self._skip_depth or skip:
            # Track nesting of the same tag so the matching end tag closes the skip.
            self._stack.append([tag, None, [], True])
            self._skip_depth += 1
            return
        if tag in _BLOCK_TAGS:
            if self._stack:
                self._flush(self._stack[-1])
            # An un-id'd block does not inherit its parent's id.
            self._stack.append([tag, a.get("id"), [], False])
        # Inline tags (span, a, em, code...) just contribute their text.

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS:
            return
        # Close back to the most recent open element with this tag, if any.
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                break
        else:
            return
        while len(self._stack) > i:
            frame = self._stack.pop()
            if frame[3]:
                self._skip_depth -= 1
            else:
                self._flush(frame)

    def handle_data(self, data):
        if self._skip_depth or not self._stack:
            return
        self._stack[-1][2].append(data)

    def close(self):
        super().close()
        while self._stack:
            frame = self._stack.pop()
            if not frame[3]:
                self._flush(frame)


def extract_paragraphs(html: str) -> list[tuple[str | None, str]]:
    """Paragraphs of an HTML page as ``(id or None, whitespace-normalised text)``.

    Block elements (p, h1-h6, li, td, div, ...) delimit paragraphs; inline markup is
    flattened into its paragraph; script/style/nav/header/footer/aside/pre and known
    navigation classes are skipped. Empty paragraphs are dropped, short ones are not
    (see :func:`keep_paragraph`).
    """
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def _is_cjk_heavy(text: str) -> bool:
    n = sum(1 for c in text if "\u3040" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af")
    return n >= 0.3 * len(text)


def keep_paragraph(text: str, min_chars: int = 20, min_chars_cjk: int = 8) -> bool:
    """Drop very short fragments (menu labels, single words, bare numbers)."""
    if _is_cjk_heavy(text):
        return len(text) >= min_chars_cjk
    return len(text) >= min_chars and len(text.split()) >= 3


def dedup(paragraphs, seen: set | None = None) -> list[str]:
    """Exact dedup after whitespace normalisation; keeps first occurrences in order."""
    seen = set() if seen is None else seen
    out = []
    for p in paragraphs:
        p = normalize_ws(p)
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out
