"""Text cleaning: Unicode repair, line endings, whitespace, HTML, junk markers, stats."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tunesmith.data.clean import CleanStats, clean_texts, fix_text, html_to_text, tidy_whitespace

SMS_SPAM = Path(__file__).resolve().parents[1] / "examples" / "data" / "sms_spam" / "SMSSpamCollection"


def test_mojibake_is_repaired_and_nfc_normalised():
    assert fix_text("cafÃ© au lait") == ("café au lait", {"unicode"})
    assert fix_text("The â€œquoteâ€\x9d") == ("The \u201cquote\u201d", {"unicode"})
    assert fix_text("that\x92s") == ("that\u2019s", {"unicode"})  # cp1252 read as latin-1
    decomposed = "cafe\u0301"
    assert fix_text(decomposed) == ("caf\u00e9", {"unicode"})
    assert fix_text("cafÃ©", fix_unicode=False)[0] == "cafÃ©"


def test_unicode_repair_leaves_quotes_width_and_entities_alone():
    # Only repair: curly quotes, full-width forms and entities are content or another op's job.
    text = "\u201cquoted\u201d \uff21\uff22 &amp;"
    assert fix_text(text, strip_html=False) == (text, set())


def test_line_endings_and_whitespace():
    assert fix_text("a\r\nb\rc") == ("a\nb\nc", {"whitespace"})
    assert fix_text("  a  \t b   \nc\t\n\n\n\n\nd  ") == ("a b\nc\n\nd", {"whitespace"})
    assert fix_text("already clean\n\nok") == ("already clean\n\nok", set())


def test_indentation_inside_text_is_kept():
    code = "def f():\n    return  1   \n"
    assert tidy_whitespace(code) == "def f():\n    return 1"


def test_html_is_stripped_to_text_with_line_breaks():
    html = (
        "<html><head><style>p {color: red}</style></head><body>"
        "<p>Hello <b>you</b>,<br>second line</p><script>if (a < b) alert(1)</script>"
        "<ul>\n  <li>one</li>\n  <li>two &amp; three</li>\n</ul></body></html>"
    )
    assert fix_text(html) == ("Hello you,\nsecond line\n\none\ntwo & three", {"html"})


def test_html_only_when_there_is_html():
    for plain in ["a < b and c > d", "AT&T & co", "<|im_end|> <think>x</think> <input>", "x</s>"]:
        assert html_to_text(plain) == plain
        assert fix_text(plain) == (plain, set())
    # Entities alone are enough, and non-tag "<" survives next to real tags.
    assert fix_text("Tom &amp; Jerry &lt;3") == ("Tom & Jerry <3", {"html"})
    assert fix_text("<i>x</i> <think>a < b</think>")[0] == "x <think>a < b</think>"
    assert fix_text("<b>bold</b>", strip_html=False) == ("<b>bold</b>", set())


def test_junk_markers_are_removed_then_whitespace_tidied():
    text = "answer <|endoftext|> more<|endoftext|>\n\n<pad><pad>"
    cleaned, ops = fix_text(text, junk_markers=["<|endoftext|>", "<pad>"])
    assert cleaned == "answer more"
    assert ops == {"junk"}
    assert fix_text(text)[0] == text.strip()  # nothing configured: nothing removed
    with pytest.raises(TypeError):
        fix_text(text, junk_markers="<pad>")  # a bare string would remove "<", "p", "a", ...


def test_several_operations_are_all_reported():
    cleaned, ops = fix_text("cafÃ©\r\n<p>x&amp;y</p>  END", junk_markers=["END"])
    assert cleaned == "café\n\nx&y"  # <p> starts a paragraph
    assert ops == {"unicode", "whitespace", "html", "junk"}


def test_clean_texts_counts_and_keeps_three_examples():
    texts = ["ok"] + [f"cafÃ© {i}" for i in range(5)] + ["a  b", "<b>x</b>  y"]
    cleaned, stats = clean_texts(texts)
    assert cleaned[:2] == ["ok", "café 0"] and cleaned[-1] == "x y"
    assert (stats.seen, stats.changed) == (8, 7)
    assert stats.by_operation == {"unicode": 5, "whitespace": 2, "html": 1}
    assert stats.examples["unicode"] == [(f"cafÃ© {i}", f"café {i}") for i in range(3)]
    assert stats.examples["whitespace"] == [("a  b", "a b"), ("<b>x</b>  y", "x y")]


def test_stats_merge():
    _, first = clean_texts(["cafÃ©", "a  b"])
    _, second = clean_texts(["x  y", "c  d", "ok"])
    first.merge(second)
    assert (first.seen, first.changed) == (5, 4)
    assert first.by_operation == {"unicode": 1, "whitespace": 3}
    assert [after for _, after in first.examples["whitespace"]] == ["a b", "x y", "c d"]
    empty = CleanStats()
    empty.merge(first)
    assert empty.by_operation == first.by_operation and empty.examples == first.examples


@pytest.mark.skipif(not SMS_SPAM.exists(), reason="examples/data/sms_spam not present")
def test_sms_spam_collection():
    text = SMS_SPAM.read_bytes().decode("utf-8", errors="replace")
    messages = [line.split("\t", 1)[1] for line in text.split("\n")[1:] if line]
    start = time.perf_counter()
    cleaned, stats = clean_texts(messages, junk_markers=["<|endoftext|>"])
    assert time.perf_counter() - start < 2
    assert stats.seen == len(messages) > 5000
    # Robust facts of this file: cp1252 apostrophes (\x92), "&lt;#&gt;" entities, double spaces.
    assert stats.by_operation["unicode"] > 0 and stats.by_operation["html"] > 0
    assert stats.by_operation["whitespace"] > 0 and stats.by_operation["junk"] == 0
    assert not any("\x92" in t or "&lt;" in t or "  " in t for t in cleaned)
