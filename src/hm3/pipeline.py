"""A recipe, end to end: plan -> LEWIS -> merge -> RegMean or coefficients -> registered steps
(`hm3.label_free`, e.g. distill) -> head steps -> write.

`merge` (the public `hm3.merge`) writes a model folder; the search's trials run `merge_in_memory`
on a preloaded model; both run the same steps in the same order.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    with_recipe,
    write_model,
)
from hm3.errors import Hm3Error, Hm3Warning
from hm3.guided import align, coefficients as coef, cross_fit, recentre, regmean
from hm3.guided.calibration import (
    calibration_batches,
    experts_logits,
    head_modules,
    once_per_batches,
    run_batches,
    tokenize,
)
from hm3.guided.lewis import LewisScores
from hm3.heads import TaskGroup
from hm3.label_free import get_step
from hm3.methods import get_method
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
    guided: dict | None = None  # what the label-free steps did, when the recipe asked for any


def merge(recipe: Recipe, output: str | Path, overwrite: bool = False,
          progress: bool = True, held_out: dict[str, list[str]] | None = None,
          device: str | None = None) -> MergeReport:
    """Merge the recipe's experts into one multi-task model directory at `output`.

    The directory appears only when the merge has succeeded (it is built in a temporary
    sibling and renamed), so an interrupted merge never leaves a complete-looking folder.
    When the recipe asks for label-free steps (`recentre`, `lewis`, `regmean`,
    `coefficients`, `align_heads`), the merge runs in memory first, on `device` (default: the
    CPU); `held_out` gives each task's validation / test texts, which are then kept out of the
    calibration texts.
    """
    start = time.perf_counter()
    check_destination(output, overwrite)  # now, not after minutes of label-free steps
    device = step_device(device)
    sources = open_sources(recipe)
    squares = TaskVectorSquares.zeros(len(sources.experts))  # filled by whichever path merges
    report = tensors = None
    hashes = None
    if recipe.guided.calibration is not None and not recipe.guided.needs_model:
        warnings.warn("the recipe's `calibration:` texts are not used: no step reads them (add "
                      "lewis, regmean, coefficients, align_heads or recentre, or drop the block)",
                      Hm3Warning, stacklevel=2)
    if recipe.guided.needs_model:
        if held_out is None:  # what the model will be scored on is never calibration text
            held_out = recipe_held_out(recipe)
        model, sources, report = guided_model(sources, progress, held_out, device=device,
                                              squares=squares)
        tensors = state_tensors(model, sources)
        hashes = report.pop("calibration_hashes")
    with atomic_directory(output, overwrite=overwrite) as staging:
        if hashes:  # hashes of the texts, not the texts: `hm3 check` warns when given them
            write_json_atomic(staging / CALIBRATION_TEXTS,
                              {"hash": "sha256 of the case-folded, whitespace-collapsed text, "
                               "first 16 hex digits", "tasks": hashes})
        norms = write_model(sources, staging, tensors, {"guided": report} if report else None,
                            progress=progress, squares=squares)
        if report is not None and "lewis" in report:
            from hm3.plots import plot_densities  # lazy: matplotlib is slow to import

            plot_densities(report["lewis"], staging / "lewis_densities.png")
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
    importances. A search reuses it for every trial."""

    calibration: Calibration
    tokenizer: object
    batches: dict[str, list[dict]]
    expert_logits: dict[str, torch.Tensor] | None = None
    lewis: LewisScores | None = None
    device: str = "cpu"  # where the models run (statistics and logits come back on the CPU)


def step_device(device: str | None) -> str:
    """Where the label-free steps run: `device` (checked), else the CPU."""
    return "cpu" if device is None else check_device(device)


