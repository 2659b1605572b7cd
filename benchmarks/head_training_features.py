"""What a merge's head reads, cached for `head_training.py`: the body merged once (TIES 0.2,
heads whole; with `distill`, the `distill` step's default on it), then the input of the head's
hidden layer (MPNet `classifier.dense`, BERT `pooler.dense`) on every task's calibration,
validation and test texts, with each expert's logits on the same texts; with `all`, also each
expert's logits on every task's calibration texts (`E_all`, task -> expert logits on the tasks'
calibration texts in the order of `tasks`), for heads fitted on more texts than their own, and
each expert's logits on every task's validation and test texts (`E_cross`, split -> task ->
logits on the split's texts of every task in the order of `tasks`), for what each head says on
the other tasks' texts (mixed traffic).

  .venv/bin/python benchmarks/head_training_features.py [minilm] [tsv] [distill] [all] [64 | shared]
Writes /tmp/hm3-head-features[-minilm][-tsv][-distill][-all][-64 | -shared]-dev.pt (MPNet zoo,
171-640 unseen texts per task; `64`: each task's calibration split cut to 64 texts; `shared`:
1024 of the unseen texts pooled into one sample every task reads; `minilm`: the MiniLM zoo with
the demo's calibration; `tsv`: the body merged by TSV-Merge, lambda 1, as `preset: label-free`
does, instead of TIES 0.2). The experts' logits do not depend on the body: they are kept in
/tmp/hm3-expert-logits-ZOO[-64 | -shared].pt (ZOO: the zoo build's folder name) and read from
there by later runs.
"""

import sys
import tempfile
from pathlib import Path

import torch

from hm3.demo import demo_recipe, held_out_texts
from hm3.engine import build_model, merge_into, open_sources
from hm3.label_free.calibration import expert_classifier
from hm3.label_free.distill import DistillOptions, distill_body
from hm3.model import MultiTaskClassifier
from hm3.pipeline import calibrate
from hm3.recipe import parse_recipe
from hm3.zoo import build_mpnet_zoo, build_zoo

from common import datasets
from mpnet_zoo import HEAD_STEPS, recipe, zoo_dev

WORDS = ("minilm", "tsv", "distill", "all", "64", "shared")
CROSS_SPLITS = ("validation", "test")


def main(words: list[str]) -> None:
    unknown = [w for w in words if w not in WORDS]
    if unknown:
        sys.exit(f"unknown argument(s) {' '.join(unknown)}: give any of {' '.join(WORDS)}")
    minilm, distill, every_text = ("minilm" in words, "distill" in words, "all" in words)
    tsv = "tsv" in words
    setting = next((w for w in words if w in ("64", "shared")), None)
    if minilm and setting:
        sys.exit(f"`{setting}` is an MPNet setting: the MiniLM zoo has only the demo's "
                 "calibration; drop one of the two")
    path = (f"/tmp/hm3-head-features{'-minilm' if minilm else ''}{'-tsv' if tsv else ''}"
            f"{'-distill' if distill else ''}{'-all' if every_text else ''}"
            f"{'-' + setting if setting else ''}-dev.pt")
    torch.save(features(minilm, tsv, distill, every_text, setting), path)
    print(f"saved {path}")


def features(minilm: bool, tsv: bool, distill: bool, every_text: bool, setting: str | None
             ) -> dict:
    work = Path(tempfile.mkdtemp())
    if minilm:
        zoo = build_zoo(progress=False)
        raw = {**demo_recipe(zoo), "coefficients": None}
    else:
        zoo = build_mpnet_zoo(progress=False)
        mode = {"64": "per-task", "shared": "shared+unseen"}.get(setting, "per-task+unseen")
        raw = recipe(zoo, list(zoo.experts), HEAD_STEPS, mode, work)
        if setting:
            raw["calibration"]["limit"] = int(setting) if setting == "64" else 1024
    # the body method said outright: the demo's recipe is the preset, whose body has changed
    raw["method"], raw["parameters"] = (("tsv", {"lambda": 1.0}) if tsv
                                        else ("ties", {"density": 0.2}))
    dev = zoo_dev(zoo, "minilm" if minilm else "mpnet")
    held = held_out_texts(zoo)
    sources = open_sources(parse_recipe(raw))
    cal = calibrate(sources, held, progress=True)
    model = build_model(sources)
    merge_into(model, sources, progress=True)
    if distill:
        distill_body(model, sources, cal, DistillOptions(train="weights", lr=0.02), progress=True)
    max_length = raw["calibration"]["max_length"]
    clf = MultiTaskClassifier(model, cal.tokenizer, sources.groups, max_length)
    splits = {s: {d.task: d for d in datasets(zoo, s)} for s in ("validation", "test")}
    splits["dev"] = {d.task: d for d in dev}  # none left for some guard tasks
    dense_name = "bert.pooler.dense" if minilm else "classifier.dense"
    dense = model.get_submodule(dense_name)

    def inputs_on(texts):
        seen = []
        h = dense.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
        clf.logits(texts)
        h.remove()
        # the classifier runs the texts sorted by length: put the rows back in input order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), seen[0].shape[1])
        out[order] = torch.cat(seen).float()
        return out

    texts = {"calibration": {t: cal.calibration.texts[t] for t in zoo.experts}}
    texts.update({s: {t: splits[s][t].texts for t in splits[s]} for s in splits})
    labels = {s: {t: splits[s][t].labels for t in splits[s]} for s in splits}
    X = {s: {t: inputs_on(texts[s][t]) for t in texts[s]} for s in texts}
    # keyed by the zoo's build (its folder, named by a hash): a zoo built afresh elsewhere has
    # other experts
    build = Path(next(iter(zoo.experts.values()))).parent.parent.name
    store = Path(f"/tmp/hm3-expert-logits-{build}{'-' + setting if setting else ''}.pt")
    E = torch.load(store, weights_only=False) if store.exists() else {}
    E = expert_logits(E, sources, cal.tokenizer, max_length, texts, zoo.experts, every_text)
    torch.save(E, store)
    state = {
        k: v.clone() for k, v in model.state_dict().items()
        if k.startswith(("classifier.", dense_name))
    }
    return {
        "X": X,
        "E": E,
        "labels": labels,
        "head": state,
        "groups": [g.to_dict() for g in sources.groups],
        "tasks": list(zoo.experts),
    }


def expert_logits(E: dict, sources, tokenizer, max_length: int, texts: dict, tasks,
                  every_text: bool) -> dict:
    """`E` with what is missing computed: each expert's logits on its task's texts of every
    split; with `every_text`, on every task's calibration texts (`all`) and every task's
    validation and test texts (`cross`)."""
    for spec, ck in zip(sources.recipe.experts, sources.experts):
        task = spec.task
        g = [type(g)(g.name, g.labels, 0, g.multi_label, g.threshold)
             for g in sources.groups if g.name == task]
        ec = MultiTaskClassifier(expert_classifier(ck), tokenizer, g, max_length)

        def run(where: dict, key: str, batch: list[str]) -> None:
            if key not in where:
                where[key] = torch.tensor(ec.logits(batch))

        for s in texts:
            if task in texts[s]:
                run(E.setdefault(s, {}), task, texts[s][task])
        if every_text:
            run(E.setdefault("all", {}), task,
                [text for t in tasks for text in texts["calibration"][t]])
            for s in CROSS_SPLITS:
                run(E.setdefault("cross", {}).setdefault(s, {}), task,
                    [text for t in tasks for text in texts[s][t]])
    return E


if __name__ == "__main__":
    main(sys.argv[1:])
