"""The `hm3` command: thin subcommands over the library. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from hm3.errors import Hm3Error


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    warnings.formatwarning = lambda message, *_: f"hm3: warning: {message}\n"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args) or 0
    except Hm3Error as exc:
        print(f"hm3: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hm3: interrupted; nothing was written", file=sys.stderr)
        return 130


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
    merge.set_defaults(run=_merge)

    inspect = sub.add_parser("inspect", help="show a merged model's tasks, labels and provenance")
    inspect.add_argument("model", help="model directory or hub id")
    inspect.add_argument("--json", action="store_true", help="print the hm3 block as JSON")
    inspect.set_defaults(run=_inspect)

    predict = sub.add_parser("predict", help="classify texts with every task of a model")
    predict.add_argument("model", help="model directory or hub id")
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument("--input", help="JSONL or CSV file of texts (one per line/row)")
    predict.add_argument("--text-column", default="text", help="column/field holding the text")
    predict.add_argument("--output", help="write JSONL here (default: standard output)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--logits", action="store_true", help="include the raw logits")
    predict.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    predict.set_defaults(run=_predict)
    return parser


def _version() -> str:
    from hm3 import __version__
    return __version__


def _merge(args) -> int:
    from hm3.merge import merge
    from hm3.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.allow_pickle:
        recipe = dataclasses.replace(recipe, allow_pickle=True)
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    report = merge(recipe, args.output, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"merged {len(report.groups)} experts ({report.tensors} tensors, "
          f"{report.groups[-1].stop} labels) with {recipe.method} in {report.seconds:.1f}s "
          f"-> {report.path}")
    for group in report.groups:
        kind = "multi-label" if group.multi_label else "single-label"
        print(f"  {group.name:<16} {kind:<12} {', '.join(group.labels)}")
    return 0


def _inspect(args) -> int:
    from hm3.checkpoint import read_config, resolve
    from hm3.model import task_groups

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
    return 0


def _predict(args) -> int:
    from hm3.model import load

    texts = list(args.texts)
    if args.input:
        texts += read_texts(Path(args.input), args.text_column)
    if not texts:
        raise Hm3Error("nothing to classify: give texts as arguments or --input FILE")
    model = load(args.model, device=args.device)
    results = model.predict(texts, batch_size=args.batch_size, return_logits=args.logits)
    lines = [json.dumps({"text": text, **result}, ensure_ascii=False)
             for text, result in zip(texts, results)]
    if args.output:
        write_text_atomic(Path(args.output), "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


def read_texts(path: Path, column: str) -> list[str]:
    """Texts from a JSONL file (objects with `column`, or bare strings) or a CSV with `column`."""
    if not path.is_file():
        raise Hm3Error(f"input file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or []):
                raise Hm3Error(f"{path} has no column {column!r} (columns: "
                               f"{', '.join(reader.fieldnames or [])}); pass --text-column")
            return [row[column] for row in reader]
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise Hm3Error(f"{path}:{number} is not JSON; expected JSONL or a .csv file") from None
        if isinstance(item, dict) and isinstance(item.get(column), str):
            texts.append(item[column])
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise Hm3Error(f"{path}:{number} has no text field {column!r}; pass --text-column")
    return texts


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
