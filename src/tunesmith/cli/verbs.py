"""The verbs of ``tunesmith``: for each, a function adding its arguments and a function running it.

``VERBS`` is the table the command line is built from; a verb's function parses nothing itself,
calls the library, prints, and returns its exit status (None for 0).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from tunesmith.cli import options
from tunesmith.cli.options import Context
from tunesmith.cli.study import study, study_arguments
from tunesmith.config import Config, load_config
from tunesmith.runs import RunError, evaluate_run, finetune, prepare_data
from tunesmith.runtime.commands import command
from tunesmith.runtime.stopping import EXIT_RESUMABLE


@dataclass(frozen=True)
class Verb:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], int | None]


def _config_arguments(p: argparse.ArgumentParser, skip_bad_rows: bool = True, config_help: str = "YAML config file") -> None:
    p.add_argument("config", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    if skip_bad_rows:
        p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad records instead of stopping")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, with --skip-bad-rows as the setting it stands for."""
    return args.overrides + (["data.skip_bad_rows=true"] if getattr(args, "skip_bad_rows", False) else [])


def train_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept every change to the training settings (lr, batch, schedule, steps, data) "
                        "from the resumed step on; changes to evaluation settings need no flag")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: accept a change of this one setting, e.g. train.lr (repeatable); any other "
                        "changed training setting still stops the resume")
    p.add_argument("--until-step", type=options.at_least(1), default=None, metavar="N",
                   help="stop after optimizer step N with a checkpoint (exit 75; continue later with --resume)")
    p.add_argument("--nproc", type=options.at_least(0), default=0, metavar="N",
                   help="train on N processes of this machine (torchrun; DDP): one per GPU, or CPU shares (gloo)")
    p.add_argument("--nnodes", type=options.at_least(1), default=1, help="with --nproc: machines taking part (run the same command on each)")
    p.add_argument("--node-rank", type=options.at_least(0), default=0, help="with --nnodes > 1: this machine's number, 0 .. nnodes-1")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes > 1: node 0's address and a free port, the same on every node")


def train(args: argparse.Namespace, ctx: Context) -> int | None:
    if (args.nnodes > 1 or args.node_rank or args.rdzv_endpoint) and args.nproc < 1:
        raise RunError("--nnodes, --node-rank and --rdzv-endpoint need --nproc N: the processes to start on this machine")
    cfg = load_config(args.config, _overrides(args))
    if (args.nproc > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ:  # start the processes; each runs this verb again
        return options.launch(args, cfg, ctx.argv)
    if cfg.task == "preference" and not args.resume:
        _export_studies(cfg, ctx)
    run = finetune(cfg, resume=args.resume, overwrite=args.overwrite, console=ctx.console,
                   allow_changes=args.allow_changes or args.allow_change, until_step=args.until_step)
    if run.eval:
        ctx.console.print(f"report: {run.dir / 'report.html'}")
    return EXIT_RESUMABLE if run.train.get("interrupted") else None


def _export_studies(cfg: Config, ctx: Context) -> None:
    """A preference run whose data names a rating study: the study's decided pairs exported now (the people's
    majority; ties and split votes left out) into STUDY/preferences.jsonl, which the run reads."""
    from tunesmith.studies.export import default_path, empty_answers, export_preferences, export_unpaired

    for split in ("train", "validation", "test"):
        path = getattr(cfg.data, split)
        if path and Path(path, "study.json").is_file() and cfg.preference.objective == "kto":  # single scores
            n = export_unpaired(path, default_path(path, fmt="unpaired"))
            ctx.console.print(f"data.{split}: {n} answers of the study {path} scored good (mean >= 4) or bad (<= 2) "
                              f"-> {default_path(path, fmt='unpaired')}", highlight=False)
        elif path and Path(path, "study.json").is_file():
            n, empty = export_preferences(path, default_path(path)), empty_answers(path)
            ctx.console.print(f"data.{split}: {n} decided pair{'' if n == 1 else 's'} of the study {path} (the people's "
                              "majority; ties, split votes" + (f" and {empty} with an empty answer" if empty else "")
                              + f" left out) -> {default_path(path)}", highlight=False)


def prepare(args: argparse.Namespace, ctx: Context) -> None:
    prepared = prepare_data(load_config(args.config, _overrides(args)), console=ctx.console)
    files = prepared.files if not isinstance(prepared, dict) else next(iter(prepared.values())).files
    where = files["train"].parent if not isinstance(prepared, dict) else files["train"].parent.parent
    ctx.console.print(f"prepared splits and data_report.json in {where}")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder, e.g. runs/sst2-lora")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="change an evaluation setting for this evaluation only, e.g. --set eval.general=none")


def evaluate(args: argparse.Namespace, ctx: Context) -> None:
    evaluate_run(args.run_dir, console=ctx.console, overrides=args.overrides)
    ctx.console.print(f"report: {Path(args.run_dir) / 'report.html'}")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p, config_help="YAML config file (its method is ignored)")
    p.add_argument("--methods", default="prompt,lora,full", help="comma-separated: prompt, lora, full")
    p.add_argument("--data-sizes", default="", metavar="N,N,...",
                   help="also run every method on this many training examples (e.g. 64,256) to measure data needs")
    p.add_argument("--reuse", action="store_true",
                   help="measure runs that already finished with exactly this config instead of running them again")


