"""Text encodings of data files.

Text files are read as UTF-8 (a BOM is dropped; a UTF-16/32 BOM is followed); else
in the encoding detected from ``charset-normalizer``'s candidates with known facts applied:
C1 control codes (what latin-1 and the other ISO-8859 pages make of bytes 0x80-0x9F) never
occur in text; a right decoding gives letters of one language's alphabet, where a wrong one
mixes alphabets ("năo" for "não") or puts symbols inside words; and among equally good
candidates Windows-1252, the usual legacy encoding of Western text, wins. The encoding and a
confidence in [0, 1] are recorded on the Table and shown by ``Table.describe``, so a fallback
is never silent; ``data.encoding`` sets the encoding instead.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

from tunesmith.data.errors import DataError

_C1 = re.compile("[\x80-\x9f]")
_NOT_C1 = bytes(b for b in range(256) if not 0x80 <= b <= 0x9F)  # deleting these leaves a file's C1-range bytes
_SIMILAR_FIT = 0.05  # decodings whose alphabet fits are this close fit equally well
_SIMILAR_CHAOS = 0.05  # charset-normalizer chaos this close to the cleanest counts as equally clean


class Decoded(NamedTuple):
    """A file's text, the encoding it was read in, and the confidence when it was detected."""

    text: str
    encoding: str
    confidence: float | None  # None: valid UTF-8, or the encoding was set


def read_text(path: Path, encoding: str | None = None) -> tuple[str, str]:
    """The file's text and the encoding used: ``encoding`` if given, else UTF-8, else the detected one."""
    decoded = decode(path, encoding)
    return decoded.text, decoded.encoding


def decode(path: Path, encoding: str | None = None) -> Decoded:
    """Decode the file in ``encoding``, or in UTF-8, or in the detected encoding."""
    raw = path.read_bytes()
    if encoding is not None:
        return _decode_as(path, raw, encoding)
    try:
        return Decoded(raw.decode("utf-8-sig"), "utf-8", None)
    except UnicodeDecodeError as e:
        first_bad = raw[: e.start].count(b"\n") + 1
    for bom, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                      (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):  # a byte-order mark names the encoding (UTF-32 LE's starts like UTF-16's: first)
            try:
                return Decoded(raw.decode(name), name, 1.0)
            except UnicodeDecodeError:
                break
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path}: binary data (NUL bytes), not a text file")
    found = _detect(raw)
    if found is None:
        raise DataError(f"{path}:{first_bad}: not valid UTF-8 and no other encoding fits; "
                        "convert the file to UTF-8 or set data.encoding")
    return found


