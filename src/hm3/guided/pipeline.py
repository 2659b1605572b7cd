"""The label-free merge, in memory: LEWIS densities -> method merge (or learned coefficients)
-> RegMean -> head alignment -> bias re-centring. `hm3.merge.merge` writes what comes out."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hm3.errors import Hm3Error
from hm3.evaluate import load_data_block
from hm3.guided import coefficients as coef
from hm3.guided import align, lewis, recentre, regmean
from hm3.checkpoint import load_tokenizer
from hm3.guided.calibration import (Calibration, expert_classifier, load_calibration,
                                    run_batches, tokenize)


def head_modules(sources) -> list[str]:
    """Module names of the final projection (left out of LEWIS and RegMean)."""
    return [sources.heads[0].weight.rsplit(".", 1)[0]]


def guided_model(sources, progress: bool = False,
                 held_out: dict[str, list[str]] | None = None,
                 calibration: Calibration | None = None):
    """Run the recipe's label-free steps; returns (model, sources as finally merged, report).

    `held_out`: each task's validation / test texts, kept out of the calibration texts.
    `calibration`: texts already read (else read from the recipe's `calibration` block).
    """
    from hm3.merge import build_model, merge_into, with_recipe

    started = time.process_time(), time.perf_counter()
    recipe = sources.recipe
    guided = recipe.guided
    spec = guided.calibration
    tasks = [e.task for e in recipe.experts]
    check_heads(sources)
    calibration, tokenizer, batches = calibration_batches(sources, held_out, calibration)
    skip = head_modules(sources)
    report: dict = {"heads": guided.heads, "calibration": calibration.provenance,
                    "max_length": spec.max_length}
    # The experts run once, for every step that matches them (coefficients and the head steps).
    expert_logits = (experts_logits(sources, batches, progress)
                     if guided.coefficients or guided.align_heads or guided.recentre else None)

    if guided.lewis:
        scores = lewis.LewisScores(sources, batches, skip, progress)
        recipe = scores.apply(recipe)
        sources = with_recipe(sources, recipe)
        table = scores.table(guided.lewis.gamma, guided.lewis.epsilon)
        report["lewis"] = {"gamma": guided.lewis.gamma, "epsilon": guided.lewis.epsilon,
                           "densities": {t: {k: round(v, 4) for k, v in d.items()}
                                         for t, d in table.items()}}

    model = build_model(sources)
    if guided.coefficients:
        config = guided.coefficients
        fit_batches = {task: tokenize(tokenizer, calibration.texts[task], spec.max_length,
                                      config.batch_size) for task in tasks}
        groups = {g.name: g for g in sources.groups}
        # The experts' logits on the calibration texts, cut into the fit's batches (both keep
        # the texts' order).
        targets = {task: [coef.expert_probabilities(z, groups[task].multi_label)
                          for z in expert_logits[task].split(config.batch_size)]
                   for task in tasks}
        report["coefficients"] = coef.fit_coefficients(model, sources, fit_batches, targets,
                                                       config, progress)
    else:
        merge_into(model, sources, progress=progress)
    if guided.regmean:
        layers = regmean.apply_regmean(model, sources, batches, guided.regmean.alpha, skip,
                                       progress)
        report["regmean"] = {"alpha": guided.regmean.alpha, "layers": len(layers)}
    if guided.align_heads or guided.recentre:
        report.update(HeadSteps(batches, expert_logits)(model, sources))
    report["cpu_seconds"] = round(time.process_time() - started[0], 1)
    report["seconds"] = round(time.perf_counter() - started[1], 1)
    return model, sources, report


def check_heads(sources) -> None:
    """Fail before any work when the recipe's head steps cannot run on this head."""
    if sources.recipe.guided.recentre and sources.heads[0].bias is None:
        raise Hm3Error(f"recentre shifts the head's biases, and {sources.heads[0].weight} has "
                       "none; drop `recentre` from the recipe (align_heads works without)")


def experts_logits(sources, batches: dict[str, list[dict]],
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Each expert's logits on its task's batches, in text order (one expert in memory at a
    time)."""
    out = {}
    pairs = list(zip(sources.recipe.experts, sources.experts))
    for spec, checkpoint in tqdm(pairs, desc="experts on calibration texts", unit="expert",
                                 disable=not progress):
        model = expert_classifier(checkpoint)
        out[spec.task] = run_batches(model, batches[spec.task])
        del model
    return out


@dataclass
class HeadSteps:
    """The recipe's head steps (align_heads, then recentre) for any merged body: the calibration
    batches and the experts' logits on them are computed once, so a search can refit the heads
    after every trial's merge."""

    batches: dict[str, list[dict]]
    expert_logits: dict[str, torch.Tensor]

    @classmethod
    def prepare(cls, sources, batches: dict[str, list[dict]]) -> "HeadSteps":
        return cls(batches, experts_logits(sources, batches))

    def __call__(self, model: torch.nn.Module, sources) -> dict:
        """Refit `model`'s heads in place; returns what each step did."""
        guided, report = sources.recipe.guided, {}
        inputs = align.head_inputs(model, sources, self.batches)  # the one forward pass
        if guided.align_heads:
            report["align_heads"] = align.align_heads(model, sources, inputs,
                                                      self.expert_logits, guided.align_heads.ridge)
        if guided.recentre:
            report["recentre"] = _recentre(model, sources, align.head_logits(model, sources, inputs),
                                           self.expert_logits)
        return report


def calibration_batches(sources, held_out: dict[str, list[str]] | None = None,
                        calibration: Calibration | None = None):
    """The recipe's calibration texts (read unless given), the tokenizer, and each task's texts
    tokenised into batches."""
    spec = sources.recipe.guided.calibration
    if spec is None:
        raise Hm3Error("this needs unlabelled texts: add a `calibration:` block to the recipe, "
                       "e.g. `calibration: {texts: {TASK: texts.txt}}` with a file per task")
    tasks = [e.task for e in sources.recipe.experts]
    if held_out is None:
        held_out = recipe_held_out(sources.recipe)
    if calibration is None:
        calibration = load_calibration(spec, tasks, held_out)
    tokenizer = load_tokenizer([sources.base.path, *(e.path for e in sources.experts)],
                               missing="no tokenizer found next to the base or the experts; "
                               "guided merging needs one to run the calibration texts")
    batches = {task: tokenize(tokenizer, calibration.texts[task], spec.max_length,
                              spec.batch_size) for task in tasks}
    return calibration, tokenizer, batches


def recipe_held_out(recipe) -> dict[str, list[str]]:
    """The texts of the recipe's own `data:` block (test and validation splits) per task: what
    the merged model will be scored on, so never calibration text."""
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


@torch.no_grad()
def _recentre(model, sources, merged_logits: dict[str, torch.Tensor],
              expert_logits: dict[str, torch.Tensor]) -> dict:
    bias = model.state_dict()[sources.heads[0].bias]
    out = {}
    for group in sources.groups:
        result = recentre.recentre(merged_logits[group.name].numpy(),
                                   expert_logits[group.name].numpy(), group)
        bias[group.offset:group.stop] += torch.tensor(result["shift"]).to(bias)
        out[group.name] = result
    return out


def format_guided(report: dict) -> str:
    """A few lines on what the label-free steps did (for the command line)."""
    texts = ", ".join(f"{task} {entry['texts']}" for task, entry in report["calibration"].items())
    lines = [f"label-free steps ({report['seconds']:.0f}s): heads {report['heads']}; "
             f"calibration texts: {texts}"]
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
    if "align_heads" in report:
        for task, entry in report["align_heads"]["tasks"].items():
            lines.append(f"  align_heads {task}: agreement with the expert "
                         f"{entry['agreement_before']:.1%} -> {entry['agreement_after']:.1%}")
    if "recentre" in report:
        for task, entry in report["recentre"].items():
            gap = max(abs(b - t) for b, t in zip(entry["before"], entry["target"]))
            done = max(abs(a - t) for a, t in zip(entry["after"], entry["target"]))
            lines.append(f"  recentre {task}: largest label-share gap to the expert "
                         f"{gap:.1%} -> {done:.1%}")
    return "\n".join(lines)
