"""``tunesmith <verb>``: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console

from tunesmith.api import ApiError
from tunesmith.config import ConfigError, load_config
from tunesmith.data import DataError
from tunesmith.deploy.errors import ExportError, ServeError
from tunesmith.models import ModelError
from tunesmith.runs import RunError, evaluate_run, finetune, prepare_data
from tunesmith.runtime.stopping import EXIT_RESUMABLE, Stopped
from tunesmith.studies import StudyError
from tunesmith.training.checkpoint import CheckpointError
from tunesmith.runtime.commands import command
from tunesmith.training.loop import NonFiniteLossError

DEMO_CONFIG = "sst2.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a language model on your data and prove it got better.",
                                     epilog="exit codes: 0 done; 2 bad input (config, data, model, checkpoint); "
                                            f"{EXIT_RESUMABLE} stopped by SIGTERM/Ctrl-C with the work so far saved "
                                            "(training: continue with --resume; eval, generate: run the same command "
                                            "again); 130 interrupted at once (a second Ctrl-C)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="fine-tune as a config says, then evaluate against the base model")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept every change to the training settings (lr, batch, schedule, steps, data) "
                        "from the resumed step on; changes to evaluation settings need no flag")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: accept a change of this one setting, e.g. train.lr (repeatable); any other "
                        "changed training setting still stops the resume")
    p.add_argument("--until-step", type=int, default=None, metavar="N",
                   help="stop after optimizer step N with a checkpoint (exit 75; continue later with --resume)")
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="train on N processes of this machine (torchrun; DDP): one per GPU, or CPU shares (gloo)")
    p.add_argument("--nnodes", type=int, default=1, help="with --nproc: machines taking part (run the same command on each)")
    p.add_argument("--node-rank", type=int, default=0, help="with --nnodes > 1: this machine's number, 0 .. nnodes-1")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes > 1: node 0's address and a free port, the same on every node")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad records instead of stopping")

    p = verbs.add_parser("prepare", help="read, clean, de-duplicate, redact, label and split the data; write a report")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad records instead of stopping")

    p = verbs.add_parser("eval", help="evaluate a finished run (tuned vs base) on its test split")
    p.add_argument("run_dir", help="the run folder, e.g. runs/sst2-lora")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="change an evaluation setting for this evaluation only, e.g. --set eval.general=none")

    p = verbs.add_parser("compare", help="run several methods on the same data and splits; measure and compare them")
    p.add_argument("config", help="YAML config file (its method is ignored)")
    p.add_argument("--methods", default="prompt,lora,full", help="comma-separated: prompt, lora, full")
    p.add_argument("--data-sizes", default="", metavar="N,N,...",
                   help="also run every method on this many training examples (e.g. 64,256) to measure data needs")
    p.add_argument("--reuse", action="store_true",
                   help="measure runs that already finished with exactly this config instead of running them again")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = verbs.add_parser("export", help="export a finished run: PEFT adapter, merged HF model, GGUF (+ Ollama Modelfile) or prompt")
    p.add_argument("run_dir", help="the run folder, e.g. runs/sst2-lora")
    p.add_argument("--format", required=True, choices=["adapter", "hf", "gguf", "prompt"])
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                   help="weights' type (default f32; f16 for gguf; q8_0 for gguf only)")
    p.add_argument("--out", default=None, help="folder to write (default RUN/export/FORMAT-DTYPE)")
    p.add_argument("--verify", action="store_true",
                   help="load the export in its consumer (PEFT, transformers, llama.cpp) and compare next-token predictions")

    p = verbs.add_parser("serve", help="serve runs (and their base model) behind an OpenAI-compatible API")
    p.add_argument("run_dirs", nargs="*", help="run folders; LoRA runs on one base share it as adapters")
    p.add_argument("--model", default=None, help="also serve this base model (a config model: value, e.g. default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this Bearer key (default: $TUNESMITH_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=2048, help="most tokens one answer may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the context)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together")
    p.add_argument("--max-waiting", type=int, default=256, help="requests queued before answering 429")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, seconds requests in flight get to finish (default 30); then each open "
                        "stream is ended (finish_reason length, an error event, [DONE]) and other requests get a 503")
    p.add_argument("--redact-pii", default="", metavar="KINDS",
                   help="redact personal data in answers: comma-separated kinds (email,phone,credit_card,ip_address,iban,url) or 'default'")
    p.add_argument("--block-words", default=None, metavar="FILE", help="a file of blocked words or phrases, one per line")
    p.add_argument("--block-regex", action="append", default=[], metavar="PATTERN", help="a blocked regular expression (repeatable)")
    p.add_argument("--block-action", choices=["redact", "refuse"], default="redact",
                   help="redact a blocked match, or end the answer before it (finish_reason content_filter)")

    p = verbs.add_parser("generate", help="answer every prompt of a file with a finished run (resumable)")
    p.add_argument("run_dir", help="the run folder, e.g. runs/alpaca-lora")
    p.add_argument("--input", required=True, help="prompts: JSONL/JSON/CSV/TSV/Parquet (messages, instruction/input, prompt or text)")
    p.add_argument("--output", required=True, help="JSONL to append answers to (rows already there are skipped)")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave out rows with no usable prompt (listed) instead of stopping")
    _decoding_options(p)

    p = verbs.add_parser("estimate", help="before training: parameters, tokens, FLOPs, peak memory, time and cost of a run")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device-tflops", type=float, default=None, metavar="X",
                   help="predict time for a device sustaining X TFLOP/s in training, instead of timing this machine")
    p.add_argument("--price-per-hour", type=float, default=None, metavar="P", help="cost of an hour of the device")
    p.add_argument("--device-memory-gib", type=float, default=None, metavar="G",
                   help="check the peak memory against this device's memory instead of this machine's")
    p.add_argument("--calibrate-seconds", type=float, default=None, metavar="S",
                   help="seconds of real training steps to time here (default: estimate.calibrate_seconds, 20)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")

    p = verbs.add_parser("search", help="search hyperparameters (Optuna) over the config's search: block; resumable")
    p.add_argument("config", help="YAML config file with a search: block")
    p.add_argument("--trials", type=int, default=None, metavar="N", help="trials in all (default: search.trials)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = verbs.add_parser("runs", help="list every run made on this machine (the run index), or compare two")
    p.add_argument("--method", default=None, help="only runs of this method (lora, full, prompt)")
    p.add_argument("--status", default=None, help="only runs in this state: evaluated, evaluating, trained, training, interrupted, stopped")
    p.add_argument("--name", default=None, help="only runs whose name contains this")
    p.add_argument("--since", default=None, metavar="DATE",
                   help="only runs started on or after this date (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)")
    p.add_argument("--sort", default="date", help="date (newest first), metric (best first), name, time or cost")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None, help="two runs (names or folders): what differs")
    p.add_argument("--rebuild", nargs="*", metavar="DIR", default=None,
                   help="build the index again from the run folders under DIRs (default: the indexed runs' folders and ./runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    p = verbs.add_parser("study", help="blind rating studies of outputs: create, invite, serve, judge, report, export")
    acts = p.add_subparsers(dest="action", required=True)
    q = acts.add_parser("create", help="a study of the runs' test outputs (and the base model's, an API model's)")
    q.add_argument("runs", nargs="*", help="finished run folders (their predictions.jsonl are the outputs shown)")
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
    q.add_argument("--overwrite", action="store_true", help="replace an existing study folder's study (ratings included)")
    q = acts.add_parser("invite", help="add raters; print their personal links")
    q.add_argument("study")
    q.add_argument("names", nargs="*", help="rater names (none: list the existing raters' links)")
    q.add_argument("--url", default="http://127.0.0.1:8080", help="the address raters will open")
    q = acts.add_parser("serve", help="the raters' web app (each rater opens their invite link)")
    q.add_argument("study")
    q.add_argument("--host", default="127.0.0.1", help="0.0.0.0 lets colleagues on your network in (every page needs a token)")
    q.add_argument("--port", type=int, default=8080)
    q = acts.add_parser("judge", help="an LLM judge rates every pair in both orders (OpenAI-compatible endpoint)")
    q.add_argument("study")
    q.add_argument("--base-url", required=True, help="the endpoint, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    q.add_argument("--model", required=True, help="the endpoint's model name")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    q.add_argument("--max-concurrency", type=int, default=4, help="requests in flight")
    q.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (a local CPU model is slow)")
    q.add_argument("--max-tokens", type=int, default=400, help="longest answer asked for (a reasoning model needs more)")
    q = acts.add_parser("report", help="results: win rates, scores, agreement, position bias, metrics and judge vs people")
    q.add_argument("study")
    q = acts.add_parser("export", help="preference pairs (prompt, chosen, rejected) for preference tuning")
    q.add_argument("study")
    q.add_argument("--format", default="preference", choices=["preference"])
    q.add_argument("--source", default="human", choices=["human", "judge"], help="whose preferences (default: the people's majority)")
    q.add_argument("--judge", help="with --source judge and several judges: which one (e.g. judge:gpt-4o)")
    q.add_argument("--out", help="JSONL file (default STUDY/preferences.jsonl; --source judge: STUDY/preferences-judge.jsonl)")

    p = verbs.add_parser("ui", help="the local dashboard: runs, reports, live training, chat playground, rating studies")
    p.add_argument("--runs", action="append", default=[], metavar="DIR", help="folder(s) of run folders (default: ./runs; "
                   "runs in the run index are listed too)")
    p.add_argument("--studies", action="append", default=[], metavar="DIR", help="folder(s) of studies (default: ./studies)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=os.environ.get("TUNESMITH_UI_TOKEN"), help="required to bind beyond 127.0.0.1 "
                   "(default $TUNESMITH_UI_TOKEN)")

    p = verbs.add_parser("demo", help="LoRA on SST-2 with the embedded model: base vs tuned, with a report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    from tunesmith.training import distributed

    return distributed.report_exit(_run(args, argv))  # under `--nproc`: planned exits are not crashes for torchrun


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Carry out the parsed command; its exit code."""
    from tunesmith.training import distributed

    # a terminal: its own width; a log file or pipe: wide tables rather than rich's default 80 columns,
    # which cut table headers to a few letters (COLUMNS still decides), and messages never wrapped
    # (a grep finds a whole line)
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=140, soft_wrap=True)
    _quiet_libraries()
    try:
        skip = ["data.skip_bad_rows=true"] if getattr(args, "skip_bad_rows", False) else []
        if args.verb == "train":
            cfg = load_config(args.config, args.overrides + skip)
            if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # start the processes; each runs this verb again
                return _launch(args, cfg, argv if argv is not None else sys.argv[1:])
            run = finetune(cfg, resume=args.resume, overwrite=args.overwrite, console=console,
                           allow_changes=args.allow_changes or args.allow_change, until_step=args.until_step)
            if run.eval:
                console.print(f"report: {run.dir / 'report.html'}")
            if run.train.get("interrupted"):
                return EXIT_RESUMABLE
        elif args.verb == "prepare":
            prepared = prepare_data(load_config(args.config, args.overrides + skip), console=console)
            where = prepared.files["train"].parent if not isinstance(prepared, dict) else next(iter(prepared.values())).files["train"].parent.parent
            console.print(f"prepared splits and data_report.json in {where}")
        elif args.verb == "eval":
            evaluate_run(args.run_dir, console=console, overrides=args.overrides)
            console.print(f"report: {Path(args.run_dir) / 'report.html'}")
        elif args.verb == "compare":
            from tunesmith.report.tables import markdown
            from tunesmith.runs.compare import compare_methods

            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            doc = compare_methods(load_config(args.config, args.overrides + skip), methods, console=console,
                                  data_sizes=_sizes(args.data_sizes), reuse=args.reuse)
            print(markdown(doc))
            console.print(f"report: {Path(doc['dir']) / 'compare.html'}")
        elif args.verb == "export":
            from tunesmith.deploy.export import describe, export

            print(describe(export(args.run_dir, args.format, args.dtype, args.out, verify=args.verify)))
        elif args.verb == "serve":
            from tunesmith.deploy.server import serve

            serve(args.run_dirs, model=args.model, host=args.host, port=args.port, api_key=args.api_key,
                  max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                  max_batch_size=args.max_batch_size, max_waiting=args.max_waiting, output_filter=_output_filter(args),
                  shutdown_timeout=args.shutdown_timeout)
        elif args.verb == "generate":
            from tunesmith.deploy.generate import generate_file

            done = generate_file(args.run_dir, args.input, args.output, _sampling(args), console=console,
                                 skip_bad_rows=args.skip_bad_rows)
            if done.get("prompts_cut"):
                console.print(f"[yellow]{done['prompts_cut']} prompt(s) were longer than the model's context "
                              f"({done['context']:,} tokens) and were cut, leaving room for the answer: each such row "
                              "says how much and where (prompt_cut)[/yellow]", highlight=False)
            console.print(f"{done['generated']} answered, {done['skipped']} already there, {done['bad_rows']} bad rows skipped, "
                          f"{done['rows']} rows: "
                          f"{args.output}", highlight=False)
        elif args.verb == "estimate":
            import json

            from tunesmith.runs import estimate

            cfg = load_config(args.config, args.overrides)
            est = estimate.estimate(cfg, console=console, calibrate_seconds=args.calibrate_seconds,
                                    device_tflops=args.device_tflops, price_per_hour=args.price_per_hour,
                                    device_memory_gib=args.device_memory_gib)
            if args.json:
                print(json.dumps(est, indent=1))
            else:
                for line in estimate.describe(est):
                    console.print(line, highlight=False)
                console.print(f"saved {cfg.run_dir / estimate.FILE}: `{command('train')}` prints it and records it against the actual run",
                              highlight=False)
        elif args.verb == "search":
            from tunesmith.runs import search as S

            try:
                summary = S.search(args.config, args.overrides, trials=args.trials, console=console)
            except S.SearchStopped as e:
                again = [w for o in args.overrides for w in ("--set", o)] + (["--trials", str(args.trials)] if args.trials else [])
                console.print(f"[yellow]{e}; continue the search with: {command('search', args.config, *again)}[/yellow]",
                              highlight=False)
                return EXIT_RESUMABLE
            S.print_summary(summary, console)
            console.print(f"plots: {Path(summary['study']).parent / 'search.html'}", highlight=False)
        elif args.verb == "runs":
            _runs(args, console)
        elif args.verb == "study":
            _study(args, console)
        elif args.verb == "ui":
            from tunesmith.web import serve_ui

            serve_ui(args.runs or ["runs"], args.studies or ["studies"], host=args.host, port=args.port, token=args.token)
        elif args.verb == "demo":
            cfg = load_config(_demo_config(), args.overrides)
            run = finetune(cfg, overwrite=True, console=console)
            if run.train.get("interrupted"):  # the run is kept: `train ... --resume` continues it
                return EXIT_RESUMABLE
            console.print(f"report: {run.dir / 'report.html'}")
    except (ApiError, StudyError, ConfigError, DataError, ModelError, RunError, NonFiniteLossError, ExportError, ServeError,
            CheckpointError, distributed.MainFailed) as e:
        if distributed.world().main:  # the same files give every process the same error: process 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGTERM/Ctrl-C: what was done is kept; the message says how to continue
        if distributed.world().main:
            print(f"stopped: {e}", file=sys.stderr)
        return EXIT_RESUMABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _runs(args: argparse.Namespace, console: Console) -> None:
    import json

    from tunesmith.runs import index, listing

    if args.rebuild is not None:
        n = index.rebuild(args.rebuild or None)
        console.print(f"rebuilt {index.index_path()}: {n} run{'' if n == 1 else 's'}", highlight=False)
    if args.diff:
        try:
            a, b = (index.find(ref) for ref in args.diff)
        except KeyError as e:
            raise RunError(e.args[0]) from None
        differences = index.diff_runs(a, b)
        if args.json:
            print(json.dumps({"a": a["path"], "b": b["path"], **differences}, indent=1, default=str))
        else:
            listing.print_diff(a, b, differences, console)
        return
    try:
        rows = index.list_runs(method=args.method, since=args.since, sort=args.sort, status=args.status, name=args.name)
    except ValueError as e:
        raise RunError(str(e)) from None
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("config", "results")} for r in rows], indent=1))
    elif not rows and (args.method or args.since or args.status or args.name):
        console.print(f"no run matches ({index.count()} runs in the index {index.index_path()})", highlight=False)
    else:
        listing.print_runs(rows, console)
        console.print(f"index: {index.index_path()}", highlight=False)


