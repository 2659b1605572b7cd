"""The `hm3` command: thin subcommands over the library. Bad input: one line on stderr, exit 2.

Each command imports what it needs when it runs (torch, transformers and Optuna take seconds to
import), so that `hm3 --help` and a mistyped command answer at once."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import os
import sys
import warnings
from pathlib import Path

from hm3 import __version__
from hm3.checkpoint import write_text_atomic
from hm3.errors import Hm3Error, Hm3Warning
from hm3.serve.options import ServeOptions, add_serve_arguments


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `predict MODEL --batch-size 4 "text"`: argparse ends the texts at the first option
        if getattr(args, "run", None) is _predict and not any(e.startswith("-") for e in extra):
            args.texts += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hm3", description="Merge text classifiers with different label sets into one "
        "multi-task model (HM3), training-free.")
    parser.add_argument("--version", action="version", version=f"hm3 {_version()}")
    sub = parser.add_subparsers(metavar="COMMAND")

    merge = sub.add_parser("merge", help="merge the experts of a YAML recipe into one model")
    merge.add_argument("recipe", help="YAML recipe (base, experts, method, parameters)")
    merge.add_argument("-o", "--output", required=True, help="output model directory")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="allow pickle .bin checkpoints (they can run arbitrary code)")
    merge.add_argument("--seed", type=int, help="override the recipe's seed")
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    merge.add_argument("--device", help="where the label-free steps run: cpu (default), cuda, "
                                        "cuda:1, ... (the merge itself streams on the CPU)")
    merge.set_defaults(run=_merge)

    inspect = sub.add_parser("inspect", help="show a merged model's tasks, labels and provenance")
    inspect.add_argument("model", help="model directory or hub id")
    inspect.add_argument("--json", action="store_true", help="print the hm3 block as JSON")
    inspect.set_defaults(run=_inspect)

    predict = sub.add_parser("predict", help="classify texts with every task of a model")
    predict.add_argument("model", help="model directory or hub id")
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument("--input", help="file of texts: .txt (one per line), JSONL (strings or "
                         "objects), CSV, TSV, JSON or Parquet")
    predict.add_argument("--text-column", default="text", help="column/field holding the text")
    predict.add_argument("--output", help="write the predictions here: .jsonl (one JSON object "
                         "per text), .csv or .tsv (a column per task and per probability); "
                         "default: JSONL on standard output")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--logits", action="store_true", help="include the raw logits")
    predict.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    predict.add_argument("--allow-pickle", action="store_true",
                         help="allow a pickle .bin checkpoint (it can run arbitrary code)")
    predict.set_defaults(run=_predict)

    evaluate = sub.add_parser("eval", help="score a merged model or one expert on labelled data")
    evaluate.add_argument("model", help="merged model or single expert (directory or hub id)")
    evaluate.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                          help="labelled data for a task: CSV / JSONL / Parquet file or hub "
                          "dataset id (repeatable)")
    evaluate.add_argument("--recipe", help="take the datasets from this recipe's `data:` block")
    evaluate.add_argument("--expect", action="append", default=[], metavar="TASK:OTHER=LABEL",
                          help="cross-check: TASK's texts should get LABEL on OTHER's head")
    evaluate.add_argument("--task", help="task name of a plain single-task classifier")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--limit", type=int, help="score only the first N examples per task")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-length", type=int, help="truncate texts to this many tokens "
                          "(default: the tokenizer's maximum)")
    evaluate.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    evaluate.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="allow a pickle .bin checkpoint (it can run arbitrary code)")
    evaluate.set_defaults(run=_evaluate)

    bench = sub.add_parser("bench", help="time the merged model against running its experts")
    bench.add_argument("model", help="merged model directory or hub id")
    bench.add_argument("--experts", nargs="+", required=True, metavar="PATH",
                       help="the expert models the merged model replaces")
    bench.add_argument("--input", help="file of texts to time on, as for predict (default: built-in "
                       "sample sentences)")
    bench.add_argument("--text-column", default="text")
    bench.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    bench.add_argument("--repeats", type=int, default=5, help="timed rounds (median is kept)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    bench.add_argument("--json", dest="json_out", help="also write the result as JSON here")
    bench.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench.set_defaults(run=_bench)

    check = sub.add_parser("check", help="label-free pre-deployment check: does the merged "
                           "model keep each expert's decisions on your texts? (exit 1 if not)")
    check.add_argument("model", help="merged model directory or hub id")
    check.add_argument("--experts", nargs="+", metavar="[TASK=]PATH",
                       help="the experts that were merged (default: the sources the merged "
                       "model records); TASK= where the task is not clear from the path")
    check.add_argument("--texts", required=True, metavar="FILE",
                       help="unlabelled texts NOT used for calibration: .txt (one per line), "
                       "JSONL, CSV, TSV, JSON or Parquet")
    check.add_argument("--text-column", default="text")
    check.add_argument("--limit", type=int, help="check only the first N texts")
    check.add_argument("--min-agreement", action="append", default=[], metavar="[TASK=]SHARE",
                       help="minimum share of texts given the expert's label, for every task "
                       "or one (repeatable; default 0.9)")
    check.add_argument("--count", choices=("all", "confident", "weighted"), default="all",
                       help="texts the verdict counts: every text (default), those the "
                       "expert is at least 90%% sure of, or every text weighted by the "
                       "expert's confidence (for mixed traffic, where other tasks' texts get "
                       "arbitrary labels from an expert)")
    check.add_argument("--max-drift", type=float, metavar="TVD",
                       help="also fail a task whose label shares move further than this (total "
                       "variation distance, 0..1)")
    check.add_argument("--batch-size", type=int, default=32)
    check.add_argument("--max-length", type=int, help="truncate texts to this many tokens "
                       "(default: the tokenizer's maximum)")
    check.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    check.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    check.set_defaults(run=_check)

    search = sub.add_parser("search", help="search merge parameters on validation data (the "
                            "paper's DARE-TIES model search) and keep the best merged model")
    search.add_argument("recipe", help="YAML recipe whose `data:` block gives every task's test "
                        "data (`path`) and validation data (`validation`)")
    _search_options(search)
    search.add_argument("--methods", nargs="+", default=["dare_ties"], metavar="METHOD",
                        help="merge methods to choose from (default: dare_ties)")
    search.add_argument("--per-expert-density", action="store_true",
                        help="sample one density per expert instead of one for all")
    search.add_argument("--weights", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="also sample a weight per expert in [LOW, HIGH]")
    search.add_argument("--lambda", dest="lambda_range", nargs=2, type=float,
                        metavar=("LOW", "HIGH"), help="also sample lambda in [LOW, HIGH]")
    search.add_argument("--lewis", dest="lewis_range", nargs=2, type=float,
                        metavar=("LOW", "HIGH"), help="also sample LEWIS's gamma and epsilon in "
                        "[LOW, HIGH] (the recipe needs a `calibration` block)")
    search.set_defaults(run=_search)

    self_merge = sub.add_parser("self-merge", help="merge one expert with itself under DARE-TIES "
                                "at sampled densities and plot F1 against density")
    self_merge.add_argument("expert", help="the expert (directory or hub id)")
    self_merge.add_argument("--base", required=True, help="the model it was fine-tuned from")
    self_merge.add_argument("--validation", required=True, metavar="FILE",
                            help="labelled validation data (CSV / JSONL / Parquet / hub id)")
    self_merge.add_argument("--test", metavar="FILE", help="labelled test data, scored by each "
                            "new best")
    self_merge.add_argument("--task", help="task name (default: the expert's folder name)")
    self_merge.add_argument("--text-column", default="text")
    self_merge.add_argument("--label-column", default="label")
    _search_options(self_merge)
    self_merge.set_defaults(run=_self_merge)

    serve = sub.add_parser("serve", help="serve a model over HTTP: POST /v1/classify, a "
                           "playground page at /, /metrics (needs the serve extra)")
    serve.add_argument("model", help="model directory (merged, single expert, ONNX or OpenVINO "
                       "export)")
    add_serve_arguments(serve)
    serve.add_argument("--max-length", type=int, help="truncate texts to this many tokens "
                       "(default: the tokenizer's maximum)")
    serve.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    serve.set_defaults(run=_serve)

    export = sub.add_parser("export", help="export a model to ONNX or OpenVINO, per-task "
                            "probabilities in the graph (needs the onnx / openvino extra)")
    export.add_argument("model", help="model directory or hub id")
    export.add_argument("-o", "--output", required=True, help="output folder")
    export.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                        help="onnx (ONNX Runtime, default) or openvino (the OpenVINO runtime)")
    export.add_argument("--quantize", choices=["int8"], help="int8: with onnx, dynamic int8 "
                        "weights; with openvino, weights and activations (needs --calibration)")
    export.add_argument("--calibration", help="with --format openvino --quantize int8: unlabelled "
                        "texts like your traffic (.txt one per line, .jsonl, or a table's "
                        "--text-column); a few hundred are enough")
    export.add_argument("--text-column", default="text", help="the column of --calibration's "
                        "table (default: text)")
    export.add_argument("--max-length", type=int, help="cut texts to this many tokens, at "
                        "calibration and when the export runs (default: the tokenizer's "
                        "maximum); calibrate at the length you serve at")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.set_defaults(run=_export)

    demo = sub.add_parser("demo", help="merge the built-in offline experts, score and time them")
    demo.add_argument("--output", default="hm3-demo",
                      help="folder for the merged model and report.json (default: hm3-demo)")
    demo.add_argument("--cache-dir", help="where the experts are cached (default: $HM3_CACHE "
                      "or ~/.cache/hm3)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)
    return parser


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True,
                        help="folder for the study, trials table, plot and best model")
    parser.add_argument("--trials", type=int, default=50, help="finished trials the study "
                        "should hold in total; a rerun runs only the missing ones (default 50)")
    parser.add_argument("--sampler", default="beta", choices=["beta", "tpe", "cmaes", "random"],
                        help="beta: densities ~ Beta(alpha, beta), the paper's (default)")
    parser.add_argument("--alpha", type=float, default=1.5, help="Beta alpha, > 1 (default 1.5)")
    parser.add_argument("--beta", type=float, default=3.0, help="Beta beta (default 3)")
    parser.add_argument("--density-range", nargs=2, type=float, default=[0.01, 1.0],
                        metavar=("LOW", "HIGH"), help="densities lie in [LOW, HIGH] "
                        "(default 0.01 1)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    parser.add_argument("--fixed-merge-seed", action="store_true",
                        help="merge every trial with the recipe's seed (default: seed + trial "
                        "number, so each trial draws its own DARE masks)")
    parser.add_argument("--prune", type=float, metavar="FRACTION", help="score this share of "
                        "each validation set first and stop weak trials early")
    parser.add_argument("--prune-keep", type=float, default=50.0, metavar="PCT",
                        help="with --prune: go on only when the subset score is in the top PCT%% "
                        "of finished trials' (default 50)")
    parser.add_argument("--prune-startup", type=int, default=5, metavar="N",
                        help="with --prune: finished trials before pruning starts (default 5)")
    parser.add_argument("--storage", help="Optuna RDB URL shared by workers, e.g. "
                        "postgresql://user@host/db (default: sqlite:///OUTPUT/study.db)")
    parser.add_argument("--study-name", help="default: derived from the recipe, data and "
                        "search settings, so the same command resumes the same study")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens "
                        "(default: the tokenizer's maximum)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _quiet_transformers() -> None:
    """hm3 prints its own progress; transformers' per-load bars and reports are noise here."""
    from transformers.utils import logging  # lazy, as the commands' imports

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _version() -> str:
    return __version__


