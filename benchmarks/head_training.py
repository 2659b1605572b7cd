"""Ways to fit the merged heads on a fixed merged body, from the features
`head_training_features.py` cached: the ridge refit of the final projection (`align_heads`) at
several strengths or chosen per task (`auto`), each with and without `recentre`, against
training the head by gradient steps on the KL divergence to each expert's probabilities (the
final projection alone, or with the shared hidden layer; pulled toward the rows as merged),
every variant scored on the validation and test splits with its agreement with the experts
(with features cached by `... all`, also each head's agreement with its expert on the other
tasks' validation and test texts: mixed traffic).

  .venv/bin/python benchmarks/head_training.py FEATURES.pt [quick|all|capped|confident|centred]
(`centred`: the ridge refit on logits less their mean over the labels, alone; `quick`: the
ridge rows only; `all`: the ridge rows, then each head fitted on every task's
calibration texts, its own at weight 1 and the others' at a smaller one, from features cached
with `head_training_features.py ... all`; `capped`: at most 16-128 of each other task's texts
per head; `confident`: each text weighted by its expert's confidence, for one shared sample).
Prints one line per variant; RESULTS.md section 10
quotes them.
"""

import json
import sys

import numpy as np
import torch

from hm3.evaluate import score_task
from hm3.heads import TaskGroup
from hm3.label_free.align_heads import choose_ridge, fit_rows
from hm3.label_free.recentre import recentre
from hm3.model import group_probabilities

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/hm3-head-features.pt"
d = torch.load(path, weights_only=False)
X, E, labels, head = d["X"], d["E"], d["labels"], d["head"]
groups = [TaskGroup.from_dict(g) for g in d["groups"]]
tasks = [g.name for g in groups]
D = "bert.pooler.dense" if "bert.pooler.dense.weight" in head else "classifier.dense"
OUT = "classifier" if "classifier.weight" in head else "classifier.out_proj"
W1, b1 = head[f"{D}.weight"].double(), head[f"{D}.bias"].double()
W2, b2 = head[f"{OUT}.weight"].double(), head[f"{OUT}.bias"].double()
local = {g.name: TaskGroup(g.name, g.labels, 0, g.multi_label, g.threshold) for g in groups}
rows = {g.name: slice(g.offset, g.stop) for g in groups}
# `val+dev`: each task's validation split and its `dev` texts (features cached since the larger
# validation set was added) scored as one set: up to 1000 more texts per task.
SPLITS = ("validation", "val+dev", "test") if "dev" in X else ("validation", "test")
if "dev" in X:
    for store in (X, E, labels):
        store["val+dev"] = {
            t: (torch.cat([store["validation"][t], store["dev"][t]])
                if isinstance(store["validation"][t], torch.Tensor)
                else list(store["validation"][t]) + list(store["dev"][t]))
            if t in store["dev"] else store["validation"][t]
            for t in tasks
        }


def logits(W1, b1, W2, b2, split, t, texts_of=None):
    """Task t's logits on the `split` texts of task `texts_of` (its own by default)."""
    h = torch.tanh(X[split][texts_of or t].double() @ W1.T + b1)
    return h @ W2[rows[t]].T + b2[rows[t]]


def do_recentre(W1, b1, W2, b2):
    b2 = b2.clone()
    for t in tasks:
        z = logits(W1, b1, W2, b2, "calibration", t).detach().numpy()
        b2[rows[t]] += torch.tensor(
            recentre(z, E["calibration"][t].double().numpy(), local[t])["shift"]
        ).double()
    return b2


def agreement(p, pe, group) -> float:
    """Share of texts given the expert's label (each label's on/off decision if multi-label)."""
    if group.multi_label:
        return float(((p > group.threshold) == (pe > group.threshold)).mean())
    return float((p.argmax(1) == pe.argmax(1)).mean())


def off_domain(W1, b1, W2, b2) -> dict:
    """Per split of `E["cross"]` (features cached with `all`), each head's agreement with its
    expert on the other tasks' texts of that split (what a deployment's mixed traffic shows),
    and their mean over the heads as "mean"."""
    if "cross" not in E:
        return {}
    order = d["tasks"]
    out = {}
    for s, by_expert in E["cross"].items():
        starts = np.cumsum([0] + [len(X[s][u]) for u in order])
        per_head = {}
        for t in tasks:
            z, ze = [], []
            for i, u in enumerate(order):
                if u != t:
                    z.append(logits(W1, b1, W2, b2, s, t, texts_of=u).detach())
                    ze.append(by_expert[t][starts[i]:starts[i + 1]].double())
            p = group_probabilities(torch.cat(z).numpy(), [local[t]])[t]
            pe = group_probabilities(torch.cat(ze).numpy(), [local[t]])[t]
            per_head[t] = round(agreement(p, pe, local[t]), 3)
        out[s] = {"mean": round(float(np.mean(list(per_head.values()))), 4), **per_head}
    return out


