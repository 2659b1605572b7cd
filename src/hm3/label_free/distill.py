"""`distill`: the experts distilled into the merged body, block by block, without labels
(after ProDistill, Xu et al. 2025, arXiv 2502.12706).

For each transformer block in turn, the merged block is fed the merged model's OWN hidden states
(the output of the blocks already distilled) and trained so that its output matches each
expert's block output on that expert's calibration texts (the expert's own hidden states, its
blocks read from its files). The loss is the squared error over real tokens, relative to the
target's size, averaged over tasks so every task counts the same. Later blocks thus correct the
drift of earlier ones. What is trained, `train`:

- `weights`: a correction of every weight of the block, W = W_merged + s * U, with s the
  tensor's task-vector scale (so one learning rate fits every tensor) and `pull` decaying U
  toward 0, i.e. toward the merge;
- `elementwise` / `rows` / `tensor`: coefficients of the experts' task vectors, W = W_merged +
  sum_i c_i * tau_i, with c_i one per entry, per output row or per tensor (ProDistill trains
  the element-wise form from the task-arithmetic merge).

What the LAST block matches, `last`: the experts' hidden states as every other block
(`hidden`), or what the heads make of them (`logits`): the merged model's own tail (final norm,
pooler, each task's head, as merged) on the block's output against each expert's logits on its
texts (KL divergence; per label for a multi-label task) — the only part of the last block's
output a head reads; `both` adds the two losses.

With one shared calibration sample (every task reads the same texts), `route: confident` keeps,
for each task, the texts its expert is confident on (top probability >= `confidence`); `all`
distils every expert on every text.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hm3.label_free.registry import (
    Step,
    StepRun,
    fraction,
    non_negative,
    one_of,
    option,
    positive,
    positive_int,
)
from hm3.label_free.stream import (
    NOTHING_TO_CORRECT,
    BlockCall,
    block_from,
    block_output,
    blocks_replaced,
    find_blocks,
    first_block_calls,
    logit_kl,
    model_logits,
)

TRAIN = ("weights", "elementwise", "rows", "tensor")
ROUTES = ("confident", "all")
LAST = ("hidden", "logits", "both")
MIN_ROUTED = 16  # a task whose expert is confident on fewer texts keeps its most confident ones


@dataclass(frozen=True)
class DistillOptions:
    """Options of the `distill` step (see the module docstring)."""

    train: str = option("weights", one_of(*TRAIN), "what is trained per block")
    texts: int = option(64, positive_int, "calibration texts per task the step distils on")
    steps: int = option(24, positive_int, "optimiser steps per block")
    lr: float = option(0.02, positive, "Adam's learning rate (picked on validation, both zoos)")
    pull: float = option(0.0, non_negative, "weight decay of the correction toward the merge")
    batch_size: int = option(8, positive_int, "texts per task in each step")
    route: str = option("confident", one_of(*ROUTES), "shared sample: texts per teacher")
    confidence: float = option(0.9, fraction, "route: confident's threshold")
    last: str = option("logits", one_of(*LAST),
                       "the last block's target: the experts' logits through the merged tail "
                       "(picked on validation, both zoos), their hidden states, or both")


@dataclass
class DistillReport:
    """What `distill` did: per block, the tasks' mean relative error of the merged block's
    output against the experts' before and after its training (on each stream's first batch of
    the texts it trained on)."""

    train: str
    blocks: int
    texts: dict[str, int]
    error_before: list[float]
    error_after: list[float]
    seconds: float
    routed: dict[str, int] | None = None  # shared sample: texts each task's expert teaches
    logit_error: tuple[float, float] | None = None  # last: logits; the KL before and after

    def summary(self) -> str:
        texts = ", ".join(f"{task} {n}" for task, n in self.texts.items())
        line = (f"distill ({self.seconds:.0f}s): {self.blocks} blocks, train {self.train}; "
                f"relative error of the last block's output to the experts "
                f"{self.error_before[-1]:.4f} -> {self.error_after[-1]:.4f}; texts: {texts}")
        if self.logit_error:
            line += (f"; the heads' KL to the experts {self.logit_error[0]:.4f} -> "
                     f"{self.logit_error[1]:.4f}")
        if self.routed:
            line += "; routed to confident experts: " + ", ".join(
                f"{task} {n}" for task, n in self.routed.items())
        return line


@dataclass
class _Stream:
    """Texts read by one or more tasks (several when they share one sample), tokenised, and the
    merged model's hidden states on them."""

    tasks: list[str]
    texts: list[str]
    batches: list[dict]
    calls: list[BlockCall] = dataclasses.field(default_factory=list)
    hidden: list[torch.Tensor] = dataclasses.field(default_factory=list)


