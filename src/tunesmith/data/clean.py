"""Cleaning text fields of training rows: Unicode repair, HTML, junk markers, whitespace.

Each operation is reported by name when it changed a text, so the data report can say what
cleaning did and show a few before/after examples instead of asking to be trusted.
Length filters live elsewhere; nothing here drops a text.

Operations, in the order they run:

- ``unicode``: mojibake repair and NFC (ftfy, entities left alone).
- ``whitespace``: one line-ending convention, no doubled blanks or runs of empty lines.
- ``junk``: configured markers such as ``<|endoftext|>`` removed.
- ``html`` (``strip_html``): real tags of known HTML names removed, entities decoded once.
- ``broken_entities`` (``strip_html``): entities whose "&" a scraper lost, as in AG News
  ("Google #39;s", "costs #36;1.5", "quot;best quot;"), repaired to their characters.
- ``escaped_markup`` (``strip_html``): tags that only appeared once entities were decoded
  ("&lt;A HREF=...&gt;GOOG.O&lt;/A&gt;") removed like real ones, keeping their text, so
  cleaning never creates markup that the source showed as text.

HTML cleaning only touches known HTML tag names: "a < b", "<think>", "<input>",
"<|im_end|>", "&lt;3" (decoded to "<3") and "AT&T" stay text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser

import ftfy

OPERATIONS = ("unicode", "whitespace", "junk", "html", "broken_entities", "escaped_markup")
MAX_EXAMPLES = 3

# Only Unicode repair: HTML entities, line breaks and quotes are handled (or kept) on purpose
# elsewhere, and width/ligature folding would silently rewrite legitimate CJK or PDF text.
_FTFY_CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,
    fix_line_breaks=False,
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    normalization="NFC",
    explain=False,
)

# Tags treated as HTML. Deliberately not every HTML element: names such as <input>, <data>,
# <title> or <s> (the sentencepiece BOS token) are common prompt placeholders or special
# tokens in training data and must survive as literal text.
_HTML_TAGS = frozenset(
    "a abbr article aside b big blockquote body br caption center cite code col colgroup dd "
    "del div dl dt em figcaption figure font footer h1 h2 h3 h4 h5 h6 head header hr html i "
    "iframe img ins kbd li link mark meta nav noscript ol p pre section small span strike "
    "strong style sub sup script table tbody td tfoot th thead tr tt u ul wbr".split()
)
_BLOCK_TAGS = frozenset(
    "article aside blockquote body div dl dt dd figcaption figure footer h1 h2 h3 h4 h5 h6 "
    "header hr html li nav ol pre section table tbody tfoot thead tr ul".split()
)
_DROP_CONTENT_TAGS = frozenset({"script", "style"})

_TAG_NAMES = "|".join(sorted(_HTML_TAGS, key=len, reverse=True))
_TAG_RE = rf"</?(?:{_TAG_NAMES})(?=[\s/>])[^<>]*>"
_ENTITY_RE = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
# A text is HTML when it closes a known tag, holds a void tag (<br>, <img ...>), a comment or an
# entity; a lone "<p>" or "<b>" is more likely text about HTML ("Type <p> to start a paragraph").
_CLOSING_OR_VOID = rf"</(?:{_TAG_NAMES})\s*>|<(?:br|hr|img|wbr|meta|link)(?=[\s/>])[^<>]*>"
_HTML_HINT = re.compile(rf"{_CLOSING_OR_VOID}|<!--|{_ENTITY_RE}", re.IGNORECASE)
# an escaped < or > (with or without its "&"): only then can decoding bring out tags to remove
_ESCAPED_HINT = re.compile(r"(?:lt|gt);|#0*6[02];|#x0*3[ce];", re.IGNORECASE)
# Code is left exactly as written: fenced blocks (``` or ~~~) and inline `code` spans are set
# aside (replaced by private-use placeholders) while whitespace, markers and HTML are cleaned.
_CODE = re.compile(r"(?ms)^(`{3,}|~{3,})[^\n]*\n.*?^\1[ \t]*$|`[^`\n]+`")
_HOLE = "\ue000{}\ue001"
# A "<" that starts a known tag, a comment or a declaration; every other "<" is escaped
# before parsing so that "a < b", "<|im_end|>" or "<think>" come out unchanged.
_MARKUP_START = re.compile(rf"(?=<(?:{_TAG_RE[1:]}|!--|![A-Za-z]))", re.IGNORECASE)
# After decoding only tags count: a decoded "<!-- -->" is text someone chose to show.
_TAG_START = re.compile(rf"(?={_TAG_RE})", re.IGNORECASE)
_KNOWN_TAG = re.compile(_TAG_RE, re.IGNORECASE)

# An entity whose "&" was lost; scrapers usually left a space in its place ("Google #39;s").
# Not after a word character or "&" (so "C#39;" and a decoded "&#39;" stay), and the ";" is
# required (so "issue #39" stays). The optional space before it is captured so the repair can
# drop it where it stood for the lost "&" rather than for real spacing.
_BROKEN_ENTITY = re.compile(
    r"(?P<gap>(?<=\S) )?(?<![\w&])"
    r"(?:#(?P<dec>[0-9]{2,5})|#[xX](?P<hex>[0-9a-fA-F]{2,4})|(?P<name>quot|amp|lt|gt|apos|nbsp));"
)
# A whole tag whose "&"s were lost ("finallylt;/bgt;"): unambiguous even right after a word.
_BROKEN_TAG = re.compile(rf"lt;(/?(?:{_TAG_NAMES}))\s*gt;", re.IGNORECASE)
_BROKEN_APOSTROPHE = re.compile(r"(?<=[^\W\d_]{2})#0*39;(?=[^\W\d_]|\s|[.,;:!?)]|$)")  # "step#39;s", "deal#39; and"
# ASCII characters that encoders really write as numeric references. Letters, digits and
# other punctuation never need escaping, so "#42;" after "issue" is a number, not a "*".
_ESCAPED_ASCII = frozenset("\"$&'<>")
# Beyond ASCII, what English-language pages escaped numerically: Latin-1, cp1252's 128-159
# (html.unescape maps them as browsers do, so AG News' "#151;" is an em dash), typographic
# punctuation (quotes, dashes, ellipsis), euro and trade mark. Other code points are left
# alone: "fixed in #1234; thanks" is far likelier than a lost-"&" Cyrillic letter.
_ESCAPED_BLOCKS = ((0x80, 0xFF), (0x2000, 0x206F), (0x20AC, 0x20AC), (0x2122, 0x2122))
_APOSTROPHES = frozenset("'\u2019")
_CLOSING_QUOTES = frozenset('"\u201d')
_AFTER_CLOSING = frozenset(".,;:!?)]}")

_INNER_BLANKS = re.compile(r"(?<=[^ \t\n])[ \t]+")
_LEADING_BLANKS = re.compile(r"^[ \t]+", re.MULTILINE)
_TRAILING_BLANKS = re.compile(r"[ \t]+(?=\n|\Z)")
_MANY_NEWLINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    """Collects text content; block tags and <br> become newlines, scripts are dropped.

    A block boundary is held back until the next real text arrives, so source indentation
    between tags and back-to-back boundaries (</li> then <li>) give one break, not several.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._dropping = 0  # depth inside <script>/<style>
        self._pending = 0  # newlines owed by block boundaries since the last text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_CONTENT_TAGS:
            self._dropping += 1
        elif tag == "br":
            self._flush()
            self.parts.append("\n")  # an explicit break always counts, even repeated
        else:
            self._block_break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _DROP_CONTENT_TAGS:  # <script/> has no content to drop
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_CONTENT_TAGS:
            self._dropping = max(0, self._dropping - 1)
        else:
            self._block_break(tag)

    def handle_data(self, data: str) -> None:
        if self._dropping or (self._pending and not data.strip()):
            return
        self._flush()
        self.parts.append(data)

    def _block_break(self, tag: str) -> None:
        if tag == "p":
            self._pending = max(self._pending, 2)
        elif tag in _BLOCK_TAGS:
            self._pending = max(self._pending, 1)

    def _flush(self) -> None:
        """Emit the owed block break, replacing layout whitespace that ends the text so far."""
        if not self._pending:
            return
        while self.parts and not self.parts[-1].strip():
            self.parts.pop()
        if self.parts:
            self.parts[-1] = self.parts[-1].rstrip()
            self.parts.append("\n" * self._pending)
        self._pending = 0


