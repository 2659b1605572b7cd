"""`hm3 bench MODEL --experts ...`: time the merged model against running its experts."""

from __future__ import annotations

import argparse

from hm3.cli.options import (
    MERGED_PRECISION_HELP,
    ModelOptions,
    add_input,
    add_json_report,
    add_model_options,
    add_precision,
    add_progress,
    write_json_report,
)

HELP = "time the merged model against running its experts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="merged model directory or hub id")
    parser.add_argument("--experts", nargs="+", required=True, metavar="PATH",
                        help="the expert models the merged model replaces")
    add_input(parser, help="file of texts to time on, as for predict (default: built-in sample "
              "sentences)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median is kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_json_report(parser, "result")
    add_progress(parser)
    add_model_options(parser, batch_size=None)  # --batch-sizes: the sizes it times
    add_precision(parser, MERGED_PRECISION_HELP)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hm3.bench import SAMPLE_TEXTS, benchmark, format_bench
    from hm3.data import read_texts
    from hm3.errors import Hm3Error
    from hm3.model import load

    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    except ValueError:
        raise Hm3Error(f"--batch-sizes expects numbers like 1,8,32, got "
                       f"{args.batch_sizes!r}") from None
    texts = read_texts(Path(args.input), args.text_column) if args.input else list(SAMPLE_TEXTS)
    model_options = ModelOptions.from_args(args)
    options = model_options.load_options()
    merged = load(args.model, precision=model_options.precision, **options)
    experts = [load(path, **options) for path in args.experts]
    result = benchmark(merged, experts, texts, batch_sizes=sizes, repeats=args.repeats,
                       warmup=args.warmup, threads=args.threads, progress=not args.no_progress)
    print(format_bench(result))
    write_json_report(args.json_out, result)
    return 0
