"""`hm3 eval MODEL --data TASK=FILE`: score a merged model or one expert on labelled data."""

from __future__ import annotations

import argparse
import sys

from hm3.cli.options import (
    ModelOptions,
    add_json_report,
    add_label_column,
    add_limit,
    add_model_options,
    add_precision,
    add_text_column,
    write_json_report,
)

HELP = "score a merged model or one expert on labelled data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="merged model or single expert (directory or hub id)")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                        help="labelled data for a task: CSV / JSONL / Parquet file or hub "
                        "dataset id (repeatable)")
    parser.add_argument("--recipe", help="take the datasets from this recipe's `data:` block")
    parser.add_argument("--expect", action="append", default=[], metavar="TASK:OTHER=LABEL",
                        help="cross-check: TASK's texts should get LABEL on OTHER's head")
    parser.add_argument("--task", help="task name of a plain single-task classifier")
    add_text_column(parser)
    add_label_column(parser)
    add_limit(parser, help="score only the first N examples per task")
    add_json_report(parser)
    add_model_options(parser)
    add_precision(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hm3.data import load_data_block
    from hm3.data.items import check_expected_heads, data_block, parse_expectation
    from hm3.errors import Hm3Error
    from hm3.evaluate import check_expected_label, evaluate, format_report, own_datasets
    from hm3.model import load
    from hm3.onnx_model import describe_precision
    from hm3.recipe import load_data_recipe

    data = data_block(args.data, args.expect, args.text_column, args.label_column,
                      block=load_data_recipe(args.recipe) if args.recipe else None,
                      limit=args.limit)
    if not data:
        raise Hm3Error("nothing to score: give --data TASK=FILE or --recipe with a `data:` block")
    options = ModelOptions.from_args(args)
    model = load(args.model, task=args.task, precision=options.precision,
                 **options.load_options())
    backend = getattr(model.model, "backend", "torch")
    if backend != "torch":  # an export: say what its scores were computed at
        print(f"scoring {args.model} on {backend} at {describe_precision(model.model)} precision",
              file=sys.stderr)
    check_expected_heads(args.expect, model.tasks)
    for item in args.expect:
        other, label = parse_expectation(item)[1:]
        check_expected_label(model.group(other), label, f"--expect {item}")
    datasets = load_data_block(data, root=Path(args.recipe).parent if args.recipe else None)
    report = evaluate(model, own_datasets(model.groups, datasets, args.model),
                      batch_size=options.batch_size)
    print(format_report(report))
    write_json_report(args.json_out, report)
    return 0
