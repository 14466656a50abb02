"""Filtering what the server sends: personal data redacted, blocked content redacted or refused.

PII uses the data-preparation redactor (``data.pii.redact``: emails, phone numbers, cards, IBANs,
IP addresses, optionally URLs), so what training data hides and what the server hides agree.
Blocked-content rules are word lists (whole words, case-insensitive) or regexes; their action is
``redact`` (the match becomes ``placeholder``) or ``refuse`` (the answer stops before the match
with finish_reason ``content_filter``).

Streaming: text is only sent once no later text can change how it is filtered. ``StreamFilter``
holds back the unfinished tail: the current word (an email or URL has no spaces), the run of
number-like groups before it (phone, card and IBAN numbers have spaces), and for blocked rules
the last ``hold`` characters (the longest blocked word, or ``pattern_window`` for regexes). Before
sending, it checks that filtering the held text together with what is about to be sent changes
nothing already decided, and holds back more if it would. A PII item or blocked match longer than
``max_hold`` characters (default 512) can be cut by the bounded hold-back: that bound is the price
of a stream that keeps moving.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from tunesmith.data.pii import DEFAULT_KINDS, DEFAULT_REGION, redact

ACTIONS = ("redact", "refuse")
# The unfinished tail: number-like groups ("020 7946", "GB82 WEST", "(415) 555-") and the last word.
_TAIL = re.compile(r"(?<!\S)(?:[+(]?[A-Z0-9][A-Z0-9().\-/]* )*\S*\Z")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class BlockRule:
    """A named rule: text matching ``pattern`` is blocked (its name is the kind counted).
    ``span``: the longest text it can match (None: unbounded, as for most regexes)."""

    name: str
    pattern: re.Pattern[str]
    span: int | None = None

    @classmethod
    def words(cls, name: str, words: Iterable[str]) -> BlockRule:
        """Whole words or phrases, case-insensitive. ValueError for an empty list."""
        ws = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
        if not ws:
            raise ValueError(f"blocked word list {name!r} is empty")
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, ws)) + r")(?!\w)", re.IGNORECASE)
        return cls(name, pattern, len(ws[0]))

    @classmethod
    def regex(cls, name: str, pattern: str) -> BlockRule:
        """A regular expression (Python syntax). ValueError when it does not compile."""
        try:
            return cls(name, re.compile(pattern))
        except re.error as e:
            raise ValueError(f"blocked pattern {name!r} is not a valid regex: {e}") from None


@dataclass
class Filtered:
    """Text that is safe to send, what was hidden in it (counts by kind) and whether the answer
    must stop here (a ``refuse`` rule matched: finish_reason ``content_filter``)."""

    text: str
    counts: Counter[str] = field(default_factory=Counter)
    refused: bool = False


class OutputFilter:
    """The server's output filter. ``pii_kinds``: kinds of ``data.pii`` to redact (empty: none).
    ``rules``: blocked-content rules, handled by ``action`` (``redact`` with ``placeholder``, or
    ``refuse``). ``region``: for phone numbers written without a country code. ``pattern_window``:
    characters held back in streams when regex rules exist (a regex match can be any length).
    Raises ValueError for an unknown kind, region or action."""

    def __init__(self, pii_kinds: Collection[str] = DEFAULT_KINDS, rules: Iterable[BlockRule] = (), *,
                 action: str = "redact", placeholder: str = "[BLOCKED]", region: str | None = DEFAULT_REGION,
                 pattern_window: int = 64, max_hold: int = 512) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown filter action {action!r}; choose one of {', '.join(ACTIONS)}")
        self.pii_kinds, self.rules = tuple(pii_kinds), tuple(rules)
        self.action, self.placeholder, self.region = action, placeholder, region
        redact("", self.pii_kinds, region=region)  # fail now on a typo in kinds or region
        self.hold = max([pattern_window if r.span is None else r.span for r in self.rules], default=0)
        self.max_hold = max(max_hold, self.hold)
        self._totals: Counter[str] = Counter()
        self._lock = threading.Lock()

    def totals(self) -> dict[str, int]:
        """Items hidden (or answers refused) since start, by kind: for /metrics."""
        with self._lock:
            return dict(self._totals)

    def apply(self, text: str) -> Filtered:
        """Filter a whole answer (and count what was hidden)."""
        out = self._filter(text)
        self._count(out.counts)
        return out

    def stream(self) -> StreamFilter:
        """A filter for one streamed answer: ``feed`` each delta, then ``close``."""
        return StreamFilter(self)

    def _count(self, counts: Counter[str]) -> None:
        if counts:
            with self._lock:
                self._totals.update(counts)

    def _filter(self, text: str) -> Filtered:
        """Blocked rules first (on the model's own words), then PII on what is left."""
        counts: Counter[str] = Counter()
        refused = False
        if self.action == "refuse":
            hits = [(m.start(), r.name) for r in self.rules if (m := r.pattern.search(text))]
            if hits:
                cut, name = min(hits)
                text, refused = text[:cut], True
                counts[name] += 1
        else:
            for r in self.rules:
                text, k = r.pattern.subn(self.placeholder, text)
                counts[r.name] += k
        if self.pii_kinds and text:
            text, found = redact(text, self.pii_kinds, region=self.region)
            counts.update(found)
        return Filtered(text, +counts, refused)


class StreamFilter:
    """Filters one streamed answer piece by piece, never sending part of what will be hidden."""

    def __init__(self, f: OutputFilter) -> None:
        self.f = f
        self.pending = ""
        self.done = False

    def feed(self, delta: str) -> Filtered:
        """The text that is safe to send now (possibly empty); ``refused`` ends the answer."""
        if self.done:
            return Filtered("")
        self.pending += delta
        whole = self.f._filter(self.pending)
        if whole.refused:  # a refuse rule matched: send what came before it, then stop
            self.done, self.pending = True, ""
            self.f._count(whole.counts)
            return whole
        cut = self._cut()
        while cut > 0:
            head = self.f._filter(self.pending[:cut])
            if whole.text.startswith(head.text):
                break  # the held tail changes nothing in what is sent
            cut = _last_space_before(self.pending, cut)
        if cut <= 0:
            return Filtered("")
        self.pending = self.pending[cut:]
        self.f._count(head.counts)
        return head

    def close(self) -> Filtered:
        """The rest, filtered whole, when the answer has ended."""
        if self.done:
            return Filtered("")
        self.done = True
        out = self.f._filter(self.pending)
        self.pending = ""
        self.f._count(out.counts)
        return out

    def _cut(self) -> int:
        """Where the held-back tail starts: before the unfinished tail and the last ``hold``
        characters, at a space; never more than ``max_hold`` characters back."""
        p = self.pending
        cut = _TAIL.search(p).start()  # type: ignore[union-attr] - \S*\Z always matches
        if self.f.hold and len(p) - cut < self.f.hold:
            cut = _last_space_before(p, len(p) - self.f.hold + 1)
        return max(cut, len(p) - self.f.max_hold)


def _last_space_before(text: str, pos: int) -> int:
    """The position just after the last whitespace before ``pos`` (0 if none)."""
    spaces = [m.end() for m in _SPACE.finditer(text, 0, max(pos - 1, 0))]
    return spaces[-1] if spaces else 0
