"""``tunesmith <verb>``: parses arguments and calls the library; nothing else lives here.

Each verb is a row of the table in ``verbs.VERBS``: its help line, a function adding its
arguments, and a small function that calls the library and prints. Every error tunesmith raises
for the user derives from ``errors.TunesmithError``: it is printed as ``error: <message>`` with exit
status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from tunesmith.cli.options import Context
from tunesmith.cli.verbs import VERBS
from tunesmith.errors import TunesmithError
from tunesmith.runtime.stopping import EXIT_RESUMABLE, Stopped

__all__ = ["EXIT_RESUMABLE", "main", "parser"]

EPILOG = ("exit codes: 0 done; 2 bad input (config, data, model, checkpoint); "
          f"{EXIT_RESUMABLE} stopped by SIGTERM/Ctrl-C with the work so far saved (training: continue with --resume; "
          "eval, generate: run the same command again); 130 interrupted at once (a second Ctrl-C)")


def parser() -> argparse.ArgumentParser:
    """The whole command line: one sub-command per row of ``VERBS``."""
    top = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a language model on your data and prove it got better.",
                                  epilog=EPILOG)
    verbs = top.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        verb.arguments(verbs.add_parser(name, help=verb.help))
    return top


def main(argv: list[str] | None = None) -> int:
    """Run ``tunesmith`` with ``argv`` (default: the process's arguments); the exit status."""
    args = parser().parse_args(argv)
    from tunesmith.training import distributed

    return distributed.report_exit(run(args, argv))  # under `--nproc`: planned exits are not crashes for torchrun


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Carry out the parsed command; its exit code. Errors written for the user exit 2 with their
    message; a stop request (SIGTERM, Ctrl-C) exits 75 with what was kept; a second Ctrl-C 130."""
    from tunesmith.training import distributed

    # a terminal: its own width; a log file or pipe: wide tables rather than rich's default 80 columns,
    # which cut table headers to a few letters (COLUMNS still decides), and messages never wrapped
    # (a grep finds a whole line)
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=140, soft_wrap=True)
    _quiet_libraries()
    try:
        return VERBS[args.verb].run(args, Context(console, argv if argv is not None else sys.argv[1:])) or 0
    except TunesmithError as e:
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


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-library bars or chatter."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT calls a transformers helper that warns about its own rename; nothing for users to do
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