def html_to_text(text: str) -> str:
    """Text content of ``text`` if it holds HTML tags or entities, else ``text`` unchanged.

    Checking first keeps plain text (which may legitimately contain "<" or "&") untouched.
    Tags that decoding entities brings out ("&lt;b&gt;") are removed too: no tag of a known
    HTML name is left in the result.
    """
    return remove_escaped_markup(_decode_markup(text))


def remove_escaped_markup(text: str) -> str:
    """``text`` without tags of known HTML names, keeping their content; entities stay as is.

    Meant for text whose entities are already decoded, where such a tag was shown as text in
    the source: decoding again would turn a literal "&lt;" the source meant into "<".
    """
    if not _KNOWN_TAG.search(text):
        return text
    text = _parse_text(text.replace("&", "&amp;"), _TAG_START)
    # The parser keeps a few malformed tags as data (<a b='>), and removing a tag can join
    # its neighbours into a new one ("<<b>b>"); those are removed without block semantics.
    while _KNOWN_TAG.search(text):
        text = _KNOWN_TAG.sub("", text)
    return text


def repair_broken_entities(text: str) -> str:
    """``text`` with entities that lost their "&" ("Google #39;s") turned into characters.

    Only where the form cannot be ordinary text: see ``_BROKEN_ENTITY`` and
    ``_broken_entity_char``. "C#", "#hashtag", "issue #39" and "F#;" are left alone.
    """
    if ";" not in text:  # every broken entity ends with one; most texts have none
        return text
    text = _BROKEN_TAG.sub(r"<\1>", text)  # "lt;bgt;" is a tag whatever stands before it
    text = _BROKEN_APOSTROPHE.sub("'", text)  # "step#39;s": an apostrophe inside a word
    return _BROKEN_ENTITY.sub(_repair_entity, text)


