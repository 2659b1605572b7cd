"""Plots of a search in the style of the paper's Figure 3: macro-F1 against density per trial."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_TASK_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan")


def plot_search(rows: Sequence[dict], experts: dict[str, dict], path: str | Path,
                title: str = "") -> Path:
    """Scatter every complete trial's validation score (mean macro-F1 over tasks) against its
    density; mark the test scores of the trials that set a new best; draw each expert's
    validation F1, and the experts' mean on validation and test, as horizontal lines.

    - `rows`: trial rows as `hm3.search.trial_rows` gives them (state, value, density, new_best,
    test_mean, params such as `density/TASK`).
    - `experts`: {task: {"validation": F1, "test": F1}}.
    - `path`: the PNG to write (atomically).
    """
    # Figure + Agg canvas, not pyplot: no global backend or figure state is touched.
    figure = Figure(figsize=(10, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    complete = [r for r in rows if r["state"] == "COMPLETE" and r.get("density") is not None]
    per_expert = any(key.startswith("density/") for r in complete for key in r)
    axes.scatter([r["density"] for r in complete], [r["value"] for r in complete], s=16,
                 alpha=0.6, color="tab:gray", label=f"trials, validation ({len(complete)})")
    best = [r for r in complete if r.get("new_best") and r.get("test_mean") is not None]
    if best:
        axes.scatter([r["density"] for r in best], [r["value"] for r in best], s=40,
                     facecolors="none", edgecolors="black", label="new best, validation")
        axes.scatter([r["density"] for r in best], [r["test_mean"] for r in best], s=70,
                     marker="*", color="tab:red", zorder=3, label="new best, test")
    for colour, (task, scores) in zip(itertools.cycle(_TASK_COLOURS), experts.items()):
        if scores.get("validation") is not None and len(experts) > 1:
            axes.axhline(scores["validation"], color=colour, linestyle="--", linewidth=1,
                         label=f"expert {task}, validation")
    means = {split: [s[split] for s in experts.values() if s.get(split) is not None]
             for split in ("validation", "test")}
    for split, style in (("validation", "-"), ("test", ":")):
        if means[split] and len(means[split]) == len(experts):
            what = "experts' mean" if len(experts) > 1 else "expert"
            axes.axhline(sum(means[split]) / len(means[split]), color="black", linestyle=style,
                         linewidth=1.5, label=f"{what}, {split}")
    skipped = len(rows) - len(complete)
    axes.set_xlabel("mean density over experts" if per_expert else "task-vector density")
    axes.set_ylabel("mean macro-F1 over tasks" if len(experts) > 1 else "macro-F1")
    axes.set_xlim(0, 1.02)
    axes.set_title(title + (f"  ({skipped} trials without a score not shown)" if skipped else ""),
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return _save(figure, path)


def plot_densities(lewis: dict, path: str | Path) -> Path:
    """LEWIS's per-layer densities: one line per expert across the layers, in model order, with
    the [gamma, epsilon] band they were scaled into."""
    figure = Figure(figsize=(10, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    layers = list(next(iter(lewis["densities"].values())))
    for colour, (task, table) in zip(itertools.cycle(_TASK_COLOURS), lewis["densities"].items()):
        axes.plot(range(len(layers)), [table[name] for name in layers], marker="o", markersize=3,
                  color=colour, label=task)
    axes.axhspan(lewis["gamma"], lewis["epsilon"], color="tab:gray", alpha=0.12,
                 label=f"[gamma, epsilon] = [{lewis['gamma']}, {lewis['epsilon']}]")
    step = max(1, len(layers) // 24)
    axes.set_xticks(range(0, len(layers), step),
                    [_short(layers[i]) for i in range(0, len(layers), step)], rotation=70,
                    fontsize=6)
    axes.set_ylabel("density kept")
    axes.set_ylim(0, 1.02)
    axes.set_title("LEWIS layer-wise densities per expert", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return _save(figure, path)


def _short(layer: str) -> str:
    """A layer name without the model prefix, e.g. `layer.3.attention.self.query`."""
    parts = layer.split(".")
    return ".".join(parts[2:]) if parts[0] in ("bert", "roberta", "model", "transformer",
                                                "deberta", "electra", "distilbert") else layer


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
