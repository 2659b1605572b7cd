"""Mutation testing with mutmut, one module group at a time.

The groups cover the engine, the label-free steps, and what a result passes through after the
merge (recipe, card, check, data, pipeline, export, serve).

Each group is mutated in a scratch copy of the repository (src/, tests/, pyproject.toml) whose
`[tool.mutmut]` section names that group's files and the test files that guard it, so a mutant
runs only the relevant tests (mutmut then narrows them further to the tests that reach the
mutated function). The score per group goes to benchmarks/results/mutation_score.json.

    python tools/mutation.py methods heads          # the groups to run (default: all)
    python tools/mutation.py heads --keep /tmp/mut  # keep the copy (/tmp/mut/heads) for
                                                    # `mutmut show NAME` run inside it
    python tools/mutation.py heads --survivors      # re-run only the recorded survivors
                                                    # against the current tests
    python tools/mutation.py card --survivors --tests tests/test_card_units.py
                                                    # ... against the test files added since
                                                    # only (the survivors passed the others)
    python tools/mutation.py heads --collect /tmp/mut  # record a kept run (even one stopped
                                                    # part way: the mutants not run are
                                                    # counted)
    python tools/mutation.py --list                 # the groups and their test files

Slow (minutes to hours per group on 2 cores): not part of the test suite or of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutmut.stats import status_by_exit_code

from hm3.checkpoint import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation_score.json"

# group -> (files mutated, test files run against them). Fast unit tests come first: pytest runs
# them in this order and stops at the first failure (-x), so most mutants die in a second.
GROUPS = {
    "methods": (["src/hm3/methods/*"],
                ["tests/test_kernels.py", "tests/test_method_reference.py",
                 "tests/test_label_free.py::test_contributions_add_up_to_the_combined_merge"]),
    "heads": (["src/hm3/heads.py"],
              ["tests/test_heads.py", "tests/test_merge.py", "tests/test_method_reference.py",
               "tests/test_errors.py",
               "tests/test_architectures.py"]),
    "merge": (["src/hm3/engine/*"],
              ["tests/test_merge_units.py", "tests/test_merge.py", "tests/test_method_reference.py",
               "tests/test_errors.py", "tests/test_recipe_mistakes.py::test_later_overrides_win",
               "tests/test_recipe_mistakes.py::test_an_override_that_matches_no_tensor_is_an_error",
               "tests/test_recipe_mistakes.py::"
               "test_weights_that_sum_to_zero_under_normalisation_are_an_error"]),
    "model": (["src/hm3/model.py"],
              ["tests/test_model.py", "tests/test_merge.py", "tests/test_evaluate.py",
               "tests/test_export.py::test_load_predicts_from_the_export_like_the_torch_model"]),
    "label_free": (["src/hm3/label_free/*"],
               ["tests/test_label_free_units.py", "tests/test_label_free.py",
                "tests/test_label_free_reference.py"]),
    "metrics": (["src/hm3/evaluate.py"], ["tests/test_metrics.py", "tests/test_evaluate.py"]),
    # What a user's result passes through after the merge (issue 25).
    "recipe": (["src/hm3/recipe.py"],
               ["tests/test_recipe_units.py", "tests/test_recipe_roundtrip.py",
                "tests/test_recipe_mergekit.py",
                "tests/test_recipe_mistakes.py"]),
    "card": (["src/hm3/card.py"], ["tests/test_card_units.py", "tests/test_card.py"]),
    "check": (["src/hm3/check.py"], ["tests/test_check_units.py", "tests/test_check.py"]),
    "data": (["src/hm3/data/*"],
             ["tests/test_data_items.py", "tests/test_data_tables.py",
              "tests/test_evaluate.py::test_load_dataset_reads_every_file_type",
              "tests/test_evaluate.py::test_bad_files_and_columns_say_what_to_do",
              "tests/test_evaluate.py::"
              "test_data_block_is_validated_then_loaded_from_the_recipe_folder",
              "tests/test_data_blocks.py", "tests/test_calibration.py"]),
    "pipeline": (["src/hm3/pipeline.py"],
                 ["tests/test_pipeline_units.py", "tests/test_label_free_units.py",
                  "tests/test_merge_units.py",
                  "tests/test_calibration.py", "tests/test_recipe_mistakes.py"]),
    "export": (["src/hm3/export.py"],
               ["tests/test_export_units.py", "tests/test_export.py",
                "tests/test_export_openvino.py"]),
    "onnx_model": (["src/hm3/onnx_model.py"],
                   ["tests/test_export_units.py", "tests/test_export_openvino.py",
                    "tests/test_export.py"]),
    # ray_app.py is left out: its tests need Ray Serve (the `ray` extra) and minutes to start
    # it, so its mutants would only count as "no tests" here. The tests that start `hm3 serve`
    # as a process are left out too: that process imports the installed hm3, not the mutated
    # copy, so they cannot kill a mutant (they only made each one slower).
    "serve": (["src/hm3/serve/app.py", "src/hm3/serve/batching.py", "src/hm3/serve/buckets.py",
               "src/hm3/serve/guard.py", "src/hm3/serve/options.py", "src/hm3/serve/policy.py",
               "src/hm3/serve/server.py"],
              ["tests/test_serve_units.py", "tests/test_serve_app.py",
               "tests/test_serve_buckets.py",
               "tests/test_serve_hardening.py::test_the_batcher_reruns_a_failing_batch_so_batch_"
               "mates_succeed",
               "tests/test_serve_hardening.py::test_a_small_request_is_not_queued_behind_every_"
               "text_of_a_large_one",
               "tests/test_serve_hardening.py::test_start_refuses_what_cannot_serve",
               "tests/test_serve_hardening.py::test_options_checks",
               "tests/test_serve_hardening.py::test_request_bodies_held_at_once_are_bounded",
               "tests/test_serve.py::test_serve_refuses_a_bad_policy_and_a_wrong_backend",
               "tests/test_serve.py::test_policy_checks_labels_and_thresholds",
               "tests/test_serve.py::test_micro_batcher_groups_concurrent_callers_and_keeps_order"]),
}
# A mutant counts as killed when a test fails or hangs past mutmut's timeout (as mutmut scores).
CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}


def config_section(group: str, tests: list[str] | None = None) -> str:
    files, tests = GROUPS[group][0], tests or GROUPS[group][1]
    quoted = lambda items: "[" + ", ".join(f'"{x}"' for x in items) + "]"  # noqa: E731
    return ("[tool.mutmut]\n"
            'source_paths = ["src/"]\n'
            f"only_mutate = {quoted(files)}\n"
            f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
            'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-x"]\n')


# Appended to the scratch copy's tests/conftest.py. mutmut hands pytest each mutant's tests as
# a list made from a set, so without this they run in an order that changes from mutant to
# mutant and a slow test often runs before the fast one that would have failed first.
ORDER_HOOK = """