def _decode_markup(text: str) -> str:
    """Real tags of known HTML names removed, entities decoded once; plain text unchanged."""
    if not _HTML_HINT.search(text):
        return text
    return _parse_text(text, _MARKUP_START)


def _parse_text(text: str, markup_start: re.Pattern[str]) -> str:
    """Text content of ``text`` where only a "<" that ``markup_start`` accepts opens markup."""
    # Escape every other "<", so the parser keeps "a < b" or "<think>" as data.
    pieces = markup_start.split(text)
    escaped = pieces[0].replace("<", "&lt;") + "".join(
        "<" + p[1:].replace("<", "&lt;") for p in pieces[1:]
    )
    parser = _TextExtractor()
    parser.feed(escaped)
    parser.close()
    return "".join(parser.parts)


def _repair_entity(match: re.Match[str]) -> str:
    """Replacement for one ``_BROKEN_ENTITY`` match: its character, spaced like the source."""
    char = _broken_entity_char(match)
    if char is None:
        return match[0]
    following = match.string[match.end() : match.end() + 1]
    gap = match["gap"] or ""
    before = match.string[match.start() - 1 : match.start()] if match.start() else ""
    apostrophe_after_punctuation = char in _APOSTROPHES and not before.isalnum()  # ", #39;a": an opening quote
    if gap and not apostrophe_after_punctuation and _joins_previous_word(char, following):
        gap = ""
    return gap + char


def _broken_entity_char(match: re.Match[str]) -> str | None:
    """The character a ``_BROKEN_ENTITY`` match stands for, or None if it is not one.

    Numeric forms count only for visible characters that pages commonly escaped
    (``_ESCAPED_ASCII``, ``_ESCAPED_BLOCKS``); cp1252 gaps such as 129 decode to control
    characters and are rejected with them.
    """
    if match["name"]:
        return html.unescape(f"&{match['name']};")
    code = int(match["dec"]) if match["dec"] else int(match["hex"], 16)
    if code < 0x80:
        return chr(code) if chr(code) in _ESCAPED_ASCII else None
    if not any(low <= code <= high for low, high in _ESCAPED_BLOCKS):
        return None
    char = html.unescape(f"&#{code};")
    return char if unicodedata.category(char)[0] != "C" else None


def _joins_previous_word(char: str, following: str) -> bool:
    """Whether the space before a repaired ``char`` stood for the lost "&", not real spacing.

    Scrapers replaced "&" by a space, so "Google&#39;s" reads "Google #39;s". Only marks that
    attach to the word before lose that space: apostrophes (not before a digit, as in
    "the '90s"), closing quotes (followed by a space, punctuation or the end), "&" between
    word characters (AT&T) and non-breaking spaces. Opening quotes, "$" and dashes keep it.
    """
    if char in _APOSTROPHES:
        return not following.isdigit()
    if char in _CLOSING_QUOTES:
        return following == "" or following.isspace() or following in _AFTER_CLOSING
    if char == "&":
        return following.isalnum()
    return char == "\xa0"


