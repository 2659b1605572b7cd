"""The `hm3` command: thin subcommands over the library, one module each. Bad input: one line
on stderr, exit 2.

Each command module declares its arguments (`add_arguments`) and its run (`run(args) -> int`);
options several commands share are declared once in `hm3.cli.options`. A command imports what
it needs when it runs (torch, transformers and Optuna take seconds to import), so that
`hm3 --help` and a mistyped command answer at once."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings

from hm3 import __version__
from hm3.cli import (
    bench,
    check,
    demo,
    evaluate,
    export,
    inspect,
    merge,
    predict,
    search,
    self_merge,
    serve,
)
from hm3.errors import Hm3Error

# name -> module, in the order `hm3 --help` lists them
COMMANDS = {"merge": merge, "inspect": inspect, "predict": predict, "eval": evaluate,
            "bench": bench, "check": check, "search": search, "self-merge": self_merge,
            "serve": serve, "export": export, "demo": demo}


def _import_torch() -> None:
    """Import torch (every command runs on it) with the cyclic garbage collector paused, then
    freeze what the import made so that later collections skip it. An import makes millions of
    objects and no garbage, yet the collector, counting allocations, traverses them again and
    again while they load: that was 0.5-0.6 s of the 1.6 s start-up of `hm3 merge` (RESULTS.md
    §1). Only when torch is not loaded yet, so a process that calls `main` again (tests) freezes
    nothing of its own."""
    if "torch" in sys.modules:
        return
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `predict MODEL --batch-size 4 "text"`: argparse ends the texts at the first option
        if getattr(args, "run", None) is predict.run and not any(e.startswith("-") for e in extra):
            args.texts += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    _import_torch()
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_: f"hm3: warning: {message}\n"
    try:
        return args.run(args) or 0
    except Hm3Error as exc:
        print(f"hm3: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hm3: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`hm3 inspect --json | head`): not an error of ours. Point stdout
        # at /dev/null so that the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = previous_format


def build_parser() -> argparse.ArgumentParser:
    """The `hm3` parser: one subparser per command of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="hm3", description="Merge text classifiers with different label sets into one "
        "multi-task model (HM3), training-free.")
    parser.add_argument("--version", action="version", version=f"hm3 {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")
    for name, command in COMMANDS.items():
        command_parser = sub.add_parser(name, help=command.HELP)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser


def _quiet_transformers() -> None:
    """hm3 prints its own progress; transformers' per-load bars and reports are noise here.

    Importing transformers takes a second, and a merge to disk never needs it: unless it (or
    the hub client) is imported already, it is told through the variables it reads when a
    command imports it."""
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
