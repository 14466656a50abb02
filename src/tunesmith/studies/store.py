"""A rating study's SQLite file (``ratings.sqlite`` in the study folder): raters, pairs, assignments,
ratings and the judge's cache.

Every write is one short ``BEGIN IMMEDIATE`` transaction in WAL mode with ``synchronous=FULL``, so an
answer the server acknowledged survives a killed server, and two raters answering at once wait for
each other (30 s) instead of corrupting the file. Assignment happens inside the same transaction
that records it, so two raters never both take the last open slot of a pair.

Pairs: each item (a test prompt) has one pair per two systems, ``a`` < ``b`` by name. A pair is
*open* until it has ``k`` human ratings. ``next_assignment`` hands a rater the least-rated open pair
they have not seen (a rater's unanswered assignment comes back after a reload), and puts on the left
the system this pair, then the whole study, has shown on the left less often: positions stay
balanced per pair and per system.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB = "ratings.sqlite"
HOLD_MINUTES = 30  # an unanswered assignment keeps its pair's slot this long for others
_SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, token TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL DEFAULT 'human', created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (id INTEGER PRIMARY KEY, item INTEGER NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    UNIQUE(item, a, b));
CREATE TABLE IF NOT EXISTS assignments (id INTEGER PRIMARY KEY, rater INTEGER NOT NULL REFERENCES raters(id),
    pair INTEGER NOT NULL REFERENCES pairs(id), left TEXT NOT NULL, created TEXT NOT NULL, UNIQUE(rater, pair));
CREATE TABLE IF NOT EXISTS ratings (id INTEGER PRIMARY KEY, rater INTEGER NOT NULL REFERENCES raters(id),
    pair INTEGER NOT NULL REFERENCES pairs(id), left TEXT NOT NULL, right TEXT NOT NULL, scores TEXT NOT NULL,
    preference TEXT NOT NULL, comment TEXT NOT NULL DEFAULT '', created TEXT NOT NULL, UNIQUE(rater, pair, left));
CREATE TABLE IF NOT EXISTS judge_cache (key TEXT PRIMARY KEY, reply TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS judge_failures (id INTEGER PRIMARY KEY, rater INTEGER NOT NULL, pair INTEGER NOT NULL,
    left TEXT NOT NULL, reply TEXT NOT NULL, problem TEXT NOT NULL, created TEXT NOT NULL,
    UNIQUE(rater, pair, left));
"""