def calibrate(sources: Sources, held_out: dict[str, list[str]] | None = None,
              calibration: Calibration | None = None, lewis_scores: bool | None = None,
              expert_logits: bool | None = None, progress: bool = False,
              device: str | None = None) -> Calibrated:
    """Read and tokenise the calibration texts, run the experts on them and measure LEWIS
    importances, each only if asked (default: if the recipe's steps need it).

    `held_out`: each task's validation / test texts, kept out of the calibration texts.
    `calibration`: texts already read (else read from the recipe's `calibration` block).
    `device`: where the experts run (default: the CPU).
    """
    device = step_device(device)
    guided = sources.recipe.guided
    if lewis_scores is None:
        lewis_scores = bool(guided.lewis)
    if expert_logits is None:
        expert_logits = bool(guided.coefficients or guided.align_heads or guided.recentre
                             or any(get_step(name).needs_expert_logits
                                    for name, _ in guided.steps))
    calibration, tokenizer, batches = calibration_batches(sources, held_out, calibration)
    # The experts run once, for every step that matches them (coefficients and the head steps).
    logits = experts_logits(sources, batches, progress, device) if expert_logits else None
    scores = (LewisScores(sources, batches, head_modules(sources), progress, device)
              if lewis_scores else None)
    return Calibrated(calibration, tokenizer, batches, logits, scores, device)


def check_steps(sources: Sources) -> None:
    """Fail before any work when the recipe's label-free steps cannot run on this head or with
    this method."""
    if sources.recipe.guided.recentre and sources.heads[0].bias is None:
        raise Hm3Error(f"recentre shifts the head's biases, and {sources.heads[0].weight} has "
                       "none; drop `recentre` from the recipe (align_heads works without)")
    if sources.recipe.guided.coefficients and get_method(sources.recipe.method).isotropic:
        raise Hm3Error(f"coefficients scale each expert's share of the merge, and "
                       f"{sources.recipe.method} has none (it flattens the summed task vector's "
                       "spectrum); use another method or drop `coefficients`")


def merge_in_memory(model: torch.nn.Module, sources: Sources, calibrated: Calibrated | None,
                    progress: bool = False, held_out_folds: int = 0,
                    head_inputs: dict | None = None, squares: TaskVectorSquares | None = None
                    ) -> tuple[Sources, dict]:
    """Merge `sources.recipe` into `model`'s weights with its label-free steps: LEWIS densities,
    the method's merge (or learned coefficients), RegMean, the registered steps (distill), then
    the head steps. Returns the sources as finally merged (with LEWIS's overrides) and what each
    step did; with `held_out_folds`, also the head steps' cross-fitted figures (`head_steps`).
    `head_inputs`, when given, receives what the head steps read (per task, the final
    projection's inputs), so the caller can score the heads without another pass. `squares`,
    when given, receives each expert's task-vector size from the merge (or the coefficients'
    shares of it)."""
    guided = sources.recipe.guided
    if guided.needs_model and calibrated is None:
        raise ValueError("the recipe's label-free steps need `calibrate(sources)` first")
    report: dict = {}
    if guided.lewis:
        recipe = calibrated.lewis.apply(sources.recipe)
        sources = with_recipe(sources, recipe)
        table = calibrated.lewis.table(guided.lewis.gamma, guided.lewis.epsilon)
        report["lewis"] = {"gamma": guided.lewis.gamma, "epsilon": guided.lewis.epsilon,
                           "densities": {t: {k: round(v, 4) for k, v in d.items()}
                                         for t, d in table.items()}}
    if guided.coefficients:
        report["coefficients"] = _fit_coefficients(model, sources, calibrated, progress, squares)
    else:
        merge_into(model, sources, progress=progress, squares=squares)
    if guided.regmean:
        layers = regmean.apply_regmean(model, sources, calibrated.batches, guided.regmean.alpha,
                                       head_modules(sources), progress)
        report["regmean"] = {"alpha": guided.regmean.alpha, "layers": len(layers)}
    for name, options in guided.steps:  # the registry's steps (hm3.label_free), in order
        done = get_step(name).apply(model, sources, calibrated, options, progress)
        report[name] = {**dataclasses.asdict(done), "summary": done.summary()}
    if guided.align_heads or guided.recentre:
        report.update(head_steps(model, sources, calibrated.batches, calibrated.expert_logits,
                                 held_out_folds, head_inputs))
    return sources, report