def _study(args: argparse.Namespace, console: Console) -> None:
    """``tunesmith study <action>``."""
    from tunesmith import studies
    from tunesmith.config import ApiConfig

    if args.action == "create":
        name = args.name or (("-vs-".join(Path(r).name for r in args.runs[:2]) or "study") + ("-base" if args.base else ""))
        if args.name and (Path(args.name).name != args.name or args.name in (".", "..")):
            raise StudyError(f"--name {args.name!r}: a plain name, no folders (use --out DIR for another place)")
        api = ApiConfig(base_url=args.api_base_url, model=args.api, api_key_env=args.api_key_env) if args.api else None
        if args.api and not args.api_base_url:
            raise StudyError("--api needs --api-base-url (the endpoint answering as that model)")
        if args.examples < 1:
            raise StudyError("--examples must be at least 1")
        out = studies.create_study(args.runs, args.out or Path("studies") / name, base=args.base, api=api,
                                   examples=args.examples, criteria=studies.criteria_from(
                                       args.criteria if args.criteria or args.rubric else "relevance,engagement,quality", args.rubric),
                                   ratings_per_pair=args.ratings_per_pair, raters=_names(args.raters), seed=args.seed,
                                   overwrite=args.overwrite, instructions=_text_or_file(args.instructions))
        study, items = studies.load_study(out)
        k = study["ratings_per_pair"]
        console.print(f"study {out}: {len(items)} prompts, systems {', '.join(study['systems'])}, "
                      f"{k} rating{'' if k == 1 else 's'} wanted per pair", highlight=False)
        if len(items) < args.examples:
            console.print(f"[yellow]note: the test split has only {len(items)} prompts (asked for {args.examples})[/yellow]",
                          highlight=False)
        if args.raters and len(_names(args.raters)) < k:
            console.print(f"[yellow]note: {len(_names(args.raters))} rater(s) for {k} ratings per pair: invite more "
                          f"({command('study', 'invite', out, 'NAME')}) or the pairs stay incomplete[/yellow]", highlight=False)
        _print_links(out, "http://127.0.0.1:8080", console)
    elif args.action == "invite":
        studies.load_study(args.study)  # a clear error for a folder that is no study (and nothing created in it)
        if args.names:
            studies.invite(args.study, args.names)
        _print_links(Path(args.study), args.url, console)
    elif args.action == "serve":
        import uvicorn

        from tunesmith.studies.web import create_study_app

        app = create_study_app(args.study)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        _print_links(Path(args.study), f"http://{shown}:{args.port}", console)
        if shown != args.host:
            console.print("others reach this machine by its network address: "
                          f"{command('study', 'invite', args.study, '--url', f'http://ADDRESS:{args.port}')} prints their links with it", highlight=False)
        console.print(f"serving the study on http://{shown}:{args.port}/ (Ctrl-C stops; every answer is already saved)",
                      highlight=False)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    elif args.action == "judge":
        from tunesmith.studies.judge import judge_study

        counts = judge_study(args.study, ApiConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                                                   max_concurrency=args.max_concurrency, timeout_s=args.timeout),
                                  console=console, max_tokens=args.max_tokens)
        console.print(f"judge {args.model}: {counts['judged']} verdicts ({counts['asked']} asked, {counts['cached']} from the cache), "
                      f"{counts['unreadable']} unreadable, {counts['failed']} failed", highlight=False)
    elif args.action == "report":
        from tunesmith.studies.report import verdicts, write_study_report

        path, doc = write_study_report(args.study)
        for line in verdicts(doc) or ["no human ratings yet" + (" (the judge's verdicts are in the report)" if doc["judges"] else "")]:
            console.print(line, highlight=False)
        console.print(f"report: {path}", highlight=False)
    elif args.action == "export":
        from tunesmith.studies.export import default_path, export_preferences

        out = Path(args.out) if args.out else default_path(args.study, args.source)
        n = export_preferences(args.study, out, source=args.source, judge=args.judge)
        console.print(f"{n} preference pairs ({args.source}): {out}", highlight=False)


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


