"""Calibration batches (each task's unlabelled texts, tokenised) and running models over them:
logits, and statistics of every linear layer's inputs through forward hooks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from hm3.checkpoint import load_tokenizer
from hm3.data.calibration import Calibration, load_calibration
from hm3.engine import Sources, build_model
from hm3.errors import Hm3Error


def tokenize(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> list[dict]:
    """Batches of tokenised texts, grouped by length. The order depends on the texts alone, so
    batches of any size hold the texts in the same sequence (logits run at one batch size can
    be cut into another's batches)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        batches.append(dict(tokenizer(chunk, truncation=True, max_length=max_length,
                                      padding=True, return_tensors="pt")))
    return batches


def linear_layers(model: torch.nn.Module, skip: Sequence[str] = ()) -> dict[str, torch.nn.Linear]:
    """The model's linear layers by state-dict prefix (`bert.encoder.layer.0.attention.self.query`),
    without those named in `skip` (the classification head)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in skip}


@contextmanager
def input_hooks(layers: dict[str, torch.nn.Linear],
                collect: Callable[[str, torch.Tensor], None]) -> Iterator[Callable[[dict], None]]:
    """Call `collect(name, x)` with every linear layer's input rows, padding tokens left out.
    Yields `set_batch(batch)`, to be called before each forward pass so the hooks know the mask."""
    state: dict = {"mask": None}

    def hook(name):
        def run(_module, inputs, _output):
            x = inputs[0].detach()
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            collect(name, x.reshape(-1, x.shape[-1]).double())
        return run

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield lambda batch: state.__setitem__(
            "mask", batch["attention_mask"].bool() if "attention_mask" in batch else None)
    finally:
        for handle in handles:
            handle.remove()


def layer_input_means(model: torch.nn.Module, batches: Sequence[dict],
                      statistic: Callable[[torch.Tensor], torch.Tensor],
                      skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Per linear layer (by module name, the `skip`ped left out), the mean over the batches'
    tokens of `statistic(x)` summed over x's rows: x the layer's input rows (float64, padding
    left out) and `statistic` additive over rows, such as `x.T @ x` (Gram) or `x.pow(2).sum(0)`.
    The one hook loop behind LEWIS importances and RegMean's Grams."""
    layers = linear_layers(model, skip)
    device = next(model.parameters()).device
    # statistic of no rows: zeros of the statistic's shape (a layer no token reaches stays 0).
    # The sums stay on the model's device; the means come back on the CPU.
    sums = {name: statistic(torch.zeros(0, layer.in_features, dtype=torch.float64, device=device))
            for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def collect(name: str, x: torch.Tensor) -> None:
        sums[name] += statistic(x)
        counts[name] += x.shape[0]

    with input_hooks(layers, collect) as set_batch:
        run_batches(model, batches, set_batch)
    return {name: (total / max(counts[name], 1)).cpu() for name, total in sums.items()}


@torch.inference_mode()
def run_batches(model: torch.nn.Module, batches: Sequence[dict],
                before: Callable[[dict], None] | None = None) -> torch.Tensor:
    """The model's logits over all batches, concatenated (in batch order), on the CPU; batches
    move to the model's device."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        if before is not None:
            before(batch)
        out.append(model(**batch).logits.float().cpu())
    return torch.cat(out)


def base_as_classifier(sources: Sources, device: str = "cpu") -> torch.nn.Module:
    """The base's weights in the merged architecture; the final projection is 0 and a head layer
    the base lacks is the experts' mean (what the merge takes task vectors from)."""
    model = build_model(sources).to(device)
    state = model.state_dict()
    with torch.no_grad():
        for job in sources.jobs:
            if job.name in state:
                state[job.name].copy_(torch.zeros(job.shape) if job.head_role is not None
                                      else sources.reference(job))
    return model


def expert_classifier(checkpoint, device: str = "cpu") -> torch.nn.Module:
    """One expert as its own sequence classifier, on `device`."""
    # Lazy: transformers takes seconds to import and only the label-free steps need it here.
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar per expert load would drown the merge's own
    try:
        return AutoModelForSequenceClassification.from_pretrained(checkpoint.path).to(device).eval()
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def experts_logits(sources: Sources, batches: dict[str, list[dict]], progress: bool = False,
                   device: str = "cpu") -> dict[str, torch.Tensor]:
    """Each expert's logits on its task's batches, in the batches' order (their texts sorted by
    length), on the CPU (one expert in memory at a time, run on `device`)."""
    out = {}
    pairs = list(zip(sources.recipe.experts, sources.experts))
    for spec, checkpoint in tqdm(pairs, desc="experts on calibration texts", unit="expert",
                                 disable=not progress):
        model = expert_classifier(checkpoint, device)
        out[spec.task] = run_batches(model, batches[spec.task])
        del model
    return out


def experts_on_other_batches(sources: Sources, batches: dict[str, list[dict]],
                             progress: bool = False, device: str = "cpu", desc: str = "",
                             sample: Callable[[str], list[dict]] | None = None
                             ) -> dict[str, dict[str, torch.Tensor]]:
    """Each expert's logits on the texts its task does not read: expert's task -> the first task
    of each other list of batches -> logits, in the batches' order (one expert in memory at a
    time, run on `device`). Tasks that share one list of batches appear once; an expert whose
    task reads every list (one shared sample) is not run. `sample(task)`: the batches run in
    place of the task's own (a sample of its texts, `sample_batches`), asked once per task and
    only for a task some expert runs on."""
    firsts: dict[int, str] = {}
    for task, task_batches in batches.items():
        firsts.setdefault(id(task_batches), task)
    runs: dict[str, list[dict]] = {}

    def batches_of(task: str) -> list[dict]:
        if task not in runs:
            runs[task] = batches[task] if sample is None else sample(task)
        return runs[task]

    out: dict[str, dict[str, torch.Tensor]] = {}
    pairs = list(zip(sources.recipe.experts, sources.experts))
    for spec, checkpoint in tqdm(pairs, desc=desc or "experts on the other tasks' texts",
                                 unit="expert", disable=not progress):
        others = [task for key, task in firsts.items() if key != id(batches[spec.task])]
        out[spec.task] = {}
        if not others:
            continue
        model = expert_classifier(checkpoint, device)
        for task in others:
            out[spec.task][task] = run_batches(model, batches_of(task))
        del model
    return out


def spread_rows(count: int, limit: int) -> list[int]:
    """At most `limit` of `count` rows, every k-th from the first: rows in batch order (texts
    sorted by length), so the sample spans the texts' lengths."""
    return list(range(0, count, -(-count // limit))) if count > limit else list(range(count))


def sample_batches(calibrated, task: str, rows: list[int], spec) -> list[dict]:
    """Batches of the task's calibration texts at `rows` (positions in its batches' order),
    tokenised as `spec` (the recipe's calibration block) says."""
    texts = calibrated.calibration.texts[task]
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # as `tokenize` orders
    return tokenize(calibrated.tokenizer, [texts[by_length[r]] for r in rows], spec.max_length,
                    spec.batch_size)


def head_modules(sources: Sources) -> list[str]:
    """Module names of the final projection (left out of LEWIS and RegMean)."""
    return [sources.heads[0].weight.rsplit(".", 1)[0]]


def calibration_batches(sources: Sources, held_out: dict[str, list[str]] | None = None,
                        calibration: Calibration | None = None):
    """The recipe's calibration texts (read unless given), the tokenizer, and each task's texts
    tokenised into batches."""
    spec = sources.recipe.label_free.calibration
    if spec is None:
        raise Hm3Error("this needs unlabelled texts: add a `calibration:` block to the recipe, "
                       "e.g. `calibration: {texts: traffic.txt}` (every task reads it) or "
                       "`{texts: {TASK: texts.txt}}` (a file per task)")
    tasks = [e.task for e in sources.recipe.experts]
    if calibration is None:
        calibration = load_calibration(spec, tasks, held_out)
    tokenizer = load_tokenizer([sources.base.path, *(e.path for e in sources.experts)],
                               missing="no tokenizer found next to the base or the experts; "
                               "the label-free steps need one to run the calibration texts")
    # Tasks that read the very same texts (one shared sample) share one list of batches, so a
    # model that serves every task runs over them once (`once_per_batches`).
    batches: dict[str, list[dict]] = {}
    for task in tasks:
        same = next((other for other in batches
                     if calibration.texts[other] == calibration.texts[task]), None)
        batches[task] = (batches[same] if same is not None else
                         tokenize(tokenizer, calibration.texts[task], spec.max_length,
                                  spec.batch_size))
    return calibration, tokenizer, batches


def once_per_batches(batches: dict[str, list[dict]], run: Callable[[list[dict]], object]
                     ) -> dict[str, object]:
    """`run(batches[task])` for every task, computed once for tasks that share their batches."""
    done: dict[int, object] = {}
    for task_batches in batches.values():
        if id(task_batches) not in done:
            done[id(task_batches)] = run(task_batches)
    return {task: done[id(task_batches)] for task, task_batches in batches.items()}