def guided_model(sources: Sources, progress: bool = False,
                 held_out: dict[str, list[str]] | None = None,
                 calibration: Calibration | None = None, device: str | None = None,
                 squares: TaskVectorSquares | None = None):
    """Run the recipe's label-free steps on a fresh model; returns (model, sources as finally
    merged, report). `held_out`, `calibration` and `device` as for `calibrate`; `squares` as
    for `merge_in_memory`."""
    started = time.process_time(), time.perf_counter()
    check_steps(sources)
    calibrated = calibrate(sources, held_out, calibration, progress=progress, device=device)
    report: dict = {"heads": sources.recipe.guided.heads,
                    "calibration": calibrated.calibration.provenance,
                    "max_length": sources.recipe.guided.calibration.max_length}
    model = build_model(sources).to(calibrated.device)
    inputs: dict = {}
    sources, steps = merge_in_memory(model, sources, calibrated, progress, cross_fit.FOLDS,
                                     inputs, squares)
    held_out = steps.pop("held_out", None)
    report.update(steps)
    report["fidelity"] = calibration_fidelity(model, sources, calibrated, inputs or None)
    if held_out:
        report["fidelity"]["held_out"] = held_out
        warn_low_held_out(held_out, shared_tasks(report["calibration"]))
    report["calibration_hashes"] = {task: [text_hash(t) for t in texts]
                                    for task, texts in calibrated.calibration.texts.items()}
    report["cpu_seconds"] = round(time.process_time() - started[0], 1)
    report["seconds"] = round(time.perf_counter() - started[1], 1)
    return model, sources, report


def shared_tasks(provenance: dict) -> set[str]:
    """Tasks that read a shared calibration sample (from the calibration provenance)."""
    return {task for task, entry in provenance.items()
            if any(source["shared"] and source["texts"] for source in entry.get("sources", []))}


def warn_low_held_out(held_out: dict, shared: set[str] = frozenset(),
                      minimum: float = DEFAULT_MIN_AGREEMENT) -> None:
    """Warn about tasks whose cross-fitted agreement with their expert is under `minimum`
    (`hm3 check`'s default): on other texts of their domain the merge is likely to do no better.
    Tasks in `shared` are left out: their calibration texts come from every domain, so their
    agreement there says little about their own."""
    low = {task: entry["agreement"] for task, entry in held_out["tasks"].items()
           if entry["agreement"] < minimum and task not in shared}
    if low:
        listed = ", ".join(f"{task} {share:.1%}" for task, share in low.items())
        warnings.warn(f"held out from the head steps, the merged model agrees with the expert on "
                      f"less than {minimum:.0%} of calibration texts for {listed}: more "
                      "calibration texts of those tasks' own domain may help; run `hm3 check` "
                      "on other texts before deploying", Hm3Warning, stacklevel=2)


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
                  align.head_logits(model, sources, head_inputs).items()}
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


def _fit_coefficients(model: torch.nn.Module, sources: Sources, calibrated: Calibrated,
                      progress: bool, squares: TaskVectorSquares | None) -> dict:
    config = sources.recipe.guided.coefficients
    spec = sources.recipe.guided.calibration
    tasks = [e.task for e in sources.recipe.experts]
    fit_batches = {task: tokenize(calibrated.tokenizer, calibrated.calibration.texts[task],
                                  spec.max_length, config.batch_size) for task in tasks}
    groups = {g.name: g for g in sources.groups}
    # The experts' logits on the calibration texts, cut into the fit's batches (both keep the
    # texts' order).
    targets = {task: [coef.expert_probabilities(z, groups[task].multi_label)
                      for z in calibrated.expert_logits[task].split(config.batch_size)]
               for task in tasks}
    return coef.fit_coefficients(model, sources, fit_batches, targets, config, progress, squares)


def head_steps(model: torch.nn.Module, sources: Sources, batches: dict[str, list[dict]],
               expert_logits: dict[str, torch.Tensor], held_out_folds: int = 0,
               inputs_out: dict | None = None) -> dict:
    """The recipe's head steps on `model` (align_heads, then recentre), from one forward pass
    over the calibration batches; returns what each step did. With `held_out_folds` (k), also
    `held_out`: each task's agreement, drift and mean |dp| against its expert on the
    calibration texts, each text scored by head steps fitted on the other k - 1 folds
    (`hm3.guided.cross_fit`): what the head steps do on texts they were not fitted to."""
    guided, report = sources.recipe.guided, {}
    inputs = align.head_inputs(model, sources, batches)  # the one forward pass
    if inputs_out is not None:
        inputs_out.update(inputs)
    starts = ({group.name: align.head_rows(model, sources, group) for group in sources.groups}
              if held_out_folds else {})  # the rows before the steps, for cross-fitting
    if guided.align_heads:
        report["align_heads"] = align.align_heads(model, sources, inputs, expert_logits,
                                                  guided.align_heads.ridge)
    if guided.recentre:
        report["recentre"] = recentre.recentre_heads(
            model, sources, align.head_logits(model, sources, inputs), expert_logits)
    if held_out_folds:
        report["held_out"] = _held_out_figures(sources, inputs, expert_logits, starts,
                                               report.get("align_heads"), held_out_folds)
    return report