def _decoding_options(p: argparse.ArgumentParser) -> None:
    """The sampling settings, named as in the OpenAI API (what ``serve`` accepts per request)."""
    p.add_argument("--max-tokens", type=int, default=256,
                   help="at most this many new tokens per answer (default %(default)s; fewer when the prompt "
                        "leaves less of the model's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the tokens whose probability sums to this")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--n", type=int, default=1, help="answers per prompt")
    p.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")


def _sampling(args: argparse.Namespace) -> object:
    from tunesmith.deploy.engine import SamplingParams

    problems = [m for bad, m in [(args.max_tokens < 1, "--max-tokens must be at least 1"),
                                 (args.temperature < 0, "--temperature must be >= 0"),
                                 (not 0 < args.top_p <= 1, "--top-p must be in (0, 1]"), (args.n < 1, "--n must be at least 1")] if bad]
    if problems:
        raise RunError("; ".join(problems))
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          stop=tuple(args.stop), seed=args.seed, n=args.n)


def _output_filter(args: argparse.Namespace) -> object:
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


def _launch(args: argparse.Namespace, cfg: object, argv: list[str]) -> int:
    """``train --nproc N``: torchrun starts N processes running ``train`` without the launch flags.
    torchrun reports any non-zero worker exit as a failure; a run that stopped resumable (its
    train_result.json says interrupted) still exits with EXIT_RESUMABLE."""
    import json

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


def _sizes(text: str) -> list[int]:
    """``--data-sizes 64,256`` as numbers; a clear error for anything else."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise RunError(f"--data-sizes: expected whole numbers separated by commas, e.g. 64,256; got {text!r}") from None


def _demo_config() -> Path:
    """examples/sst2.yaml in the working folder, else in the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "examples" / DEMO_CONFIG
        if path.is_file():
            return path
    raise RunError(f"examples/{DEMO_CONFIG} not found; run the demo from the tunesmith checkout")


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-library bars or chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT calls a transformers helper that warns about its own rename; nothing for users to do
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