def tidy_whitespace(text: str, *, keep_indent: bool = True) -> str:
    """One line-ending convention, no doubled blanks, at most one empty line in a row.

    Leading indentation of a line is kept by default: it carries meaning in code and lists.
    Text extracted from HTML has none worth keeping, so that path passes ``keep_indent=False``.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not keep_indent:
        text = _LEADING_BLANKS.sub("", text)
    text = _INNER_BLANKS.sub(" ", text)
    text = _TRAILING_BLANKS.sub("", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def fix_text(
    text: str,
    *,
    fix_unicode: bool = True,
    strip_html: bool = True,
    junk_markers: Sequence[str] = (),
) -> tuple[str, set[str]]:
    """Cleaned ``text`` and the names of the operations that changed it.

    Order matters: Unicode first (mojibake can hide markup and entities), whitespace next,
    junk markers before HTML (so a marker that looks like markup is removed whole, not
    half-parsed), and the whitespace a removal leaves behind is tidied and credited to it.
    """
    if isinstance(junk_markers, str):  # would otherwise remove each of its characters
        raise TypeError(f"junk_markers must be a list of strings, not the string {junk_markers!r}")
    ops: set[str] = set()
    if fix_unicode:
        fixed = ftfy.fix_text(text, _FTFY_CONFIG)
        if fixed != text:
            ops.add("unicode")
            text = fixed
    text, code = _set_code_aside(text)
    text = _apply(text, tidy_whitespace, "whitespace", ops)
    if junk_markers:
        text = _apply(
            text, lambda t: tidy_whitespace(_remove_markers(t, junk_markers)), "junk", ops
        )
    if strip_html:
        escaped = bool(_ESCAPED_HINT.search(text))
        # Entities are decoded before escaped markup is looked for, whether their "&" survived
        # (html) or not (broken_entities): both can bring out tags the source showed as text.
        text = _apply(text, _html_then_tidy, "html", ops)
        text = _apply(text, _repair_then_tidy, "broken_entities", ops)
        if escaped:
            text = _apply(text, _escaped_then_tidy, "escaped_markup", ops)
    return _put_code_back(text, code), ops


def _set_code_aside(text: str) -> tuple[str, list[str]]:
    """``text`` with each code block and inline code span replaced by a placeholder, and the code."""
    if "`" not in text and "~~~" not in text or "\ue000" in text:
        return text, []
    code: list[str] = []

    def hole(m: re.Match[str]) -> str:
        code.append(m.group())
        return _HOLE.format(len(code) - 1)

    return _CODE.sub(hole, text), code


def _put_code_back(text: str, code: list[str]) -> str:
    for i, c in enumerate(code):
        text = text.replace(_HOLE.format(i), c, 1)
    return text


def _apply(text: str, operation: Callable[[str], str], name: str, ops: set[str]) -> str:
    """Run ``operation`` on ``text``; record ``name`` in ``ops`` if it changed anything."""
    result = operation(text)
    if result != text:
        ops.add(name)
    return result


def _html_then_tidy(text: str) -> str:
    """``_decode_markup``, then tidied as HTML layout if it changed anything."""
    stripped = _decode_markup(text)
    if stripped == text:
        return text  # no HTML: keep the indentation that only HTML layout makes meaningless
    return tidy_whitespace(stripped, keep_indent=False)


def _repair_then_tidy(text: str) -> str:
    """``repair_broken_entities``, then tidied (an entity at an end may be a blank)."""
    repaired = repair_broken_entities(text)
    return text if repaired == text else tidy_whitespace(repaired)


def _escaped_then_tidy(text: str) -> str:
    """``remove_escaped_markup``, then tidied as HTML layout if it removed anything."""
    stripped = remove_escaped_markup(text)
    return text if stripped == text else tidy_whitespace(stripped, keep_indent=False)


def _remove_markers(text: str, markers: Iterable[str]) -> str:
    """``text`` with every occurrence of each non-empty marker removed."""
    for marker in markers:
        if marker:
            text = text.replace(marker, "")
    return text


@dataclass
class CleanStats:
    """How many texts each operation changed, with a few (before, after) examples of each."""

    seen: int = 0
    changed: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    max_examples: int = MAX_EXAMPLES

    def add(self, before: str, after: str, ops: Iterable[str]) -> None:
        """Count one cleaned text; keep it as an example of each operation still short of some."""
        ops = sorted(ops)
        self.seen += 1
        self.changed += bool(ops)
        for op in ops:
            self.by_operation[op] += 1
            kept = self.examples.setdefault(op, [])
            if len(kept) < self.max_examples:
                kept.append((before, after))

    def merge(self, other: CleanStats) -> None:
        """Add ``other``'s counts and examples into this one (e.g. across files or columns)."""
        self.seen += other.seen
        self.changed += other.changed
        self.by_operation.update(other.by_operation)
        for op, pairs in other.examples.items():
            kept = self.examples.setdefault(op, [])
            kept.extend(pairs[: max(0, self.max_examples - len(kept))])


def clean_texts(
    texts: Sequence[str],
    *,
    fix_unicode: bool = True,
    strip_html: bool = True,
    junk_markers: Sequence[str] = (),
) -> tuple[list[str], CleanStats]:
    """``fix_text`` over many texts, with the counts and examples for the data report."""
    stats = CleanStats()
    cleaned: list[str] = []
    for text in texts:
        after, ops = fix_text(
            text, fix_unicode=fix_unicode, strip_html=strip_html, junk_markers=junk_markers
        )
        stats.add(text, after, ops)
        cleaned.append(after)
    return cleaned, stats