def _decode_as(path: Path, raw: bytes, encoding: str) -> Decoded:
    """Decode in the encoding set by ``data.encoding``: DataError for an unknown name or a bad byte."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):  # e.g. 'base64' is a codec, not a text encoding
        raise DataError(f"{path}: data.encoding {encoding!r} is not a known text encoding "
                        "(use a Python codec name such as 'utf-8', 'cp1252' or 'cp1250')")
    try:
        text = raw.decode("utf-8-sig" if info.name == "utf-8" else info.name)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[e.start]:02x} is not valid {info.name} "
                        f"(data.encoding {encoding!r}); fix the setting or the file") from None
    return Decoded(text, info.name, None)


def _detect(raw: bytes) -> Decoded | None:
    """The decoding of ``raw`` that fits a language best among those charset-normalizer finds.

    charset-normalizer measures "chaos" (how garbled a decoding looks) but often leaves
    several Latin code pages equally clean (Portuguese "não" is "năo" in cp1250 and cp1258);
    they differ in which letters they make, so the decoding whose letters one language's
    alphabet holds wins (``_alphabet_fit``), then the cleanest, then cp1252, the usual legacy
    encoding of Western text, then charset-normalizer's own order.
    Confidence: (1 - chaos) x the alphabet fit of the choice, x 0.7 when another decoding as
    good reads the bytes as different text."""
    from charset_normalizer import from_bytes

    matches = [m for m in from_bytes(raw) if m.encoding not in ("ascii", "utf_8")]
    if not any(m.encoding == "cp1252" for m in matches):  # skipped as "similar" to one tried first: try it alone
        matches += [m for m in from_bytes(raw, cp_isolation=["cp1252"]) if m.encoding == "cp1252"]
    candidates = _plausible(raw, matches)
    if not candidates:
        return None
    sample = _fit_sample(raw)
    decoded = {m.encoding: sample.decode(m.encoding, errors="replace") for m in candidates}
    fit = {name: _alphabet_fit(text) for name, text in decoded.items()}
    best_fit = max(fit.values())
    fitting = [m for m in candidates if fit[m.encoding] >= best_fit - _SIMILAR_FIT]
    cleanest = min(m.chaos for m in fitting)
    close = [m for m in fitting if m.chaos <= cleanest + _SIMILAR_CHAOS]
    chosen = next((m for m in close if m.encoding == "cp1252"), close[0])
    ambiguous = any(decoded[m.encoding] != decoded[chosen.encoding] for m in close)
    confidence = max(0.0, 1.0 - chosen.chaos) * fit[chosen.encoding] * (0.7 if ambiguous else 1.0)
    return Decoded(str(chosen), codecs.lookup(chosen.encoding).name, round(min(1.0, confidence), 2))


def _fit_sample(raw: bytes, limit: int = 1 << 18, reach: int = 2048) -> bytes:
    """The file's lines that hold non-ASCII bytes (at most ``reach`` bytes either side of
    one), up to ``limit`` bytes: where decodings differ, without decoding a large file whole."""
    parts: list[bytes] = []
    size, pos = 0, 0
    high = re.compile(rb"[\x80-\xff]")
    while size < limit and (hit := high.search(raw, pos)):
        at = hit.start()
        start = max(raw.rfind(b"\n", 0, at) + 1, at - reach)
        end = raw.find(b"\n", at)
        end = min(len(raw) if end < 0 else end + 1, at + reach)
        parts.append(raw[start:end] + b"\n")
        size, pos = size + end - start, end
    return b"".join(parts)


def _plausible(raw: bytes, matches: list[Any]) -> list[Any]:
    """The candidate decodings left once C1 control codes rule some out.

    C1 controls (U+0080-U+009F) never occur in text: an encoding that reads the file's bytes
    0x80-0x9F as them (latin-1 and the other ISO-8859 pages) is wrong for it; browsers read
    such "latin-1" as windows-1252 for the same reason."""
    from charset_normalizer.utils import is_multi_byte_encoding

    c1_bytes = bytes(sorted(set(raw.translate(None, _NOT_C1))))
    return [m for m in matches if is_multi_byte_encoding(m.encoding)
            or not _C1.search(c1_bytes.decode(m.encoding, errors="ignore"))]


# The letters beyond ASCII of languages written in Latin script, lower case. A right decoding
# gives letters that one language uses; a wrong one mixes alphabets ("năo", "Dìkuji") or puts
# symbols inside words ("by³em").
_ALPHABETS = {
    "pt": "áâãàçéêíóôõú", "es": "áéíóúüñ", "fr": "àâæçéèêëîïôœùûüÿ", "de": "äöüß", "it": "àèéìíîòóùú",
    "ca": "àçèéíïòóúü", "nl": "áéíóúàèëïöü", "da-no": "æøåéó", "sv": "åäöé", "fi": "äöåšž",
    "is": "áðéíóúýþæö", "et": "äõöüšž", "cs": "áčďéěíňóřšťúůýž", "sk": "áäčďéíĺľňóôŕšťúýž",
    "pl": "ąćęłńóśźż", "hu": "áéíóöőúüű", "ro": "ăâîșşțţ", "hr-sl": "čćđšž", "sq": "çë",
    "tr": "çğıöşüâî", "lv": "āčēģīķļņšūž", "lt": "ąčęėįšųūž",
    "vi": "àáâãèéêìíòóôõùúýăđĩũơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ\u0300\u0301\u0303\u0309\u0323",
}
_LANGUAGES_OF: dict[str, list[str]] = {}
for _lang, _letters in _ALPHABETS.items():
    for _letter in _letters:
        _LANGUAGES_OF.setdefault(_letter, []).append(_lang)
# scripts other than Latin count as one alphabet each (Chinese, Japanese and Korean together)
_SCRIPTS = {"CYRILLIC": "cyrillic", "GREEK": "greek", "HEBREW": "hebrew", "ARABIC": "arabic", "THAI": "thai",
            "ARMENIAN": "armenian", "GEORGIAN": "georgian", "DEVANAGARI": "devanagari",
            "CJK": "cjk", "HIRAGANA": "cjk", "KATAKANA": "cjk", "HANGUL": "cjk"}
_INSIDE_WORDS = "’'‘·"  # apostrophes and the Catalan middle dot do sit between letters
_TEXT_SYMBOLS = "°©®™±×÷¬"  # symbols that text uses; other symbols (box drawing, math) are mojibake
_FIT_SAMPLE = 50_000  # non-ASCII characters looked at


def _alphabet_fit(text: str) -> float:
    """The share of the text's non-ASCII letters that one alphabet holds (1.0 when it has none).

    Mojibake counts as letters no alphabet holds: symbols other than text's usual ones, any
    non-letter between two letters ("by³em"; a dash is fine), and a non-Latin letter between
    two ASCII letters (a stray byte read as one CJK character, "sister城ity")."""
    votes: Counter[str] = Counter()
    total = 0
    for match in islice(re.finditer(r"[^\x00-\x7f]", text), _FIT_SAMPLE):
        c, i = match.group(), match.start()
        between = 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()
        category = unicodedata.category(c)
        if not c.isalpha() and category[0] != "M":
            symbol = category[0] in "SC" and category != "Sc" and c not in _TEXT_SYMBOLS
            total += symbol or (between and category != "Pd" and c not in _INSIDE_WORDS)
            continue
        total += 1
        script = _SCRIPTS.get(unicodedata.name(c, "").split(" ")[0])
        if script and not (between and text[i - 1].isascii() and text[i + 1].isascii()):
            votes[script] += 1
        elif not script:
            votes.update(_LANGUAGES_OF.get(c.lower(), ()))
    return max(votes.values(), default=0) / total if total else 1.0
