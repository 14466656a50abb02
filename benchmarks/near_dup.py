"""Benchmark: exact + near-duplicate detection (tunesmith.data.dedup) on ~100k real-text rows.

Rows come from the real data sets shipped in examples/data (SMS, SST-2, TREC, Bitext
customer-support instructions, Alpaca instructions). Each source text is used once; the
rest of the rows are copies of random source rows with one small random edit (a word
replaced, deleted or inserted, a character typo, or a case/punctuation change), so the
planted duplicate pairs are known. Reports rows/s, peak memory, the recall of the planted
pairs and the machine it ran on, into ``results/near_dup.{json,md}``.

    .venv/bin/python benchmarks/near_dup.py            # 100k rows
    .venv/bin/python benchmarks/near_dup.py --rows 5000 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import random
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

from tunesmith.data.dedup import DedupResult, find_duplicates, normalize

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("TUNESMITH_DATA", Path(__file__).resolve().parents[1] / "examples" / "data"))
EDITS = ("word_sub", "word_del", "word_ins", "char_typo", "case_punct")
EDIT_WEIGHTS = (0.25, 0.2, 0.2, 0.25, 0.1)


# ---------------------------------------------------------------- data


def _lines(path: Path) -> list[str]:
    """Lines of a file, decoded leniently: the files mix UTF-8 and Latin-1 bytes."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def load_sources(data: Path) -> dict[str, list[str]]:
    """Source texts per data set, as published (no cleaning: that is what is measured)."""
    sms = [line.split("\t", 1)[1] for line in _lines(data / "sms_spam/SMSSpamCollection")[1:]
           if "\t" in line]
    sst2 = [line.split(" ", 1)[1] for name in ("train", "dev", "test")
            for line in _lines(data / f"sst2/stsa.binary.{name}") if " " in line]
    trec = [line.split(" ", 1)[1] for name in ("train", "test")
            for line in _lines(data / f"trec/TREC.{name}.all") if " " in line]
    with open(data / "bitext/customer_support.csv", newline="", encoding="utf-8", errors="replace") as f:
        bitext = [row["instruction"] for row in csv.DictReader(f)]
    alpaca = [row["instruction"] for row in json.loads((data / "alpaca/alpaca_en_demo.json").read_text())]
    return {"sms_spam": sms, "sst2": sst2, "trec": trec, "bitext": bitext, "alpaca": alpaca}


def edit(text: str, kind: str, vocab: list[str], rng: random.Random) -> tuple[str, str]:
    """One small edit (the near-duplicate a scraper or a user would make), and the kind made.

    A text too short for the kind asked gets a case/punctuation change instead.
    """
    words = text.split()
    if kind == "char_typo" and len(text) > 3:
        i = rng.randrange(len(text) - 1)
        return text[:i] + text[i + 1] + text[i] + text[i + 2:], kind  # swap two neighbours
    if kind == "word_sub" and words:
        words[rng.randrange(len(words))] = rng.choice(vocab)
    elif kind == "word_del" and len(words) > 2:
        del words[rng.randrange(len(words))]
    elif kind == "word_ins" and words:
        words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
    else:  # an exact duplicate once normalize() has run
        return text.upper() + rng.choice(["!!", "...", " ?", " ."]), "case_punct"
    return " ".join(words), kind


def build_rows(sources: dict[str, list[str]], rows: int, seed: int) -> tuple[list[str], list[tuple[int, int, str]]]:
    """``rows`` texts: distinct source texts, then edited copies; and the planted (source, copy, edit) pairs."""
    rng = random.Random(seed)
    pool = [t for texts in sources.values() for t in texts]
    rng.shuffle(pool)
    base = pool[: min(len(pool), max(1, int(rows * 0.6)))]
    vocab = sorted({w for t in base for w in t.split()})
    texts = list(base)
    planted = []
    while len(texts) < rows:
        src = rng.randrange(len(base))
        text, kind = edit(base[src], rng.choices(EDITS, EDIT_WEIGHTS)[0], vocab, rng)
        planted.append((src, len(texts), kind))
        texts.append(text)
    return texts[:rows], planted


# ---------------------------------------------------------------- scoring


def owners(n: int, result: DedupResult) -> list[int]:
    """The kept row each row was merged into (itself when kept)."""
    owner = list(range(n))
    for cluster in result.exact:
        for i in cluster:
            owner[i] = cluster[0]
    near_root = {i: c[0] for c in result.near for i in c}
    return [near_root.get(o, o) for o in owner]


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """True Jaccard of the character n-gram sets (what MinHash estimates)."""
    def grams(t: str) -> set[str]:
        return {t[i:i + ngram] for i in range(len(t) - ngram + 1)} if len(t) >= ngram else {t}
    sa, sb = grams(normalize(a)), grams(normalize(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


BANDS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01))


