"""How far apart two head fits must score before 100 validation texts per task can tell them
apart: the paired bootstrap of the difference in mean macro-F1 (single-label tasks) between the
ridge refit at two strengths (each + `recentre`), on the features `head_training_features.py`
cached, on the validation and the test splits (and on validation with the `dev` texts, where
cached). Texts are resampled within each task, 1000 times.

  .venv/bin/python benchmarks/head_fit_noise.py /tmp/hm3-head-features-distill-all.pt [A B]
(A, B: the two ridges, numbers or `auto`; default 0.1 and 1.0.) Prints one line per split.
"""

import runpy
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

features = sys.argv[1]
first, second = ((r if r == "auto" else float(r) for r in sys.argv[2:4]) if len(sys.argv) > 3
                 else (0.1, 1.0))
sys.argv = ["head_training.py", features]
fits = runpy.run_path(str(Path(__file__).with_name("head_training.py")))  # the fits, not the rows
W1, b1, W2, b2 = fits["W1"], fits["b1"], fits["W2"], fits["b2"]


def fitted(ridge):
    rows, bias = fits["align"](W1, b1, W2, b2, ridge)
    return rows, fits["do_recentre"](W1, b1, rows, bias)


heads = {first: fitted(first), second: fitted(second)}
rng = np.random.default_rng(0)
for split in fits["SPLITS"]:
    tasks = []
    for t in fits["tasks"]:
        group = fits["local"][t]
        if group.multi_label:
            continue
        gold = np.array([list(group.labels).index(label) for label in fits["labels"][split][t]])
        decided = [fits["logits"](W1, b1, *heads[r], split, t).detach().numpy().argmax(1)
                   for r in (first, second)]
        tasks.append((gold, *decided))

    def gain(rows=None):
        out = []
        for gold, a, b in tasks:
            i = rng.integers(0, len(gold), len(gold)) if rows else slice(None)
            out.append(f1_score(gold[i], b[i], average="macro")
                       - f1_score(gold[i], a[i], average="macro"))
        return 100 * float(np.mean(out))

    draws = [gain(True) for _ in range(1000)]
    print(f"{split}: ridge {second} minus ridge {first}, {len(tasks)} single-label tasks: "
          f"{gain():+.2f} points, bootstrap SD {np.std(draws):.2f}, 95% interval "
          f"[{np.percentile(draws, 2.5):+.2f}, {np.percentile(draws, 97.5):+.2f}]", flush=True)
