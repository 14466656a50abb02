"""``tunesmith study <action>``: blind rating studies, each action a small function in a table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from tunesmith.cli.options import Context
from tunesmith.config import ApiConfig
from tunesmith.runtime.commands import command
from tunesmith.studies import StudyError


def study_arguments(p: argparse.ArgumentParser) -> None:
    acts = p.add_subparsers(dest="action", required=True)
    for name, (help_text, arguments, _) in ACTIONS.items():
        arguments(acts.add_parser(name, help=help_text))


def study(args: argparse.Namespace, ctx: Context) -> None:
    ACTIONS[args.action][2](args, ctx.console)


def _create_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("runs", nargs="*", help="finished run folders (their predictions.jsonl are the outputs shown; a "
                                           "preference run answers the other runs' test prompts when the study is made)")
    q.add_argument("--base", action="store_true", help="include the base model's outputs (from the runs' evaluation)")
    q.add_argument("--api", metavar="MODEL", help="include a prompted API model's answers (asked once, here)")
    q.add_argument("--api-base-url", metavar="URL", help="its OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding its key")
    q.add_argument("--examples", type=int, default=30, help="test prompts to rate (drawn at random; default 30)")
    q.add_argument("--criteria", help="comma-separated names scored 1-5 (default relevance,engagement,quality; "
                   "with --rubric: the rubric's criteria)")
    q.add_argument("--rubric", help="YAML file: criteria with their question and anchor wording (see docs)")
    q.add_argument("--ratings-per-pair", type=int, default=3, help="human ratings wanted per pair (default 3)")
    q.add_argument("--instructions", help="guidance shown to raters above every pair: text, or @FILE (default: a general guide)")
    q.add_argument("--raters", default="", help="comma-separated rater names to invite now")
    q.add_argument("--name", help="study name (default: from the runs); the folder is studies/NAME")
    q.add_argument("--out", help="study folder (default studies/NAME)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--exclude", action="append", default=[], metavar="STUDY",
                   help="an earlier study whose prompts are not drawn again (repeatable): a preference run trained on "
                        "its ratings is then rated on prompts it never saw")
    q.add_argument("--overwrite", action="store_true", help="replace an existing study folder's study (ratings included)")


def _create(args: argparse.Namespace, console: Console) -> None:
    from tunesmith import studies

    name = args.name or (("-vs-".join(Path(r).name for r in args.runs[:2]) or "study") + ("-base" if args.base else ""))
    if args.name and (Path(args.name).name != args.name or args.name in (".", "..")):
        raise StudyError(f"--name {args.name!r}: a plain name, no folders (use --out DIR for another place)")
    api = ApiConfig(base_url=args.api_base_url, model=args.api, api_key_env=args.api_key_env) if args.api else None
    if args.api and not args.api_base_url:
        raise StudyError("--api needs --api-base-url (the endpoint answering as that model)")
    if args.examples < 1:
        raise StudyError("--examples must be at least 1")
    criteria = studies.criteria_from(args.criteria if args.criteria or args.rubric else "relevance,engagement,quality",
                                     args.rubric)
    out = studies.create_study(args.runs, args.out or Path("studies") / name, base=args.base, api=api,
                               examples=args.examples, criteria=criteria, ratings_per_pair=args.ratings_per_pair,
                               raters=_names(args.raters), seed=args.seed, overwrite=args.overwrite,
                               instructions=_text_or_file(args.instructions), exclude=args.exclude)
    made, items = studies.load_study(out)
    k = made["ratings_per_pair"]
    console.print(f"study {out}: {len(items)} prompts, systems {', '.join(made['systems'])}, "
                  f"{k} rating{'' if k == 1 else 's'} wanted per pair", highlight=False)
    if len(items) < args.examples:
        console.print(f"[yellow]note: the test split has only {len(items)} prompts (asked for {args.examples})[/yellow]",
                      highlight=False)
    if args.raters and len(_names(args.raters)) < k:
        console.print(f"[yellow]note: {len(_names(args.raters))} rater(s) for {k} ratings per pair: invite more "
                      f"({command('study', 'invite', out, 'NAME')}) or the pairs stay incomplete[/yellow]", highlight=False)
    _print_links(out, "http://127.0.0.1:8080", console)


def _invite_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("study")
    q.add_argument("names", nargs="*", help="rater names (none: list the existing raters' links)")
    q.add_argument("--url", default="http://127.0.0.1:8080", help="the address raters will open")


def _invite(args: argparse.Namespace, console: Console) -> None:
    from tunesmith import studies

    studies.load_study(args.study)  # a clear error for a folder that is no study (and nothing created in it)
    if args.names:
        studies.invite(args.study, args.names)
    _print_links(Path(args.study), args.url, console)


def _serve_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("study")
    q.add_argument("--host", default="127.0.0.1", help="0.0.0.0 lets colleagues on your network in (every page needs a token)")
    q.add_argument("--port", type=int, default=8080)


def _serve(args: argparse.Namespace, console: Console) -> None:
    import uvicorn

    from tunesmith.deploy.server import check_port
    from tunesmith.studies.web import create_study_app

    check_port(args.host, args.port)
    app = create_study_app(args.study)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    _print_links(Path(args.study), f"http://{shown}:{args.port}", console)
    if shown != args.host:
        console.print("others reach this machine by its network address: "
                      f"{command('study', 'invite', args.study, '--url', f'http://ADDRESS:{args.port}')} prints their links with it",
                      highlight=False)
    console.print(f"serving the study on http://{shown}:{args.port}/ (Ctrl-C stops; every answer is already saved)",
                  highlight=False)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _judge_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("study")
    q.add_argument("--base-url", required=True, help="the endpoint, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    q.add_argument("--model", required=True, help="the endpoint's model name")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    q.add_argument("--max-concurrency", type=int, default=4, help="requests in flight")
    q.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (a local CPU model is slow)")
    q.add_argument("--max-tokens", type=int, default=400, help="longest answer asked for (a reasoning model needs more)")


def _judge(args: argparse.Namespace, console: Console) -> None:
    from tunesmith.studies.judge import judge_study

    api = ApiConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                    max_concurrency=args.max_concurrency, timeout_s=args.timeout)
    counts = judge_study(args.study, api, console=console, max_tokens=args.max_tokens)
    console.print(f"judge {args.model}: {counts['judged']} verdicts ({counts['asked']} asked, {counts['cached']} from the cache), "
                  f"{counts['unreadable']} unreadable, {counts['failed']} failed", highlight=False)


def _study_only(q: argparse.ArgumentParser) -> None:
    q.add_argument("study")


def _report(args: argparse.Namespace, console: Console) -> None:
    from tunesmith.studies.report import verdicts, write_study_report

    path, doc = write_study_report(args.study)
    for line in verdicts(doc) or ["no human ratings yet" + (" (the judge's verdicts are in the report)" if doc["judges"] else "")]:
        console.print(line, highlight=False)
    console.print(f"report: {path}", highlight=False)


def _export_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("study")
    q.add_argument("--format", default="preference", choices=["preference", "unpaired"],
                   help="preference: the decided pairs (prompt/chosen/rejected); unpaired: each scored answer as good or "
                        "bad by its mean 1-5 score (prompt/completion/label, for preference.objective: kto)")
    q.add_argument("--good", type=float, default=4.0, help="--format unpaired: a mean score at least this is a good answer")
    q.add_argument("--bad", type=float, default=2.0, help="--format unpaired: a mean score at most this is a bad answer")
    q.add_argument("--source", default="human", choices=["human", "judge"], help="whose preferences (default: the people's majority)")
    q.add_argument("--judge", help="with --source judge and several judges: which one (e.g. judge:gpt-4o)")
    q.add_argument("--out", help="JSONL file (default STUDY/preferences.jsonl; --source judge: STUDY/preferences-judge.jsonl)")


def _export(args: argparse.Namespace, console: Console) -> None:
    from tunesmith.studies.export import default_path, empty_answers, export_preferences, export_unpaired

    out = Path(args.out) if args.out else default_path(args.study, args.source, args.format)
    if args.format == "unpaired":
        n = export_unpaired(args.study, out, args.source, args.good, args.bad, args.judge)
        console.print(f"{n} scored answers ({args.source}; good: mean score >= {args.good:g}, bad: <= {args.bad:g}, the "
                      f"rest left out): {out}", highlight=False)
        return
    n = export_preferences(args.study, out, source=args.source, judge=args.judge)
    empty = empty_answers(args.study, args.source, judge=args.judge)
    console.print(f"{n} preference pairs ({args.source}): {out}"
                  + (f"; {empty} decided pair{'' if empty == 1 else 's'} with an empty answer left out" if empty else ""),
                  highlight=False)


Action = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Console], None]]
ACTIONS: dict[str, Action] = {
    "create": ("a study of the runs' test outputs (and the base model's, an API model's)", _create_arguments, _create),
    "invite": ("add raters; print their personal links", _invite_arguments, _invite),
    "serve": ("the raters' web app (each rater opens their invite link)", _serve_arguments, _serve),
    "judge": ("an LLM judge rates every pair in both orders (OpenAI-compatible endpoint)", _judge_arguments, _judge),
    "report": ("results: win rates, scores, agreement, position bias, metrics and judge vs people", _study_only, _report),
    "export": ("preference pairs (prompt, chosen, rejected) for preference tuning", _export_arguments, _export),
}


def _text_or_file(value: str | None) -> str | None:
    """``@path``: the file's text (a clear error when it cannot be read); anything else as it is."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise StudyError(f"--instructions {value}: {e.strerror or e}") from None


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _print_links(study_dir: Path, url: str, console: Console) -> None:
    from tunesmith.studies import store

    with store.connect(study_dir) as con:
        people = store.raters(con, "human")
    if not people:
        console.print(f"no raters yet: {command('study', 'invite', study_dir, 'NAME', '...')}", highlight=False)
    for r in people:
        console.print(f"  {r['name']}: {url.rstrip('/')}/r/{r['token']}", highlight=False, soft_wrap=True)
