"""Cleaning text fields of training rows: Unicode repair, HTML, junk markers, whitespace.

Each operation is reported by name when it changed a text, so the data report can say what
cleaning did and show a few before/after examples instead of asking to be trusted.
Length filters live elsewhere; nothing here drops a text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser

import ftfy

OPERATIONS = ("unicode", "whitespace", "junk", "html")
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
_HTML_HINT = re.compile(rf"{_TAG_RE}|<!--|{_ENTITY_RE}", re.IGNORECASE)
# A "<" that starts a known tag, a comment or a declaration; every other "<" is escaped
# before parsing so that "a < b", "<|im_end|>" or "<think>" come out unchanged.
_MARKUP_START = re.compile(rf"(?=<(?:{_TAG_RE[1:]}|!--|![A-Za-z]))", re.IGNORECASE)

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
    """
    if not _HTML_HINT.search(text):
        return text
    # Escape every "<" that does not open real markup, so the parser keeps it as data.
    pieces = _MARKUP_START.split(text)
    escaped = pieces[0].replace("<", "&lt;") + "".join(
        "<" + p[1:].replace("<", "&lt;") for p in pieces[1:]
    )
    parser = _TextExtractor()
    parser.feed(escaped)
    parser.close()
    return "".join(parser.parts)


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
    text = _apply(text, tidy_whitespace, "whitespace", ops)
    if junk_markers:
        text = _apply(
            text, lambda t: tidy_whitespace(_remove_markers(t, junk_markers)), "junk", ops
        )
    if strip_html:
        text = _apply(text, _html_then_tidy, "html", ops)
    return text, ops


def _apply(text: str, operation: Callable[[str], str], name: str, ops: set[str]) -> str:
    """Run ``operation`` on ``text``; record ``name`` in ``ops`` if it changed anything."""
    result = operation(text)
    if result != text:
        ops.add(name)
    return result


def _html_then_tidy(text: str) -> str:
    stripped = html_to_text(text)
    if stripped == text:
        return text  # no HTML: keep the indentation that only HTML layout makes meaningless
    return tidy_whitespace(stripped, keep_indent=False)


def _remove_markers(text: str, markers: Iterable[str]) -> str:
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
