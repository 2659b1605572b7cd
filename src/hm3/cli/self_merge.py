"""`hm3 self-merge EXPERT --base BASE`: merge one expert with itself under DARE-TIES at sampled
densities and plot F1 against density (the paper's self-merging)."""

from __future__ import annotations

import argparse

from hm3.cli.options import add_label_column, add_text_column
from hm3.cli.search import add_study_options, run_study

HELP = ("merge one expert with itself under DARE-TIES at sampled densities and plot F1 against "
        "density")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("expert", help="the expert (directory or hub id)")
    parser.add_argument("--base", required=True, help="the model it was fine-tuned from")
    parser.add_argument("--validation", required=True, metavar="FILE",
                        help="labelled validation data (CSV / JSONL / Parquet / hub id)")
    parser.add_argument("--test", metavar="FILE", help="labelled test data, scored by each "
                        "new best")
    parser.add_argument("--task", help="task name (default: the expert's folder name)")
    add_text_column(parser)
    add_label_column(parser)
    add_study_options(parser)


def run(args: argparse.Namespace) -> int:
    import functools
    from pathlib import Path

    from hm3.data import load_dataset
    from hm3.search import SearchSpace, self_merge

    task = args.task or Path(args.expert.rstrip("/")).name
    validation, test = (load_dataset(spec, task, args.text_column, args.label_column)
                        if spec else None for spec in (args.validation, args.test))
    space = SearchSpace(density_range=tuple(args.density_range))
    return run_study(args, space, functools.partial(
        self_merge, args.expert, args.base, validation, test, args.output,
        allow_pickle=args.allow_pickle))
