"""`hm3 demo`: merge the built-in offline experts, score and time them."""

from __future__ import annotations

import argparse

from hm3.cli.options import add_progress

HELP = "merge the built-in offline experts, score and time them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="hm3-demo",
                        help="folder for the merged model and report.json (default: hm3-demo)")
    parser.add_argument("--cache-dir", help="where the experts are cached (default: $HM3_CACHE "
                        "or ~/.cache/hm3)")
    add_progress(parser, help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from hm3.demo import run_demo

    run_demo(args.output, cache_dir=args.cache_dir, progress=not args.no_progress)
    return 0