class Distill(Step):
    """The experts distilled into the merged body, block by block (body stage)."""

    name = "distill"
    options = DistillOptions
    report = DistillReport
    stage = "body"
    reference = "https://arxiv.org/abs/2502.12706"

    def apply(self, run: StepRun, options: DistillOptions) -> DistillReport:
        return distill_body(run.model, run.sources, run.calibrated, options, run.progress)


def distill_body(model: torch.nn.Module, sources, calibrated, options: DistillOptions,
                 progress: bool = False) -> DistillReport:
    """Distil every expert into `model`'s blocks, in place (see the module docstring).
    `sources`: the merge's opened inputs; `calibrated`: its calibration texts and tokenizer."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    prefix, blocks = find_blocks(model)
    groups = {group.name: group for group in sources.groups}
    tasks = list(groups)
    streams = _streams(calibrated, tasks, options, sources.recipe.label_free.calibration.max_length)
    stream_of = {task: stream for stream in streams for task in stream.tasks}
    model.eval()
    for stream in streams:
        stream.calls, _ = first_block_calls(model, blocks, stream.batches)
        stream.hidden = [call.hidden for call in stream.calls]
    # Each expert's own stream: its first block's calls, then its blocks one at a time.
    expert_calls, expert_hidden, token_weights, routed, expert_logits = {}, {}, {}, {}, {}
    by_logits = options.last != "hidden"
    for task, checkpoint in tqdm(list(zip(tasks, sources.experts)), desc="distill: experts",
                                 unit="expert", disable=not progress):
        stream = stream_of[task]
        shared = len(stream.tasks) > 1
        expert = _load_expert(checkpoint, device)
        _, expert_blocks = find_blocks(expert)
        calls, logits = first_block_calls(expert, expert_blocks, stream.batches,
                                          run_whole=shared or by_logits)
        del expert
        expert_calls[task] = calls
        expert_hidden[task] = [call.hidden for call in calls]
        keep = (_routed(logits, groups[task].multi_label, options.confidence)
                if shared and options.route == "confident" else None)
        if keep is not None:
            routed[task] = int(keep.sum())
        token_weights[task] = _token_weights(calls, keep)
        if by_logits:
            expert_logits[task] = list(logits.split([len(call.mask) for call in calls]))
    jobs = {job.name: job for job in sources.jobs}
    before, after, logit_error = [], [], None
    for index in tqdm(range(len(blocks)), desc="distill: blocks", unit="block",
                      disable=not progress):
        block, name = blocks[index], f"{prefix}.{index}"
        targets = {}
        with torch.no_grad():
            for task, checkpoint in zip(tasks, sources.experts):
                expert_block = block_from(block, name, checkpoint).to(device)
                targets[task] = [block_output(expert_block, call, hidden) for call, hidden
                                 in zip(expert_calls[task], expert_hidden[task])]
                del expert_block
        scales = {task: _target_scale(targets[task], token_weights[task]) for task in tasks}
        correction = _Correction(block, name, sources, jobs, options, device)
        before.append(_error(block, streams, targets, token_weights, scales, correction.weights()))
        tail = None
        if by_logits and index == len(blocks) - 1:
            tail = _Tail(model, prefix, block, groups, expert_logits, token_weights)
            start_kl = tail.error(streams, correction.weights())
        optimiser = torch.optim.AdamW(correction.parameters, lr=options.lr,
                                      weight_decay=options.pull)
        # Nothing to correct (the merged block already gives the experts' outputs, e.g. one
        # expert merged into itself): Adam would rescale a gradient of rounding noise into
        # steps of its full learning rate, so the block is left as merged.
        if tail is None:
            start = before[-1]
        else:
            start = start_kl + (before[-1] if options.last == "both" else 0.0)
        for step in range(options.steps if start >= NOTHING_TO_CORRECT else 0):
            weights = correction.weights()
            loss = torch.zeros((), device=device)
            for stream in streams:
                b = step % len(stream.batches)
                if tail is not None:
                    loss = loss + tail.loss(stream, b, weights) / len(tasks)
                    if options.last == "logits":
                        continue
                out = block_output(block, stream.calls[b], stream.hidden[b], weights)
                for task in stream.tasks:
                    loss = loss + _loss(out, targets[task][b], token_weights[task][b],
                                        scales[task]) / len(tasks)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if tail is not None:
                model.zero_grad(set_to_none=True)  # the tail's own weights are not trained
        final = {key: value.detach() for key, value in correction.weights().items()}
        after.append(_error(block, streams, targets, token_weights, scales, final))
        if tail is not None:
            logit_error = (round(start_kl, 6), round(tail.error(streams, final), 6))
        with torch.no_grad():
            for key, parameter in block.named_parameters():
                parameter.copy_(final[key])
            for stream in streams:
                stream.hidden = [block_output(block, call, hidden)
                                 for call, hidden in zip(stream.calls, stream.hidden)]
        for task in tasks:
            expert_hidden[task] = targets[task]
    return DistillReport(options.train, len(blocks),
                         {task: len(stream_of[task].texts) for task in tasks},
                         [round(e, 6) for e in before], [round(e, 6) for e in after],
                         round(time.perf_counter() - started, 1), routed or None, logit_error)


class _Tail:
    """The merged model after its blocks, read on the last block's output: each task's logits
    against its expert's, over the texts that count for the task."""

    def __init__(self, model, prefix: str, block, groups: dict, expert_logits: dict,
                 token_weights: dict) -> None:
        self.model, self.prefix, self.block = model, prefix, block
        self.groups, self.expert_logits = groups, expert_logits
        self.rows = {task: [w.sum(-1) > 0 for w in weights]
                     for task, weights in token_weights.items()}

    def loss(self, stream: _Stream, b: int, weights: dict) -> torch.Tensor:
        """The sum over the stream's tasks of their mean KL on batch `b`."""
        raw = block_output(self.block, stream.calls[b], stream.hidden[b], weights, whole=True)
        with blocks_replaced(self.model, self.prefix, raw):
            logits = model_logits(self.model, stream.batches[b])
        total = torch.zeros((), device=logits.device)
        for task in stream.tasks:
            group = self.groups[task]
            total = total + logit_kl(logits[:, group.offset:group.stop],
                                self.expert_logits[task][b], self.rows[task][b],
                                group.multi_label)
        return total

    @torch.no_grad()
    def error(self, streams: list[_Stream], weights: dict) -> float:
        """The tasks' mean KL on each stream's first batch (as `_error`)."""
        kls = [float(self.loss(stream, 0, weights)) / len(stream.tasks) for stream in streams]
        return sum(kls) / len(kls)


