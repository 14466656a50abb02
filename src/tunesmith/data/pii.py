"""Redacting personal data in text fields of training rows, with counts for the data report.

Each kind has its own detector; items that a checksum or parser can validate (cards, IBANs,
IP addresses, phone numbers) are kept only when valid, so ordinary numbers survive.
Detectors run in a fixed priority order and every found item is hidden from the later ones,
so one item is never counted as two kinds (an email's domain is not a URL, a card number is
not a phone number). Nothing is downloaded: phone numbers use the ``phonenumbers`` metadata.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence

import phonenumbers

PII_KINDS = ("email", "phone", "credit_card", "ip_address", "iban", "url")
DEFAULT_KINDS = tuple(k for k in PII_KINDS if k != "url")  # URLs are usually content, not PII
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in PII_KINDS}
DEFAULT_REGION = "US"
MAX_EXAMPLES = 3

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
_URL = re.compile(r"(?<![\w@.])(?:https?://|www\.)[^\s<>\"'\[\]{}|\\^`]+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?)'\""
# Uppercase only: IBANs are written that way, and it keeps words from looking like one.
_IBAN = re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# First digit 2-6: the issuer ranges of Visa, Mastercard, Amex, Discover, JCB, UnionPay,
# Maestro and Diners. Without it, runs of phone numbers ("020 7946 0958 020 ...") would pass
# Luhn one time in ten; phone numbers start with 0, 1 or "+" far more often.
_CARD = re.compile(r"(?<![\d.,+-])[2-6](?:[ -]?\d){12,18}(?![\d-]|[.,]\d)")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\w)")
# Loose candidates; ipaddress decides. Two colons at least, so times like 12:30 never qualify.
_IPV6 = re.compile(
    r"(?<![\w:.])\[?([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3})(?![\w:])"
)
# Bare digit runs for the phone pass the matcher leaves out (see _phone_spans).
_DIGIT_RUN = re.compile(r"(?<![\d+])\+?\d{7,16}(?!\d)")

# One private-use character per hidden item: it carries no digits, letters or punctuation
# that a later detector could match, and it marks where the item goes back in.
_MASK_BASE = 0xF0000
_MASK_LIMIT = 0xFFFFD

Span = tuple[int, int]


def luhn_valid(digits: str) -> bool:
    """The Luhn check that every payment card number passes (a typo or random digits fail 9/10)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: country and check digits moved to the end, read in base 36, mod 97 == 1.

    Catches every single-character typo and almost all swaps, so valid means really an IBAN.
    """
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or not re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]+", compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _longest_valid_prefix(
    text: str, start: int, end: int, ok: Callable[[str], bool], sep: str
) -> Span | None:
    """The longest prefix of ``text[start:end]``, cut at a separator, that ``ok`` accepts.

    Why: a greedy pattern may swallow a following group ("... 7654 32 2024"), which would
    fail the checksum and hide the real item.
    """
    seps = [m.start() + start for m in re.finditer(f"[{re.escape(sep)}]", text[start:end])]
    for cut in [end, *reversed(seps)]:
        if ok(text[start:cut]):
            return start, cut
    return None


def _email_spans(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def _url_spans(text: str) -> Iterator[Span]:
    for m in _URL.finditer(text):
        url = m.group()
        # Keep a closing parenthesis only when the URL opened one (Wikipedia-style links).
        while url and url[-1] in _URL_TRAILING:
            if url[-1] == ")" and url.count("(") >= url.count(")"):
                break
            url = url[:-1]
        if len(url) > 4 and not url.lower().endswith(("://", "www.")):
            yield m.start(), m.start() + len(url)


def _iban_spans(text: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        span = _longest_valid_prefix(text, m.start(), m.end(), iban_valid, " ")
        if span:
            yield span


def _card_spans(text: str) -> Iterator[Span]:
    def ok(candidate: str) -> bool:
        digits = re.sub(r"[ -]", "", candidate)
        return 13 <= len(digits) <= 19 and luhn_valid(digits)

    for m in _CARD.finditer(text):
        span = _longest_valid_prefix(text, m.start(), m.end(), ok, " -")
        if span:
            yield span


def _ip_spans(text: str) -> Iterator[Span]:
    """IPv6 then IPv4 (an IPv6 address may end in a dotted IPv4 part); ipaddress validates."""
    taken: list[Span] = []
    for m in _IPV6.finditer(text):
        candidate = m.group(1)
        if sum(1 for g in re.split(r"[:.]", candidate) if g) < 2:
            continue  # "::" or "::1" alone: no address worth hiding, often just punctuation
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        taken.append(m.span(1))
        yield m.span(1)
    for m in _IPV4.finditer(text):
        if any(s <= m.start() < e for s, e in taken):
            continue
        try:
            ipaddress.IPv4Address(m.group())  # rejects 999.1.1.1 and leading zeros
        except ValueError:
            continue
        yield m.span()


def _phone_spans(text: str, region: str | None) -> Iterator[Span]:
    """Numbers ``phonenumbers`` accepts as valid for ``region`` (None: only "+" international ones).

    The matcher refuses numbers glued to letters ("call09050000327", "08452810075over18"), as
    is common in SMS and scraped text; a second pass checks such bare digit runs directly.
    """
    matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID)
    found = [(match.start, match.end) for match in matcher]
    yield from found
    for m in _DIGIT_RUN.finditer(text):
        if any(s < m.end() and m.start() < e for s, e in found):
            continue
        end = _valid_phone_prefix_end(m.group(), region)
        if end:
            yield m.start(), m.start() + end


def _valid_phone_prefix_end(digits: str, region: str | None) -> int:
    """Length of the valid phone number ``digits`` is, or starts with; 0 if none.

    Shorter prefixes are tried only for runs written with a trunk "0" or a "+", where
    trailing digits are usually a glued-on price or age ("0870241182716" = number + "16");
    other long digit runs are more often IDs than phone numbers.
    """
    shortest = 7 if digits[0] in "0+" else len(digits)
    for end in range(len(digits), shortest - 1, -1):
        # The matcher on the bare candidate applies exactly its own checks (validity, and a
        # trunk prefix where the region requires one: "1234567890" is no GB number).
        matches = phonenumbers.PhoneNumberMatcher(
            digits[:end], region, leniency=phonenumbers.Leniency.VALID
        )
        if any(m.start == 0 and m.end == end for m in matches):
            return end
    return 0


class _Masks:
    """Hides found items behind one private-use character each, and puts them back at the end."""

    _CHAR = re.compile("[\U000f0000-\U000ffffd\U00100000-\U0010fffd]")

    def __init__(self, text: str) -> None:
        self.items: dict[str, tuple[str, str]] = {}  # mask char -> (kind, original text)
        self._taken = set(self._CHAR.findall(text))  # never reuse a character the text has
        self._next = _MASK_BASE

    def hide(self, text: str, spans: Sequence[Span], kind: str) -> str:
        out: list[str] = []
        pos = 0
        for start, end in sorted(spans):
            if start < pos or start >= end:
                continue  # overlapping or empty: the first one found wins
            mask = self._new_char()
            self.items[mask] = (kind, text[start:end])
            out += [text[pos:start], mask]
            pos = end
        return "".join(out) + text[pos:]

    def reveal(self, text: str, kinds: Collection[str], counts: Counter[str]) -> str:
        """Placeholders for the kinds asked for (counted), the original text for the others."""

        def put_back(m: re.Match[str]) -> str:
            if m.group() not in self.items:
                return m.group()
            kind, original = self.items[m.group()]
            if kind in kinds:
                counts[kind] += 1
                return PLACEHOLDERS[kind]
            return self.reveal(original, kinds, counts)  # it may hold items found earlier

        return self._CHAR.sub(put_back, text)

    def _new_char(self) -> str:
        while True:
            if self._next == _MASK_LIMIT + 1:
                self._next = 0x100000  # plane 15 used up: go on in plane 16
            if self._next > 0x10FFFD:
                raise ValueError("too many PII items in one text to redact")
            char = chr(self._next)
            self._next += 1
            if char not in self._taken:
                return char


Detector = Callable[[str], Iterator[Span]]


def _detectors(kinds: Collection[str], region: str | None) -> list[tuple[str, Detector]]:
    """Detectors in priority order: whatever an earlier one claims, a later one cannot see.

    Emails before URLs (a mail domain is not a link); IBANs and cards before IPs and phones,
    since their digit runs could pass as phone numbers. Kinds not asked for still run and hide
    their items, so asking only for phones never redacts a card number as a phone; URLs are
    the exception, being containers: when not asked for, PII inside a link is still found.
    """
    order: list[tuple[str, Detector]] = [
        ("email", _email_spans),
        ("url", _url_spans),
        ("iban", _iban_spans),
        ("credit_card", _card_spans),
        ("ip_address", _ip_spans),
        ("phone", lambda text: _phone_spans(text, region)),
    ]
    return [(kind, find) for kind, find in order if kind != "url" or "url" in kinds]


def redact(
    text: str,
    kinds: Collection[str] = DEFAULT_KINDS,
    *,
    region: str | None = DEFAULT_REGION,
) -> tuple[str, Counter[str]]:
    """``text`` with each PII item of ``kinds`` replaced by its placeholder, and counts by kind.

    ``region`` is where phone numbers written without "+country" are assumed to be from
    (an ISO 3166 code such as "US" or "GB"); None finds only international "+" numbers.
    """
    _check_options(kinds, region)
    masks = _Masks(text)
    masked = text
    for kind, find in _detectors(kinds, region):
        masked = masks.hide(masked, list(find(masked)), kind)
    counts: Counter[str] = Counter()
    if not masks.items:
        return text, counts
    return masks.reveal(masked, kinds, counts), counts


def redact_texts(
    texts: Sequence[str],
    kinds: Collection[str] = DEFAULT_KINDS,
    *,
    region: str | None = DEFAULT_REGION,
    max_examples: int = MAX_EXAMPLES,
) -> tuple[list[str], Counter[str], dict[str, list[tuple[str, str]]]]:
    """``redact`` over many texts: the texts, total counts by kind, and a few (before, after)
    examples per kind so the data report can show what was hidden."""
    _check_options(kinds, region)
    out: list[str] = []
    totals: Counter[str] = Counter()
    examples: dict[str, list[tuple[str, str]]] = {}
    for text in texts:
        after, counts = redact(text, kinds, region=region)
        out.append(after)
        totals.update(counts)
        for kind in sorted(counts):
            kept = examples.setdefault(kind, [])
            if len(kept) < max_examples:
                kept.append((text, after))
    return out, totals, examples


def _check_options(kinds: Collection[str], region: str | None) -> None:
    """Fail loudly on a typo: an unknown kind or region would otherwise silently redact nothing."""
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a collection of kind names, not the string {kinds!r}")
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise ValueError(f"unknown PII kinds {unknown}; known: {', '.join(PII_KINDS)}")
    if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {region!r}; use an ISO 3166 code such as 'US'")