class RatingRefused(ValueError):
    """A rating that does not fit the study: not this rater's assignment, already answered, or with a
    missing or out-of-range score. ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Assignment:
    """One pair shown to one rater: ``left`` and ``right`` are system names, ``item`` the item id."""

    id: int
    pair: int
    item: int
    left: str
    right: str


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def connect(study_dir: Path, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """An open connection to the study's file (created with its tables on first use). ``readonly``:
    opened for reading only, never created or changed (raises sqlite3.Error when it is missing)."""
    path = Path(study_dir) / DB
    if readonly:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
    else:
        path.touch()  # sqlite would create it 0644 whatever the umask; its -wal and -shm files copy this mode
        con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        if not readonly:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # an acknowledged answer is on disk, even if the machine stops
            con.executescript(_SCHEMA)
        con.execute("PRAGMA busy_timeout=30000")
        con.row_factory = sqlite3.Row
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def add_pairs(con: sqlite3.Connection, items: list[int], systems: list[str]) -> int:
    """One pair per item and two systems (``a`` < ``b``); returns how many pairs were added."""
    names = sorted(systems)
    rows = [(i, a, b) for i in items for x, a in enumerate(names) for b in names[x + 1:]]
    with transaction(con):
        before = con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        con.executemany("INSERT OR IGNORE INTO pairs (item, a, b) VALUES (?, ?, ?)", rows)
        return int(con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] - before)


def add_rater(con: sqlite3.Connection, name: str, kind: str = "human") -> str:
    """Add a rater (``kind`` human or judge) with a fresh random token, or return an existing one's
    token. Raises ValueError for an empty name."""
    name = name.strip()
    if not name:
        raise ValueError("a rater needs a name")
    with transaction(con):
        row = con.execute("SELECT token FROM raters WHERE name = ?", (name,)).fetchone()
        if row:
            return str(row[0])
        token = secrets.token_urlsafe(18)
        con.execute("INSERT INTO raters (name, token, kind, created) VALUES (?, ?, ?, ?)", (name, token, kind, now()))
        return token


def raters(con: sqlite3.Connection, kind: str | None = None) -> list[dict[str, Any]]:
    """Every rater (name, token, kind, id), in the order they were added."""
    rows = con.execute("SELECT * FROM raters" + (" WHERE kind = ?" if kind else "") + " ORDER BY id",
                       (kind,) if kind else ()).fetchall()
    return [dict(r) for r in rows]


def rater_by_token(con: sqlite3.Connection, token: str) -> dict[str, Any] | None:
    """The human rater whose invite token this is (compared in constant time), or None."""
    for r in raters(con, "human"):
        if secrets.compare_digest(str(r["token"]).encode(), token.encode()):  # bytes: any text compares
            return r
    return None


def _order(rater: int, pair: int) -> str:
    """A per-rater shuffle of the pairs (stable across reloads)."""
    return hashlib.sha256(f"{rater}:{pair}".encode()).hexdigest()


def next_assignment(con: sqlite3.Connection, rater: int, k: int) -> Assignment | None:
    """The pair rater ``rater`` should rate now (None when nothing is left for them now).

    An unanswered assignment of theirs comes first; otherwise a new one is made, in the same
    transaction, for the open pair with the fewest ratings plus others' fresh (``HOLD_MINUTES``)
    unanswered assignments, among the pairs they have not been given yet. A pair whose ratings and
    fresh assignments already make ``k`` is not handed out (``progress`` then still counts it as open:
    it comes free when another rater's assignment goes stale).
    """
    with transaction(con):
        open_row = con.execute(
            "SELECT a.id, a.pair, a.left, p.item, p.a, p.b FROM assignments a JOIN pairs p ON p.id = a.pair "
            "WHERE a.rater = ? AND NOT EXISTS (SELECT 1 FROM ratings r WHERE r.rater = a.rater AND r.pair = a.pair) "
            "ORDER BY a.id LIMIT 1", (rater,)).fetchone()
        if open_row:
            full = _human_ratings(con, open_row["pair"]) >= k
            if not full:  # still theirs: shown again, and its hold starts again
                con.execute("UPDATE assignments SET created = ? WHERE id = ?", (now(), open_row["id"]))
                return _assignment(open_row)
            # others completed the pair while this rater was away: give them another
            con.execute("DELETE FROM assignments WHERE id = ?", (open_row["id"],))
        held = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=HOLD_MINUTES)).isoformat(timespec="seconds")
        rows = con.execute(
            "SELECT p.id, p.item, p.a, p.b, "
            " (SELECT COUNT(*) FROM ratings r JOIN raters x ON x.id = r.rater WHERE r.pair = p.id AND x.kind = 'human') AS done, "
            " (SELECT COUNT(*) FROM assignments s WHERE s.pair = p.id AND s.created >= ? AND NOT EXISTS "
            "   (SELECT 1 FROM ratings r WHERE r.rater = s.rater AND r.pair = s.pair)) AS waiting "
            "FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM assignments s WHERE s.pair = p.id AND s.rater = ?)",
            (held, rater)).fetchall()
        candidates = [r for r in rows if r["done"] + r["waiting"] < k]  # never more than K per pair
        if not candidates:
            return None
        pick = min(candidates, key=lambda r: (r["done"] + r["waiting"], r["done"], _order(rater, r["id"])))
        left = _left_system(con, pick["id"], pick["a"], pick["b"], rater)
        cur = con.execute("INSERT INTO assignments (rater, pair, left, created) VALUES (?, ?, ?, ?)",
                          (rater, pick["id"], left, now()))
        return Assignment(int(cur.lastrowid or 0), pick["id"], pick["item"], left, pick["b"] if left == pick["a"] else pick["a"])


def _human_ratings(con: sqlite3.Connection, pair: int) -> int:
    """How many people (not judges) have rated ``pair``."""
    return int(con.execute("SELECT COUNT(*) FROM ratings r JOIN raters x ON x.id = r.rater "
                           "WHERE r.pair = ? AND x.kind = 'human'", (pair,)).fetchone()[0])


def _left_system(con: sqlite3.Connection, pair: int, a: str, b: str, rater: int) -> str:
    """Which of ``a``, ``b`` goes left: the one this pair showed left less often, then the one the
    whole study showed left less often, then a per-rater coin."""
    def count(where: str, args: tuple[Any, ...]) -> dict[str, int]:
        return {r[0]: r[1] for r in con.execute(f"SELECT left, COUNT(*) FROM assignments WHERE {where} GROUP BY left", args)}

    here = count("pair = ?", (pair,))
    overall = count("1 = 1", ())
    coin = int(_order(rater, pair)[:8], 16) % 2
    return min((a, b), key=lambda s: (here.get(s, 0), overall.get(s, 0), (s == a) == bool(coin)))


def _assignment(row: sqlite3.Row) -> Assignment:
    return Assignment(row["id"], row["pair"], row["item"], row["left"], row["b"] if row["left"] == row["a"] else row["a"])


def progress(con: sqlite3.Connection, rater: int, k: int) -> tuple[int, int]:
    """(answered by this rater, the most they can answer: pairs still open to them plus answered)."""
    done = con.execute("SELECT COUNT(*) FROM ratings WHERE rater = ?", (rater,)).fetchone()[0]
    left = con.execute(
        "SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM ratings r WHERE r.pair = p.id AND r.rater = ?) "
        "AND (SELECT COUNT(*) FROM ratings r JOIN raters x ON x.id = r.rater WHERE r.pair = p.id AND x.kind = 'human') < ?",
        (rater, k)).fetchone()[0]
    return int(done), int(done + left)


def assignment_of(con: sqlite3.Connection, rater: int, assignment: int) -> Assignment | None:
    """Rater ``rater``'s assignment ``assignment`` (None when it is not theirs)."""
    row = con.execute("SELECT a.id, a.pair, a.left, a.rater, p.item, p.a, p.b FROM assignments a JOIN pairs p ON p.id = a.pair "
                      "WHERE a.id = ?", (assignment,)).fetchone()
    return _assignment(row) if row is not None and row["rater"] == rater else None


def answered(con: sqlite3.Connection, rater: int) -> list[tuple[int, dict[str, Any]]]:
    """Rater ``rater``'s answered assignments in the order answered: (assignment id, rating)."""
    rows = con.execute("SELECT a.id AS assignment, r.* FROM ratings r JOIN assignments a ON a.rater = r.rater AND a.pair = r.pair "
                       "WHERE r.rater = ? ORDER BY r.id", (rater,)).fetchall()
    return [(int(r["assignment"]), dict(r) | {"scores": json.loads(r["scores"])}) for r in rows]


def save_rating(con: sqlite3.Connection, rater: int, assignment: int, scores: dict[str, dict[str, int]],
                preference: str, comment: str, criteria: list[str], revise: bool = False, k: int | None = None) -> None:
    """Record rater ``rater``'s answer to their assignment ``assignment``; with ``revise``, replace
    their earlier answer to it (a rater correcting a slip).

    ``scores``: {"left"|"right": {criterion: 1..5}}; ``preference``: left, right or tie. Raises
    RatingRefused: 403 when the assignment is not this rater's, 409 when it is already answered
    (and not ``revise``) or, given ``k``, when the pair already has ``k`` human ratings (others
    completed it while this rater's assignment went stale), 400 for a missing or out-of-range score
    or preference.
    """
    problems = [f"Answer {'A' if side == 'left' else 'B'}, {c}: a score from 1 to 5 is needed" for side in ("left", "right") for c in criteria
                if not isinstance(scores.get(side, {}).get(c), int) or not 1 <= scores[side][c] <= 5]
    if preference not in ("left", "right", "tie"):
        problems.append("which do you prefer: choose A, B or tie")
    if problems:
        raise RatingRefused("; ".join(problems), 400)
    stale = False
    with transaction(con):
        row = con.execute("SELECT a.rater, a.pair, a.left, p.a, p.b FROM assignments a JOIN pairs p ON p.id = a.pair "
                          "WHERE a.id = ?", (assignment,)).fetchone()
        if row is None or row["rater"] != rater:
            raise RatingRefused("this pair was not assigned to you", 403)
        right = row["b"] if row["left"] == row["a"] else row["a"]
        by_system = {row["left"]: {c: scores["left"][c] for c in criteria}, right: {c: scores["right"][c] for c in criteria}}
        winner = {"left": row["left"], "right": right, "tie": "tie"}[preference]
        if con.execute("SELECT 1 FROM ratings WHERE rater = ? AND pair = ?", (rater, row["pair"])).fetchone():
            if not revise:
                raise RatingRefused("you have already rated this pair", 409)
            con.execute("UPDATE ratings SET scores = ?, preference = ?, comment = ?, created = ? WHERE rater = ? AND pair = ?",
                        (json.dumps(by_system), winner, comment.strip(), now(), rater, row["pair"]))
            return
        if k is not None and _human_ratings(con, row["pair"]) >= k:
            con.execute("DELETE FROM assignments WHERE id = ?", (assignment,))
            stale = True  # committed below, then refused (raising here would roll the delete back)
        else:
            con.execute("INSERT INTO ratings (rater, pair, left, right, scores, preference, comment, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (rater, row["pair"], row["left"], right, json.dumps(by_system), winner, comment.strip(), now()))
    if stale:
        raise RatingRefused("others completed this pair while it waited for you; your next pair is ready", 409)


def save_judgement(con: sqlite3.Connection, rater: int, pair: int, left: str, right: str,
                   scores: dict[str, dict[str, float]], preference: str) -> None:
    """Record a judge's verdict on ``pair`` shown with ``left`` first (replacing an earlier one)."""
    with transaction(con):
        con.execute("INSERT OR REPLACE INTO ratings (rater, pair, left, right, scores, preference, comment, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, '', ?)", (rater, pair, left, right, json.dumps(scores), preference, now()))
        con.execute("DELETE FROM judge_failures WHERE rater = ? AND pair = ? AND left = ?", (rater, pair, left))


def save_judge_failure(con: sqlite3.Connection, rater: int, pair: int, left: str, reply: str, problem: str) -> None:
    """Record a judge answer that could not be read (kept for the report; never a rating). It
    replaces any earlier verdict of this judge on this pair and order: the latest answer counts."""
    with transaction(con):
        con.execute("DELETE FROM ratings WHERE rater = ? AND pair = ? AND left = ?", (rater, pair, left))
        con.execute("INSERT OR REPLACE INTO judge_failures (rater, pair, left, reply, problem, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (rater, pair, left, reply[:2000], problem, now()))


def cached_reply(con: sqlite3.Connection, key: str) -> str | None:
    row = con.execute("SELECT reply FROM judge_cache WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def cache_reply(con: sqlite3.Connection, key: str, reply: str) -> None:
    with transaction(con):
        con.execute("INSERT OR REPLACE INTO judge_cache (key, reply, created) VALUES (?, ?, ?)", (key, reply, now()))


def all_ratings(con: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every rating with its rater's name and kind and its pair's item: plain dicts, scores decoded."""
    rows = con.execute("SELECT r.*, x.name AS rater_name, x.kind AS kind, p.item, p.a, p.b FROM ratings r "
                       "JOIN raters x ON x.id = r.rater JOIN pairs p ON p.id = r.pair ORDER BY r.id").fetchall()
    return [dict(r) | {"scores": json.loads(r["scores"])} for r in rows]


def pairs(con: sqlite3.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in con.execute("SELECT * FROM pairs ORDER BY id")]