def _held_out_figures(sources: Sources, inputs: dict[str, torch.Tensor],
                      expert_logits: dict[str, torch.Tensor], starts: dict[str, torch.Tensor],
                      aligned: dict | None, folds: int) -> dict:
    """`compare_logits`'s figures of the head steps cross-fitted over `folds` folds."""
    ridges = None
    if aligned is not None:
        ridges = {task: entry.get("ridge", aligned["ridge"])
                  for task, entry in aligned["tasks"].items()}
    logits = cross_fit.cross_fitted_logits(sources.groups, inputs, expert_logits, starts, ridges,
                                           bool(sources.recipe.guided.recentre), folds)
    groups = [group for group in sources.groups if group.name in logits]
    tasks = compare_logits(groups, {t: expert_logits[t].numpy() for t in logits},
                           {t: z.numpy() for t, z in logits.items()})
    return {"folds": folds,
            "note": f"each calibration text scored by head steps fitted on the other {folds - 1} "
                    f"of {folds} folds; the body's label-free steps saw every text",
            "tasks": {t: {k: e[k] for k in ("n", "agreement", "drift", "mean_abs_dp")}
                      for t, e in tasks.items()}}


def format_guided(report: dict) -> str:
    """A few lines on what the label-free steps did (for the command line)."""
    texts = ", ".join(f"{task} {entry['texts']}" for task, entry in report["calibration"].items())
    lines = [f"label-free steps ({report['seconds']:.0f}s): heads {report['heads']}; "
             f"calibration texts: {texts}"]
    shared = {s["path"] for entry in report["calibration"].values()
              for s in entry.get("sources", []) if s["shared"] and s["texts"]}
    if shared:
        lines.append(f"  shared calibration sample (read by every task): {', '.join(shared)}")
    if "lewis" in report:
        lewis_ = report["lewis"]
        lines.append(f"  lewis: layer densities in [{lewis_['gamma']}, {lewis_['epsilon']}] "
                     "(table in config.json, plot lewis_densities.png)")
    if "coefficients" in report:
        fit = report["coefficients"]
        lines.append(f"  coefficients: {len(fit['blocks'])} blocks x {len(fit['coefficients'])} "
                     f"experts, KL to the experts {fit['objective_before']:.4f} -> "
                     f"{fit['objective_after']:.4f}")
    if "regmean" in report:
        lines.append(f"  regmean: {report['regmean']['layers']} linear layers "
                     f"(alpha {report['regmean']['alpha']})")
    lines.extend(f"  {entry['summary']}" for entry in report.values()
                 if isinstance(entry, dict) and "summary" in entry)
    if "align_heads" in report:
        for task, entry in report["align_heads"]["tasks"].items():
            chosen = f" (ridge {entry['ridge']} by cross-validation)" if "ridge" in entry else ""
            lines.append(f"  align_heads {task}: agreement with the expert "
                         f"{entry['agreement_before']:.1%} -> {entry['agreement_after']:.1%}"
                         f"{chosen}")
    if "fidelity" in report:
        figures = ", ".join(f"{task} {entry['agreement']:.1%}"
                            for task, entry in report["fidelity"]["tasks"].items())
        lines.append(f"  agreement with the experts on the calibration texts (optimistic, "
                     f"fitted there; run `hm3 check` on other texts): {figures}")
        held_out = report["fidelity"].get("held_out")
        if held_out:
            figures = ", ".join(f"{task} {entry['agreement']:.1%}"
                                for task, entry in held_out["tasks"].items())
            lines.append(f"  the same with the head steps fitted without each text "
                         f"({held_out['folds']}-fold): {figures}")
    if "recentre" in report:
        for task, entry in report["recentre"].items():
            gap = max(abs(b - t) for b, t in zip(entry["before"], entry["target"]))
            done = max(abs(a - t) for a, t in zip(entry["after"], entry["target"]))
            lines.append(f"  recentre {task}: largest label-share gap to the expert "
                         f"{gap:.1%} -> {done:.1%}")
    return "\n".join(lines)
