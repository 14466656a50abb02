"""Exact and near-duplicate detection for the data-preparation stage.

Duplicates inflate a class, bias the loss towards repeated rows and, across splits, leak test
answers into training. Two notions are used:

* exact: the same text after :func:`normalize` (case, Unicode form, spacing and edge punctuation
  are ignored), found with a hash table;
* near: estimated Jaccard similarity of the texts' *character* n-gram sets (MinHash signatures,
  candidates from ``datasketch``'s ``MinHashLSH``, every candidate checked against the threshold).

Why character n-grams rather than word shingles: an SMS-sized text has 5-15 words, so it has only
a handful of word 5-grams and a single changed word destroys up to five of them (Jaccard drops to
0.3 or lower); with character 5-grams the same text has ~60-150 shingles and one changed word
touches only ``ngram + len(word) - 1`` of them, so the Jaccard of "the same message, one word
changed" stays above 0.8 from about 25 words up. For long documents character shingles still
work (unrelated documents share few 5-grams relative to their union); they only cost more
hashing, which is vectorised here: shingle hashing and the MinHash permutations are numpy
operations over whole batches of texts, never Python loops over shingles x permutations.

The signatures use ``datasketch``'s ``affine32`` scheme and permutation parameters, so a row
of :func:`minhash_signatures` equals ``MinHash(num_perm, seed).update_batch(shingles)`` with
:func:`shingle_hash` as the hash function (a test checks this).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

__all__ = [
    "DedupResult", "DupPair", "Leak", "find_duplicates", "find_leakage",
    "minhash_signatures", "normalize", "shingle_hash",
]

_MASK64 = (1 << 64) - 1
_PRIME = 0x100000001B3  # FNV-64 prime: the base of the polynomial n-gram hash
_BLOCK = 1 << 15  # shingles per permutation block: 32768 x 128 perms x 4 B = 16 MiB a temporary
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's value for "no shingle seen"
_LSH_RECALL = 0.95  # candidate probability wanted for a pair exactly at the threshold
_EXAMPLES = 5


class DupPair(NamedTuple):
    """One duplicate shown to a person: the text kept, one removed, and their similarity."""

    kept: str
    removed: str
    jaccard: float  # 1.0 for exact duplicates, the MinHash estimate for near ones


@dataclass
class DedupResult:
    """What :func:`find_duplicates` found; ``keep`` is what to train on."""

    keep: list[int]  # indices kept (first occurrence of each cluster), in original order
    exact: list[list[int]]  # clusters of >= 2 rows with the same normalised text
    near: list[list[int]]  # clusters linked only by near-dup; each member stands for its exact cluster
    removed_exact: int
    removed_near: int
    exact_examples: list[DupPair] = field(default_factory=list)
    near_examples: list[DupPair] = field(default_factory=list)


@dataclass(frozen=True)
class Leak:
    """A train row that duplicates a row of another split (the caller drops the train row)."""

    train_index: int
    split: str
    other_index: int
    similarity: float  # 1.0 for exact, else the estimated Jaccard of the character n-grams
    kind: str  # "exact" or "near"


# ---------------------------------------------------------------- normalisation and hashing


def normalize(text: str) -> str:
    """The text as exact de-dup compares it: NFKC, casefolded, single spaces, no edge punctuation.

    "Ok lar..." and "OK  lar" are the same message; punctuation is only stripped at the ends
    so that inner punctuation (numbers, URLs) still tells texts apart. A text that is nothing
    but punctuation (":-)") keeps it, so that emoticons do not all collapse into "".
    """
    if text.isascii():  # fast path: NFKC is a no-op and casefold is lower() on ASCII
        folded = text.lower()
    else:
        folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    collapsed = " ".join(folded.split())
    start, end = 0, len(collapsed)
    while start < end and _is_edge_junk(collapsed[start]):
        start += 1
    while end > start and _is_edge_junk(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end] or collapsed


def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def _digest(text: str) -> bytes:
    """A 128-bit key for exact matching: smaller than the text, collisions negligible."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, so the kept top 32 bits depend on every character."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finaliser: datasketch's ``affine32`` pre-mix of every input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hash(shingle: str, ngram: int = 5) -> int:
    """Scalar reference of the vectorised shingle hash (for tests and ``MinHash(hashfunc=...)``).

    A polynomial hash over exactly ``ngram`` slots (code point + 1, zero-padded for texts
    shorter than ``ngram``), finalised by splitmix64, top 32 bits.
    """
    h = 0
    for k in range(ngram):
        code = ord(shingle[k]) + 1 if k < len(shingle) else 0
        h = (h * _PRIME + code) & _MASK64
    return int(_mix64(np.array([h], dtype=np.uint64))[0] >> np.uint64(32))


