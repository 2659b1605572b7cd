"""A label-free check of a merged model against its experts: on unlabelled texts, how often each
task gives its expert's label, how far its label shares drift, which labels flip, and a verdict
per task against a threshold (for a deployment pipeline to act on)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import yaml

from hm3.card import RECIPE_FILE
from hm3.checkpoint import read_config, resolve
from hm3.data.blocks import parse_calibration_block
from hm3.data.calibration import source_texts, text_hash
from hm3.errors import Hm3Error, Hm3Warning
from hm3.heads import TaskGroup
from hm3.label_free.registry import saved_report
from hm3.model import MultiTaskClassifier, embed_texts, group_probabilities, load, task_groups
from hm3.table import format_table

CALIBRATION_TEXTS = "calibration_texts.json"  # beside a label-free merge's config.json
DEFAULT_MIN_AGREEMENT = 0.9
# On mixed traffic a text outside a task's domain gets an arbitrary label from its expert;
# texts the expert is this sure of (top probability; each label's on/off probability for a
# multi-label task) are the ones whose label means something.
CONFIDENT = 0.9
# An expert that is never that sure (many labels, soft training) still has texts it is SURER
# of than of others: the share of the texts it is surest of, whatever its confidence there.
SUREST = 0.25
# A text is typical of a task when its nearest texts known to be from the task (`TYPICAL_K`, in
# the expert's embedding space) are as close as they are for all but the least typical
# `TYPICAL_LEVEL` of those texts themselves: a conformal test that keeps ~90% of the task's own
# texts whatever the encoder's scale, and needs no text of the other tasks.
TYPICAL_K = 10
TYPICAL_LEVEL = 0.1
TYPICAL_REFERENCES = 512  # of a task's recorded calibration texts, the first these many
# A text is in a task's domain when more than half of its `DOMAIN_K` nearest texts known to be
# from some task (every task's, in the base encoder's space) are that task's: a kNN classifier
# of domains, which unlike `typical` also knows what the other tasks' texts look like.
DOMAIN_K = 10
COUNTS = ("all", "confident", "weighted", "surest", "typical", "domain")  # texts a verdict counts
PER_LABEL_COUNTS = ("all", "typical", "domain")  # those a verdict can also take per label


# --- the figures ---------------------------------------------------------------------------------

def compare_task(group: TaskGroup, expert: np.ndarray, merged: np.ndarray,
                 typical: np.ndarray | None = None, domain: np.ndarray | None = None) -> dict:
    """How far the merged model's decisions on one task are from its expert's, on the same texts.

    - `expert`, `merged`: probabilities (n, K) of the task's labels (a softmax per text, or a
    sigmoid per label for a multi-label task).
    - `typical`, `domain`: optional boolean masks of the texts typical of the task
    (`typical_texts`) and of those in its domain (`domain_texts`); add `typical_n` and
    `typical_agreement`, `domain_n` and `domain_agreement` (and each one's per-label agreement,
    `typical_balanced_agreement` / `domain_balanced_agreement`).

    Returns a JSON-able dict:

    - single-label: `agreement` (share of texts with the expert's argmax), `drift` (total
      variation distance between the two predicted-label histograms, 0..1), `expert_shares`
      / `merged_shares` (the histograms), `flips` ({from, to, count}: expert label -> merged
      label, most frequent first), `mean_abs_dp` (mean |p_merged - p_expert| over texts and
      labels), `balanced_agreement` (per label the expert gives, then averaged:
      `label_agreement`);
    - multi-label: the same per label on the thresholded on/off decisions (`label_agreement`,
      shares = the share of texts where the label is on); `agreement` is the worst label's, so
      a task passes only when every label does; `mean_label_agreement` and
      `exact_agreement` (every label of a text as the expert) beside it; `drift` is the largest
      change of a label's on-share; `flips` ({label, on_to_off, off_to_on}).
    """
    expert, merged = np.asarray(expert, np.float64), np.asarray(merged, np.float64)
    if expert.shape != merged.shape or expert.ndim != 2 or expert.shape[1] != len(group.labels):
        raise Hm3Error(f"task {group.name!r}: expert and merged probabilities must both be "
                       f"(n, {len(group.labels)}), got {expert.shape} and {merged.shape}")
    n = len(expert)
    if n == 0:
        raise Hm3Error(f"task {group.name!r}: no texts to compare on")
    out: dict = {"n": n, "multi_label": group.multi_label,
                 "mean_abs_dp": float(np.abs(merged - expert).mean()),
                 **confident_agreement(group, expert, merged),
                 "weighted_agreement": weighted_agreement(group, expert, merged),
                 **surest_agreement(group, expert, merged),
                 **label_agreement(group, expert, merged)}
    if typical is not None:
        out.update(typical_agreement(group, expert, merged, typical))
        out.update(label_agreement(group, expert, merged, typical, "typical_balanced"))
    if domain is not None:
        out.update(typical_agreement(group, expert, merged, domain, "domain"))
        out.update(label_agreement(group, expert, merged, domain, "domain_balanced"))
    if group.multi_label:
        on_e, on_m = expert > group.threshold, merged > group.threshold
        per_label = (on_e == on_m).mean(0)
        shares_e, shares_m = on_e.mean(0), on_m.mean(0)
        out.update(
            agreement=float(per_label.min()),
            mean_label_agreement=float(per_label.mean()),
            exact_agreement=float((on_e == on_m).all(1).mean()),
            label_agreement={lab: float(v) for lab, v in zip(group.labels, per_label)},
            drift=float(np.abs(shares_m - shares_e).max()),
            expert_shares=_named(group, shares_e), merged_shares=_named(group, shares_m),
            flips=[{"label": lab, "on_to_off": int((on_e[:, k] & ~on_m[:, k]).sum()),
                    "off_to_on": int((~on_e[:, k] & on_m[:, k]).sum())}
                   for k, lab in enumerate(group.labels)
                   if (on_e[:, k] != on_m[:, k]).any()])
        return out
    k = len(group.labels)
    label_e, label_m = expert.argmax(1), merged.argmax(1)
    shares_e = np.bincount(label_e, minlength=k) / n
    shares_m = np.bincount(label_m, minlength=k) / n
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (label_e, label_m), 1)
    flips = [{"from": group.labels[a], "to": group.labels[b], "count": int(confusion[a, b])}
             for a in range(k) for b in range(k) if a != b and confusion[a, b]]
    out.update(agreement=float((label_e == label_m).mean()),
               drift=float(0.5 * np.abs(shares_m - shares_e).sum()),
               expert_shares=_named(group, shares_e), merged_shares=_named(group, shares_m),
               flips=sorted(flips, key=lambda f: -f["count"]))
    return out


def confident_agreement(group: TaskGroup, expert: np.ndarray, merged: np.ndarray) -> dict:
    """The agreement on the texts the expert is confident on (`CONFIDENT`): `confident_n` texts
    (for a multi-label task, the fewest of any label) and `confident_agreement` (None when
    there are none; a multi-label task's worst label, over the texts confident on that label)."""
    if group.multi_label:
        sure = np.maximum(expert, 1 - expert) >= CONFIDENT
        same = _same_decision(group, expert, merged)
        counts = sure.sum(0)
        shares = [float(same[sure[:, k], k].mean()) for k in range(expert.shape[1]) if counts[k]]
        return {"confident_n": int(counts.min()),
                "confident_agreement": min(shares) if shares else None}
    sure = expert.max(1) >= CONFIDENT
    agree = _same_decision(group, expert, merged)
    return {"confident_n": int(sure.sum()),
            "confident_agreement": float(agree[sure].mean()) if sure.any() else None}


def weighted_agreement(group: TaskGroup, expert: np.ndarray, merged: np.ndarray
                       ) -> float | None:
    """The agreement with each text weighted by how sure the expert is of its label, from 0 at
    chance to 1 when certain: (top probability - 1/K) / (1 - 1/K) for a single-label task,
    |2p - 1| for each label of a multi-label task (then the worst label's). Unlike a fixed
    confidence threshold it needs no setting and still counts an expert that is never very
    sure; a text the expert labels at chance counts for nothing. None when every weight is 0."""
    if group.multi_label:
        weight = np.abs(2 * expert - 1)
        same = _same_decision(group, expert, merged)
        totals = weight.sum(0)
        shares = [float((weight[:, k] * same[:, k]).sum() / totals[k])
                  for k in range(expert.shape[1]) if totals[k] > 0]
        return min(shares) if shares else None
    k = expert.shape[1]
    weight = np.clip((expert.max(1) - 1 / k) / (1 - 1 / k), 0, 1)
    total = weight.sum()
    if total <= 0:
        return None
    return float((weight * _same_decision(group, expert, merged)).sum() / total)


def surest_agreement(group: TaskGroup, expert: np.ndarray, merged: np.ndarray,
                     share: float = SUREST) -> dict:
    """The agreement on the `share` of texts the expert is surest of (top probability; for a
    multi-label task each label's |2p - 1|, then the worst label's): `surest_n` texts and
    `surest_agreement`. Relative to the expert itself, so it needs no confidence level that
    an under-confident expert never reaches."""
    n = max(1, math.ceil(share * len(expert)))
    if group.multi_label:
        sureness = np.abs(2 * expert - 1)
        same = _same_decision(group, expert, merged)
        shares = []
        for k in range(expert.shape[1]):
            top = np.argsort(-sureness[:, k], kind="stable")[:n]
            shares.append(float(same[top, k].mean()))
        return {"surest_n": n, "surest_agreement": min(shares)}
    top = np.argsort(-expert.max(1), kind="stable")[:n]
    agree = _same_decision(group, expert, merged)
    return {"surest_n": n, "surest_agreement": float(agree[top].mean())}


def typicality(embeddings: np.ndarray, references: np.ndarray, k: int = TYPICAL_K,
               leave_one_out: bool = False) -> np.ndarray:
    """How typical each text is of a set of reference texts: the mean cosine similarity of its
    embedding to its `k` nearest references (fewer when there are fewer).

    - `embeddings`: (n, d), the texts to score; `references`: (m, d), texts known to be from
    the task, in the same space.
    - `leave_one_out`: `embeddings` ARE the references; each is scored against the others.
    """
    similarity = _unit_rows(embeddings) @ _unit_rows(references).T
    if leave_one_out:
        np.fill_diagonal(similarity, -np.inf)
    k = max(1, min(k, references.shape[0] - int(leave_one_out)))
    nearest = -np.sort(-similarity, axis=1)[:, :k]
    return nearest.mean(1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """The rows of `x` scaled to length 1 (float64), for cosine similarities; a zero row stays
    zero."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def typical_texts(embeddings: np.ndarray, references: np.ndarray, k: int = TYPICAL_K,
                  level: float = TYPICAL_LEVEL) -> np.ndarray:
    """Which texts are typical of the task the references come from: those whose `typicality`
    is at least the `level` quantile of the references' own (each against the others), so that
    about 1 - `level` of the task's texts pass and texts of other domains mostly do not.
    Returns a boolean mask over `embeddings`' rows."""
    references = np.asarray(references, np.float64)
    if references.shape[0] < 2:
        raise Hm3Error(f"typical texts: need at least 2 texts known to be from the task, got "
                       f"{references.shape[0]}")
    own = typicality(references, references, k, leave_one_out=True)
    return typicality(embeddings, references, k) >= np.quantile(own, level)


def domain_texts(embeddings: np.ndarray, references: Mapping[str, np.ndarray],
                 k: int = DOMAIN_K) -> dict[str, np.ndarray]:
    """Each text's domain, from its `k` nearest texts (cosine) among the texts known to be from
    each task: the task that holds more than half of them; a text with no such task is in
    none. Returns task -> boolean mask over `embeddings`' rows.

    - `embeddings`: (n, d), the texts to place; `references`: task -> (m_task, d), texts known
    to be from that task, in the same space (at least two tasks).
    """
    if len(references) < 2:
        raise Hm3Error("domains: need texts known to be from at least 2 tasks, got "
                       f"{len(references)}; with one task, count `typical` texts instead")
    tasks = list(references)
    pool = np.concatenate([np.asarray(references[t], np.float64) for t in tasks])
    owner = np.repeat(np.arange(len(tasks)), [len(references[t]) for t in tasks])
    similarity = _unit_rows(embeddings) @ _unit_rows(pool).T
    k = min(k, len(pool))
    nearest = owner[np.argsort(-similarity, axis=1, kind="stable")[:, :k]]
    return {task: (nearest == i).sum(1) > k / 2 for i, task in enumerate(tasks)}


def typical_agreement(group: TaskGroup, expert: np.ndarray, merged: np.ndarray,
                      typical: np.ndarray, name: str = "typical") -> dict:
    """The agreement on the texts `typical` marks (see `typical_texts`, `domain_texts`):
    `{name}_n` texts and `{name}_agreement` (None when there are none; a multi-label task's
    worst label)."""
    typical = np.asarray(typical, bool)
    if typical.shape != (len(expert),):
        raise Hm3Error(f"task {group.name!r}: the {name}-text mask must have one entry per "
                       f"text ({len(expert)}), got shape {typical.shape}")
    same = _same_decision(group, expert, merged)[typical]
    if not typical.any():
        return {f"{name}_n": 0, f"{name}_agreement": None}
    share = same.mean(0).min() if group.multi_label else same.mean()
    return {f"{name}_n": int(typical.sum()), f"{name}_agreement": float(share)}


def label_agreement(group: TaskGroup, expert: np.ndarray, merged: np.ndarray,
                    counted: np.ndarray | None = None, name: str = "balanced") -> dict:
    """The agreement per label the expert gives, then averaged over those labels: each label
    weighs the same however rarely the expert gives it, so a merge that stops giving a rare
    label (the few spam messages among many hams) loses as much as that label is worth to
    macro-F1, not as little as its share of the texts. For a multi-label task, per label the
    mean of the agreement on the texts the expert turns it on and on those it leaves off, then
    the worst label's.

    - `counted`: optional boolean mask of the texts to count (e.g. `domain_texts`'s), default
    every text.

    Returns `{name}_agreement` (None when no text is counted) and `{name}_labels` (how many
    labels the expert gave on the counted texts: for a multi-label task, the labels seen both
    on and off)."""
    counted = np.ones(len(expert), bool) if counted is None else np.asarray(counted, bool)
    if counted.shape != (len(expert),):
        raise Hm3Error(f"task {group.name!r}: the mask of counted texts must have one entry "
                       f"per text ({len(expert)}), got shape {counted.shape}")
    same = _same_decision(group, expert, merged)[counted]
    expert = expert[counted]
    if not len(expert):
        return {f"{name}_agreement": None, f"{name}_labels": 0}
    if group.multi_label:
        on = expert > group.threshold
        per_label = [np.mean([same[on[:, k], k].mean(), same[~on[:, k], k].mean()])
                     if 0 < on[:, k].sum() < len(on) else same[:, k].mean()
                     for k in range(expert.shape[1])]
        both = int(((on.sum(0) > 0) & (on.sum(0) < len(on))).sum())
        return {f"{name}_agreement": float(min(per_label)), f"{name}_labels": both}
    given = expert.argmax(1)
    per_label = [same[given == c].mean() for c in np.unique(given)]
    return {f"{name}_agreement": float(np.mean(per_label)), f"{name}_labels": len(per_label)}


def _same_decision(group: TaskGroup, expert: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """Where the merged model decides as the expert: per text, the same top label; for a
    multi-label task per text and label, the same side of the task's threshold."""
    if group.multi_label:
        return (expert > group.threshold) == (merged > group.threshold)
    return expert.argmax(1) == merged.argmax(1)


def compare_logits(groups: Sequence[TaskGroup], expert_logits: Mapping[str, np.ndarray],
                   merged_logits: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """`compare_task` for every task from logits of the task's own labels (n, K_task), e.g. the
    experts' and the merged model's on the calibration texts."""
    out = {}
    for group in groups:
        own = dataclasses.replace(group, offset=0)
        expert = group_probabilities(np.asarray(expert_logits[group.name]), [own])[group.name]
        merged = group_probabilities(np.asarray(merged_logits[group.name]), [own])[group.name]
        out[group.name] = compare_task(group, expert, merged)
    return out


def _named(group: TaskGroup, values: np.ndarray) -> dict[str, float]:
    return {label: round(float(v), 4) for label, v in zip(group.labels, values)}


# --- the check -----------------------------------------------------------------------------------

def check(merged: MultiTaskClassifier,
          experts: Mapping[str, MultiTaskClassifier | Callable[[], MultiTaskClassifier]],
          texts: Sequence[str], batch_size: int = 32,
          task_texts: Mapping[str, Sequence[str]] | None = None,
          embed: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """Compare `merged` with each task's expert on `texts` (no labels needed).

    - `merged`: the merged model (`hm3.load(path)`).
    - `experts`: task -> that task's expert (`hm3.load(path, task=TASK)`), or a function that
    loads it (then one expert is in memory at a time); its labels must be the merged task's, in
    the same order. Tasks without an expert are listed as unchecked.
    - `texts`: unlabelled texts that were NOT used to calibrate the merge (see
    `calibration_overlap`).
    - `task_texts`: optional task -> texts known to be from that task (e.g. its calibration
    texts); each such task's entry also gets the agreement on the check texts typical of them,
    in its expert's embedding space (`typical_texts`), and `typical_references` (how many).
    - `embed`: optional function from texts to embeddings (e.g. `hm3.model.embed_texts` with
    the merge's base model); with `task_texts` for every checked task it places each text in
    a task's domain or none (`domain_texts`, in that space) and each entry gets the agreement
    on the texts of its domain INSTEAD of the typical texts.

    Returns a JSON-able dict: {"texts": n, "tasks": {task: compare_task(...)}, "unchecked":
    [tasks]}. Add verdicts with `verdicts`.
    """
    texts = list(texts)
    task_texts = {task: list(refs) for task, refs in (task_texts or {}).items()}
    if not texts:
        raise Hm3Error("no texts to check on; give a file with one text per line (or a table)")
    for task, refs in task_texts.items():
        if task not in experts:
            raise Hm3Error(f"texts given for task {task!r}, which has no expert to check")
        if len(refs) < 2:
            raise Hm3Error(f"task {task!r}: need at least 2 texts known to be from it to tell "
                           f"which check texts are typical of it, got {len(refs)}")
    groups = {g.name: g for g in merged.groups}
    for task, expert in experts.items():
        if task not in groups:
            raise Hm3Error(f"expert for {task!r}: the merged model has no such task; its tasks "
                           f"are {', '.join(groups)}")
        if isinstance(expert, MultiTaskClassifier):
            check_expert_groups(groups[task], expert.groups)
    merged_probs = merged.predict_proba(texts, batch_size=batch_size)
    domains = None
    if embed is not None:
        missing = [task for task in experts if task not in task_texts]
        if missing:
            raise Hm3Error(f"domains: no texts known to be from {', '.join(missing)}; give "
                           "texts of every checked task")
        known = [t for task in experts for t in task_texts[task]]
        embedded = embed(texts + known)
        start, references = len(texts), {}
        for task in experts:
            references[task] = embedded[start:start + len(task_texts[task])]
            start += len(task_texts[task])
        domains = domain_texts(embedded[:len(texts)], references)
    tasks = {}
    for task, expert in experts.items():
        if not isinstance(expert, MultiTaskClassifier):
            expert = expert()
            check_expert_groups(groups[task], expert.groups)
        typical = None
        if task in task_texts and domains is None:
            refs = task_texts[task]
            logits, embedded = expert.logits_and_embeddings(texts + refs, batch_size)
            typical = typical_texts(embedded[:len(texts)], embedded[len(texts):])
            expert_probs = group_probabilities(logits[:len(texts)], expert.groups)
        else:
            expert_probs = expert.predict_proba(texts, batch_size=batch_size)
        tasks[task] = compare_task(groups[task], expert_probs[expert.groups[0].name],
                                   merged_probs[task], typical,
                                   None if domains is None else domains[task])
        if task in task_texts:
            tasks[task]["typical_references"] = len(task_texts[task])
    tasks = {task: tasks[task] for task in groups if task in tasks}  # the model's order
    return {"texts": len(texts), "tasks": tasks,
            "unchecked": [task for task in groups if task not in experts]}



def check_model(model: str | Path, texts: Sequence[str], experts: Sequence[str] | None = None,
                min_agreement: Sequence[str] = (), max_drift: float | None = None,
                count: str = "all", batch_size: int = 32, device: str | None = None,
                max_length: int | None = None, allow_pickle: bool = False,
                task_texts: Mapping[str, Sequence[str]] | None = None,
                per_label: bool = False, precision: str | None = None) -> dict:
    """The whole check of a merged model folder (`hm3 check`): its experts found and their
    labels compared with the merged tasks' before any forward pass, `check`, `verdicts`, and
    what the merge records of its calibration (a warning when `texts` were calibration texts).

    - `model`: the merged model (directory or hub id).
    - `texts`: unlabelled texts NOT used for calibration.
    - `experts`: `[TASK=]PATH` items (see `expert_paths`); default: the sources the model records.
    - `min_agreement`: `SHARE` / `TASK=SHARE` items (see `parse_thresholds`).
    - `max_drift`, `count`, `per_label`: as for `verdicts`.
    - `batch_size`, `device`, `max_length`, `allow_pickle`: how the models are loaded and run
    (`hm3.load`); `precision`: the merged model's, if it is an OpenVINO export (`hm3.load`'s).
    - `task_texts`: task -> texts known to be from the task, for `count="typical"` (see
    `check`) and `count="domain"` (then the texts are placed in the merge's base model's
    embedding space, `domain_texts`); tasks not given read the per-task calibration texts the
    merge's recipe records (the first `TYPICAL_REFERENCES`), and a task with neither is an
    error.

    Returns `verdicts`'s dict, with "model", "experts" (task -> path), "calibration_overlap",
    "task_texts" (task -> how many texts and where from, when typicality was counted) and,
    where the merge recorded them, "calibration_figures" and "calibration_held_out".
    """
    if max_drift is not None and not 0 <= max_drift <= 1:
        raise Hm3Error(f"--max-drift: expected a distance in [0, 1], got {max_drift}")
    check_count(count, per_label)  # before any model is read
    folder = resolve(str(model), allow_pickle=allow_pickle)
    block = read_config(folder).get("hm3") or {}
    if not block:
        raise Hm3Error(f"{model} is not an hm3-merged model (its config.json has no hm3 "
                       "block); check the folder `hm3 merge` wrote")
    tasks = [t["name"] for t in block["tasks"]]
    thresholds = parse_thresholds(min_agreement, tasks)
    paths = expert_paths(experts, block, tasks)
    merged_groups = {g.name: g for g in task_groups(read_config(folder), None, str(model))}
    for task, path in paths.items():  # a wrong expert fails before any forward pass
        check_expert_groups(merged_groups[task], task_groups(
            read_config(resolve(path, allow_pickle=allow_pickle)), task, path))
    options = {"device": device, "max_length": max_length, "allow_pickle": allow_pickle}
    merged = load(folder, precision=precision, **options)
    loaders = {task: functools.partial(load, path, task=task, **options)
               for task, path in paths.items()}
    texts = list(texts)
    known = dict(task_texts or {})
    sources = {task: "--task-texts" for task in known}
    if count in ("typical", "domain"):
        known, sources = reference_texts(folder, known, list(paths), count)
    embed = None
    if count == "domain":
        if len(paths) < 2:
            raise Hm3Error("--count domain tells the checked tasks' texts apart and needs at "
                           "least 2 of them; with one expert use --count typical")
        embed = functools.partial(embed_texts, block["base"], batch_size=batch_size, **options)
    report = verdicts(check(merged, loaders, texts, batch_size, known, embed), thresholds,
                      max_drift, count, per_label)
    report["model"], report["experts"] = str(model), paths
    if known:
        report["task_texts"] = {task: {"texts": len(known[task]), "from": sources[task]}
                                for task in known}
    overlap = calibration_overlap(folder, texts)
    report["calibration_overlap"] = overlap
    fidelity = (saved_report(block) or {}).get("fidelity")
    if fidelity:
        report["calibration_figures"] = fidelity["tasks"]
        if "held_out" in fidelity:  # merges by earlier hm3 versions have none
            report["calibration_held_out"] = fidelity["held_out"]["tasks"]
    if overlap and any(overlap.values()):
        used = ", ".join(f"{task} {n}" for task, n in overlap.items() if n)
        warnings.warn(f"some check texts were calibration texts of this merge ({used} of "
                      f"{len(texts)}): the label-free steps were fitted to them, so agreement "
                      "on them is optimistic; check on texts the merge has not seen", Hm3Warning,
                      stacklevel=2)
    return report


def reference_texts(folder: str | Path, given: Mapping[str, Sequence[str]],
                    tasks: Sequence[str], count: str = "typical"
                    ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each task's texts known to be from it: `given`, else the first `TYPICAL_REFERENCES` of
    the per-task calibration texts the merge's recipe (`hm3_recipe.yaml` in `folder`) records.
    Returns (task -> texts, task -> where they came from); a task with neither is an error."""
    unknown = sorted(set(given) - set(tasks))
    if unknown:
        raise Hm3Error(f"--task-texts: no checked task {', '.join(map(repr, unknown))}; tasks "
                       f"are {', '.join(tasks)}")
    texts = {task: list(given[task]) for task in tasks if task in given}
    sources = {task: "--task-texts" for task in texts}
    recipe = Path(folder) / RECIPE_FILE
    recorded = {}
    if recipe.is_file():
        raw = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("calibration")
        spec = parse_calibration_block(raw, list(tasks)) if raw else None
        recorded = spec.sources if spec else {}
    for task in tasks:
        if task not in texts and task in recorded:
            texts[task] = source_texts(recorded[task])[:TYPICAL_REFERENCES]
            sources[task] = f"the merge's calibration texts ({recorded[task]['path']})"
    missing = [task for task in tasks if task not in texts]
    if missing:
        raise Hm3Error(f"--count {count} needs texts known to be from each task, and the merge "
                       f"records no calibration texts of its own for {', '.join(missing)}: give "
                       "--task-texts TASK=FILE for each")
    return texts, sources


def expert_paths(items: Sequence[str] | None, block: Mapping, tasks: Sequence[str]
                 ) -> dict[str, str]:
    """`[TASK=]PATH` items as task -> path. A path without TASK= is matched to the source the
    merged model's hm3 `block` records for it, else to the task named like its folder. Without
    items, the recorded sources."""
    recorded = {s["task"]: s["model"] for s in block.get("sources", [])}
    if not items:
        missing = [t for t in tasks if t not in recorded]
        if missing:
            raise Hm3Error(f"the model records no expert for {', '.join(missing)}; name them "
                           "with --experts TASK=PATH ...")
        return {task: recorded[task] for task in tasks}
    by_path = {_same_path(path): task for task, path in recorded.items()}
    out: dict[str, str] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep:
            path = item
            name = Path(item.rstrip("/")).name
            task = by_path.get(_same_path(item)) or (name if name in tasks else "")
            if not task:
                raise Hm3Error(f"--experts {item}: cannot tell which task it is the expert of "
                               f"(tasks: {', '.join(tasks)}); write TASK={item}")
        if task not in tasks:
            raise Hm3Error(f"--experts {item}: no task {task!r}; tasks are {', '.join(tasks)}")
        if task in out:
            raise Hm3Error(f"--experts: two experts for task {task!r}; give one per task")
        out[task] = path
    return out


def _same_path(path: str) -> str:
    """A path in the form two spellings of one folder share (hub ids stay as they are)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def check_expert_groups(group: TaskGroup, expert_groups: Sequence[TaskGroup]) -> None:
    """Refuse an expert whose labels are not the merged task's (the wrong model, probably)."""
    if len(expert_groups) != 1:
        raise Hm3Error(f"expert for {group.name!r} has {len(expert_groups)} tasks; give the "
                       "single-task classifier that was merged")
    own = expert_groups[0]
    if tuple(own.labels) != tuple(group.labels) or own.multi_label != group.multi_label:
        kind = {True: "multi-label", False: "single-label"}
        raise Hm3Error(f"expert for {group.name!r} has labels {', '.join(own.labels)} "
                       f"({kind[own.multi_label]}); the merged task has "
                       f"{', '.join(group.labels)} ({kind[group.multi_label]}): is it the "
                       "right expert?")


def parse_thresholds(values: Sequence[str], tasks: Sequence[str],
                     default: float = DEFAULT_MIN_AGREEMENT) -> dict[str, float]:
    """Per-task minimum agreement from `X` (every task) and `TASK=X` items (later win)."""
    out = {task: default for task in tasks}
    for item in values:
        task, sep, number = item.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
        if not 0 <= value <= 1:
            raise Hm3Error(f"--min-agreement: expected a share in [0, 1] or TASK=SHARE, got "
                           f"{item!r}")
        if not sep:
            out = {t: value for t in tasks}
        elif task not in out:
            raise Hm3Error(f"--min-agreement {item}: no task {task!r}; tasks are "
                           f"{', '.join(tasks)}")
        else:
            out[task] = value
    return out


def check_count(count: str, per_label: bool) -> None:
    """Fail when a verdict cannot count `count`'s texts (`--count`), or not per label
    (`--per-label`)."""
    if count not in COUNTS:
        raise Hm3Error(f"--count: expected one of {', '.join(COUNTS)}, got {count!r}")
    if per_label and count not in PER_LABEL_COUNTS:
        raise Hm3Error(f"--per-label works with --count {', '.join(PER_LABEL_COUNTS)}, not "
                       f"--count {count} (whose texts are chosen by the expert's confidence, "
                       "which picks its labels unevenly)")


def verdicts(report: dict, min_agreement: Mapping[str, float],
             max_drift: float | None = None, count: str = "all",
             per_label: bool = False) -> dict:
    """Mark each checked task passed or failed against its minimum agreement (and, if given,
    the largest label-share drift allowed); sets `passed` for the whole report. `count`: the
    agreement on every text (`all`), on the texts the expert is confident on (`confident`),
    with each text weighted by the expert's confidence (`weighted`), on the quarter of texts
    the expert is surest of (`surest`), on the texts typical of the texts known to be from
    the task (`typical`, which needs `check`'s `task_texts`), or on the texts in the task's
    domain (`domain`, which needs `task_texts` and `embed`): the last five for mixed traffic,
    where other tasks' texts get arbitrary labels from an expert (a task with no such text
    falls back to all). `per_label`: the agreement of `all`, `typical` or `domain` taken per
    label the expert gives, then averaged (`label_agreement`), so that a merge that stops
    giving a rare label fails. The report says which (`counted`, `per_label`), and each task
    which texts (`verdict_counted`)."""
    check_count(count, per_label)
    report["counted"], report["per_label"] = count, per_label
    for task, entry in report["tasks"].items():
        reasons = []
        entry["min_agreement"] = min_agreement[task]
        agreement, which = entry["agreement"], "agreement"
        if per_label:
            agreement, which = entry["balanced_agreement"], "agreement per label"
        if count == "confident" and entry.get("confident_agreement") is not None:
            agreement = entry["confident_agreement"]
            which = f"agreement on the {entry['confident_n']} texts the expert is sure of"
        elif count == "weighted" and entry.get("weighted_agreement") is not None:
            agreement = entry["weighted_agreement"]
            which = "agreement weighted by the expert's confidence"
        elif count == "surest" and entry.get("surest_agreement") is not None:
            agreement = entry["surest_agreement"]
            which = f"agreement on the {entry['surest_n']} texts the expert is surest of"
        elif count == "typical" and entry.get("typical_agreement") is not None:
            agreement = entry["typical_balanced_agreement" if per_label else "typical_agreement"]
            refs = entry.get("typical_references")
            which = (f"{which} on the {entry['typical_n']} texts typical of the task"
                     + (f"'s {refs} texts" if refs else ""))
        elif count == "domain" and entry.get("domain_agreement") is not None:
            agreement = entry["domain_balanced_agreement" if per_label else "domain_agreement"]
            which = f"{which} on the {entry['domain_n']} texts in the task's domain"
        if count in ("typical", "domain") and f"{count}_n" not in entry:
            raise Hm3Error(f"count {count}: task {task!r} has no texts known to be from it; "
                           "give them (--task-texts TASK=FILE) or count another way")
        entry["verdict_agreement"] = agreement
        every = which in ("agreement", "agreement per label")  # no subset was counted
        entry["verdict_counted"] = (("per label " if per_label else "") + f"on all {entry['n']} "
                                    "texts" if every else which.removeprefix("agreement "))
        if agreement < min_agreement[task]:
            reasons.append(f"{which} {agreement:.1%} < {min_agreement[task]:.1%}")
        if max_drift is not None:
            entry["max_drift"] = max_drift
            if entry["drift"] > max_drift:
                reasons.append(f"drift {entry['drift']:.3f} > {max_drift:.3f}")
        entry["passed"] = not reasons
        entry["reasons"] = reasons
    report["passed"] = all(e["passed"] for e in report["tasks"].values())
    return report


def calibration_overlap(model_dir: str | Path, texts: Sequence[str]) -> dict[str, int] | None:
    """Per task, how many of `texts` the merge used as calibration texts (None when the model
    records none: not a label-free merge, or not a local folder)."""
    record = Path(model_dir) / CALIBRATION_TEXTS
    if not record.is_file():
        return None
    used = json.loads(record.read_text(encoding="utf-8"))["tasks"]
    keys = {text_hash(t) for t in texts}
    return {task: len(keys & set(hashes)) for task, hashes in used.items()}


def format_check(report: dict) -> str:
    """The check as a table (one row per task), the flips, and the verdict."""
    rows = []
    for task, e in report["tasks"].items():
        calib = (report.get("calibration_figures") or {}).get(task, {}).get("agreement")
        held = (report.get("calibration_held_out") or {}).get(task, {}).get("agreement")
        sure, weighted = e.get("confident_agreement"), e.get("weighted_agreement")
        surest, typical = e.get("surest_agreement"), e.get("typical_agreement")
        domain = e.get("domain_agreement")
        rows.append([task, e["n"], f"{e['agreement']:.1%}",
                     "-" if sure is None else f"{sure:.1%} ({e['confident_n']})",
                     "-" if weighted is None else f"{weighted:.1%}",
                     "-" if surest is None else f"{surest:.1%} ({e['surest_n']})",
                     "-" if typical is None else f"{typical:.1%} ({e['typical_n']})",
                     "-" if domain is None else f"{domain:.1%} ({e['domain_n']})",
                     f"{e['min_agreement']:.1%}",
                     "pass" if e["passed"] else "FAIL", f"{e['drift']:.3f}",
                     f"{e['mean_abs_dp']:.3f}", "-" if calib is None else f"{calib:.1%}",
                     "-" if held is None else f"{held:.1%}"])
    header = ["task", "texts", "agreement", f"where expert >= {CONFIDENT:.0%} (texts)",
              "weighted by confidence", f"surest {SUREST:.0%} (texts)",
              "typical of the task (texts)", "in its domain (texts)", "minimum", "verdict",
              "drift", "mean |dp|", "on calibration (optimistic)", "held out (k-fold)"]
    # a column with no figure for any task (e.g. typicality not counted) is left out
    kept = [i for i in range(len(header)) if not rows or any(row[i] != "-" for row in rows)]
    lines = [format_table([header[i] for i in kept], [[row[i] for i in kept] for row in rows])]
    for task, e in report["tasks"].items():
        if e["multi_label"]:
            parts = [f"{f['label']} on->off {f['on_to_off']}, off->on {f['off_to_on']}"
                     for f in e["flips"]]
            worst = min(e["label_agreement"], key=e["label_agreement"].get)
            lines.append(f"{task}: worst label {worst} {e['label_agreement'][worst]:.1%}, "
                         f"all labels as the expert on {e['exact_agreement']:.1%} of texts")
        else:
            parts = [f"{f['from']}->{f['to']} {f['count']}" for f in e["flips"][:6]]
        shares = ", ".join(f"{lab} {e['expert_shares'][lab]:.0%}->{e['merged_shares'][lab]:.0%}"
                           for lab in e["expert_shares"])
        lines.append(f"{task}: flips {'; '.join(parts) or 'none'}; shares expert->merged "
                     f"{shares}")
        if (report.get("counted", "all") != "all" or report.get("per_label")) \
                and "verdict_counted" in e:
            lines.append(f"{task}: the verdict counted {e['verdict_counted']}: "
                         f"{e['verdict_agreement']:.1%}")
        for reason in e.get("reasons", []):
            lines.append(f"{task}: FAIL: {reason}")
    for task, known in (report.get("task_texts") or {}).items():
        lines.append(f"{task}: {known['texts']} texts known to be from it, from "
                     f"{known['from']}")
    if report.get("unchecked"):
        lines.append(f"not checked (no expert given): {', '.join(report['unchecked'])}")
    failed = [t for t, e in report["tasks"].items() if not e["passed"]]
    counted = {"confident": "on the texts each expert is sure of",
               "weighted": "each text weighted by its expert's confidence",
               "surest": f"on the {SUREST:.0%} of texts each expert is surest of",
               "typical": "on the texts typical of each task's known texts",
               "domain": "on the texts in each task's domain, by their nearest known texts",
               "all": "on every text"}.get(report.get("counted", "all"))
    if report.get("per_label"):
        counted = f"per label the expert gives, {counted}"
    lines.append(f"verdict ({counted}): "
                 f"{'FAIL (' + ', '.join(failed) + ')' if failed else 'pass'}: "
                 f"{len(report['tasks']) - len(failed)} of {len(report['tasks'])} tasks keep "
                 "their expert's decisions" + (" within the thresholds" if failed else ""))
    return "\n".join(lines)
