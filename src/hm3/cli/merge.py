"""`hm3 merge RECIPE -o MODEL`: merge the experts of a recipe into one model."""

from __future__ import annotations

import argparse
import dataclasses

from hm3.cli.options import add_model_options, add_overwrite, add_progress

HELP = "merge the experts of a YAML recipe into one model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (base, experts, method, parameters)")
    parser.add_argument("-o", "--output", required=True, help="output model directory")
    add_overwrite(parser)
    parser.add_argument("--seed", type=int, help="override the recipe's seed")
    add_progress(parser)
    # the recipe's calibration block sets the label-free steps' batch size and max length
    add_model_options(parser, batch_size=None, max_length=None,
                      device="where the label-free steps run: cpu (default), cuda, cuda:1, ... "
                      "(the merge itself streams on the CPU)")


def run(args: argparse.Namespace) -> int:
    from hm3.pipeline import merge
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
    if report.label_free:
        print(report.label_free.summary())
    return 0
