"""Labeling functions for SMS spam ("spam" / "ham"), for `tunesmith.data.label`.

Each function is a small, honest heuristic written from what SMS spam generally looks like
(premium-rate offers, prizes, short codes, phone numbers, prices, links, shouting) and what
personal messages look like (short, casual, no numbers). None was tuned against labelled
rows: each is expected to be noisy, and the label model's job is to weigh them.
A function returns a label, or ABSTAIN when its clue is absent.
"""

from __future__ import annotations

import re

from tunesmith.data.label import ABSTAIN, labeling_function

SPAM = "spam"
HAM = "ham"

_FREE = re.compile(r"\bfree\b", re.IGNORECASE)
_WIN = re.compile(r"\b(win|wins|won|winner|winning|prize|prizes|award|awarded|reward)\b", re.IGNORECASE)
_CLAIM = re.compile(r"\b(claim|redeem|urgent|guaranteed|congratulations|congrats)\b", re.IGNORECASE)
# "txt WIN to 80082", "send STOP to 87239", "reply YES to 8007": a keyword then a 4-6 digit short code.
_SHORT_CODE = re.compile(r"\b(txt|text|send|reply|call)\b.{0,25}?\b\d{4,6}\b", re.IGNORECASE)
# Premium-rate and callback numbers: 10+ digits, possibly grouped by spaces or dashes.
_LONG_NUMBER = re.compile(r"(?:\d[ -]?){10,}")
# A price: a currency sign next to a number, or a per-message / per-minute rate ("150p/msg", "10p/min").
_MONEY = re.compile(r"[£$€]\s?\d|\d+\s?p\s?(/|per)\s?(msg|min|minute|text|sms)\b|\bppm\b", re.IGNORECASE)
_URL = re.compile(r"https?://|\bwww\.|\b[\w-]+\.(com|net|org|co\.uk|biz|info)\b", re.IGNORECASE)
_OPT_OUT = re.compile(r"\b(unsubscribe|opt[ -]?out)\b|\b(txt|text|send|reply)\s+stop\b|\bstop\s+to\b", re.IGNORECASE)
_CASUAL = re.compile(r"\b(i'm|im|i'll|lol|haha|hehe|ok|okay|home|later|gonna|wanna|sorry|hey)\b", re.IGNORECASE)
_DIGIT = re.compile(r"\d")


@labeling_function()
def keyword_free(text: str) -> str | None:
    """Offers of something "free" are the classic spam hook."""
    return SPAM if _FREE.search(text) else ABSTAIN


@labeling_function()
def keyword_win_prize(text: str) -> str | None:
    """Prize and competition wording."""
    return SPAM if _WIN.search(text) else ABSTAIN


@labeling_function()
def keyword_claim_urgent(text: str) -> str | None:
    """Pressure to act: claim, redeem, urgent, guaranteed, congratulations."""
    return SPAM if _CLAIM.search(text) else ABSTAIN


@labeling_function()
def text_to_short_code(text: str) -> str | None:
    """Instructions to text a keyword to a short code are how premium SMS services sign people up."""
    return SPAM if _SHORT_CODE.search(text) else ABSTAIN


@labeling_function()
def long_phone_number(text: str) -> str | None:
    """Friends rarely type out full phone numbers; advertisers ask you to call one."""
    return SPAM if _LONG_NUMBER.search(text) else ABSTAIN


@labeling_function()
def price_or_rate(text: str) -> str | None:
    """Currency amounts and per-message rates belong to commercial messages."""
    return SPAM if _MONEY.search(text) else ABSTAIN


@labeling_function()
def has_url(text: str) -> str | None:
    """Links in unsolicited SMS point to offers."""
    return SPAM if _URL.search(text) else ABSTAIN


@labeling_function()
def opt_out_instructions(text: str) -> str | None:
    """Bulk senders must say how to stop messages; friends don't."""
    return SPAM if _OPT_OUT.search(text) else ABSTAIN


@labeling_function()
def mostly_capitals(text: str) -> str | None:
    """Shouting in capitals is common in ads; only judged on messages with enough letters."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 15:
        return ABSTAIN
    upper = sum(c.isupper() for c in letters)
    return SPAM if upper / len(letters) >= 0.5 else ABSTAIN


@labeling_function()
def short_casual(text: str) -> str | None:
    """Short messages with casual first-person wording are personal."""
    return HAM if len(text.split()) <= 20 and _CASUAL.search(text) else ABSTAIN


@labeling_function()
def short_without_digits(text: str) -> str | None:
    """Spam almost always carries a number (to call, text, or pay); short digit-free messages are personal."""
    return HAM if len(text.split()) <= 15 and not _DIGIT.search(text) else ABSTAIN