def _shingle_counts(lengths: np.ndarray, ngram: int) -> np.ndarray:
    """n-grams per text: ``len - ngram + 1``; a shorter non-empty text is one shingle."""
    return np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))


def _shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every character n-gram of every text, in text order, and counts per text."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    counts = _shingle_counts(lengths, ngram)
    raw = "".join(texts).encode("utf-32-le", "surrogatepass")
    codes = np.frombuffer(raw, dtype=np.uint32).astype(np.uint64) + np.uint64(1)
    codes = np.concatenate([codes, np.zeros(ngram, dtype=np.uint64)])  # room for the last window
    pos = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    start = np.repeat(np.cumsum(lengths) - lengths, counts) + pos
    left = np.repeat(lengths, counts) - pos  # characters of its own text from this window on
    h = np.zeros(len(start), dtype=np.uint64)
    for k in range(ngram):  # Horner over the window; slots past the text's end count as 0
        h = h * np.uint64(_PRIME) + np.where(k < left, codes[start + k], np.uint64(0))
    return (_mix64(h) >> np.uint64(32)).astype(np.uint32), counts


# ---------------------------------------------------------------- MinHash signatures


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own affine32 permutation parameters, so signatures interoperate with it."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _chunks(counts: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Ranges of texts with at most ``budget`` shingles together (or one text that has more)."""
    cum = np.cumsum(counts)
    lo = 0
    while lo < len(counts):
        before = int(cum[lo - 1]) if lo else 0
        hi = max(int(np.searchsorted(cum, before + budget, side="right")), lo + 1)
        yield lo, hi
        lo = hi


