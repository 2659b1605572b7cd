"""`hm3 search RECIPE -o FOLDER`: the paper's model search over merge parameters on validation
data, keeping the best merged model. Its study options are shared with `hm3 self-merge`."""

from __future__ import annotations

import argparse

from hm3.cli.options import ModelOptions, add_model_options, add_progress

HELP = ("search merge parameters on validation data (the paper's DARE-TIES model search) and keep "
        "the best merged model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe whose `data:` block gives every task's test "
                        "data (`path`) and validation data (`validation`)")
    add_study_options(parser)
    parser.add_argument("--methods", nargs="+", default=["dare_ties"], metavar="METHOD",
                        help="merge methods to choose from (default: dare_ties)")
    parser.add_argument("--per-expert-density", action="store_true",
                        help="sample one density per expert instead of one for all")
    parser.add_argument("--weights", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="also sample a weight per expert in [LOW, HIGH]")
    parser.add_argument("--lambda", dest="lambda_range", nargs=2, type=float,
                        metavar=("LOW", "HIGH"), help="also sample lambda in [LOW, HIGH]")
    parser.add_argument("--lewis", dest="lewis_range", nargs=2, type=float,
                        metavar=("LOW", "HIGH"), help="also sample LEWIS's gamma and epsilon in "
                        "[LOW, HIGH] (the recipe needs a `calibration` block)")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import functools
    from pathlib import Path

    from hm3.data import load_data_block
    from hm3.errors import Hm3Error
    from hm3.recipe import load_recipe
    from hm3.search import SearchSpace, run_search

    recipe = load_recipe(args.recipe)
    if args.allow_pickle:
        recipe = dataclasses.replace(recipe, allow_pickle=True)
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
    return run_study(args, space, functools.partial(run_search, recipe, validation, test,
                                                    args.output))


def add_study_options(parser: argparse.ArgumentParser) -> None:
    """The options of an Optuna study (`search` and `self-merge`): its trials, sampler, pruning
    and storage, and how trials load and score models."""
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
    add_model_options(parser, batch_size=64)
    add_progress(parser)


def run_study(args: argparse.Namespace, space, run) -> int:
    """`run(config=..., progress=...)` with the study options of `args`, then the report."""
    import sys

    from hm3.search import SearchConfig, format_summary

    options = ModelOptions.from_args(args)
    config = SearchConfig(trials=args.trials, space=space, sampler=args.sampler,
                          alpha=args.alpha, beta=args.beta, seed=args.seed,
                          vary_merge_seed=not args.fixed_merge_seed, prune_fraction=args.prune,
                          prune_keep=args.prune_keep, prune_startup=args.prune_startup,
                          batch_size=options.batch_size, max_length=options.max_length,
                          device=options.device, storage=args.storage,
                          study_name=args.study_name)
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