# --- added by tools/mutation.py to the scratch copy only ---
_MUTATION_TEST_ORDER = {order!r}


def _mutation_rank(nodeid):
    nodeid = nodeid.removeprefix("mutants/")
    for rank, entry in enumerate(_MUTATION_TEST_ORDER):
        if nodeid == entry or nodeid.startswith((entry + "::", entry + "[")):
            return rank
    return len(_MUTATION_TEST_ORDER)


def pytest_collection_modifyitems(items):
    \"\"\"The group's test files in the order listed (fast unit tests first), each file's tests in
    the order they are written: with -x a mutant stops at the first test that fails.\"\"\"
    items.sort(key=lambda item: (_mutation_rank(item.nodeid), item.location[0],
                                 item.location[1] or 0))
"""


def scratch_copy(group: str, folder: Path, tests: list[str] | None = None) -> None:
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__",
                                                                             "*.egg-info"))
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    with open(folder / "tests" / "conftest.py", "a") as conftest:
        conftest.write(ORDER_HOOK.format(order=tests or GROUPS[group][1]))
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", text)
    (folder / "pyproject.toml").write_text(text + "\n" + config_section(group, tests))


def statuses(folder: Path) -> dict[str, str]:
    """Each mutant's status ("killed", "survived", "no tests", "not checked", ...), read from the
    .meta files mutmut keeps beside the mutated sources (also mid-run)."""
    out = {}
    for meta in (folder / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def summary(group: str, status: dict[str, str], seconds: float | None) -> dict:
    counts: dict[str, int] = {}
    for value in status.values():
        counts[value] = counts.get(value, 0) + 1
    run = {name: s for name, s in status.items() if s not in ("not checked", "skipped")}
    killed = sum(s in CAUGHT for s in run.values())
    return {"files": GROUPS[group][0], "tests": GROUPS[group][1], "mutants": len(status),
            "run": len(run), "killed": killed, "score": killed / len(run) if run else None,
            "complete": len(run) == len(status), "counts": counts,
            "seconds": None if seconds is None else round(seconds),
            "surviving": sorted(name for name, s in run.items() if s not in CAUGHT)}


def run_mutmut(group: str, folder: Path, children: int, names: list[str]) -> float:
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([str(mutmut), "run", "--max-children", str(children), *names], cwd=folder,
                   env=env, check=False)
    return time.perf_counter() - started


def run_group(group: str, children: int, keep: Path | None, survivors_of: dict | None,
              tests: list[str] | None = None) -> dict:
    """Mutate `group` and run its tests; with `survivors_of` (the group's recorded entry) only
    its surviving mutants run, against the current tests (or only `tests`: the test files
    added since, when the others are unchanged), and the entry is updated."""
    names = survivors_of["surviving"] if survivors_of else []
    with tempfile.TemporaryDirectory(prefix=f"hm3-mutation-{group}-") as scratch:
        folder = Path(scratch)
        if keep:
            folder = keep / group
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        scratch_copy(group, folder, tests)
        seconds = run_mutmut(group, folder, children, names)
        status = statuses(folder)
    if not survivors_of:
        return summary(group, status, seconds)
    rerun = {name: status.get(name, "not checked") for name in names}
    still = sorted(name for name, s in rerun.items() if s not in CAUGHT)
    entry = dict(survivors_of)
    entry.setdefault("first_run", {k: survivors_of.get(k) for k in ("run", "killed", "score")})
    entry["killed"] = survivors_of["killed"] + len(names) - len(still)
    entry["score"] = entry["killed"] / entry["run"]
    entry["surviving"] = still
    entry["tests"] = GROUPS[group][1]
    entry["counts"] = {"killed": entry["killed"], "not killed": len(still)}
    entry.setdefault("reruns", []).append({"mutants": len(names), "killed": len(names) - len(still),
                                           "seconds": round(seconds),
                                           **({"tests": tests} if tests else {})})
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"any of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--children", type=int, default=1, help="mutants run at once")
    parser.add_argument("--keep", type=Path, help="keep each group's scratch copy in KEEP/GROUP")
    parser.add_argument("--survivors", action="store_true",
                        help="re-run only the surviving mutants recorded for each group")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="with --survivors: run them against these test files only (those "
                             "added since the run; the survivors passed the unchanged ones)")
    parser.add_argument("--collect", type=Path, metavar="KEEP",
                        help="record the runs kept in KEEP/GROUP without running anything")
    parser.add_argument("--list", action="store_true", help="show the groups and exit")
    args = parser.parse_args()
    if args.list:
        for name, (files, tests) in GROUPS.items():
            print(f"{name:<8} {' '.join(files)}  <-  {' '.join(tests)}")
        return 0
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(GROUPS)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for group in args.groups or list(GROUPS):
        if args.collect:
            entry = summary(group, statuses(args.collect / group), None)
        elif args.survivors:
            # a partial run's survivors too: the mutants it did not run stay not run
            if group not in results or "surviving" not in results[group]:
                parser.error(f"{group}: no run recorded to take the survivors from")
            entry = run_group(group, args.children, args.keep, results[group], args.tests)
        else:
            entry = run_group(group, args.children, args.keep, None)
        if entry["score"] is None:  # mutmut stopped before any mutant (its output says why)
            print(f"{group}: no mutant was run, so nothing is recorded; mutmut's output above "
                  f"says why (often: a test fails on the unmutated code)", file=sys.stderr)
            return 1
        results[group] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(RESULTS, results)  # an interrupted write keeps the old file whole
        print(f"{group}: {entry['killed']} of {entry['run']} mutants run killed "
              f"(score {entry['score']:.1%}; {entry['mutants']} mutants in all); "
              f"{len(entry['surviving'])} not killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
