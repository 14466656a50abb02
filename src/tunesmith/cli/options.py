"""Options several verbs share, turned into the library's objects (with clear errors), and the
torchrun launch of ``train --nproc``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tunesmith.runs import RunError
from tunesmith.runtime.stopping import EXIT_RESUMABLE

DEMO_CONFIG = "sst2.yaml"


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` no smaller than ``low`` (argparse then says which flag
    and exits 2)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{' whole' if kind is int else ''} number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low:g}")
        return value

    return parse


def above_zero(text: str) -> float:
    """An argparse type: a number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


@dataclass(frozen=True)
class Context:
    """What every verb gets besides its arguments: the console to print to and the raw argv."""

    console: Console
    argv: list[str]


def decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling settings, named as in the OpenAI API (what ``serve`` accepts per request)."""
    p.add_argument("--max-tokens", type=int, default=256,
                   help="at most this many new tokens per answer (default %(default)s; fewer when the prompt "
                        "leaves less of the model's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the tokens whose probability sums to this")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--n", type=int, default=1, help="answers per prompt")
    p.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")


def sampling(args: argparse.Namespace) -> object:
    """``SamplingParams`` from the decoding options; RunError naming every bad one."""
    from tunesmith.generation.engine import SamplingParams

    problems = [m for bad, m in [(args.max_tokens < 1, "--max-tokens must be at least 1"),
                                 (args.temperature < 0, "--temperature must be >= 0"),
                                 (not 0 < args.top_p <= 1, "--top-p must be in (0, 1]"), (args.n < 1, "--n must be at least 1")] if bad]
    if problems:
        raise RunError("; ".join(problems))
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          stop=tuple(args.stop), seed=args.seed, n=args.n)


def filter_arguments(p: argparse.ArgumentParser) -> None:
    """``serve``'s output filter: personal data redaction and blocked content."""
    p.add_argument("--redact-pii", default="", metavar="KINDS",
                   help="redact personal data in answers: comma-separated kinds (email,phone,credit_card,ip_address,iban,url) or 'default'")
    p.add_argument("--block-words", default=None, metavar="FILE", help="a file of blocked words or phrases, one per line")
    p.add_argument("--block-regex", action="append", default=[], metavar="PATTERN", help="a blocked regular expression (repeatable)")
    p.add_argument("--block-action", choices=["redact", "refuse"], default="redact",
                   help="redact a blocked match, or end the answer before it (finish_reason content_filter)")


def output_filter(args: argparse.Namespace) -> object:
    """``serve``'s PII and blocked-content filter from its options (None when none is asked for)."""
    from tunesmith.data.pii import DEFAULT_KINDS
    from tunesmith.deploy.safety import BlockRule, OutputFilter

    kinds = DEFAULT_KINDS if args.redact_pii == "default" else tuple(k.strip() for k in args.redact_pii.split(",") if k.strip())
    try:
        rules = [BlockRule.regex(f"regex{i + 1}", p) for i, p in enumerate(args.block_regex)]
        if args.block_words:
            words = Path(args.block_words).read_text(encoding="utf-8").splitlines()
            rules.append(BlockRule.words(Path(args.block_words).stem, words))
        if not kinds and not rules:
            return None
        return OutputFilter(kinds, rules, action=args.block_action)
    except (OSError, ValueError) as e:
        raise RunError(f"serve output filter: {e}") from None


def launch(args: argparse.Namespace, cfg: object, argv: list[str]) -> int:
    """``train --nproc N``: torchrun starts N processes running ``train`` without the launch flags.
    torchrun reports any non-zero worker exit as a failure; a run that stopped resumable (its
    train_result.json says interrupted) still exits with EXIT_RESUMABLE."""
    from tunesmith.training.distributed import launch

    rest, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint"):
            skip_next = "=" not in a
            continue
        rest.append(a)
    started = time.time()
    try:
        code = launch(rest, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    except ValueError as e:
        raise RunError(str(e)) from None
    result = Path(cfg.run_dir) / "train_result.json"  # type: ignore[attr-defined]
    fresh = result.is_file() and result.stat().st_mtime >= started
    if code not in (0, 2, EXIT_RESUMABLE) and fresh and json.loads(result.read_text()).get("interrupted"):
        return EXIT_RESUMABLE  # workers killed after their checkpoint (e.g. torchrun's own grace period)
    return code


def sizes(text: str) -> list[int]:
    """``--data-sizes 64,256`` as numbers; a clear error for anything else."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise RunError(f"--data-sizes: expected whole numbers separated by commas, e.g. 64,256; got {text!r}") from None


def demo_config() -> Path:
    """examples/sst2.yaml in the working folder, else in the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        path = root / "examples" / DEMO_CONFIG
        if path.is_file():
            return path
    raise RunError(f"examples/{DEMO_CONFIG} not found; run the demo from the tunesmith checkout")