def score(W1, b1, W2, b2, name):
    out, agree = {}, {}
    for s in SPLITS:
        for t in tasks:
            z = logits(W1, b1, W2, b2, s, t).detach().numpy()
            p = group_probabilities(z, [local[t]])[t]
            pe = group_probabilities(E[s][t].double().numpy(), [local[t]])[t]
            out.setdefault(s, {})[t] = round(score_task(local[t], labels[s][t], p)["macro_f1"], 4)
            agree.setdefault(s, {})[t] = round(agreement(p, pe, local[t]), 3)
    mean = {s: round(float(np.mean(list(v.values()))), 4) for s, v in out.items()}
    am = {s: round(float(np.mean(list(v.values()))), 3) for s, v in agree.items()}
    wide = f"val+dev {mean['val+dev']:.4f} " if "val+dev" in mean else ""
    cross = off_domain(W1, b1, W2, b2)
    others = (f" other tasks' texts {json.dumps(cross)}" if cross else "")
    print(
        f"{name:45s} val {mean['validation']:.4f} {wide}test {mean['test']:.4f} agree {am} "
        f"test {json.dumps(out['test'])}{others}",
        flush=True,
    )
    return mean


def experts():
    out = {}
    for s in SPLITS:
        out[s] = {
            t: round(
                score_task(
                    local[t],
                    labels[s][t],
                    group_probabilities(E[s][t].double().numpy(), [local[t]])[t],
                )["macro_f1"],
                4,
            )
            for t in tasks
        }
    print(
        "experts",
        {s: round(float(np.mean(list(v.values()))), 4) for s, v in out.items()},
        json.dumps(out["test"]),
    )


def align(W1, b1, W2, b2, ridge, centred=False):
    """The ridge refit of every task's final projection to its expert's logits (`align_heads`).
    `centred`: on what a softmax reads, for a single-label task each text's logits less their
    mean over the labels (the part a softmax ignores), the start rows centred the same way, so
    the pull toward the merged rows spends nothing on the common part."""
    W2, b2 = W2.clone(), b2.clone()
    for t in tasks:
        h = torch.tanh(X["calibration"][t].double() @ W1.T + b1)
        x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        start = torch.cat([W2[rows[t]], b2[rows[t], None]], 1)
        target = E["calibration"][t].double()
        if centred and not local[t].multi_label:
            start, target = start - start.mean(0), target - target.mean(1, keepdim=True)
        chosen = choose_ridge(x, target, start)[0] if ridge == "auto" else ridge
        fitted = fit_rows(x, target, start, chosen)
        W2[rows[t]], b2[rows[t]] = fitted[:, :-1], fitted[:, -1]
    return W2, b2


def align_all(W1, b1, W2, b2, ridge, weight, per_task=None):
    """`align`, each task's head fitted on every task's calibration texts: its own texts at
    weight 1, the other tasks' at `weight`, the targets its expert's logits on them all; with
    `per_task`, at most that many of each other task's texts (every k-th)."""
    W2, b2 = W2.clone(), b2.clone()
    order = d["tasks"]
    starts = np.cumsum([0] + [len(X["calibration"][u]) for u in order])
    for t in tasks:
        parts, targets, weights = [], [], []
        for i, u in enumerate(order):
            n = len(X["calibration"][u])
            keep = (slice(None) if u == t or per_task is None or n <= per_task
                    else slice(0, None, -(-n // per_task)))
            parts.append(X["calibration"][u].double()[keep])
            targets.append(E["all"][t][starts[i]:starts[i + 1]].double()[keep])
            weights.append(torch.full((len(parts[-1]), 1), 1.0 if u == t else weight,
                                      dtype=torch.float64))
        h = torch.tanh(torch.cat(parts) @ W1.T + b1)
        root = torch.cat(weights).sqrt()
        x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) * root
        start = torch.cat([W2[rows[t]], b2[rows[t], None]], 1)
        fitted = fit_rows(x, torch.cat(targets) * root, start, ridge)
        W2[rows[t]], b2[rows[t]] = fitted[:, :-1], fitted[:, -1]
    return W2, b2


def align_confident(W1, b1, W2, b2, ridge, power=None, floor=None):
    """`align`, each text weighted by its expert's confidence on it: the top probability (for a
    multi-label task each label's max(p, 1 - p), averaged) to `power`, or, with `floor`, 1 where
    it is at least 0.9 and `floor` elsewhere (for one shared sample, where a task's own texts
    are not known and its expert's confidence stands in for them)."""
    W2, b2 = W2.clone(), b2.clone()
    for t in tasks:
        z = E["calibration"][t].double()
        if local[t].multi_label:
            q = torch.sigmoid(z)
            sure = torch.maximum(q, 1 - q).mean(1)
        else:
            sure = torch.softmax(z, 1).max(1).values
        w = torch.where(sure >= 0.9, 1.0, floor) if floor is not None else sure ** power
        root = w.double().sqrt()[:, None]
        h = torch.tanh(X["calibration"][t].double() @ W1.T + b1)
        x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) * root
        start = torch.cat([W2[rows[t]], b2[rows[t], None]], 1)
        fitted = fit_rows(x, z * root, start, ridge)
        W2[rows[t]], b2[rows[t]] = fitted[:, :-1], fitted[:, -1]
    return W2, b2


def kl_train(W1, b1, W2, b2, steps, lr, pull, train_dense=True, temperature=1.0):
    p = [torch.nn.Parameter(v.clone().float()) for v in (W1, b1, W2, b2)]
    start = [v.detach().clone() for v in p]
    scale = [float(v.pow(2).mean()) or 1.0 for v in start]
    opt = torch.optim.Adam(p if train_dense else p[2:], lr=lr)
    Xc = {t: X["calibration"][t].float() for t in tasks}
    Ec = {t: E["calibration"][t].float() for t in tasks}
    for step in range(steps):
        opt.zero_grad()
        loss = 0
        for t in tasks:
            h = torch.tanh(Xc[t] @ p[0].T + p[1])
            z = h @ p[2][rows[t]].T + p[3][rows[t]]
            if local[t].multi_label:
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
                    z / temperature, torch.sigmoid(Ec[t] / temperature)
                )
            else:
                loss = loss + torch.nn.functional.kl_div(
                    torch.log_softmax(z / temperature, 1),
                    torch.log_softmax(Ec[t] / temperature, 1),
                    log_target=True,
                    reduction="batchmean",
                )
        loss = loss / len(tasks)
        reg = sum(((a - b).pow(2).mean() / s) for a, b, s in zip(p, start, scale))
        (loss + pull * reg).backward()
        opt.step()
    return [v.detach().double() for v in p]