def recall(texts: list[str], planted: list[tuple[int, int, str]], owner: list[int],
           threshold: float) -> dict[str, object]:
    """Share of planted pairs merged: all, those truly >= threshold, by edit and by true Jaccard."""
    hits: dict[str, list[int]] = {}  # name -> [merged, total]
    for src, copy, kind in planted:
        hit = int(owner[src] == owner[copy])
        sim = jaccard(texts[src], texts[copy])
        band = next(f"{lo:.2f}-{min(hi, 1.0):.2f}" for lo, hi in BANDS if lo <= sim < hi)
        for name in ("all", f"edit {kind}", f"true jaccard {band}") + (("above",) if sim >= threshold else ()):
            counts = hits.setdefault(name, [0, 0])
            counts[0] += hit
            counts[1] += 1

    def rate(name: str) -> float | None:
        merged, total = hits.get(name, [0, 0])
        return round(merged / total, 4) if total else None

    return {
        "planted_pairs": len(planted),
        "recall_all_planted": rate("all"),
        "planted_pairs_true_jaccard_at_or_above_threshold": hits.get("above", [0, 0])[1],
        "recall_at_threshold": rate("above"),
        "recall_by_edit": {k[5:]: rate(k) for k in sorted(hits) if k.startswith("edit ")},
        "recall_by_true_jaccard": {k[13:]: [rate(k), hits[k][1]] for k in sorted(hits)
                                   if k.startswith("true jaccard ")},
    }


def near_precision(texts: list[str], result: DedupResult, threshold: float) -> dict[str, float]:
    """True Jaccard of each near-removed row with the row kept for it.

    Below the threshold means MinHash estimation noise (pairs near the threshold) or a chain
    A~B~C where A and C are further apart than the threshold.
    """
    sims = sorted(jaccard(texts[c[0]], texts[i]) for c in result.near for i in c[1:])
    if not sims:
        return {"near_removed_true_jaccard_p10": 1.0, "near_removed_true_jaccard_median": 1.0,
                "near_removed_share_below_threshold": 0.0}
    return {
        "near_removed_true_jaccard_p10": round(sims[len(sims) // 10], 4),
        "near_removed_true_jaccard_median": round(sims[len(sims) // 2], 4),
        "near_removed_share_below_threshold": round(sum(s < threshold for s in sims) / len(sims), 4),
    }


# ---------------------------------------------------------------- machine and report


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    versions = {}
    for pkg in ("numpy", "datasketch", "scipy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "near_dup.json").write_text(json.dumps(results, indent=2) + "\n")
    m, r, q = results["machine"], results["run"], results["quality"]
    lines = [
        "# Near-duplicate detection benchmark (`benchmarks/near_dup.py`)", "",
        f"- Date: {m['date']}",
        f"- Machine: {m['cores']} cores, {m['cpu']}, {m['ram_gib']} GiB RAM; load average "
        f"(1/5/15 min) at start {m['load_average_1_5_15']}",
        f"- Software: Python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- Command: `{results['command']}`",
        f"- Data: {r['rows']} rows = {r['source_rows']} source texts ({r['sources']}) + "
        f"{q['planted_pairs']} edited copies; threshold {r['threshold']}, {r['num_perm']} permutations, "
        f"character {r['ngram']}-grams", "",
        "| measure | value |", "|---|---|",
        f"| find_duplicates wall time | {r['seconds']} s |",
        f"| throughput | {r['rows_per_s']} rows/s |",
        f"| peak RSS (whole process) | {r['peak_rss_mib']} MiB; before the call {r['rss_before_mib']} MiB "
        f"(importing `tunesmith.data` loads torch and transformers), so the call added "
        f"{round(r['peak_rss_mib'] - r['rss_before_mib'], 1)} MiB |",
        f"| removed exact / near | {r['removed_exact']} / {r['removed_near']} (kept {r['kept']}) |",
        f"| recall, planted pairs with true Jaccard >= threshold | {q['recall_at_threshold']} "
        f"({q['planted_pairs_true_jaccard_at_or_above_threshold']} pairs) |",
        f"| recall, all planted pairs | {q['recall_all_planted']} |",
        f"| recall by edit | {', '.join(f'{k} {v}' for k, v in q['recall_by_edit'].items())} |",
        f"| recall by true Jaccard [recall, pairs] | "
        f"{', '.join(f'{k}: {v}' for k, v in q['recall_by_true_jaccard'].items())} |",
        f"| near-removed rows: true Jaccard to kept row, p10 / median | "
        f"{q['near_removed_true_jaccard_p10']} / {q['near_removed_true_jaccard_median']} |",
        f"| near-removed rows below threshold (estimate noise or chains) | {q['near_removed_share_below_threshold']} |", "",
        "Recall over *all* planted pairs is below 1 by design: one word changed in a short "
        "question is more than a 15% change of its character 5-grams.", "",
    ]
    (out / "near_dup.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    info = machine()  # load average before the work starts
    sources = load_sources(args.data)
    texts, planted = build_rows(sources, args.rows, args.seed)
    rss_before = _rss_mib()
    start = time.perf_counter()
    result = find_duplicates(texts, threshold=args.threshold)
    seconds = time.perf_counter() - start
    run = {
        "rows": len(texts), "source_rows": len(texts) - len(planted),
        "sources": ", ".join(f"{k} {len(v)}" for k, v in sources.items()),
        "threshold": args.threshold, "num_perm": 128, "ngram": 5,
        "seconds": round(seconds, 2), "rows_per_s": int(len(texts) / seconds),
        "rss_before_mib": round(rss_before, 1), "peak_rss_mib": round(_rss_mib(), 1),
        "removed_exact": result.removed_exact, "removed_near": result.removed_near, "kept": len(result.keep),
    }
    quality = recall(texts, planted, owners(len(texts), result), args.threshold)
    quality.update(near_precision(texts, result, args.threshold))
    results = {"command": " ".join(["python benchmarks/near_dup.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": info, "run": run, "quality": quality}
    write_report(results, args.out)
    print(json.dumps({"run": run, "quality": quality}, indent=2))
    return results


if __name__ == "__main__":
    main()
