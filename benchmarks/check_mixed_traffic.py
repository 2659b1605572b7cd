"""`hm3 check` on mixed traffic: every task's test texts pooled and shuffled into one sample (as
a deployment's traffic is), each merged model checked against its experts on it, counting every
text, only the texts each expert is sure of (`--count confident`), each text weighted by its
expert's confidence (`--count weighted`), the quarter of texts each expert is surest of
(`--count surest`), the texts typical of each task's calibration split in its expert's
embedding space (`--count typical`; `typical, base space`: the same in the base model's space,
for the record) or the texts whose 10 nearest calibration texts of all tasks, in the base
model's space, are mostly the task's (`--count domain`); beside each task's test macro-F1
change (merged minus expert, on the task's own test split) and, as the study's ceiling, the
agreement on the task's own test texts (`own`: what a perfect typicality would count). A
verdict should fail a task 3 or more points under its expert and pass one within 1 point.

`--split validation` pools the validation splits instead (recorded as `ZOO-validation NAME`),
to choose a minimum agreement on them before looking at the test splits' figures.

  .venv/bin/python benchmarks/check_mixed_traffic.py --zoo minilm NAME=FOLDER ...
Results: benchmarks/results/check_mixed_traffic.json (one entry per zoo and model). The experts'
and each merge's probabilities and embeddings are cached under the system's temporary folder
(keyed by the zoo and the model file), so a rerun recounts without a forward pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from hm3.check import compare_task, domain_texts, label_agreement, typical_texts
from hm3.checkpoint import write_json_atomic
from hm3.evaluate import score_task
from hm3.model import embed_texts, group_probabilities, load
from hm3.zoo import build_mpnet_zoo, build_zoo, read_split

from common import datasets

RESULTS = Path(__file__).resolve().parent / "results" / "check_mixed_traffic.json"
CACHE = Path(tempfile.gettempdir()) / "hm3-check-mixed"
MINIMUMS = (0.9, 0.95)
# key in a task's row -> the `--count` it stands for (`own` is the study's ceiling, no option)
COUNTED = {"agreement": "all", "confident_agreement": "confident",
           "weighted_agreement": "weighted", "surest_agreement": "surest",
           "typical_agreement": "typical", "base_typical_agreement": "typical, base space",
           "domain_agreement": "domain",
           "own_agreement": "own (ceiling)",
           # per label (`hm3.check.label_agreement`): each label the expert gives weighs the
           # same; and macro-F1 of the merged decisions against the expert's (study only)
           "balanced_agreement": "all, per label", "typical_balanced_agreement":
           "typical, per label", "domain_balanced_agreement": "domain, per label",
           "own_balanced_agreement": "own, per label (ceiling)",
           "expert_f1": "all, F1 against the expert", "domain_expert_f1":
           "domain, F1 against the expert", "own_expert_f1": "own, F1 against the expert "
           "(ceiling)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("minilm", "mpnet"), default="minilm")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the splits pooled into the traffic (and the F1 changes'); "
                        "validation results are recorded as ZOO-validation, for choosing a "
                        "minimum agreement before looking at test")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--per-task", type=int, metavar="N",
                        help="check on the first N texts of each task in the shuffled sample "
                        "(cheaper); the test macro-F1 changes then come from this model's "
                        "full-sample entry already in the results")
    parser.add_argument("models", nargs="*", metavar="NAME=FOLDER")
    args = parser.parse_args()
    zoo = build_mpnet_zoo(progress=False) if args.zoo == "mpnet" else build_zoo(progress=False)
    max_length = args.max_length or (32 if args.zoo == "mpnet" else 128)
    test = datasets(zoo, args.split)
    key = args.zoo if args.split == "test" else f"{args.zoo}-validation"
    traffic = [(text, data.task, label) for data in test
               for text, label in zip(data.texts, data.labels)]
    random.Random(0).shuffle(traffic)
    texts, owner = [t for t, _, _ in traffic], np.array([task for _, task, _ in traffic])
    labels = [label for _, _, label in traffic]
    keep = np.arange(len(texts))
    if args.per_task:
        keep = np.concatenate([np.flatnonzero(owner == data.task)[:args.per_task]
                               for data in test])
        keep.sort()
    references = {task: [t for t, _ in read_split(files["calibration"])]
                  for task, files in zoo.splits.items()}
    experts = expert_outputs(zoo, args.zoo, texts, references, max_length, owner, labels, keep)
    base = base_outputs(zoo, args.zoo, texts, references, max_length, keep)
    texts, owner, labels = [texts[i] for i in keep], owner[keep], [labels[i] for i in keep]
    domains = domain_texts(base[next(iter(base))][0], {task: base[task][1] for task in base})
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for item in args.models:
        name, _, folder = item.partition("=")
        merged = merged_outputs(folder, args.zoo, texts, max_length, owner, labels)
        full = results.get(f"{key} {name}", {}).get("tasks", {})
        rows = {}
        for task, (group, probs, embedded, refs, f1) in experts.items():
            typical = typical_texts(embedded, refs)
            in_base = typical_texts(base[task][0], base[task][1])
            own = owner == task
            entry = compare_task(group, probs, merged["probs"][task], typical)
            by_base = compare_task(group, probs, merged["probs"][task], in_base)
            by_domain = compare_task(group, probs, merged["probs"][task], domain=domains[task])
            mine = compare_task(group, probs[own], merged["probs"][task][own])
            change = merged["f1"][task] - f1
            if args.per_task:
                if task not in full or full[task].get("texts_per_task"):
                    raise SystemExit(f"--per-task: no full-sample F1 change of {name}/{task}")
                change = full[task]["f1_change"]
            rows[task] = {"f1_change": round(change, 4),
                          **{key: _round(entry.get(key)) for key in COUNTED if key in entry},
                          "base_typical_agreement": _round(by_base["typical_agreement"]),
                          "domain_agreement": _round(by_domain["domain_agreement"]),
                          "own_agreement": round(mine["agreement"], 4),
                          **per_label(group, probs, merged["probs"][task],
                                      {"": None, "typical_": typical,
                                       "domain_": domains[task], "own_": own}),
                          "confident_n": entry["confident_n"], "surest_n": entry["surest_n"],
                          "typical_n": entry["typical_n"],
                          "typical_own": int((typical & own).sum()),
                          "base_typical_n": by_base["typical_n"],
                          "base_typical_own": int((in_base & own).sum()),
                          "domain_n": by_domain["domain_n"],
                          "domain_own": int((domains[task] & own).sum()), "own_n": int(own.sum())}
            print(name, task, rows[task], flush=True)
        results[f"{key} {name}"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "texts": len(texts), "model": folder, "tasks": rows,
                                         **({"texts_per_task": args.per_task,
                                             "f1_change": "from the full-sample run"}
                                            if args.per_task else {})}
        write_json_atomic(RESULTS, results)
    print(json.dumps(outcomes(results), indent=1))


def expert_outputs(zoo, name: str, texts: list[str], references: dict[str, list[str]],
                   max_length: int, owner: np.ndarray, labels: list, keep: np.ndarray) -> dict:
    """task -> (group, probabilities on `texts[keep]`, their embeddings, embeddings of the
    task's references, macro-F1 on the task's own texts among them), from each expert, cached
    (a cache of every text serves any `keep`)."""
    out = {}
    for task, path in zoo.experts.items():
        group = load(path, task=task, max_length=max_length).groups[0]
        rows, cache = _cached(f"{name}-expert-{task}", path, texts, references[task], keep)
        if cache.suffix != ".npz":
            cache = cache.with_suffix(".npz")
            expert = load(path, task=task, max_length=max_length)
            logits, embedded = expert.logits_and_embeddings(
                [texts[i] for i in keep] + references[task])
            np.savez(cache, logits=logits, embedded=embedded)
        saved = np.load(cache)
        n = len(saved["logits"]) - len(references[task])
        probs = group_probabilities(saved["logits"][rows], [group])[task]
        out[task] = (group, probs, saved["embedded"][rows], saved["embedded"][n:],
                     _f1(group, probs, owner[keep] == task, [labels[i] for i in keep]))
    return out


def _cached(prefix: str, source, texts: list[str], refs: list[str], keep: np.ndarray):
    """(rows to read, cache file) for `texts[keep]`: the cache of every text if there is one,
    else that of `keep` (a file to write when its suffix is not .npz / .npy yet)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for suffix in (".npz", ".npy"):
        every = CACHE / f"{prefix}-{_key(source, texts, refs)}{suffix}"
        if every.is_file():
            return keep, every
    if len(keep) == len(texts):
        return keep, CACHE / f"{prefix}-{_key(source, texts, refs)}.new"
    part = CACHE / f"{prefix}-{_key(source, [texts[i] for i in keep], refs)}"
    for suffix in (".npz", ".npy"):
        if part.with_suffix(suffix).is_file():
            return np.arange(len(keep)), part.with_suffix(suffix)
    return np.arange(len(keep)), part.with_suffix(".new")