class _Correction:
    """The trainable part of one block: W = W_merged + s * U (`weights`) or W_merged + sum_i
    c_i * tau_i (the coefficient forms), every parameter of the block."""

    def __init__(self, block: torch.nn.Module, name: str, sources, jobs: dict, options,
                 device) -> None:
        self.train = options.train
        self.merged = {key: p.detach().clone() for key, p in block.named_parameters()}
        self.parameters: list[torch.Tensor] = []
        self.terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for key, merged in self.merged.items():
            vectors = _task_vectors(f"{name}.{key}", sources, jobs, device)
            if self.train == "weights":
                scale = torch.stack([tau.pow(2).mean() for tau in vectors]).mean().sqrt()
                shapes = [(scale if float(scale) > 0 else merged.abs().mean() + 1e-8,
                           merged.shape)]
            else:
                shapes = [(tau, _coefficient_shape(merged.shape, self.train)) for tau in vectors]
            self.terms[key] = []
            for direction, shape in shapes:
                coefficient = torch.zeros(shape, device=device, requires_grad=True)
                self.parameters.append(coefficient)
                self.terms[key].append((direction, coefficient))

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, merged in self.merged.items():
            value = merged
            for direction, coefficient in self.terms[key]:
                value = value + direction * coefficient
            out[key] = value
        return out


def _coefficient_shape(shape: torch.Size, train: str) -> tuple[int, ...]:
    if train == "elementwise":
        return tuple(shape)
    if train == "rows":
        return (shape[0], *([1] * (len(shape) - 1)))
    return ()


