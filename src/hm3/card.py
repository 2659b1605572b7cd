"""The merged model's hub card: README.md (tasks, sources, method, how to load) and the recipe as
YAML, written beside config.json, as mergekit writes its card and config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hm3.checkpoint import write_text_atomic
from hm3.label_free.registry import CONFIG_KEY, saved_report, step_names

CARD_FILE = "README.md"
RECIPE_FILE = "hm3_recipe.yaml"


def write_card(folder: Path, config: dict, scores: dict | None = None) -> None:
    """Write README.md and hm3_recipe.yaml for the merged model in `folder` (its config.json)."""
    block = config["hm3"]
    write_text_atomic(folder / RECIPE_FILE,
                      yaml.safe_dump(block["recipe"], sort_keys=False, allow_unicode=True))
    write_text_atomic(folder / CARD_FILE, model_card(block, scores))


def model_card(block: dict, scores: dict | None = None) -> str:
    """The card's Markdown from a merged model's `hm3` config block (and scores, when known)."""
    tasks = block["tasks"]
    sources = {s["task"]: s["model"] for s in block.get("sources", [])}
    hub_models = [m for m in [block.get("base"), *sources.values()] if _hub_id(m)]
    front = {"library_name": "transformers", "pipeline_tag": "text-classification",
             "tags": ["hm3", "merge", "multi-task", "text-classification"]}
    if hub_models:
        front["base_model"] = hub_models
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {len(tasks)}-task classifier merged with hm3", "",
             f"One model that answers {len(tasks)} classification tasks in one forward pass, "
             f"merged training-free by hm3 {block.get('version', '')} "
             "(HM3, Hackmann 2024) from the experts below. Its logits are one block per task: "
             "take a softmax per block (a sigmoid per label for multi-label tasks), never one "
             "softmax over all of them.", "",
             "## Tasks", "", "| task | logits | kind | labels | merged from |",
             "| --- | --- | --- | --- | --- |"]
    for task in tasks:
        stop = task["offset"] + len(task["labels"])
        kind = (f"multi-label (threshold {task.get('threshold', 0.5)})"
                if task.get("multi_label") else "single-label")
        lines.append(f"| {task['name']} | [{task['offset']}:{stop}) | {kind} | "
                     f"{', '.join(task['labels'])} | {sources.get(task['name'], '')} |")
    lines += ["", "## Method", "", f"- base: `{block.get('base')}`",
              f"- method: `{block.get('method')}`, "
              f"parameters `{json.dumps(block.get('parameters', {}))}`, seed {block.get('seed')}"]
    norms = block.get("task_vector_norms", {})
    for expert in block.get("recipe", {}).get("experts", []):
        params = {k: v for k, v in expert.items() if k not in ("model", "task", "revision", "head")}
        norm = norms.get(expert["task"])
        lines.append(f"- {expert['task']}: `{expert['model']}`, parameters `{json.dumps(params)}`"
                     + (f", task vector {norm:.2%} of the base's norm" if norm is not None else ""))
    label_free = saved_report(block)
    if label_free:
        steps = [key for key in step_names() if key in label_free]
        texts = ", ".join(f"{task} {entry['texts']}"
                          for task, entry in label_free.get("calibration", {}).items())
        lines.append(f"- label-free steps: {', '.join(steps) or 'none'} on unlabelled "
                     f"calibration texts ({texts}); figures in config.json under "
                     f"`hm3.{CONFIG_KEY}`")
        held_out = label_free.get("fidelity", {}).get("held_out")
        if held_out:
            shares = ", ".join(f"{task} {entry['agreement']:.1%}"
                               for task, entry in held_out["tasks"].items())
            lines.append(f"- agreement with each expert on the calibration texts, each scored by "
                         f"head steps fitted without it ({held_out['folds']}-fold): {shares}")
    lines += ["", f"The full recipe is in `{RECIPE_FILE}`; `hm3 merge {RECIPE_FILE} -o OUT` "
              "reproduces the model from the same experts.", ""]
    if scores:
        lines += ["## Scores", "", "| task | macro-F1 |", "| --- | --- |"]
        lines += [f"| {task} | {value:.4f} |" for task, value in scores.items()]
        lines.append("")
    first = tasks[0]["name"]
    lines += ["## Use", "", "With hm3 (per-task labels and probabilities):", "", "```python",
              "import hm3", "", "model = hm3.load(\"PATH_OR_HUB_ID\")",
              "print(model.predict(\"some text\"))  # {task: {label, score, probabilities}}",
              "print(model.predict([\"a text\", \"another\"]))  # a list: one such dict per text",
              "```", "", "Serve it: `hm3 serve PATH --port 8000` (POST /v1/classify).", "",
              "With plain transformers (slice the logits per task yourself):", "", "```python",
              "import json, torch",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
              "model = AutoModelForSequenceClassification.from_pretrained(\"PATH_OR_HUB_ID\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_HUB_ID\")",
              "logits = model(**tokenizer([\"some text\"], return_tensors=\"pt\")).logits",
              "for task in model.config.hm3[\"tasks\"]:",
              "    z = logits[:, task[\"offset\"]:task[\"offset\"] + len(task[\"labels\"])]",
              "    p = z.sigmoid() if task[\"multi_label\"] else z.softmax(-1)",
              "    print(task[\"name\"], dict(zip(task[\"labels\"], p[0].tolist())))",
              "```", "",
              f"A text-classification pipeline would take one softmax over all labels: wrong for "
              f"every task (e.g. `{first}`'s probabilities would not sum to 1).", ""]
    return "\n".join(lines)


def _hub_id(name: str | None) -> bool:
    if not name or Path(name).exists() or name.startswith(("/", ".", "~")):
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)
