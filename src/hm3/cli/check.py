"""`hm3 check MODEL --texts FILE`: the label-free pre-deployment check (exit 1 if it fails)."""

from __future__ import annotations

import argparse

from hm3.cli.options import (
    MERGED_PRECISION_HELP,
    ModelOptions,
    add_json_report,
    add_limit,
    add_model_options,
    add_precision,
    add_text_column,
    write_json_report,
)

COUNTS = ("all", "confident", "weighted", "surest", "typical", "domain")

HELP = ("label-free pre-deployment check: does the merged model keep each expert's decisions on "
        "your texts? (exit 1 if not)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="merged model directory or hub id")
    parser.add_argument("--experts", nargs="+", metavar="[TASK=]PATH",
                        help="the experts that were merged (default: the sources the merged "
                        "model records); TASK= where the task is not clear from the path")
    parser.add_argument("--texts", required=True, metavar="FILE",
                        help="unlabelled texts NOT used for calibration: .txt (one per line), "
                        "JSONL, CSV, TSV, JSON or Parquet")
    add_text_column(parser)
    add_limit(parser, help="check only the first N texts")
    parser.add_argument("--min-agreement", action="append", default=[], metavar="[TASK=]SHARE",
                        help="minimum share of texts given the expert's label, for every task "
                        "or one (repeatable; default 0.9)")
    # hm3.check.COUNTS, spelled out: importing hm3.check loads torch, which `hm3 --help` should
    # not wait for (tests/test_package.py keeps the two equal)
    parser.add_argument("--count", choices=COUNTS, default="all",
                        help="texts the verdict counts: every text (default), those the "
                        "expert is at least 90%% sure of, every text weighted by the "
                        "expert's confidence, the quarter of texts the expert is surest of, "
                        "the texts typical of each task (as close, in its expert's embedding "
                        "space, to texts known to be from the task as those are to each "
                        "other), or the texts in each task's domain (most of their 10 nearest "
                        "known texts of all tasks, in the base model's space, are the task's). "
                        "The last five are for mixed traffic, where other tasks' texts get "
                        "arbitrary labels from an expert; typical and domain need --task-texts "
                        "or the merge's recorded calibration texts")
    parser.add_argument("--per-label", action="store_true",
                        help="take the agreement per label the expert gives, then average "
                        "(each label weighs the same, however rare): a merge that stops giving "
                        "a rare label (the few spams) fails; with --count all, typical or "
                        "domain")
    parser.add_argument("--task-texts", nargs="+", default=[], metavar="TASK=FILE",
                        help="texts known to be from a task (e.g. a sample of its traffic), "
                        "for --count typical / domain; default: the per-task calibration texts "
                        "the merge records")
    parser.add_argument("--max-drift", type=float, metavar="TVD",
                        help="also fail a task whose label shares move further than this (total "
                        "variation distance, 0..1)")
    add_json_report(parser)
    add_model_options(parser)
    add_precision(parser, MERGED_PRECISION_HELP)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hm3.check import check_model, format_check
    from hm3.data import read_texts
    from hm3.errors import Hm3Error

    if args.limit is not None and args.limit < 1:
        raise Hm3Error(f"--limit: expected a positive number of texts, got {args.limit}")
    texts = read_texts(Path(args.texts), args.text_column)[:args.limit]
    known = {}
    for item in args.task_texts:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise Hm3Error(f"--task-texts: expected TASK=FILE, got {item!r}")
        if task in known:
            raise Hm3Error(f"--task-texts: two files for task {task!r}; give one per task")
        known[task] = read_texts(Path(path), args.text_column)
    options = ModelOptions.from_args(args)
    report = check_model(args.model, texts, args.experts, args.min_agreement, args.max_drift,
                         args.count, batch_size=options.batch_size, **options.load_options(),
                         task_texts=known, per_label=args.per_label,
                         precision=options.precision)
    print(format_check(report))
    write_json_report(args.json_out, report)
    return 0 if report["passed"] else 1