def _task_vectors(name: str, sources, jobs: dict, device) -> list[torch.Tensor]:
    job = jobs.get(name)
    base = sources.reference(job) if job is not None else None
    vectors = []
    for checkpoint in sources.experts:
        theta = checkpoint.tensor(name).float()
        vectors.append((theta - base if base is not None else theta).to(device))
    return vectors


def _streams(calibrated, tasks: list[str], options: DistillOptions, max_length: int
             ) -> list[_Stream]:
    """Tasks grouped by the texts they read; each group's texts thinned to `texts` per task
    (evenly over the list), tokenised into batches of `batch_size` per task, by length."""
    streams: list[_Stream] = []
    for task in tasks:
        texts = calibrated.calibration.texts[task]
        same = next((s for s in streams if calibrated.calibration.texts[s.tasks[0]] == texts),
                    None)
        if same is not None:
            same.tasks.append(task)
        else:
            streams.append(_Stream([task], list(texts), []))
    for stream in streams:
        wanted = options.texts * len(stream.tasks)
        texts = stream.texts
        if len(texts) > wanted:
            texts = [texts[i * len(texts) // wanted] for i in range(wanted)]
        texts = sorted(texts, key=len)
        size = options.batch_size * len(stream.tasks)
        stream.texts = texts
        stream.batches = [dict(calibrated.tokenizer(texts[i:i + size], truncation=True,
                                                    max_length=max_length, padding=True,
                                                    return_tensors="pt"))
                          for i in range(0, len(texts), size)]
    return streams


def _load_expert(checkpoint, device) -> torch.nn.Module:
    # Lazy: transformers takes seconds to import, and a recipe is read without it.
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return AutoModelForSequenceClassification.from_pretrained(checkpoint.path).to(
            device).eval()
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _routed(logits: torch.Tensor, multi_label: bool, threshold: float) -> torch.Tensor:
    """Texts (bool, in batch order) on which the expert is confident: top probability at or
    above `threshold` (each label's on/off probability, for a multi-label expert); at least the
    MIN_ROUTED most confident."""
    if multi_label:
        p = torch.sigmoid(logits)
        confidence = torch.maximum(p, 1 - p).min(dim=1).values
    else:
        confidence = torch.softmax(logits, dim=1).max(dim=1).values
    keep = confidence >= threshold
    if int(keep.sum()) < min(MIN_ROUTED, len(keep)):
        keep[confidence.topk(min(MIN_ROUTED, len(keep))).indices] = True
    return keep


def _token_weights(calls: list[BlockCall], keep: torch.Tensor | None) -> list[torch.Tensor]:
    """Per batch, each token's weight in the loss: 1 for real tokens of kept texts, else 0."""
    weights, start = [], 0
    for call in calls:
        w = call.mask.float()
        if keep is not None:
            w = w * keep[start:start + len(w)].to(w.device, torch.float32)[:, None]
        start += len(w)
        weights.append(w)
    return weights


def _target_scale(targets: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    """Mean squared entry of the targets over the tokens that count."""
    total = sum(float((y.pow(2).sum(-1) * w).sum()) for y, w in zip(targets, weights))
    count = sum(float(w.sum()) for w in weights) * targets[0].shape[-1]
    return max(total / max(count, 1.0), 1e-12)


def _loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: float
          ) -> torch.Tensor:
    """Squared error over the tokens that count, relative to the target's mean square."""
    total = weight.sum()
    if float(total) == 0:
        return out.sum() * 0
    return ((out - target).pow(2).mean(-1) * weight).sum() / (total * scale)


@torch.no_grad()
def _error(block, streams, targets, weights, scales, block_weights) -> float:
    """The tasks' mean relative error of the block (with `block_weights`) on each stream's first
    batch (a cheap, fixed sample: the same texts before and after training)."""
    errors = {}
    for stream in streams:
        out = block_output(block, stream.calls[0], stream.hidden[0], block_weights)
        for task in stream.tasks:
            w = weights[task][0]
            if float(w.sum()) > 0:
                errors[task] = float(_loss(out, targets[task][0], w, scales[task]))
    return sum(errors.values()) / max(len(errors), 1)
