"""A small, self-contained, deterministic language identifier.

No model, no dependency: Unicode-script rules decide the non-Latin languages and
stopword / diacritic evidence decides between the Latin-script ones.

    >>> identify("Đóng hộp thoại và áp dụng các thay đổi.")
    'vi'
    >>> identify("Closes the dialog and applies the changes.")
    'en'

Supported codes: en, fr, de, es, pt, vi (Latin script); ru, uk (Cyrillic); ja (kana,
possibly with Han), zh (Han without kana), ko (Hangul), hi (Devanagari), ar, fa (Arabic
script). ``identify`` returns ``None`` when the evidence is too weak (numbers, code,
file names, a lone product name) -- callers that filter corpora should drop those.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["identify", "is_language", "SUPPORTED_LANGUAGES", "script_counts"]

SUPPORTED_LANGUAGES = (
    "en", "fr", "de", "es", "pt", "vi", "ru", "uk", "ja", "zh", "ko", "hi", "ar", "fa",
)

# ---------------------------------------------------------------------------- scripts

_LATIN, _CYRILLIC, _HAN, _KANA, _HANGUL, _DEVANAGARI, _ARABIC, _OTHER = (
    "latin", "cyrillic", "han", "kana", "hangul", "devanagari", "arabic", "other",
)


def _script(ch: str) -> str | None:
    """Script of one character, or None for non-letters (digits, punctuation, space)."""
    cp = ord(ch)
    if cp < 0x80:
        return _LATIN if ch.isalpha() else None
    if 0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF or 0xFF66 <= cp <= 0xFF9D:
        # Hiragana, Katakana (incl. the prolonged-sound mark), half-width katakana.
        return _KANA
    if (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF
            or 0x20000 <= cp <= 0x2FA1F):
        return _HAN
    if 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F:
        return _HANGUL
    if 0x0400 <= cp <= 0x052F:
        return _CYRILLIC if ch.isalpha() else None
    if 0x0900 <= cp <= 0x097F:
        # Devanagari vowel signs are category Mn/Mc, not alpha: count them anyway.
        return _DEVANAGARI if unicodedata.category(ch)[0] in "LM" else None
    if 0x0600 <= cp <= 0x06FF or 0x0750 <= cp <= 0x077F or 0xFB50 <= cp <= 0xFEFF:
        return _ARABIC if unicodedata.category(ch)[0] in "LM" else None
    if ch.isalpha():
        if 0x00C0 <= cp <= 0x024F or 0x1E00 <= cp <= 0x1EFF:
            return _LATIN
        return _OTHER
    return None


# Scripts whose characters are words of their own (no spaces between words).
_CHAR_TOKEN_SCRIPTS = (_HAN, _KANA)


def script_counts(text: str) -> dict[str, int]:
    """Token counts per script: one per character for Han/kana, one per word otherwise."""
    counts: dict[str, int] = {}
    prev = None
    for ch in text:
        s = _script(ch)
        if s is None:
            prev = None
            continue
        if s in _CHAR_TOKEN_SCRIPTS or s != prev:
            counts[s] = counts.get(s, 0) + 1
        prev = s
    return counts


# ---------------------------------------------------------------------- Latin evidence

# Characters that only Vietnamese uses among the supported languages: the whole Latin
# Extended Additional block (U+1EA0..U+1EF9: ạ ả ấ ầ ẩ ẫ ậ ắ ... ỹ) plus ă đ ơ ư.
_VI_CHARS = set("ăâđêôơưĂÂĐÊÔƠƯ") - set("âêôÂÊÔ")  # â ê ô are also French/Portuguese
_VI_CHARS |= {chr(c) for c in range(0x1EA0, 0x1EFA)}

_CHAR_HINTS = {
    "fr": set("éèêëàâçîïôûùœ"),
    "de": set("äöüß"),
    "es": set("ñáíóú¿¡"),
    "pt": set("ãõçáâêóôíú"),
}

_STOPWORDS = {
    "en": """the of and to in is that for it with as on are be this by or a an you can
        from which if not your when will at have all has click select choose use these
        then into its was were also their been only other more there such than enter""",
    "fr": """le la les de des du et est un une pour dans que qui sur par au aux avec
        vous pas ce cette ces ou sont se son sa ses être peut cliquez sélectionnez
        lorsque leur plus tout tous où ne ainsi si comme entre""",
    "de": """der die das und ist ein eine einer einen nicht mit zu den von im auf für
        sie dem des sich auch wird werden oder wenn bei aus dass kann können klicken
        wählen hier diese dieser noch nur wie zum zur über""",
    "es": """el la los las de del y en es un una que para con por se al lo como más
        está son pero sus su este esta cuando puede haga pulse seleccione hay entre
        también sobre donde desde no y hasta mismo muy sin nuevo nueva otro otra
        usar utilice elija""",
    "pt": """o a os as de do da dos das e em um uma que para com por se no na nos nas
        ao é não mais como são está pode seu sua seus suas este esta quando clique
        selecione também entre pelo pela sobre onde ou até você seja mesmo sem
        novo nova outro outra usar utilize escolha""",
    "vi": """và của các là có được trong này cho một những không với để bạn khi từ
        trên theo đã sẽ hoặc nếu thì nhưng cũng như vào hay đó""",
}
_STOPWORDS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}
# Spelling patterns of content words (regexes on one lowercase word): each matching word
# adds half a point. They carry the short UI strings that have few function words.
_WORD_PATTERNS = {
    "en": re.compile(r"^th|^wh|ing$|ght|ly$|^un[a-z]|ed$|ness$|ies$"),
    "fr": re.compile(r"eau|aux$|oi|ou[^s]|^[ldjnscm]'|é$|ée?s?$|^qu|ment$|eur|[èêç]"),
    "de": re.compile(r"sch|ung$|ungen$|ei|[äöüß]|^ge|keit|lich|^zu|^ver|tz|ck"),
    "es": re.compile(r"ción$|ciones$|ñ|^ll|[^q]ue|ie|dad$|os$|as$|ía$|ado$|ada$"),
    "pt": re.compile(r"ção$|ções$|ão$|ões$|nh|lh|[ãõç]|ado$|ada$|os$|as$|ia$|ém$"),
}

_STOPWORD_OWNERS: dict[str, tuple[str, ...]] = {}
for _lang, _words in _STOPWORDS.items():
    for _w in _words:
        _STOPWORD_OWNERS[_w] = _STOPWORD_OWNERS.get(_w, ()) + (_lang,)

_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)

_LATIN_LANGS = ("en", "fr", "de", "es", "pt", "vi")  # tie-break order


def _identify_latin(text: str) -> str | None:
    words = _WORD_RE.findall(text.lower())
    if not words:
        return None
    # Vietnamese: its own letters are decisive once they cover a real share of words, unless English
    # function words dominate: untranslated English that quotes a Vietnamese title ("See Phần 6.4, ...").
    vi_words = sum(1 for w in words if any(c in _VI_CHARS for c in w))
    en_function = sum(1 for w in words if w in _STOPWORDS["en"] and w != "a")  # "a" also labels cells: A1
    vi_function = sum(1 for w in words if w in _STOPWORDS["vi"])
    english = en_function >= max(2, 0.15 * len(words)) and en_function > 2 * vi_function
    if vi_words >= 1 and vi_words >= 0.15 * len(words) and not english:
        return "vi"

    scores = {lang: 0.0 for lang in _LATIN_LANGS}
    for w in words:
        owners = _STOPWORD_OWNERS.get(w)
        if owners:
            # A word shared by k languages ("de", "la", "in", "a") is worth 1/k to each.
            for lang in owners:
                scores[lang] += 1.0 / len(owners)
    has_stopword = {lang for lang, sc in scores.items() if sc > 0}
    for w in words:
        if len(w) < 4:  # "as", "os", "ei" are function words, handled above
            continue
        for lang, pat in _WORD_PATTERNS.items():
            if pat.search(w):
                scores[lang] += 0.5
    chars = set(text.lower())
    for lang, hint in _CHAR_HINTS.items():
        # Half a point per distinct hinting character: diacritics break stopword ties
        # (es vs pt share most function words) but never outvote real evidence.
        scores[lang] += 0.5 * len(chars & hint)
    # Plain ASCII with real English function words leans English (untranslated UI strings).
    if scores["en"] >= 1.0 and not any(ord(c) > 0x7F for c in text):
        scores["en"] += 0.5
    if vi_words:
        scores["vi"] += 0.5 * vi_words

    best = max(_LATIN_LANGS, key=lambda lang: (scores[lang], -_LATIN_LANGS.index(lang)))
    ranked = sorted(scores.values(), reverse=True)
    if ranked[0] < 1.0 or ranked[0] == ranked[1]:
        return None
    # Spelling patterns alone cannot name a language in plain ASCII (identifier lists
    # such as "DateField, TimeField" would look German or Spanish).
    if best not in has_stopword and all(ord(c) < 0x80 for c in text):
        return None
    # Long text needs more than one stray function word.
    if len(words) >= 12 and ranked[0] < 2.0:
        return None
    return best


# --------------------------------------------------------------------------- public


def identify(text: str) -> str | None:
    """Best-guess language code of ``text``, or None when the evidence is too weak."""
    if not text:
        return None
    counts = script_counts(text)
    if not counts:
        return None
    total = sum(counts.values())
    cjk = counts.get(_HAN, 0) + counts.get(_KANA, 0)
    if cjk >= 2 and cjk >= 0.5 * total:
        # Any kana means Japanese; Chinese has no kana. A lone kana (e.g. a katakana
        # middle dot) in long Han text is not enough.
        kana = counts.get(_KANA, 0)
        if kana >= 1 and (kana >= 2 or cjk < 20):
            return "ja"
        return "zh"
    dominant = max(counts, key=lambda s: (counts[s], s))
    if counts[dominant] < 0.5 * total:
        return None
    if dominant == _CYRILLIC:
        return "uk" if any(c in "іїєґІЇЄҐ" for c in text) else "ru"
    if dominant == _DEVANAGARI:
        return "hi"
    if dominant == _HANGUL:
        return "ko"
    if dominant == _ARABIC:
        return "fa" if any(c in "پچژگکی" for c in text) else "ar"
    if dominant == _LATIN:
        return _identify_latin(text)
    return None


def is_language(text: str, lang: str) -> bool:
    """True when ``text`` is identified as ``lang`` (regional suffixes ignored: zh-CN)."""
    base = lang.replace("_", "-").split("-")[0].lower()
    return identify(text) == base
