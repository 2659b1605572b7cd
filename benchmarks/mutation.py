"""Mutation testing of the engine and the label-free steps with mutmut, one module group at a time.

Each group is mutated in a scratch copy of the repository (src/, tests/, pyproject.toml) whose
`[tool.mutmut]` section names that group's files and the test files that guard it, so a mutant
runs only the relevant tests (mutmut then narrows them further to the tests that reach the
mutated function). The score per group goes to benchmarks/results/mutation_score.json.

    python benchmarks/mutation.py methods heads          # the groups to run (default: all)
    python benchmarks/mutation.py --list                 # the groups and their test files

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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation_score.json"

# group -> (files mutated, test files run against them)
GROUPS = {
    "methods": (["src/hm3/methods/*"],
                ["tests/test_kernels.py", "tests/test_method_reference.py",
                 "tests/test_guided.py::test_contributions_add_up_to_the_combined_merge"]),
    "heads": (["src/hm3/heads.py"],
              ["tests/test_merge.py", "tests/test_method_reference.py", "tests/test_errors.py",
               "tests/test_architectures.py"]),
    "merge": (["src/hm3/merge.py"],
              ["tests/test_merge.py", "tests/test_method_reference.py", "tests/test_errors.py",
               "tests/test_recipe_mistakes.py"]),
    "model": (["src/hm3/model.py"],
              ["tests/test_merge.py", "tests/test_cli.py", "tests/test_evaluate.py"]),
    "guided": (["src/hm3/guided/*"],
               ["tests/test_guided.py", "tests/test_guided_reference.py"]),
    "metrics": (["src/hm3/evaluate.py"], ["tests/test_evaluate.py"]),
}


def config_section(group: str) -> str:
    files, tests = GROUPS[group]
    quoted = lambda items: "[" + ", ".join(f'"{x}"' for x in items) + "]"  # noqa: E731
    return ("[tool.mutmut]\n"
            'source_paths = ["src/"]\n'
            f"only_mutate = {quoted(files)}\n"
            f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
            'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-x"]\n')


def scratch_copy(group: str, folder: Path) -> None:
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__",
                                                                             "*.egg-info"))
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", text)
    (folder / "pyproject.toml").write_text(text + "\n" + config_section(group))


def run_group(group: str, children: int) -> dict:
    mutmut = Path(sys.executable).with_name("mutmut")
    with tempfile.TemporaryDirectory(prefix=f"hm3-mutation-{group}-") as scratch:
        folder = Path(scratch)
        scratch_copy(group, folder)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        subprocess.run([str(mutmut), "run", "--max-children", str(children)], cwd=folder,
                       env=env, check=False)
        seconds = time.perf_counter() - started
        subprocess.run([str(mutmut), "export-cicd-stats"], cwd=folder, env=env, check=True)
        stats = json.loads((folder / "mutants" / "mutmut-cicd-stats.json").read_text())
        listing = subprocess.run([str(mutmut), "results"], cwd=folder, env=env,
                                 capture_output=True, text=True).stdout
        # `mutmut show NAME` in a kept copy gives a survivor's diff; one call per survivor is
        # slow, so only the names are recorded here.
        survivors = sorted(line.split(":")[0].strip() for line in listing.splitlines()
                           if line.strip().endswith(("survived", "no tests")))
    killed, total = stats["killed"], stats["total"]
    scored = total - stats.get("skipped", 0) - stats.get("not_checked", 0)
    return {"files": GROUPS[group][0], "tests": GROUPS[group][1], "stats": stats,
            "score": killed / scored if scored else None, "seconds": round(seconds),
            "surviving": survivors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"any of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--children", type=int, default=1, help="mutants run at once")
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
        results[group] = run_group(group, args.children)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        entry = results[group]
        print(f"{group}: {entry['stats']['killed']} of {entry['stats']['total']} mutants killed "
              f"(score {entry['score']:.1%}) in {entry['seconds']}s; "
              f"{len(entry['surviving'])} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