def compare(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.report.tables import markdown
    from tunesmith.runs.compare import compare_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    doc = compare_methods(load_config(args.config, _overrides(args)), methods, console=ctx.console,
                          data_sizes=options.sizes(args.data_sizes), reuse=args.reuse)
    print(markdown(doc))
    ctx.console.print(f"report: {Path(doc['dir']) / 'compare.html'}")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder, e.g. runs/sst2-lora")
    p.add_argument("--format", required=True, choices=["adapter", "hf", "gguf", "prompt"])
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                   help="weights' type (default f32; f16 for gguf; q8_0 for gguf only)")
    p.add_argument("--out", default=None, help="folder to write (default RUN/export/FORMAT-DTYPE)")
    p.add_argument("--verify", action="store_true",
                   help="load the export in its consumer (PEFT, transformers, llama.cpp) and compare next-token predictions")


def export(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.deploy.export import describe, export

    print(describe(export(args.run_dir, args.format, args.dtype, args.out, verify=args.verify)))


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="*", help="run folders; LoRA runs on one base share it as adapters")
    p.add_argument("--model", default=None, help="also serve this base model (a config model: value, e.g. default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this Bearer key (default: $TUNESMITH_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=2048, help="most tokens one answer may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the context)")
    p.add_argument("--max-batch-size", type=options.at_least(1), default=32, help="rows decoded together")
    p.add_argument("--max-waiting", type=options.at_least(1), default=256, help="requests queued before answering 429")
    p.add_argument("--shutdown-timeout", type=options.at_least(0.0, float), default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, seconds requests in flight get to finish (default 30); then each open "
                        "stream is ended (finish_reason length, an error event, [DONE]) and other requests get a 503")
    options.filter_arguments(p)