def base_outputs(zoo, name: str, texts: list[str], references: dict[str, list[str]],
                 max_length: int, keep: np.ndarray) -> dict:
    """task -> (embeddings of `texts[keep]`, of the task's references) by the zoo's base
    encoder, cached."""
    known = [t for task in zoo.experts for t in references[task]]
    # the key of every text and the references as one list (as the first runs wrote it)
    rows, cache = _cached(f"{name}-base", zoo.base, texts + known, [],
                          np.concatenate([keep, len(texts) + np.arange(len(known))]))
    if cache.suffix != ".npy":
        cache = cache.with_suffix(".npy")
        np.save(cache, embed_texts(zoo.base, [texts[i] for i in keep] + known,
                                   max_length=max_length))
    embedded = np.load(cache)[rows]
    out, start = {}, len(keep)
    for task in zoo.experts:
        out[task] = (embedded[:len(keep)], embedded[start:start + len(references[task])])
        start += len(references[task])
    return out


def merged_outputs(folder: str, name: str, texts: list[str], max_length: int,
                   owner: np.ndarray, labels: list) -> dict:
    """The merged model's probabilities on `texts` per task and its test macro-F1 per task (on
    the task's own texts among them), cached by the model file."""
    weights = Path(folder) / "model.safetensors"
    stamp = f"{weights.resolve()}:{weights.stat().st_mtime_ns}" if weights.is_file() else folder
    cache = CACHE / f"{name}-merged-{_key(stamp, texts, [])}.npy"
    merged = load(folder, max_length=max_length)
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, merged.logits(texts))
    probs = group_probabilities(np.load(cache), merged.groups)
    return {"probs": probs, "f1": {g.name: _f1(g, probs[g.name], owner == g.name, labels)
                                   for g in merged.groups}}


