"""Tests of the multilingual corpus: HTML extraction, langid, dedup, the builder on a fake
package tree, the bundled corpus in data/corpus and the loader's errors. No apt, no network."""

import gzip
import hashlib
import json
import os

import pytest

from data import corpus
from data.corpus_builder import build_corpus, write_gz_lines
from data.html_text import dedup, extract_paragraphs, keep_paragraph, normalize_ws
from data.langid import identify, is_language
from trainer.errors import DataError

BUNDLED_LANGS = ["en", "zh", "fr", "ja", "es", "de", "pt", "ru", "vi", "hi"]


# --------------------------------------------------------------------- extraction

HTML = """<!DOCTYPE html>
<html lang="vi"><head><title>Tiêu đề không lấy</title>
<style>p { color: red }</style><script>var x = "script text";</script></head>
<body>
<header><p>LibreOffice 7.4 Help</p></header>
<nav><ul><li>Navigation item one two three</li></ul></nav>
<div id="DisplayArea">
<h1 id="hd_id1" dir="auto">Sửa  Mục nhập
   Thư tịch</h1>
<p id="par_id2" class="paragraph"><a name="x"></a><span class="avis">Edits the selected
bibliography entry.</span></p>
<p id="par_id3">Mở hộp thoại <a href="x.html">Xác định&nbsp;Mục nhập</a>, trong đó bạn có thể
tạo một mục nhập mới.<br>Dòng thứ hai.</p>
<ul><li>First item text<li>Second item text</ul>
<pre>$ apt-get install code-not-prose</pre>
<div class="navfooter"><table><tr><td>Prev chapter link text</td></tr></table></div>
</div>
<footer><p>This page is: /text/swriter/01/02130000.xhp</p></footer>
</body></html>"""


def test_extract_paragraphs_keeps_ids_and_skips_boilerplate():
    paras = extract_paragraphs(HTML)
    assert paras == [
        ("hd_id1", "Sửa Mục nhập Thư tịch"),
        ("par_id2", "Edits the selected bibliography entry."),
        ("par_id3", "Mở hộp thoại Xác định Mục nhập, trong đó bạn có thể tạo một mục nhập mới. "
                    "Dòng thứ hai."),
        (None, "First item text"),
        (None, "Second item text"),
    ]
    joined = " ".join(t for _, t in paras)
    for boiler in ("script text", "color", "Tiêu đề", "LibreOffice 7.4 Help", "Navigation",
                   "code-not-prose", "Prev chapter", "This page is"):
        assert boiler not in joined


def test_nested_blocks_split_paragraphs():
    paras = extract_paragraphs("<div>Outer text before <p id='a'>inner para</p> outer after</div>")
    assert paras == [(None, "Outer text before"), ("a", "inner para"), (None, "outer after")]


def test_normalize_ws_and_short_fragments():
    assert normalize_ws("  a\u00a0b\n\t c  ") == "a b c"
    assert not keep_paragraph("Menu Format")
    assert not keep_paragraph("12345")
    assert keep_paragraph("Choose Format - Cells - Numbers.")
    assert keep_paragraph("选择「格式 - 单元格」。")  # CJK needs fewer characters
    assert not keep_paragraph("格式")


def test_dedup_is_exact_after_whitespace_normalisation():
    got = dedup(["Hello  world here", "Hello world here", "hello world here", " Hello world here\n", ""])
    assert got == ["Hello world here", "hello world here"]


# -------------------------------------------------------------------------- langid

