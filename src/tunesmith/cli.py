"""``tunesmith <verb>``: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

from tunesmith.api import ApiError
from tunesmith.config import ConfigError, load_config
from tunesmith.data import DataError
from tunesmith.deploy.errors import ExportError
from tunesmith.models import ModelError
from tunesmith.runs import RunError, evaluate_run, finetune, prepare_data
from tunesmith.train import NonFiniteLossError

DEMO_CONFIG = "sst2.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a language model on your data and prove it got better.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="fine-tune as a config says, then evaluate against the base model")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even though optimisation settings (lr, batch, schedule, steps) changed")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad records instead of stopping")

    p = verbs.add_parser("prepare", help="read, clean, de-duplicate, redact, label and split the data; write a report")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad records instead of stopping")

    p = verbs.add_parser("eval", help="evaluate a finished run (tuned vs base) on its test split")
    p.add_argument("run_dir", help="the run folder, e.g. runs/sst2-lora")

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

    p = verbs.add_parser("demo", help="LoRA on SST-2 with the embedded model: base vs tuned, with a report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    console = Console()
    _quiet_libraries()
    try:
        skip = ["data.skip_bad_rows=true"] if getattr(args, "skip_bad_rows", False) else []
        if args.verb == "train":
            cfg = load_config(args.config, args.overrides + skip)
            run = finetune(cfg, resume=args.resume, overwrite=args.overwrite, console=console,
                           allow_changes=args.allow_changes)
            if run.eval:
                console.print(f"report: {run.dir / 'report.html'}")
        elif args.verb == "prepare":
            prepared = prepare_data(load_config(args.config, args.overrides + skip), console=console)
            console.print(f"prepared splits and data_report.json in {prepared.files['train'].parent}")
        elif args.verb == "eval":
            evaluate_run(args.run_dir, console=console)
            console.print(f"report: {Path(args.run_dir) / 'report.html'}")
        elif args.verb == "compare":
            from tunesmith.compare import compare_methods, markdown

            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            doc = compare_methods(load_config(args.config, args.overrides + skip), methods, console=console,
                                  data_sizes=_sizes(args.data_sizes), reuse=args.reuse)
            print(markdown(doc))
            console.print(f"report: {Path(doc['dir']) / 'compare.html'}")
        elif args.verb == "export":
            from tunesmith.deploy.export import describe, export

            print(describe(export(args.run_dir, args.format, args.dtype, args.out, verify=args.verify)))
        elif args.verb == "demo":
            cfg = load_config(_demo_config(), args.overrides)
            run = finetune(cfg, overwrite=True, console=console)
            console.print(f"report: {run.dir / 'report.html'}")
    except (ApiError, ConfigError, DataError, ModelError, RunError, NonFiniteLossError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


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
