"""`hm3 predict MODEL TEXT...`: classify texts with every task of a model."""

from __future__ import annotations

import argparse

from hm3.cli.options import (
    STDIO,
    ModelOptions,
    add_input,
    add_model_options,
    add_precision,
    write_output,
)

HELP = "classify texts with every task of a model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or hub id")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    add_input(parser, help="file of texts: .txt (one per line), JSONL (strings or objects), CSV, "
              "TSV, JSON or Parquet; - reads one text per line from standard input")
    parser.add_argument("--output", help="write the predictions here: .jsonl (one JSON object "
                        "per text), .csv or .tsv (a column per task and per probability), "
                        "missing folders created; - or none: JSONL on standard output")
    parser.add_argument("--logits", action="store_true", help="include the raw logits")
    add_model_options(parser)
    add_precision(parser)


def run(args: argparse.Namespace) -> int:
    from hm3.data import read_texts
    from hm3.errors import Hm3Error
    from hm3.model import load
    from hm3.predictions import check_format, format_predictions, prediction_lines

    to_file = args.output not in (None, STDIO)
    if to_file:
        check_format(args.output)  # before the model loads
    texts = list(args.texts)
    if args.input:
        texts += read_texts(args.input, args.text_column)
    if not texts:
        raise Hm3Error("nothing to classify: give texts as arguments or --input FILE")
    options = ModelOptions.from_args(args)
    model = load(args.model, precision=options.precision, **options.load_options())
    results = model.predict(texts, batch_size=options.batch_size, return_logits=args.logits)
    if to_file:
        write_output(args.output, format_predictions(args.output, model.groups, texts, results),
                     f"{len(texts)} prediction{'s' if len(texts) != 1 else ''}")
    else:
        print(prediction_lines(texts, results), end="")
    return 0
