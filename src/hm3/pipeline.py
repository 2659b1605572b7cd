"""A recipe, end to end: plan -> the label-free steps stage by stage (`hm3.label_free`: LEWIS
densities -> the merge, or learned coefficients -> RegMean, distill -> align_heads, recentre
-> tune, then align_heads and recentre again) -> write.

`merge` (the public `hm3.merge`) writes a model folder; the search's trials run `merge_in_memory`
on a preloaded model; both run the same steps in the same order, through the step registry.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hm3.check import CALIBRATION_TEXTS, DEFAULT_MIN_AGREEMENT, compare_logits
from hm3.checkpoint import atomic_directory, check_destination, write_json_atomic
from hm3.data.blocks import load_data_block
from hm3.data.calibration import Calibration, text_hash
from hm3.engine import (
    Sources,
    TaskVectorSquares,
    build_model,
    merge_into,
    open_sources,
    state_tensors,
    warn_implausible,
    write_model,
)
from hm3.errors import Hm3Warning
from hm3.heads import TaskGroup
from hm3.label_free.calibration import (
    calibration_batches,
    experts_logits,
    head_modules,
    once_per_batches,
    run_batches,
)
from hm3.label_free.heads_stage import FOLDS, head_inputs, head_logits, head_rows, held_out_figures
from hm3.label_free.lewis import LewisScores
from hm3.label_free.registry import CONFIG_KEY, STAGES, StepRun
from hm3.label_free.steps import get_step, step_names
from hm3.model import check_device
from hm3.recipe import Recipe


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote."""

    path: Path
    groups: list[TaskGroup]
    tensors: int
    seconds: float
    task_vector_norms: dict[str, float]
    label_free: LabelFreeReport | None = None  # what the label-free steps did, if any ran