def main():
    """The variants' rows (run as a script; `head_fit_noise.py` reads the fits above without
    them)."""
    experts()
    if "centred" in sys.argv[2:]:
        for ridge in (0.1, 0.3, 1.0):
            A2, a2 = align(W1, b1, W2, b2, ridge, centred=True)
            score(W1, b1, A2, do_recentre(W1, b1, A2, a2), f"align centred {ridge} + recentre")
        return
    score(W1, b1, W2, b2, "heads as merged")
    b = do_recentre(W1, b1, W2, b2)
    score(W1, b1, W2, b, "recentre only")
    for ridge in (0.1, 0.2, 0.3, 0.5, 1.0, "auto"):
        A2, a2 = align(W1, b1, W2, b2, ridge)
        score(W1, b1, A2, a2, f"align {ridge} (no recentre)")
        score(W1, b1, A2, do_recentre(W1, b1, A2, a2), f"align {ridge} + recentre")
    if "all" in sys.argv[2:]:
        for weight in (1.0, 0.3, 0.1, 0.03):
            for ridge in (0.1, 1.0):
                A2, a2 = align_all(W1, b1, W2, b2, ridge, weight)
                score(W1, b1, A2, do_recentre(W1, b1, A2, a2),
                      f"align all texts, others x{weight}, ridge {ridge} + recentre")
    if "confident" in sys.argv[2:]:  # texts weighted by the expert's confidence
        for power in (1, 2, 4, 8):
            A2, a2 = align_confident(W1, b1, W2, b2, 0.1, power=power)
            score(W1, b1, A2, do_recentre(W1, b1, A2, a2), f"align confidence^{power}, 0.1 + rc")
        for floor in (0.1, 0.3):
            A2, a2 = align_confident(W1, b1, W2, b2, 0.1, floor=floor)
            score(W1, b1, A2, do_recentre(W1, b1, A2, a2),
                  f"align sure>=0.9 else {floor}, 0.1 + rc")
    if "capped" in sys.argv[2:]:  # each head on at most N texts of every other task
        for per_task in (16, 32, 64, 128):
            for weight in (0.3, 1.0, 3.0):
                A2, a2 = align_all(W1, b1, W2, b2, 0.1, weight, per_task)
                score(W1, b1, A2, do_recentre(W1, b1, A2, a2),
                      f"align all texts, {per_task} per other task x{weight}, ridge 0.1 + rc")
    for train_dense in () if len(sys.argv) > 2 else (True, False):
        for lr, steps in ((1e-3, 200), (3e-3, 300)):
            for pull in (0.0, 0.1, 1.0):
                V = kl_train(W1, b1, W2, b2, steps, lr, pull, train_dense)
                score(
                    V[0],
                    V[1],
                    V[2],
                    do_recentre(*V),
                    f"KL {'dense+out' if train_dense else 'out'} lr{lr} s{steps} pull{pull} +rc",
                )


if __name__ == "__main__":
    main()
