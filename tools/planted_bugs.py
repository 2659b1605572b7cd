"""Plant each bug a review found unguarded into a scratch copy of the code and run the tests that
should catch it (stopping at the first failure); print the test that failed (the bug is
"killed") or that none did.

    python tools/planted_bugs.py              # every bug
    python tools/planted_bugs.py gamma magnitude_ties

A bug is a text replacement in one source file; the copy lives in a temporary folder, so the
worktree is never touched. Slow-ish (a few minutes on 2 cores): not part of the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = "tests/test_method_reference.py"
OPENVINO = "tests/test_export_openvino.py"
# name -> (file, text, replacement, tests to run)
BUGS = {
    "merged_heads_zeroed": (
        "src/hm3/engine/stream.py", "yield expand_head(sparse, sources.groups[i].offset",
        "yield expand_head(sparse * 0, sources.groups[i].offset", [REFERENCE]),
    "della_without_sign_election": (
        "src/hm3/methods/registry.py",
        'sparsifier=sp.della_magprune, consensus=True, default_normalize=True,',
        'sparsifier=sp.della_magprune, consensus=False, default_normalize=True,', [REFERENCE]),
    "breadcrumbs_ties_without_sign_election": (
        "src/hm3/methods/registry.py",
        'sparsifier=sp.magnitude_outliers, consensus=True,',
        'sparsifier=sp.magnitude_outliers, consensus=False,', [REFERENCE]),
    "magnitude_turned_into_ties": (
        "src/hm3/methods/registry.py",
        '"magnitude pruning of each task vector, then sum",\n'
        '                sparsifier=sp.magnitude,',
        '"magnitude pruning of each task vector, then sum",\n'
        '                sparsifier=sp.magnitude,'
        ' consensus=True, default_normalize=True,', [REFERENCE]),
    "della_linear_normalising_by_default": (
        "src/hm3/methods/registry.py",
        'sparsifier=sp.della_magprune, default_rescale=True,',
        'sparsifier=sp.della_magprune, default_rescale=True, default_normalize=True,',
        [REFERENCE]),
    "gamma_default_0.2": (
        "src/hm3/methods/registry.py", 'Parameter("gamma", 0.01,', 'Parameter("gamma", 0.2,',
        [REFERENCE]),
    "epsilon_default_0.05": (
        "src/hm3/methods/registry.py", 'Parameter("epsilon", 0.15,', 'Parameter("epsilon", 0.05,',
        [REFERENCE]),
    "magnitude_unregistered": (
        "src/hm3/methods/registry.py",
        '    MergeMethod("magnitude", "magnitude pruning of each task vector, then sum",\n'
        '                sparsifier=sp.magnitude, reference=TIES),\n', '', [REFERENCE]),
    "regmean_identity_grams": (
        "src/hm3/label_free/regmean.py", "grams = [handle.get_tensor(name) for handle in handles]",
        "grams = [torch.eye(handle.get_tensor(name).shape[0], dtype=torch.float64) "
        "for handle in handles]", ["tests/test_label_free_reference.py"]),
    "lewis_without_activations": (
        "src/hm3/label_free/lewis.py", ".abs() * mean_squares[name].sqrt()).norm())",
        ".abs()).norm())", ["tests/test_label_free_reference.py"]),
    "pruning_forced_off": (
        "src/hm3/search/trial.py",
        "        if self.config.prune_fraction:\n            trial.report(",
        "        if False:\n            trial.report(", ["tests/test_search_rules.py"]),
    "trial_seed_not_varied": (
        "src/hm3/search/trial.py",
        "seed = self.recipe.seed + (trial.number if self.config.vary_merge_seed else 0)",
        "seed = self.recipe.seed", ["tests/test_search_rules.py"]),
    "fixed_merge_seed_flag_ignored": (
        "src/hm3/cli/search.py", "vary_merge_seed=not args.fixed_merge_seed",
        "vary_merge_seed=True", ["tests/test_search_rules.py"]),
    "earlier_overrides_win": (
        "src/hm3/recipe.py", "for override in self.overrides:",
        "for override in reversed(self.overrides):", ["tests/test_recipe_mistakes.py"]),
    "base_less_head_layers_from_zeros": (
        "src/hm3/engine/sources.py",
        "        return total.div_(len(self.experts))\n",
        "        return torch.zeros(job.shape)\n",
        [REFERENCE, "tests/test_merge.py"]),
    "base_less_head_layers_from_first_expert": (
        "src/hm3/engine/sources.py",
        "        return total.div_(len(self.experts))\n",
        "        return self.experts[0].tensor(job.name).float()\n",
        [REFERENCE, "tests/test_merge.py"]),
    "predict_does_nothing": (
        "src/hm3/cli/predict.py", "def run(args: argparse.Namespace) -> int:\n",
        "def run(args: argparse.Namespace) -> int:\n    return 0\n",
        ["tests/test_cli.py"]),
    "eval_does_nothing": (
        "src/hm3/cli/evaluate.py", "def run(args: argparse.Namespace) -> int:\n",
        "def run(args: argparse.Namespace) -> int:\n    return 0\n", ["tests/test_cli.py"]),
    "bench_does_nothing": (
        "src/hm3/cli/bench.py", "def run(args: argparse.Namespace) -> int:\n",
        "def run(args: argparse.Namespace) -> int:\n    return 0\n",
        ["tests/test_cli.py"]),
    # issue 25: plausible bugs in the modules outside the mutation runs that passed the whole
    # suite; each now has a test that kills it
    "check_multi_label_at_one_half": (
        "src/hm3/check.py",
        "on_e, on_m = expert > group.threshold, merged > group.threshold",
        "on_e, on_m = expert > 0.5, merged > 0.5", ["tests/test_check.py"]),
    "onnx_outputs_in_sorted_order": (
        "src/hm3/export.py",
        'return ["logits"] + [f"probabilities.{g.name}" for g in groups]',
        'return ["logits"] + sorted(f"probabilities.{g.name}" for g in groups)',
        ["tests/test_export.py"]),
    "int8_minimum_calibration_refused": (
        "src/hm3/export.py", "len(texts) < MIN_CALIBRATION_TEXTS:",
        "len(texts) <= MIN_CALIBRATION_TEXTS:",
        [f"{OPENVINO}::test_openvino_int8_needs_calibration_texts_and_keeps_the_head_fp32",
         f"{OPENVINO}::test_openvino_int8_takes_exactly_the_minimum_of_calibration_texts"]),
    "openvino_one_infer_request_for_all_threads": (
        "src/hm3/onnx_model.py", "self._requests = threading.local()",
        "self._requests = SimpleNamespace()",
        [f"{OPENVINO}::test_openvino_export_answers_as_the_torch_model",
         f"{OPENVINO}::test_openvino_export_answers_threads_at_once"]),
    "serve_batch_dropped_on_stop": (
        "src/hm3/serve/batching.py",
        "batch = self._take()\n            if batch:",
        "batch = self._take()\n            if batch and not self._stopping:",
        ["tests/test_serve_units.py"]),
    "serve_max_texts_off_by_one": (
        "src/hm3/serve/app.py", "if len(texts) > options.max_texts:",
        "if len(texts) >= options.max_texts:", ["tests/test_serve_units.py"]),
    "policy_fires_above_only": (
        "src/hm3/serve/policy.py", "probabilities[label] >= self.threshold",
        "probabilities[label] > self.threshold", ["tests/test_serve_units.py"]),
    "calibration_dedup_per_source": (
        "src/hm3/data/calibration.py",
        "        for source in spec.sources_of(task):\n            count = 0\n",
        "        for source in spec.sources_of(task):\n            count, seen = 0, set()\n",
        ["tests/test_calibration.py"]),
    "card_recipe_loses_override_experts": (
        "src/hm3/recipe.py",
        '                           '
        '**({"experts": list(o.experts)} if o.experts is not None else {})}',
        "                           }", ["tests/test_recipe_roundtrip.py", "tests/test_card.py"]),
    "csv_byte_order_mark_kept": (
        "src/hm3/data/tables.py", '        return data.decode("utf-8-sig")',
        '        return data.decode("utf-8")', ["tests/test_data_tables.py"]),
}


def plant(name: str) -> tuple[int, list[str]]:
    file, text, replacement, tests = BUGS[name]
    with tempfile.TemporaryDirectory(prefix=f"hm3-bug-{name}-") as scratch:
        folder = Path(scratch)
        shutil.copytree(ROOT / "src", folder / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        shutil.copytree(ROOT / "tests", folder / "tests",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
        source = (folder / file).read_text()
        if source.count(text) != 1:
            raise SystemExit(f"{name}: the text to replace is not in {file} exactly once; "
                             "update this script to the current code")
        (folder / file).write_text(source.replace(text, replacement))
        env = {**os.environ, "PYTHONPATH": str(folder / "src"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                               "no:cacheprovider", "-m", "not slow", *tests], cwd=folder, env=env,
                              capture_output=True, text=True)
        failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, re.M)))
        return done.returncode, failed


def main() -> int:
    names = sys.argv[1:] or list(BUGS)
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        raise SystemExit(f"unknown bug(s) {', '.join(unknown)}; choose from {', '.join(BUGS)}")
    survivors = []
    for name in names:
        code, failed = plant(name)
        if failed:
            print(f"{name}: killed by {failed[0]}", flush=True)
        else:
            survivors.append(name)
            print(f"{name}: SURVIVED (pytest exit {code})", flush=True)
    print(f"{len(names) - len(survivors)} of {len(names)} planted bugs killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
