"""`hm3 inspect MODEL`: a merged model's tasks, labels and provenance, read from its config."""

from __future__ import annotations

import argparse
import json

HELP = "show a merged model's tasks, labels and provenance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or hub id")
    parser.add_argument("--json", action="store_true", help="print the hm3 block as JSON")


def run(args: argparse.Namespace) -> int:
    from hm3.checkpoint import read_config, resolve
    from hm3.label_free.registry import saved_report
    from hm3.model import task_groups
    from hm3.pipeline import LabelFreeReport

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
    label_free = saved_report(block)  # `guided` in models merged by earlier versions
    if label_free:
        print(LabelFreeReport.from_dict(label_free).summary())
    return 0