@dataclass
class LabelFreeReport:
    """What the label-free steps of a merge did, as config.json's `hm3.label_free` holds it
    (`to_dict`; `from_dict` reads it back, from models of earlier versions too)."""

    heads: str
    calibration: dict  # per task, the texts read and where from (`Calibration.provenance`)
    max_length: int
    steps: dict[str, Any]  # each step's report, by name, in run order
    fidelity: dict | None = None  # the merged model against the experts on the calibration texts
    cpu_seconds: float = 0.0
    seconds: float = 0.0
    # sha256 prefixes of each task's calibration texts: written beside config.json, not in it
    calibration_hashes: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": self.heads, "calibration": self.calibration,
                               "max_length": self.max_length}
        out.update({name: get_step(name).report_dict(report)
                    for name, report in self.steps.items()})
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        return {**out, "cpu_seconds": self.cpu_seconds, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> LabelFreeReport:
        return cls(entry.get("heads", "whole"), entry.get("calibration", {}),
                   entry.get("max_length", 0),
                   {name: get_step(name).read_report(entry[name]) for name in step_names()
                    if name in entry},
                   entry.get("fidelity"), entry.get("cpu_seconds", 0.0), entry.get("seconds", 0.0))

    def summary(self) -> str:
        """A few lines on what the label-free steps did (for the command line)."""
        texts = ", ".join(f"{task} {entry['texts']}" for task, entry in self.calibration.items())
        lines = [f"label-free steps ({self.seconds:.0f}s): heads {self.heads}; "
                 f"calibration texts: {texts}"]
        shared = {s["path"] for entry in self.calibration.values()
                  for s in entry.get("sources", []) if s["shared"] and s["texts"]}
        if shared:
            lines.append(f"  shared calibration sample (read by every task): {', '.join(shared)}")
        lines.extend(f"  {line}" for report in self.steps.values()
                     for line in report.summary().splitlines())
        if self.fidelity:
            figures = ", ".join(f"{task} {entry['agreement']:.1%}"
                                for task, entry in self.fidelity["tasks"].items())
            lines.append(f"  agreement with the experts on the calibration texts (optimistic, "
                         f"fitted there; run `hm3 check` on other texts): {figures}")
            held_out = self.fidelity.get("held_out")
            if held_out:
                figures = ", ".join(f"{task} {entry['agreement']:.1%}"
                                    for task, entry in held_out["tasks"].items())
                lines.append(f"  the same with the head steps fitted without each text "
                             f"({held_out['folds']}-fold): {figures}")
        return "\n".join(lines)


@dataclass
class StepsDone:
    """What `merge_in_memory`'s label-free steps did: each step's report by name, in run order,
    and, with `held_out_folds`, the head steps' cross-fitted figures."""

    reports: dict[str, Any] = field(default_factory=dict)
    held_out: dict | None = None


def merge(recipe: Recipe, output: str | Path, overwrite: bool = False,
          progress: bool = True, held_out: dict[str, list[str]] | None = None,
          device: str | None = None) -> MergeReport:
    """Merge the recipe's experts into one multi-task model directory at `output`.

    The directory appears only when the merge has succeeded (it is built in a temporary
    sibling and renamed), so an interrupted merge never leaves a complete-looking folder.
    When the recipe asks for label-free steps (`hm3.label_free`: lewis, coefficients, regmean,
    distill, align_heads, recentre), the merge runs in memory first, on `device` (default: the
    CPU); `held_out` gives each task's validation / test texts, which are then kept out of the
    calibration texts.
    """
    start = time.perf_counter()
    check_destination(output, overwrite)  # now, not after minutes of label-free steps
    device = step_device(device)
    sources = open_sources(recipe)
    squares = TaskVectorSquares.zeros(len(sources.experts))  # filled by whichever path merges
    report = tensors = None
    if recipe.label_free.calibration is not None and not recipe.label_free.needs_model:
        warnings.warn(f"the recipe's `calibration:` texts are not used: no step reads them (add "
                      f"{', '.join(step_names()[:-1])} or {step_names()[-1]}, or drop the block)",
                      Hm3Warning, stacklevel=2)
    if recipe.label_free.needs_model:
        if held_out is None:  # what the model will be scored on is never calibration text
            held_out = recipe_held_out(recipe)
        model, sources, report = label_free_model(sources, progress, held_out, device=device,
                                                  squares=squares)
        tensors = state_tensors(model, sources)
    with atomic_directory(output, overwrite=overwrite) as staging:
        if report is not None and report.calibration_hashes:
            # hashes of the texts, not the texts: `hm3 check` warns when given them
            write_json_atomic(staging / CALIBRATION_TEXTS,
                              {"hash": "sha256 of the case-folded, whitespace-collapsed text, "
                               "first 16 hex digits", "tasks": report.calibration_hashes})
        norms = write_model(sources, staging, tensors,
                            {CONFIG_KEY: report.to_dict()} if report else None,
                            progress=progress, squares=squares)
        for name, done in (report.steps.items() if report else ()):
            get_step(name).write_files(done, staging)
    warn_implausible(norms)
    return MergeReport(Path(output).resolve(), sources.groups, len(sources.jobs),
                       time.perf_counter() - start, norms, report)


def recipe_held_out(recipe: Recipe) -> dict[str, list[str]]:
    """The texts of the recipe's own `data:` block (test and validation splits) per task."""
    if not recipe.data:
        return {}
    tasks = [e.task for e in recipe.experts]
    with_validation = {task: entry for task, entry in recipe.data.items()
                       if isinstance(entry, dict) and entry.get("validation") is not None}
    held: dict[str, list[str]] = {}
    for data, part in ((recipe.data, "test"), (with_validation, "validation")):
        for dataset in load_data_block(data, recipe.data_root, tasks, part) if data else []:
            held.setdefault(dataset.task, []).extend(dataset.texts)
    return held


@dataclass
class Calibrated:
    """What the label-free steps read, computed once for a set of sources: the calibration
    texts tokenised, and (when a step needs them) the experts' logits on them and the LEWIS
    importances. A search reuses it for every trial. `other_logits`: each expert's logits on
    a sample of the other tasks' texts, by sample size, left to the first step that reads
    them (`align_heads` with `others`), which keeps them here for later trials."""

    calibration: Calibration
    tokenizer: object
    batches: dict[str, list[dict]]
    expert_logits: dict[str, torch.Tensor] | None = None
    lewis: LewisScores | None = None
    device: str = "cpu"  # where the models run (statistics and logits come back on the CPU)
    other_logits: dict[int, dict] | None = None


def step_device(device: str | None) -> str:
    """Where the label-free steps run: `device` (checked), else the CPU."""
    return "cpu" if device is None else check_device(device)


def calibrate(sources: Sources, held_out: dict[str, list[str]] | None = None,
              calibration: Calibration | None = None, lewis_scores: bool | None = None,
              expert_logits: bool | None = None, progress: bool = False,
              device: str | None = None) -> Calibrated:
    """Read and tokenise the calibration texts, run the experts on them and measure LEWIS
    importances, each only if asked (default: if the recipe's steps need it).

    - `held_out`: each task's validation / test texts, kept out of the calibration texts.
    - `calibration`: texts already read (else read from the recipe's `calibration` block).
    - `device`: where the experts run (default: the CPU).
    """
    device = step_device(device)
    needs = {need for name, _ in sources.recipe.label_free.steps for need in get_step(name).needs}
    if lewis_scores is None:
        lewis_scores = "lewis_scores" in needs
    if expert_logits is None:
        expert_logits = "expert_logits" in needs
    calibration, tokenizer, batches = calibration_batches(sources, held_out, calibration)
    # The experts run once, for every step that matches them (coefficients and the head steps).
    logits = experts_logits(sources, batches, progress, device) if expert_logits else None
    scores = (LewisScores(sources, batches, head_modules(sources), progress, device)
              if lewis_scores else None)
    return Calibrated(calibration, tokenizer, batches, logits, scores, device)


def check_steps(sources: Sources) -> None:
    """Fail before any work when the recipe's label-free steps cannot run on this head or with
    this method."""
    for name, options in sources.recipe.label_free.steps:
        get_step(name).check(sources, options)


def merge_in_memory(model: torch.nn.Module, sources: Sources, calibrated: Calibrated | None,
                    progress: bool = False, held_out_folds: int = 0,
                    head_inputs: dict | None = None, squares: TaskVectorSquares | None = None
                    ) -> tuple[Sources, StepsDone]:
    """Merge `sources.recipe` into `model`'s weights with its label-free steps, stage by stage
    (`STAGES`): the densities steps (LEWIS), the merge (the method's, or a merge-stage step's:
    learned coefficients), the body steps (RegMean, distill), the head steps (`head_steps`),
    the joint steps (tune) and then the head steps again.
    Returns the sources as finally merged (with LEWIS's overrides) and what each step did; with
    `held_out_folds`, also the head steps' cross-fitted figures. `head_inputs`, when given,
    receives what the head steps read (per task, the final projection's inputs), so the caller
    can score the heads without another pass. `squares`, when given, receives each expert's
    task-vector size from the merge (or the coefficients' shares of it)."""
    steps = sources.recipe.label_free.steps
    if steps and calibrated is None:
        raise ValueError("the recipe's label-free steps need `calibrate(sources)` first")
    run = StepRun(model, sources, calibrated, progress, squares)
    done = StepsDone()
    heads = [(name, options) for name, options in steps if get_step(name).stage == "heads"]
    joint = any(get_step(name).stage == "joint" for name, _ in steps)
    for stage in STAGES:
        asked = [(name, options) for name, options in steps if get_step(name).stage == stage]
        if stage == "heads":
            if asked:  # cross-fitted after the joint steps' refit when they run
                _heads_stage(run, asked, done, 0 if joint else held_out_folds, head_inputs)
            continue
        if stage == "merge" and not asked:  # no step merges the body: the method does
            merge_into(run.model, run.sources, progress=progress, squares=squares)
        for name, options in asked:
            done.reports[name] = get_step(name).apply(run, options)
        if stage == "joint" and asked and heads:  # the heads refitted on the body they left
            _heads_stage(run, heads, done, held_out_folds, head_inputs)
    return run.sources, done


def head_steps(model: torch.nn.Module, sources: Sources, calibrated: Calibrated,
               held_out_folds: int = 0, inputs_out: dict | None = None) -> StepsDone:
    """The recipe's head steps on `model` (align_heads, then recentre), from one forward pass
    over the calibration batches; returns what each step did. With `held_out_folds` (k), also
    `held_out`: each task's agreement, drift and mean |dp| against its expert on the
    calibration texts, each text scored by head steps fitted on the other k - 1 folds
    (`hm3.label_free.heads_stage`): what the head steps do on texts they were not fitted to."""
    done = StepsDone()
    asked = [(name, options) for name, options in sources.recipe.label_free.steps
             if get_step(name).stage == "heads"]
    if asked:
        _heads_stage(StepRun(model, sources, calibrated), asked, done, held_out_folds,
                     inputs_out)
    return done


def _heads_stage(run: StepRun, asked: list[tuple[str, Any]], done: StepsDone, folds: int,
                 inputs_out: dict | None) -> None:
    run.head_inputs = head_inputs(run.model, run.sources, run.calibrated.batches)  # one pass
    if inputs_out is not None:
        inputs_out.update(run.head_inputs)
    starts = ({group.name: head_rows(run.model, run.sources, group)
               for group in run.sources.groups}
              if folds else {})  # the rows before the steps, for cross-fitting
    ran = []
    for name, options in asked:
        step = get_step(name)
        done.reports[name] = step.apply(run, options)
        ran.append((step, options, done.reports[name]))
    if folds:
        done.held_out = held_out_figures(run.sources.groups, run.head_inputs,
                                         run.calibrated.expert_logits, starts, ran, folds)


def label_free_model(sources: Sources, progress: bool = False,
                     held_out: dict[str, list[str]] | None = None,
                     calibration: Calibration | None = None, device: str | None = None,
                     squares: TaskVectorSquares | None = None
                     ) -> tuple[torch.nn.Module, Sources, LabelFreeReport]:
    """Run the recipe's label-free steps on a fresh model; returns (model, sources as finally
    merged, report). `held_out`, `calibration` and `device` as for `calibrate`; `squares` as
    for `merge_in_memory`."""
    started = time.process_time(), time.perf_counter()
    check_steps(sources)
    calibrated = calibrate(sources, held_out, calibration, progress=progress, device=device)
    model = build_model(sources).to(calibrated.device)
    inputs: dict = {}
    sources, done = merge_in_memory(model, sources, calibrated, progress, FOLDS, inputs,
                                    squares)
    provenance = calibrated.calibration.provenance
    fidelity = calibration_fidelity(model, sources, calibrated, inputs or None)
    if done.held_out:
        fidelity["held_out"] = done.held_out
        warn_low_held_out(done.held_out, shared_tasks(provenance))
    hashes = {task: [text_hash(t) for t in texts]
              for task, texts in calibrated.calibration.texts.items()}
    return model, sources, LabelFreeReport(
        sources.recipe.label_free.heads, provenance,
        sources.recipe.label_free.calibration.max_length, done.reports, fidelity,
        round(time.process_time() - started[0], 1), round(time.perf_counter() - started[1], 1),
        hashes)


def shared_tasks(provenance: dict) -> set[str]:
    """Tasks that read a shared calibration sample (from the calibration provenance)."""
    return {task for task, entry in provenance.items()
            if any(source["shared"] and source["texts"] for source in entry.get("sources", []))}


# A task calibrated on a shared sample is warned about under this held-out agreement: part of
# the sample is outside its domain, where its expert's label means little (good merges agreed on
# 57-85% of mixed traffic, benchmarks/RESULTS.md section 10), so the bar is lower than
# `hm3 check`'s; under it, far from every text agrees and the task's own texts must be checked.
SHARED_MIN_AGREEMENT = 0.6


def warn_low_held_out(held_out: dict, shared: set[str] = frozenset(),
                      minimum: float = DEFAULT_MIN_AGREEMENT,
                      shared_minimum: float = SHARED_MIN_AGREEMENT) -> None:
    """Warn about tasks whose cross-fitted agreement with their expert is under `minimum`
    (`hm3 check`'s default): on other texts of their domain the merge is likely to do no better.
    Tasks in `shared` read a shared sample with texts from every domain, so their agreement there
    says less about their own: they are warned about under `shared_minimum`, and told so."""
    bars = ((False, minimum, "calibration texts",
             "more calibration texts of those tasks' own domain may help; run `hm3 check` on "
             "other texts before deploying"),
            (True, shared_minimum, "the shared calibration sample",
             "texts outside a task's domain count there too, but this is low; run `hm3 check` "
             "on texts of those tasks' own domain before deploying, or calibrate them on such "
             "texts (`texts: {TASK: FILE}`)"))
    for in_shared, bar, where, advice in bars:
        low = [f"{task} {entry['agreement']:.1%}" for task, entry in held_out["tasks"].items()
               if entry["agreement"] < bar and (task in shared) == in_shared]
        if low:
            warnings.warn(f"held out from the head steps, the merged model agrees with the expert "
                          f"on less than {bar:.0%} of {where} for {', '.join(low)}: {advice}",
                          Hm3Warning, stacklevel=2)


def calibration_fidelity(model: torch.nn.Module, sources: Sources, calibrated: Calibrated,
                         head_inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """The merged model against each expert on the calibration texts (`hm3.check`'s figures).
    Optimistic: the label-free steps were fitted to these very texts. With `head_inputs` (what
    the head steps read: the body is final by then), the heads are scored from those, without
    another pass over the texts."""
    expert_logits = calibrated.expert_logits
    if expert_logits is None:
        expert_logits = experts_logits(sources, calibrated.batches, device=calibrated.device)
    if head_inputs:
        merged = {task: z.float() for task, z in
                  head_logits(model, sources, head_inputs).items()}
    else:
        logits = once_per_batches(calibrated.batches,
                                  lambda batches: run_batches(model, batches))
        merged = {group.name: logits[group.name][:, group.offset:group.stop]
                  for group in sources.groups}
    tasks = compare_logits(sources.groups, {t: z.numpy() for t, z in expert_logits.items()},
                           {t: z.numpy() for t, z in merged.items()})
    return {"texts": "calibration", "optimistic": True,
            "note": "measured on the texts the label-free steps were fitted to, so optimistic; "
                    "run `hm3 check` on texts the merge has not seen",
            "tasks": {t: {k: e[k] for k in ("n", "agreement", "drift", "mean_abs_dp")}
                      for t, e in tasks.items()}}