def _merge(args) -> int:
    from hm3.pipeline import format_guided, merge
    from hm3.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.allow_pickle:
        recipe = dataclasses.replace(recipe, allow_pickle=True)
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    report = merge(recipe, args.output, overwrite=args.overwrite, progress=not args.no_progress,
                   device=args.device)
    count = len(report.groups)
    print(f"merged {count} expert{'s' if count != 1 else ''} ({report.tensors} tensors, "
          f"{report.groups[-1].stop} labels) with {recipe.method} in {report.seconds:.1f}s "
          f"-> {report.path}")
    for group in report.groups:
        kind = "multi-label" if group.multi_label else "single-label"
        print(f"  {group.name:<16} {kind:<12} {', '.join(group.labels)}")
    if report.guided:
        print(format_guided(report.guided))
    return 0


def _inspect(args) -> int:
    from hm3.checkpoint import read_config, resolve
    from hm3.model import task_groups
    from hm3.pipeline import format_guided

    config = read_config(resolve(args.model))
    block = config.get("hm3")
    if args.json:
        print(json.dumps(block or {}, indent=2))
        return 0
    groups = task_groups(config, None, args.model)
    if block:
        print(f"hm3 {block.get('version')} model: {len(groups)} tasks, "
              f"{groups[-1].stop} labels, method {block.get('method')} "
              f"{json.dumps(block.get('parameters', {}))}, seed {block.get('seed')}")
        print(f"base: {block.get('base')}")
    else:
        print(f"plain classifier (no hm3 block): 1 task, {groups[-1].stop} labels")
    sources = {s["task"]: s["model"] for s in (block or {}).get("sources", [])}
    for group in groups:
        kind = "multi-label" if group.multi_label else "single-label"
        print(f"  {group.name:<16} logits [{group.offset}:{group.stop}) {kind:<12} "
              f"{', '.join(group.labels)}")
        if group.name in sources:
            print(f"  {'':<16} from {sources[group.name]}")
    if block and block.get("guided"):
        print(format_guided(block["guided"]))
    return 0