def serve(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.deploy.server import serve

    serve(args.run_dirs, model=args.model, host=args.host, port=args.port, api_key=args.api_key,
          max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
          max_batch_size=args.max_batch_size, max_waiting=args.max_waiting, output_filter=options.output_filter(args),
          shutdown_timeout=args.shutdown_timeout)


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder, e.g. runs/alpaca-lora")
    p.add_argument("--input", required=True, help="prompts: JSONL/JSON/CSV/TSV/Parquet (messages, instruction/input, prompt or text)")
    p.add_argument("--output", required=True, help="JSONL to append answers to (rows already there are skipped)")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave out rows with no usable prompt (listed) instead of stopping")
    options.decoding_arguments(p)


def generate(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.deploy.generate import generate_file

    done = generate_file(args.run_dir, args.input, args.output, options.sampling(args), console=ctx.console,
                         skip_bad_rows=args.skip_bad_rows)
    if done.get("prompts_cut"):
        ctx.console.print(f"[yellow]{done['prompts_cut']} prompt(s) were longer than the model's context "
                          f"({done['context']:,} tokens) and were cut, leaving room for the answer: each such row "
                          "says how much and where (prompt_cut)[/yellow]", highlight=False)
    if done.get("hit_max_tokens"):
        ctx.console.print(f"[yellow]{done['hit_max_tokens']} of {done['generated']} answers ran to --max-tokens "
                          f"({done['max_tokens']}) without ending (finish_reason length): allow more tokens, or the "
                          "model has not learnt to end its answers (more training, or another chat template)[/yellow]",
                          highlight=False)
    rows = f"{done['rows']} row" + ("" if done["rows"] == 1 else "s")
    ctx.console.print(f"{rows} in the input: {done['generated']} answered now, {done['skipped']} answered before, "
                      f"{done['bad_rows']} bad skipped; answers in {args.output}", highlight=False)


def estimate_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p, skip_bad_rows=False)
    p.add_argument("--device-tflops", type=options.above_zero, default=None, metavar="X",
                   help="predict time for a device sustaining X TFLOP/s in training, instead of timing this machine")
    p.add_argument("--price-per-hour", type=options.at_least(0.0, float), default=None, metavar="P", help="cost of an hour of the device")
    p.add_argument("--device-memory-gib", type=options.above_zero, default=None, metavar="G",
                   help="check the peak memory against this device's memory instead of this machine's")
    p.add_argument("--calibrate-seconds", type=options.at_least(0.0, float), default=None, metavar="S",
                   help="seconds of real training steps to time here (default: estimate.calibrate_seconds, 20)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def estimate(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.runs import estimate

    cfg = load_config(args.config, args.overrides)
    est = estimate.estimate(cfg, console=ctx.console, calibrate_seconds=args.calibrate_seconds,
                            device_tflops=args.device_tflops, price_per_hour=args.price_per_hour,
                            device_memory_gib=args.device_memory_gib)
    if args.json:
        print(json.dumps(est, indent=1))
        return
    for line in estimate.describe(est):
        ctx.console.print(line, highlight=False)
    ctx.console.print(f"saved {cfg.run_dir / estimate.FILE}: `{command('train')}` prints it and records it against the actual run",
                      highlight=False)


def search_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p, skip_bad_rows=False, config_help="YAML config file with a search: block")
    p.add_argument("--trials", type=options.at_least(1), default=None, metavar="N", help="trials in all (default: search.trials)")


def search(args: argparse.Namespace, ctx: Context) -> int | None:
    from tunesmith.runs import search as S

    try:
        summary = S.search(args.config, args.overrides, trials=args.trials, console=ctx.console)
    except S.SearchStopped as e:
        again = [w for o in args.overrides for w in ("--set", o)] + (["--trials", str(args.trials)] if args.trials else [])
        ctx.console.print(f"[yellow]{e}; continue the search with: {command('search', args.config, *again)}[/yellow]",
                          highlight=False)
        return EXIT_RESUMABLE
    S.print_summary(summary, ctx.console)
    ctx.console.print(f"plots: {Path(summary['study']).parent / 'search.html'}", highlight=False)
    return None


def runs_arguments(p: argparse.ArgumentParser) -> None:
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


def runs(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.runs import index, listing

    console = ctx.console
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


def ui_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", action="append", default=[], metavar="DIR", help="folder(s) of run folders (default: ./runs; "
                   "runs in the run index are listed too)")
    p.add_argument("--studies", action="append", default=[], metavar="DIR", help="folder(s) of studies (default: ./studies)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=os.environ.get("TUNESMITH_UI_TOKEN"), help="required to bind beyond 127.0.0.1 "
                   "(default $TUNESMITH_UI_TOKEN)")


def ui(args: argparse.Namespace, ctx: Context) -> None:
    from tunesmith.web import serve_ui

    serve_ui(args.runs or ["runs"], args.studies or ["studies"], host=args.host, port=args.port, token=args.token)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def demo(args: argparse.Namespace, ctx: Context) -> int | None:
    run = finetune(load_config(options.demo_config(), args.overrides), overwrite=True, console=ctx.console)
    if run.train.get("interrupted"):  # the run is kept: `train ... --resume` continues it
        return EXIT_RESUMABLE
    ctx.console.print(f"report: {run.dir / 'report.html'}")
    return None


VERBS: dict[str, Verb] = {
    "train": Verb("fine-tune as a config says, then evaluate against the base model", train_arguments, train),
    "prepare": Verb("read, clean, de-duplicate, redact, label and split the data; write a report", _config_arguments, prepare),
    "eval": Verb("evaluate a finished run (tuned vs base) on its test split", eval_arguments, evaluate),
    "compare": Verb("run several methods on the same data and splits; measure and compare them", compare_arguments, compare),
    "export": Verb("export a finished run: PEFT adapter, merged HF model, GGUF (+ Ollama Modelfile) or prompt",
                   export_arguments, export),
    "serve": Verb("serve runs (and their base model) behind an OpenAI-compatible API", serve_arguments, serve),
    "generate": Verb("answer every prompt of a file with a finished run (resumable)", generate_arguments, generate),
    "estimate": Verb("before training: parameters, tokens, FLOPs, peak memory, time and cost of a run", estimate_arguments, estimate),
    "search": Verb("search hyperparameters (Optuna) over the config's search: block; resumable", search_arguments, search),
    "runs": Verb("list every run made on this machine (the run index), or compare two", runs_arguments, runs),
    "study": Verb("blind rating studies of outputs: create, invite, serve, judge, report, export", study_arguments, study),
    "ui": Verb("the local dashboard: runs, reports, live training, chat playground, rating studies", ui_arguments, ui),
    "demo": Verb("LoRA on SST-2 with the embedded model: base vs tuned, with a report", demo_arguments, demo),
}