SENTENCES = {
    "en": "Select the cells that you want to format and then click the button.",
    "fr": "Sélectionnez les cellules que vous voulez mettre en forme, puis cliquez sur le bouton.",
    "de": "Wählen Sie die Zellen aus, die Sie formatieren möchten, und klicken Sie auf die Schaltfläche.",
    "es": "Seleccione las celdas a las que desea aplicar formato y haga clic en el botón.",
    "pt": "Selecione as células que deseja formatar e clique no botão.",
    "vi": "Chọn các ô bạn muốn định dạng rồi nhấn vào nút.",
    "ru": "Выделите ячейки, которые нужно отформатировать, и нажмите кнопку.",
    "ja": "書式設定するセルを選択して、ボタンをクリックします。",
    "zh": "选择要设置格式的单元格，然后单击按钮。",
    "hi": "उन कक्षों को चुनें जिन्हें आप फ़ॉर्मेट करना चाहते हैं और फिर बटन पर क्लिक करें।",
    "ar": "حدد الخلايا التي تريد تنسيقها ثم انقر فوق الزر.",
    "fa": "سلول‌هایی را که می‌خواهید قالب‌بندی کنید انتخاب کنید و سپس روی دکمه کلیک کنید.",
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_langid_known_sentences(lang):
    assert identify(SENTENCES[lang]) == lang
    assert is_language(SENTENCES[lang], lang)


def test_langid_more_cases():
    # Untranslated English inside the Vietnamese help is not Vietnamese.
    assert not is_language("Edits the selected bibliography entry.", "vi")
    assert identify("Specifies whether to select a text box by clicking the text.") == "en"
    # English quoting a Vietnamese cross-reference title (found in the Installation Guide probe) is English...
    assert identify("If firmware is needed, the installer will prompt you to load firmware. See Phần 6.4, "
                    "“Nạp phần vững bị thiếu” for detailed information on how to load firmware.") == "en"
    assert identify("These concepts are discussed in greater detail in Chương 5, Hệ thống gói: Công cụ và "
                    "Nguyên tắc cơ bản.") == "en"
    # ...while Vietnamese with a stray English word or cell names stays Vietnamese.
    assert identify("Chọn lệnh Xem > Phóng to.") == "vi"
    assert identify("Giả sử nội dung ô là A1=-10000, A2=3500, A3=7600 và A4=1000, công thức =IRR(A1:A4) "
                    "trả về kết quả 80,24%.") == "vi"
    # One decisive Vietnamese word in a short heading is enough.
    assert identify("Phân tích câu lệnh SQL") == "vi"
    assert identify("Chèn Tham Chiếu Chéo") == "vi"
    # Han without kana is Chinese; kana makes it Japanese.
    assert identify("打开对话框") == "zh"
    assert identify("ダイアログを開きます") == "ja"
    assert is_language("选择要设置格式的单元格。", "zh-CN")
    # No evidence: code, numbers, identifier lists.
    for junk in ("", "12345 678", "=SUM(A1:B2)", "DateField, TimeField, FormattedField"):
        assert identify(junk) is None, junk


# ------------------------------------------------------------- builder end to end


def _page(lang, paras):
    body = "\n".join(f'<p id="{pid}" class="paragraph">{text}</p>' for pid, text in paras)
    return (f'<html lang="{lang}"><head><title>t</title></head><body>'
            f'<header><p>LibreOffice Help header</p></header><div id="DisplayArea">{body}</div>'
            f'<footer><p>This page is: debug footer info</p></footer></body></html>')


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


EN_1 = "Choose the menu command to open the dialog."
EN_2 = "Specifies the width of the selected column."
FR_1 = "Choisissez la commande du menu pour ouvrir la boîte de dialogue."
VI_1 = "Chọn lệnh trong trình đơn để mở hộp thoại."
VI_2 = "Xác định độ rộng của cột đã chọn."
VI_SHARED = "Đây là một đoạn văn có trong cả dữ liệu huấn luyện và tập thăm dò."
PROBE_1 = "Trình cài đặt sẽ tự động phát hiện phần cứng của bạn trong nhiều trường hợp."
PROBE_2 = "Bạn nên sao lưu mọi dữ liệu trên đĩa cứng trước khi cài đặt."


@pytest.fixture()
def fake_tree(tmp_path):
    roots = {}

    def lo(pkg, helpdir, lang, pages):
        root = tmp_path / "extract" / pkg
        for rel, paras in pages.items():
            _write(str(root / "usr/share/libreoffice/help" / helpdir / "text" / rel), _page(lang, paras))
        roots[pkg] = str(root)

    lo("libreoffice-help-en-us", "en-US", "en", {
        "shared/01/a.html": [("par_1", EN_1), ("par_2", EN_2)],
        "swriter/b.html": [("par_9", EN_1)],  # duplicate paragraph on another page
    })
    lo("libreoffice-help-fr", "fr", "fr", {
        "shared/01/a.html": [("par_1", FR_1), ("par_2", EN_2)],  # par_2 untranslated
    })
    lo("libreoffice-help-vi", "vi", "vi", {
        "shared/01/a.html": [("par_1", VI_1), ("par_2", VI_2)],
        "swriter/b.html": [("par_9", "Choose the menu command to open the dialog."),  # English
                           ("par_10", VI_SHARED)],
    })
    guide = tmp_path / "extract" / "installation-guide-amd64"
    _write(str(guide / "usr/share/doc/installation-guide-amd64/vi/ch01.html"),
           f"<html><body><div class='navheader'><p>Chương trước tiếp theo đây</p></div>"
           f"<p>{PROBE_1}</p><p>{VI_SHARED}</p><p>The Debian Wiki hardware page is here.</p>"
           f"<pre>Mã nguồn không phải văn xuôi</pre></body></html>")
    _write(str(guide / "usr/share/doc/installation-guide-amd64/en/ch01.html"),
           "<html><body><p>English guide text is not probe material.</p></body></html>")
    roots["installation-guide-amd64"] = str(guide)
    book = tmp_path / "extract" / "debian-handbook"
    _write(str(book / "usr/share/doc/debian-handbook/html/vi-VN/apt.html"),
           f"<html><body><div class='para'>{PROBE_2}</div><div class='para'>{PROBE_1}</div>"
           f"</body></html>")
    roots["debian-handbook"] = str(book)
    return roots


def _gz_lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def test_builder_end_to_end_on_fake_tree(fake_tree, tmp_path):
    out = tmp_path / "out"
    versions = {k: "1.0-1" for k in fake_tree}
    manifest = build_corpus(str(out), ["en", "fr", "vi"], work_dir=str(tmp_path / "work"),
                            extracted=fake_tree, versions=versions, log=lambda m: None)
    assert sorted(_gz_lines(out / "train/en.txt.gz")) == sorted([EN_1, EN_2])  # deduped
    assert _gz_lines(out / "train/fr.txt.gz") == [FR_1]  # untranslated English dropped
    assert sorted(_gz_lines(out / "train/vi.txt.gz")) == sorted([VI_1, VI_2, VI_SHARED])
    # Probe: vi only, deduped across both packages, minus what training already has.
    assert sorted(_gz_lines(out / "probe/vi.txt.gz")) == sorted([PROBE_1, PROBE_2])
    assert manifest["stats"]["probe/vi"]["dropped_as_in_training"] == 1
    # Parallel: aligned on (path, id); only paragraphs identified as their language.
    rows = [json.loads(line) for line in _gz_lines(out / "parallel.jsonl.gz")]
    by_id = {r["id"]: r for r in rows}
    assert by_id["shared/01/a.html#par_1"] == {"id": "shared/01/a.html#par_1", "en": EN_1,
                                               "fr": FR_1, "vi": VI_1}
    assert by_id["shared/01/a.html#par_2"] == {"id": "shared/01/a.html#par_2", "en": EN_2, "vi": VI_2}
    assert "swriter/b.html#par_9" not in by_id  # only English there
    # Manifest: versions and hashes; files reproducible byte for byte.
    assert manifest["files"]["train/vi.txt.gz"]["sources"] == [
        {"package": "libreoffice-help-vi", "version": "1.0-1"}]
    for rel, meta in manifest["files"].items():
        with open(out / rel, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == meta["sha256"]
    out2 = tmp_path / "out2"
    build_corpus(str(out2), ["en", "fr", "vi"], work_dir=str(tmp_path / "work"),
                 extracted=fake_tree, versions=versions, log=lambda m: None)
    for rel in manifest["files"]:
        assert (out / rel).read_bytes() == (out2 / rel).read_bytes(), rel
    # The loader reads what the builder wrote.
    assert corpus.available_languages(str(out)) == ["en", "fr", "vi"]
    assert corpus.load_texts("fr", str(out)) == [FR_1]
    assert len(corpus.load_parallel(str(out))) == 2


def test_builder_caps_bytes_deterministically(fake_tree, tmp_path):
    out = tmp_path / "capped"
    cap = len(VI_1.encode()) + len(VI_SHARED.encode()) + 1
    m = build_corpus(str(out), ["en", "fr", "vi"], extracted=fake_tree, max_bytes_per_lang=cap,
                     work_dir=str(tmp_path / "w"), log=lambda m: None)
    st = m["stats"]["train/vi"]
    assert st["paragraphs_after_dedup"] == 3
    assert st["bytes_after_cap"] <= cap and 1 <= st["paragraphs_after_cap"] < 3
    # The probe set is never capped.
    assert len(_gz_lines(out / "probe/vi.txt.gz")) == 2


def test_builder_cli_reports_missing_help_dir(tmp_path, capsys):
    from data.corpus_builder import main
    empty = tmp_path / "debs"
    empty.mkdir()
    with pytest.raises(DataError, match="no help text directory"):
        build_corpus(str(tmp_path / "o"), ["en"], extracted={"libreoffice-help-en-us": str(empty)},
                     work_dir=str(tmp_path / "w"), log=lambda m: None)
    with pytest.raises(SystemExit):
        main(["--help"])


# ------------------------------------------------------------------ bundled corpus


def test_bundled_corpus_has_every_language():
    assert set(BUNDLED_LANGS) <= set(corpus.available_languages())
    assert corpus.available_languages()[:8] == ["en", "zh", "fr", "ja", "es", "de", "pt", "ru"]
    for lang in BUNDLED_LANGS:
        texts = corpus.load_texts(lang)
        assert len(texts) > 1000, lang
        assert all(t and t == normalize_ws(t) for t in texts), lang
        assert len(set(texts)) == len(texts), f"{lang}: duplicate lines"
        # Spot-check the language filter on a deterministic sample.
        sample = texts[:: max(1, len(texts) // 200)]
        ok = sum(is_language(t, lang) for t in sample)
        assert ok == len(sample), lang
    assert corpus.available_languages(split="probe") == ["vi"]


def test_bundled_probe_disjoint_from_training():
    probe = corpus.load_texts("vi", split="probe")
    assert len(probe) > 500
    probe_set = set(probe)
    for lang in BUNDLED_LANGS:
        assert not probe_set & set(corpus.load_texts(lang)), lang


def test_bundled_files_are_utf8_and_match_manifest():
    d = corpus.DEFAULT_CORPUS_DIR
    with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    files = manifest["files"]
    assert {f"train/{lang}.txt.gz" for lang in BUNDLED_LANGS} | {
        "probe/vi.txt.gz", "parallel.jsonl.gz", "LICENSES.md"} <= set(files)
    total = 0
    for rel, meta in files.items():
        with open(os.path.join(d, rel), "rb") as f:
            data = f.read()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], rel
        assert len(data) == meta["bytes"], rel
        raw = gzip.decompress(data) if rel.endswith(".gz") else data
        raw.decode("utf-8")  # raises if not UTF-8
        assert raw.count(b"\n") == meta["lines"], rel
        if rel.endswith(".gz"):
            assert data[4:8] == b"\0\0\0\0", f"{rel}: gzip mtime must be 0"
        if rel != "LICENSES.md":
            assert meta["sources"], rel
    assert total <= 4_000_000


def test_bundled_licence_texts():
    """GPL-2 section 1 and MPL-2.0 section 3.1 require a copy of the licence next to the redistributed text."""
    d = corpus.DEFAULT_CORPUS_DIR
    notice = open(os.path.join(d, "LICENSES.md"), encoding="utf-8").read()
    for name, title in (("GPL-2", "GNU GENERAL PUBLIC LICENSE"), ("MPL-2.0", "Mozilla Public License Version 2.0")):
        assert f"licenses/{name}" in notice
        with open(os.path.join(d, "licenses", name), encoding="utf-8") as f:
            assert title in f.read(200)


def test_bundled_parallel_pairs():
    rows = corpus.load_parallel()
    assert len(rows) > 500
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    langs_seen = set()
    for r in rows:
        langs = [k for k in r if k != "id"]
        assert len(langs) >= 2
        langs_seen |= set(langs)
    assert set(BUNDLED_LANGS) <= langs_seen


# ------------------------------------------------------------------- loader errors


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_loader_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(DataError) as e:
        corpus.load_texts(str(p))
    assert str(p) in _one_line(e) and "not found" in str(e.value)


def test_loader_empty_files(tmp_path):
    for name, data in (("empty.txt", b""), ("blank.txt", b"\n  \n"),
                       ("empty.txt.gz", gzip.compress(b""))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError) as e:
            corpus.load_texts(str(p))
        assert str(p) in _one_line(e) and "empty" in str(e.value)


def test_loader_non_utf8_names_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("first line\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        corpus.load_texts(str(p))
    msg = _one_line(e)
    assert str(p) in msg and "UTF-8" in msg and "byte offset 14" in msg
    pg = tmp_path / "bad.txt.gz"
    pg.write_bytes(gzip.compress(b"ok\n\xff\xfe\n"))
    with pytest.raises(DataError) as e:
        corpus.load_texts(str(pg))
    assert "byte offset 3" in _one_line(e) and str(pg) in str(e.value)
    notgz = tmp_path / "fake.txt.gz"
    notgz.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError) as e:
        corpus.load_texts(str(notgz))
    assert "gzip" in _one_line(e) and str(notgz) in str(e.value)


def test_loader_unknown_language_lists_available():
    with pytest.raises(DataError) as e:
        corpus.load_texts("xx")
    msg = _one_line(e)
    assert "'xx'" in msg and "xx.txt.gz" in msg and "en, zh, fr" in msg
    with pytest.raises(DataError):
        corpus.load_texts("en", split="dev")
    with pytest.raises(DataError) as e:
        corpus.load_texts("en", corpus_dir="/nonexistent/corpus")
    assert "/nonexistent/corpus" in _one_line(e)


def test_loader_user_files(tmp_path):
    t = tmp_path / "mine.txt"
    t.write_text("one\n\ntwo\r\n", encoding="utf-8")
    assert corpus.load_texts(str(t)) == ["one", "two"]
    j = tmp_path / "mine.jsonl.gz"
    write_gz_lines(str(j), [json.dumps({"text": "a b"}), json.dumps({"text": "c", "x": 1})])
    assert corpus.load_texts(str(j)) == ["a b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        corpus.load_texts(str(bad))
    assert "line 2" in _one_line(e) and str(bad) in str(e.value)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": \n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        corpus.load_texts(str(broken))
    assert "line 1" in _one_line(e)
    par = tmp_path / "par.jsonl"
    par.write_text('{"id": "a", "en": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        corpus.load_parallel(str(par))
    assert ">= 2" in _one_line(e)