def _predict(args) -> int:
    from hm3.data import read_texts
    from hm3.model import load

    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in PREDICTION_FORMATS:
        raise Hm3Error(f"--output {output}: expected a .jsonl, .csv or .tsv file name")
    texts = list(args.texts)
    if args.input:
        texts += read_texts(Path(args.input), args.text_column)
    if not texts:
        raise Hm3Error("nothing to classify: give texts as arguments or --input FILE")
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    results = model.predict(texts, batch_size=args.batch_size, return_logits=args.logits)
    if output is not None and output.suffix.lower() in (".csv", ".tsv"):
        write_text_atomic(output, _prediction_table(model.groups, texts, results,
                                                    "\t" if output.suffix.lower() == ".tsv"
                                                    else ","))
        return 0
    lines = [json.dumps({"text": text, **result}, ensure_ascii=False)
             for text, result in zip(texts, results)]
    if output is not None:
        write_text_atomic(output, "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


PREDICTION_FORMATS = (".jsonl", ".ndjson", ".csv", ".tsv")


def _prediction_table(groups, texts: list[str], results: list[dict], delimiter: str) -> str:
    """Predictions as CSV/TSV: the text, each task's label (a multi-label task's labels joined by
    `|`), then one column per `task/label` probability (and the logits when asked)."""
    header = ["text", *(g.name for g in groups),
              *(f"{g.name}/{label}" for g in groups for label in g.labels)]
    with_logits = bool(results) and "logits" in results[0]
    if with_logits:
        header += [f"logit/{g.name}/{label}" for g in groups for label in g.labels]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    for text, result in zip(texts, results):
        labels = [result[g.name]["label"] for g in groups]
        row = [text, *("|".join(x) if isinstance(x, list) else x for x in labels),
               *(result[g.name]["probabilities"][label] for g in groups for label in g.labels)]
        if with_logits:
            row += result["logits"]
        writer.writerow(row)
    return buffer.getvalue()


def _evaluate(args) -> int:
    from hm3.data import load_data_block
    from hm3.evaluate import evaluate, format_report
    from hm3.model import load
    from hm3.recipe import load_data_recipe

    data: dict = {}
    root = None
    if args.recipe:
        data.update(load_data_recipe(args.recipe))
        root = Path(args.recipe).parent
    for item in args.data:
        task, sep, spec = item.partition("=")
        if not sep or not task or not spec:
            raise Hm3Error(f"--data expects TASK=FILE, got {item!r}")
        data[task] = {"path": spec, "text_column": args.text_column,
                      "label_column": args.label_column}
    for item in args.expect:
        head, sep, label = item.partition("=")
        task, colon, other = head.partition(":")
        if not (sep and colon and task and other and label):
            raise Hm3Error(f"--expect expects TASK:OTHER=LABEL, got {item!r}")
        if task not in data:
            raise Hm3Error(f"--expect {item}: no --data for task {task!r}")
        data[task] = {**data[task], "expect": {**data[task].get("expect", {}), other: label}}
    if not data:
        raise Hm3Error("nothing to score: give --data TASK=FILE or --recipe with a `data:` block")
    if args.limit is not None:
        data = {task: {**({"path": e} if isinstance(e, str) else e), "limit": args.limit}
                for task, e in data.items()}
    model = load(args.model, task=args.task, device=args.device, max_length=args.max_length,
                 allow_pickle=args.allow_pickle)
    for item in args.expect:  # named on the command line: a typo must not pass as "no such head"
        other = item.partition("=")[0].partition(":")[2]
        if other not in model.tasks:
            raise Hm3Error(f"--expect {item}: the model has no task {other!r}; its tasks are "
                           f"{', '.join(model.tasks)}")
    datasets = load_data_block(data, root=root)
    if len(model.groups) == 1:  # a single expert: score its own task; others' data do not apply
        own = [d for d in datasets if d.task == model.groups[0].name]
        if own and len(own) < len(datasets):
            skipped = sorted(d.task for d in datasets if d.task != model.groups[0].name)
            warnings.warn(f"{args.model} has one task ({model.groups[0].name}); the data for "
                          f"{', '.join(skipped)} was not scored (use --task to name the model's "
                          "task)", Hm3Warning, stacklevel=2)
        datasets = own or datasets
    report = evaluate(model, datasets, batch_size=args.batch_size)
    print(format_report(report))
    if args.json_out:
        write_text_atomic(Path(args.json_out), json.dumps(report, indent=2) + "\n")
    return 0


def _bench(args) -> int:
    from hm3.bench import SAMPLE_TEXTS, benchmark, format_bench
    from hm3.data import read_texts
    from hm3.model import load

    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    except ValueError:
        raise Hm3Error(f"--batch-sizes expects numbers like 1,8,32, got {args.batch_sizes!r}") from None
    texts = read_texts(Path(args.input), args.text_column) if args.input else list(SAMPLE_TEXTS)
    merged = load(args.model, device=args.device, max_length=args.max_length)
    experts = [load(path, device=args.device, max_length=args.max_length) for path in args.experts]
    result = benchmark(merged, experts, texts, batch_sizes=sizes, repeats=args.repeats,
                       warmup=args.warmup, threads=args.threads, progress=not args.no_progress)
    print(format_bench(result))
    if args.json_out:
        write_text_atomic(Path(args.json_out), json.dumps(result, indent=2) + "\n")
    return 0


def _check(args) -> int:
    from hm3.check import (calibration_overlap, check, check_expert_groups, format_check,
                           parse_thresholds, verdicts)
    from hm3.checkpoint import read_config, resolve
    from hm3.data import read_texts
    from hm3.model import load, task_groups

    if args.limit is not None and args.limit < 1:
        raise Hm3Error(f"--limit: expected a positive number of texts, got {args.limit}")
    if args.max_drift is not None and not 0 <= args.max_drift <= 1:
        raise Hm3Error(f"--max-drift: expected a distance in [0, 1], got {args.max_drift}")
    texts = read_texts(Path(args.texts), args.text_column)[:args.limit]
    folder = resolve(args.model)
    block = read_config(folder).get("hm3") or {}
    if not block:
        raise Hm3Error(f"{args.model} is not an hm3-merged model (its config.json has no hm3 "
                       "block); check the folder `hm3 merge` wrote")
    tasks = [t["name"] for t in block["tasks"]]
    thresholds = parse_thresholds(args.min_agreement, tasks)
    experts = _check_experts(args.experts, block, tasks)
    merged_groups = {g.name: g for g in task_groups(read_config(folder), None, args.model)}
    for task, path in experts.items():  # a wrong expert fails before any forward pass
        check_expert_groups(merged_groups[task],
                            task_groups(read_config(resolve(path)), task, path))
    merged = load(folder, device=args.device, max_length=args.max_length)
    loaders = {task: functools.partial(load, path, task=task, device=args.device,
                                       max_length=args.max_length)
               for task, path in experts.items()}
    report = verdicts(check(merged, loaders, texts, args.batch_size), thresholds,
                      args.max_drift, args.count)
    report["model"], report["experts"] = str(args.model), experts
    overlap = calibration_overlap(folder, texts)
    report["calibration_overlap"] = overlap
    fidelity = (block.get("guided") or {}).get("fidelity")
    if fidelity:
        report["calibration_figures"] = fidelity["tasks"]
        if "held_out" in fidelity:  # merges by earlier hm3 versions have none
            report["calibration_held_out"] = fidelity["held_out"]["tasks"]
    if overlap and any(overlap.values()):
        used = ", ".join(f"{task} {count}" for task, count in overlap.items() if count)
        warnings.warn(f"some check texts were calibration texts of this merge ({used} of "
                      f"{len(texts)}): the label-free steps were fitted to them, so agreement "
                      "on them is optimistic; check on texts the merge has not seen", Hm3Warning)
    print(format_check(report))
    if args.json_out:
        write_text_atomic(Path(args.json_out), json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def _check_experts(items: list[str] | None, block: dict, tasks: list[str]) -> dict[str, str]:
    """`--experts [TASK=]PATH ...` as task -> path. A path without TASK= is matched to the
    source the merged model records for it, else to the task named like its folder. Without
    --experts, the recorded sources."""
    recorded = {s["task"]: s["model"] for s in block.get("sources", [])}
    if not items:
        missing = [t for t in tasks if t not in recorded]
        if missing:
            raise Hm3Error(f"the model records no expert for {', '.join(missing)}; name them "
                           "with --experts TASK=PATH ...")
        return {task: recorded[task] for task in tasks}
    by_path = {_same_path(path): task for task, path in recorded.items()}
    out: dict[str, str] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep:
            path = item
            name = Path(item.rstrip("/")).name
            task = by_path.get(_same_path(item)) or (name if name in tasks else "")
            if not task:
                raise Hm3Error(f"--experts {item}: cannot tell which task it is the expert of "
                               f"(tasks: {', '.join(tasks)}); write TASK={item}")
        if task not in tasks:
            raise Hm3Error(f"--experts {item}: no task {task!r}; tasks are {', '.join(tasks)}")
        if task in out:
            raise Hm3Error(f"--experts: two experts for task {task!r}; give one per task")
        out[task] = path
    return out


def _same_path(path: str) -> str:
    """A path in the form two spellings of one folder share (hub ids stay as they are)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def _search(args) -> int:
    from hm3.data import load_data_block
    from hm3.recipe import load_recipe
    from hm3.search import SearchSpace, run_search

    recipe = load_recipe(args.recipe)
    if not recipe.data:
        raise Hm3Error(f"{args.recipe} has no `data:` block; a search needs each task's "
                       "validation and test data, e.g. `data: {spam: {path: test.jsonl, "
                       "validation: validation.jsonl}}`")
    tasks = [e.task for e in recipe.experts]
    root = Path(args.recipe).parent
    validation = load_data_block(recipe.data, root, tasks, part="validation")
    test = load_data_block(recipe.data, root, tasks, part="test")
    space = SearchSpace(methods=tuple(args.methods), density_range=tuple(args.density_range),
                        per_expert_density=args.per_expert_density,
                        weight_range=tuple(args.weights) if args.weights else None,
                        lambda_range=tuple(args.lambda_range) if args.lambda_range else None,
                        lewis_range=tuple(args.lewis_range) if args.lewis_range else None)
    return _run_search(args, space, functools.partial(run_search, recipe, validation, test,
                                                      args.output))


def _self_merge(args) -> int:
    from hm3.data import load_dataset
    from hm3.search import SearchSpace, self_merge

    task = args.task or Path(args.expert.rstrip("/")).name
    validation, test = (load_dataset(spec, task, args.text_column, args.label_column)
                        if spec else None for spec in (args.validation, args.test))
    space = SearchSpace(density_range=tuple(args.density_range))
    return _run_search(args, space, functools.partial(self_merge, args.expert, args.base,
                                                      validation, test, args.output))


def _run_search(args, space, run) -> int:
    """Shared by `search` and `self-merge`: `run(config=..., progress=...)`, then the report."""
    from hm3.search import SearchConfig, format_summary

    config = SearchConfig(trials=args.trials, space=space, sampler=args.sampler,
                          alpha=args.alpha, beta=args.beta, seed=args.seed,
                          vary_merge_seed=not args.fixed_merge_seed, prune_fraction=args.prune,
                          prune_keep=args.prune_keep, prune_startup=args.prune_startup,
                          batch_size=args.batch_size, max_length=args.max_length,
                          device=args.device, storage=args.storage, study_name=args.study_name)
    try:
        result = run(config=config, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("hm3: search interrupted; its finished trials are kept: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    rate = result.trials_per_minute
    print(f"study {result.study_name} ({result.storage}): {result.finished} finished trials; "
          f"this run {result.ran} in {result.seconds:.0f}s"
          + (f" ({rate:.1f} trials/min)" if rate else ""))
    print(format_summary(result))
    for what, path in result.files.items():
        print(f"  {what:<6} {path}")
    return 0


def _serve(args) -> int:
    options = ServeOptions.from_args(args)
    if options.ray:
        return _serve_on_ray(args, options)
    from hm3.serve.server import serve

    serve(args.model, options, device=args.device, max_length=args.max_length)
    return 0


def _serve_on_ray(args, options) -> int:
    try:
        from hm3.serve.ray_app import serve_on_ray
    except ImportError as exc:
        raise Hm3Error(f"--ray needs Ray Serve ({exc}); install it with "
                       "pip install 'hm3[ray]'") from None
    serve_on_ray(args.model, options, device=args.device, max_length=args.max_length)
    return 0


def _export(args) -> int:
    from hm3.data import read_texts
    from hm3.export import export_onnx, export_openvino

    if args.format == "onnx":
        if args.calibration:
            raise Hm3Error("--calibration is for --format openvino --quantize int8 (ONNX "
                           "Runtime's int8 quantises activations on the fly, without texts)")
        report = export_onnx(args.model, args.output, quantize=args.quantize,
                             overwrite=args.overwrite, max_length=args.max_length)
    else:
        texts = read_texts(args.calibration, args.text_column) if args.calibration else None
        report = export_openvino(args.model, args.output, quantize=args.quantize,
                                 calibration=texts, overwrite=args.overwrite,
                                 max_length=args.max_length)
    print(f"exported {args.model} -> {report['path']} ({report['file']}, "
          f"{report['megabytes']:.1f} MB{', int8' if args.quantize else ''}); "
          f"largest difference from PyTorch on sample texts: {report['max_abs_diff']:.2g}")
    return 0


def _demo(args) -> int:
    from hm3.demo import run_demo

    run_demo(args.output, cache_dir=args.cache_dir, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