def _min_hash(hv: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signatures of the texts with >= 1 shingle: min over each text's shingles of ``a*h + b``.

    Laid out permutations x shingles so the reduction runs along contiguous memory
    (about 30x faster than reducing a shingles x permutations array along axis 0).
    """
    mixed = _fmix32(hv)
    if len(counts) == 1:  # one text, maybe huge: running minimum over blocks bounds memory
        sig = np.full(len(a), _EMPTY, dtype=np.uint32)
        for lo in range(0, len(mixed), _BLOCK):
            block = np.multiply.outer(a, mixed[lo:lo + _BLOCK])  # uint32 wraps: mod 2^32
            block += b[:, None]
            np.minimum(sig, block.min(axis=1), out=sig)
        return sig[None, :]
    phv = np.multiply.outer(a, mixed)
    phv += b[:, None]
    return np.minimum.reduceat(phv, np.cumsum(counts) - counts, axis=1).T


def minhash_signatures(texts: Sequence[str], *, num_perm: int = 128, ngram: int = 5,
                       seed: int = 1) -> np.ndarray:
    """``(len(texts), num_perm)`` uint32 MinHash signatures of the texts' character n-grams.

    Texts are shingled as given (callers pass normalised text). An empty text has no shingles
    and gets datasketch's empty signature (all 0xFFFFFFFF).
    """
    a, b = _permutations(num_perm, seed)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    counts = _shingle_counts(lengths, ngram)
    sig = np.full((len(texts), num_perm), _EMPTY, dtype=np.uint32)
    for lo, hi in _chunks(counts, _BLOCK):
        hv, chunk_counts = _shingle_hashes(texts[lo:hi], ngram)
        filled = np.flatnonzero(chunk_counts)
        if len(filled):
            sig[lo + filled] = _min_hash(hv, chunk_counts[filled], a, b)
    return sig


# ---------------------------------------------------------------- LSH candidates


def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows: the longest bands that still catch a pair at the threshold 95% of the time.

    datasketch's default optimiser balances false positives and negatives, which loses about
    half the pairs right at the threshold; here every candidate is checked against the
    threshold anyway, so recall matters and false candidates only cost a comparison.
    """
    for r in range(num_perm // 2, 0, -1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold ** r) ** b >= _LSH_RECALL:
            return b, r
    return num_perm, 1


def _lean(row: np.ndarray, seed: int) -> LeanMinHash:
    return LeanMinHash(seed=seed, hashvalues=row, scheme="affine32")


def _new_lsh(threshold: float, num_perm: int) -> MinHashLSH:
    return MinHashLSH(num_perm=num_perm, params=_lsh_params(threshold, num_perm))


def _build_lsh(sig: np.ndarray, rows: Sequence[int], threshold: float, seed: int) -> MinHashLSH:
    """A MinHashLSH over the given signature rows, keyed by row number, filled in one session."""
    lsh = _new_lsh(threshold, sig.shape[1])
    with lsh.insertion_session() as session:
        for k in rows:
            session.insert(int(k), _lean(sig[k], seed), check_duplication=False)
    return lsh


def _matches(lsh: MinHashLSH, index_sig: np.ndarray, query: LeanMinHash,
             threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Indexed rows whose estimated Jaccard with ``query`` is >= threshold."""
    keys = lsh.query(query)
    if not keys:
        return np.empty(0, dtype=np.int64), np.empty(0)
    cand = np.array(keys, dtype=np.int64)
    sims = (index_sig[cand] == query.hashvalues).mean(axis=1)  # share of equal minima ~ Jaccard
    ok = sims >= threshold
    return cand[ok], sims[ok]


def _has_shingles(sig: np.ndarray) -> np.ndarray:
    return ~(sig == _EMPTY).all(axis=1)


def _check(threshold: float, num_perm: int, ngram: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be >= 2, got {num_perm}")
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")


# ---------------------------------------------------------------- clustering


class _UnionFind:
    """Disjoint sets whose root is always the smallest index, i.e. the first occurrence."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps trees shallow
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            lo, hi = (ri, rj) if ri < rj else (rj, ri)
            self.parent[hi] = lo

    def clusters(self, members: Sequence[int]) -> list[list[int]]:
        """Sets of >= 2 of ``members``, each sorted, ordered by first member."""
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(self.find(i), []).append(i)
        return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _exact_groups(norm: Sequence[str], targets: Sequence[str] | None = None) -> tuple[list[int], list[list[int]]]:
    """First index of each distinct normalised text (and target), and the clusters of >= 2 equal ones."""
    first: dict[bytes, list[int]] = {}
    for i, text in enumerate(norm):
        key = text if targets is None else f"{text}\x00{targets[i]}"
        first.setdefault(_digest(key), []).append(i)
    reps = sorted(group[0] for group in first.values())
    exact = sorted((g for g in first.values() if len(g) > 1), key=lambda g: g[0])
    return reps, exact


def _near_edges(sig: np.ndarray, threshold: float, seed: int) -> list[tuple[int, int, float]]:
    """Pairs of signature rows (earlier, later, estimated Jaccard) at or above the threshold.

    One pass, query then insert: each row is compared only with the rows before it, so every
    pair is checked once and each LeanMinHash is built once.
    """
    lsh = _new_lsh(threshold, sig.shape[1])
    edges = []
    for k in np.flatnonzero(_has_shingles(sig)).tolist():
        minhash = _lean(sig[k], seed)
        cand, sims = _matches(lsh, sig, minhash, threshold)
        edges.extend((int(c), k, float(s)) for c, s in zip(cand, sims))
        lsh.insert(k, minhash, check_duplication=False)
    return edges


def find_duplicates(texts: list[str], *, near: bool = True, threshold: float = 0.85,
                    num_perm: int = 128, ngram: int = 5, seed: int = 1,
                    targets: Sequence[str] | None = None) -> DedupResult:
    """Exact and near-duplicate clusters of ``texts``; one row (the first) is kept per cluster.

    Exact duplicates are merged first; near-dup search then runs on one row per exact cluster,
    so ``near`` lists only links that exact matching did not find. Near clusters are transitive
    (union-find): A~B and B~C put A, B, C together even if A and C are further apart.
    ``targets`` (the answer or label of each row): rows whose normalised targets differ are never
    merged, however alike their texts ("convert 10 degrees" -> "50" and "convert 20 degrees" ->
    "68" are two examples, not one); since only equal targets are linked, a cluster has one target.
    """
    _check(threshold, num_perm, ngram)
    norm = [normalize(t) for t in texts]
    tnorm = None if targets is None else [normalize(t) for t in targets]
    reps, exact = _exact_groups(norm, tnorm)
    near_clusters: list[list[int]] = []
    near_examples: list[DupPair] = []
    keep = reps
    if near and len(reps) > 1:
        sig = minhash_signatures([norm[i] for i in reps], num_perm=num_perm, ngram=ngram, seed=seed)
        uf = _UnionFind(len(reps))
        for a, b, _ in _near_edges(sig, threshold, seed):
            if tnorm is None or tnorm[reps[a]] == tnorm[reps[b]]:
                uf.union(a, b)
        keep = [reps[k] for k in range(len(reps)) if uf.find(k) == k]
        near_clusters = [[reps[k] for k in c] for c in uf.clusters(range(len(reps)))]
        by_rep = {r: k for k, r in enumerate(reps)}
        for c in near_clusters[:_EXAMPLES]:
            sim = float((sig[by_rep[c[0]]] == sig[by_rep[c[1]]]).mean())
            near_examples.append(DupPair(texts[c[0]], texts[c[1]], sim))
    return DedupResult(
        keep=keep, exact=exact, near=near_clusters,
        removed_exact=sum(len(c) - 1 for c in exact),
        removed_near=sum(len(c) - 1 for c in near_clusters),
        exact_examples=[DupPair(texts[c[0]], texts[c[1]], 1.0) for c in exact[:_EXAMPLES]],
        near_examples=near_examples,
    )


# ---------------------------------------------------------------- leakage between splits


def find_leakage(train: list[str], others: dict[str, list[str]], *, threshold: float = 0.85,
                 near: bool = True, num_perm: int = 128, ngram: int = 5,
                 seed: int = 1) -> list[Leak]:
    """Train rows that exactly or nearly duplicate a row of another split, one Leak per (row, split).

    An exact match wins over a near one; among near matches the most similar is reported.
    Sorted by train index, then split name. The other splits are indexed (they are usually the
    small ones) and every train row is queried against them.
    """
    _check(threshold, num_perm, ngram)
    norm_train = [normalize(t) for t in train]
    train_keys = [_digest(t) for t in norm_train]
    leaks: dict[tuple[int, str], Leak] = {}
    flat: list[tuple[str, int]] = []
    flat_text: list[str] = []
    for split, rows in others.items():
        first: dict[bytes, int] = {}
        for j, text in enumerate(rows):
            norm = normalize(text)
            first.setdefault(_digest(norm), j)
            flat.append((split, j))
            flat_text.append(norm)
        for i, key in enumerate(train_keys):
            if key in first:
                leaks[(i, split)] = Leak(i, split, first[key], 1.0, "exact")
    if near and flat and train:
        _near_leaks(norm_train, flat, flat_text, leaks, threshold, num_perm, ngram, seed)
    return [leaks[k] for k in sorted(leaks)]


def _near_leaks(norm_train: list[str], flat: list[tuple[str, int]], flat_text: list[str],
                leaks: dict[tuple[int, str], Leak], threshold: float, num_perm: int,
                ngram: int, seed: int) -> None:
    """Add the best near match per (train row, split) to ``leaks`` where no exact one is there."""
    other_sig = minhash_signatures(flat_text, num_perm=num_perm, ngram=ngram, seed=seed)
    train_sig = minhash_signatures(norm_train, num_perm=num_perm, ngram=ngram, seed=seed)
    lsh = _build_lsh(other_sig, np.flatnonzero(_has_shingles(other_sig)), threshold, seed)
    for i in np.flatnonzero(_has_shingles(train_sig)).tolist():
        cand, sims = _matches(lsh, other_sig, _lean(train_sig[i], seed), threshold)
        for c in np.argsort(-sims, kind="stable"):  # best first: the first per split wins
            split, j = flat[cand[c]]
            if (i, split) not in leaks:
                leaks[(i, split)] = Leak(i, split, j, float(sims[c]), "near")
