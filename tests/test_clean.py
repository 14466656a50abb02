"""Text cleaning: Unicode repair, line endings, whitespace, HTML, junk markers, stats."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data.clean import (
    OPERATIONS,
    CleanStats,
    clean_texts,
    fix_text,
    html_to_text,
    repair_broken_entities,
    tidy_whitespace,
)

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


# AG News as distributed: markup shown as text, and entities whose "&" the scraper lost.
AG_ESCAPED = (
    'Google &lt;A HREF="http://www.investor.reuters.com/FullQuote.aspx?ticker=GOOG.O '
    'target=/stocks/quickinfo/fullquote"&gt;GOOG.O&lt;/A&gt; shares rose'
)


def test_escaped_markup_is_removed_not_created():
    assert fix_text(AG_ESCAPED) == ("Google GOOG.O shares rose", {"html", "escaped_markup"})
    assert html_to_text(AG_ESCAPED) == "Google GOOG.O shares rose"
    paragraphs = "&lt;p&gt;one&lt;/p&gt;&lt;p&gt;two &lt;b&gt;2&lt;/b&gt;&lt;/p&gt;"
    assert fix_text(paragraphs)[0] == "one\n\ntwo 2"  # block tags still break lines
    assert fix_text("&lt;script&gt;alert(1)&lt;/script&gt;ok")[0] == "ok"  # like a real <script>
    # The removal does not decode a second time: "&" decoded once stays a literal "&".
    assert fix_text("AT&amp;T &lt;i&gt;x&lt;/i&gt; &amp;lt;b&amp;gt;") == (
        "AT&T x &lt;b&gt;",
        {"html", "escaped_markup"},
    )
    assert fix_text(AG_ESCAPED, strip_html=False) == (AG_ESCAPED, set())


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("a < b", "a < b"),
        ("x <= 3", "x <= 3"),
        ("<|im_end|> <think>x</think> <input>", "<|im_end|> <think>x</think> <input>"),
        ("AT&T and R&D", "AT&T and R&D"),
        ("&lt;3 you", "<3 you"),
        ("&lt;think&gt;plan&lt;/think&gt;", "<think>plan</think>"),  # not an HTML tag name
        ("&lt;input&gt; &lt;|im_end|&gt; a &lt; b &gt; c", "<input> <|im_end|> a < b > c"),
        ("&lt;!-- shown --&gt;", "<!-- shown -->"),  # a decoded comment is text, not markup
    ],
)
def test_decoded_text_that_is_not_markup_survives(text, cleaned):
    assert html_to_text(text) == cleaned
    assert fix_text(text)[0] == cleaned


# Tag-shaped pieces, written as real, escaped or broken markup, mixed with loose bits of it.
OPENERS = st.sampled_from(["<", "</", "&lt;", "&lt;/", "lt;", " lt;/", "#60;", "&amp;lt;", "<<"])
NAMES = st.sampled_from(["a", "B", "p", "br", "script", "think", "input"])
INSIDES = st.sampled_from(["", " ", "/", " href='x", ' x="&gt;"', " x='>'", "\n"])
CLOSERS = st.sampled_from([">", "&gt;", " gt;", "gt;", "#62;", "/>", ">>"])
LOOSE = st.sampled_from(["<", ">", "&", "&amp;", ";", "#39;", " ", "x", "'", "<!--", "-->"])
MARKUPISH = st.lists(
    st.one_of(LOOSE, st.tuples(OPENERS, NAMES, INSIDES, CLOSERS).map("".join)), max_size=12
).map("".join)
TAG_OF_THOSE_NAMES = re.compile(r"</?(?:a|b|p|br|script)(?=[\s/>])[^<>]*>", re.IGNORECASE)


@settings(max_examples=300, deadline=None)
@given(MARKUPISH)
def test_cleaning_never_creates_markup(text):
    """Every known tag left in the output stood in the input as written (a lone literal "<p>" may stay:
    it is text about HTML); none comes from decoding entities or joining pieces."""
    from collections import Counter

    before = Counter(TAG_OF_THOSE_NAMES.findall(text))
    for out in (html_to_text(text), fix_text(text)[0]):
        after = Counter(TAG_OF_THOSE_NAMES.findall(out))
        assert not after - before, (text, out)
    if TAG_OF_THOSE_NAMES.search(text) and any(t.startswith("</") for t in before):
        assert not TAG_OF_THOSE_NAMES.search(html_to_text(text))  # real markup (a closing tag) is stripped whole


def test_parser_leftovers_and_joined_tags_are_removed():
    assert html_to_text("<a b='>x</a> tail") == "x tail"  # the parser keeps <a b='> as data
    assert html_to_text("&lt;&lt;b&gt;b&gt;x") == "x"  # removing <b> would join "<" and "b>"


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("Google #39;s shares rose", "Google's shares rose"),
        ("Google #x27;s shares rose", "Google's shares rose"),
        ("Google #146;s shares rose", "Google\u2019s shares rose"),  # cp1252 number, as browsers
        ("the players #39; union", "the players' union"),
        ("hits of the #39;90s", "hits of the '90s"),
        ("costs #36;1.5 billion", "costs $1.5 billion"),
        ("the quot;best quot; deal", 'the "best" deal'),
        ("He said quot;No.quot; twice", 'He said "No." twice'),
        ("she said #147;Hi, #148; and left", "she said \u201cHi,\u201d and left"),
        ("prices #151; and profits", "prices \u2014 and profits"),
        ("Procter amp; Gamble", "Procter & Gamble"),
        ("AT amp;T and S #38;P", "AT&T and S&P"),
        ("if a lt; b", "if a < b"),
        ("Jean nbsp;Dupont", "Jean\xa0Dupont"),
    ],
)
def test_entities_that_lost_their_ampersand_are_repaired(text, cleaned):
    assert fix_text(text) == (cleaned, {"broken_entities"})
    assert fix_text(text, strip_html=False) == (text, set())


@pytest.mark.parametrize(
    "text",
    [
        "C# and F#; code",
        "#hashtag #39",
        "issue #39 is open",
        "C#39; x#39;",  # after a word character
        "item #1; next",  # not a character anyone escapes
        "issue #42; see",  # "*" is never escaped
        "fixed in #1234; thanks",  # outside the blocks pages escaped
        "#129; and #173;",  # a cp1252 gap and a soft hyphen: invisible
        "salt; quotation; Quot;",  # inside a word, or not the lowercase name
    ],
)
def test_broken_entity_lookalikes_are_left_alone(text):
    assert repair_broken_entities(text) == text
    assert fix_text(text) == (text, set())


def test_entities_are_decoded_once():
    assert fix_text("it&#39;s") == ("it's", {"html"})
    assert fix_text("&amp;#39; &amp;quot;") == ("&#39; &quot;", {"html"})  # no second decode


def test_broken_entities_that_form_markup_are_removed():
    text = "lt;p gt;ADVERTISEMENT lt;/p gt;lt;p gt;Shares rose.lt;/p gt;"
    cleaned = "ADVERTISEMENT\n\nShares rose."
    assert fix_text(text) == (cleaned, {"broken_entities", "escaped_markup"})


def test_clean_texts_counts_entity_and_markup_repairs():
    texts = [
        "Google #39;s shares",
        AG_ESCAPED,
        "lt;b gt;Hot lt;/b gt; news",
        "plain text",
        "<b>x</b>",
        "AT&T R&D",
    ]
    cleaned, stats = clean_texts(texts)
    assert cleaned == [
        "Google's shares",
        "Google GOOG.O shares rose",
        "Hot news",
        "plain text",
        "x",
        "AT&T R&D",
    ]
    assert (stats.seen, stats.changed) == (6, 4)
    assert stats.by_operation == {"broken_entities": 2, "escaped_markup": 2, "html": 2}
    assert set(stats.by_operation) <= set(OPERATIONS)
    assert stats.examples["escaped_markup"] == [
        (AG_ESCAPED, "Google GOOG.O shares rose"),
        ("lt;b gt;Hot lt;/b gt; news", "Hot news"),
    ]
    assert stats.examples["broken_entities"][0] == ("Google #39;s shares", "Google's shares")


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


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("Type <p> to start a paragraph", "Type <p> to start a paragraph"),  # text about HTML, not HTML
        ("Use the `<hr>` tag for a rule, and `&amp;` for &amp;.", "Use the `<hr>` tag for a rule, and `&amp;` for &."),
        ("```css\nbody {\n    color:  red;\n}\n```\n<p>done</p>", "```css\nbody {\n    color:  red;\n}\n```\n\ndone"),
        ("```html\n<table>\n  <tr><td>John</td></tr>\n</table>\n```", "```html\n<table>\n  <tr><td>John</td></tr>\n</table>\n```"),
        ("a  b   `x  =  1`  c", "a b `x  =  1` c"),
    ],
)
def test_code_and_text_about_html_are_left_as_written(text, cleaned):
    assert fix_text(text)[0] == cleaned


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("it was lt;bgt;finallylt;/bgt; done", "it was finally done"),  # a whole broken tag, even after a word
        ("the first step#39;s cost", "the first step's cost"),
        ("he said, #39;a deal#39; and left", "he said, 'a deal' and left"),
    ],
)
def test_broken_entities_next_to_words(text, cleaned):
    assert fix_text(text)[0] == cleaned