def per_label(group, expert: np.ndarray, merged: np.ndarray, masks: dict) -> dict:
    """For each mask of counted texts (prefix -> mask, None for all): the per-label agreement
    (`label_agreement`) and the macro-F1 of the merged model's decisions taking the expert's
    as the truth (over the labels the expert gives there; a multi-label task's labels as
    on/off columns)."""
    out = {}
    for prefix, mask in masks.items():
        rows = np.ones(len(expert), bool) if mask is None else mask
        found = label_agreement(group, expert, merged, rows)
        out[f"{prefix}balanced_agreement"] = _round(found["balanced_agreement"])
        if not rows.any():
            out[f"{prefix}expert_f1"] = None
        elif group.multi_label:
            out[f"{prefix}expert_f1"] = round(float(f1_score(
                expert[rows] > group.threshold, merged[rows] > group.threshold,
                average="macro", zero_division=1.0)), 4)
        else:
            given = expert[rows].argmax(1)
            out[f"{prefix}expert_f1"] = round(float(f1_score(
                given, merged[rows].argmax(1), labels=np.unique(given), average="macro",
                zero_division=0.0)), 4)
    return {key: value for key, value in out.items() if key in COUNTED}


def _f1(group, probs: np.ndarray, own: np.ndarray, labels: list) -> float:
    return score_task(group, [lab for lab, mine in zip(labels, own) if mine], probs[own])[
        "macro_f1"]


def _key(path, texts: list[str], refs: list[str]) -> str:
    return hashlib.sha256(json.dumps([str(path), texts, refs]).encode()).hexdigest()[:12]


def _round(value):
    return None if value is None else round(value, 4)


def outcomes(results: dict, minimums=MINIMUMS) -> dict:
    """Per way of counting and minimum agreement: false alarms (a task within 1 point failed)
    and misses (a task 3 or more points under passed), over every (model, task) recorded."""
    out = {}
    for zoo in sorted({model.split()[0] for model in results}):
        for key, count in COUNTED.items():
            for minimum in minimums:
                out[f"{zoo}, {count} at {minimum:.0%}"] = _outcome(
                    {m: e for m, e in results.items() if m.split()[0] == zoo}, key, minimum)
    return out


def _outcome(results: dict, key: str, minimum: float) -> dict:
    alarms, misses, within, under = [], [], 0, 0
    for model, entry in results.items():
        for task, row in entry["tasks"].items():
            if key not in row:  # recorded before this way of counting existed
                continue
            share = row[key] if row[key] is not None else row["agreement"]
            if row["f1_change"] >= -0.01:
                within += 1
                if share < minimum:
                    alarms.append(f"{model}/{task}")
            elif row["f1_change"] <= -0.03:
                under += 1
                if share >= minimum:
                    misses.append(f"{model}/{task}")
    return {"within_1_point": within, "false_alarms": alarms, "3_or_more_under": under,
            "misses": misses}


if __name__ == "__main__":
    main()
