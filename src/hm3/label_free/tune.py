"""`tune`: the merged model trained end to end so that every task's logits match its expert's on
that task's calibration texts, after the head steps; the head steps then run again on the tuned
body (joint stage).

`distill` matches each block's output to the experts' block outputs, one block at a time; what
the tasks read, though, is only the logits. Here the last `blocks` blocks (0: every block) and
everything after them (final norm, pooler, every task's head) are trained together by Adam on
the KL divergence from each expert's logits to the merged model's logits for that expert's task
(per label for a multi-label task), every task weighted the same: each step takes one batch of
every task's calibration texts, in turn. Tasks that read one shared sample are all taught on
every text of it (one forward pass for all of them). The embeddings are not trained.

With `teach: all` every expert teaches on every task's calibration texts, not only its own: the
experts run once more over the other tasks' texts, and each step's batch of a task's texts is
matched to every expert's logits on it. A merge should reproduce each expert on any text, and
the other tasks' texts multiply what each expert teaches on; on the MiniLM zoo, though, it
scored 0.3 points under `own` on validation, on the MPNet zoo about 0.3 over it (RESULTS.md
§10): a tie, so `own`, the cheaper, is the default.

Training many weights on a few hundred texts per task can fit those texts rather than the task,
so the defaults are small steps (lr 1e-5) for few steps (48), picked on validation
(benchmarks/RESULTS.md §10, where the measurements on both zoos are).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import accumulate

import torch
from tqdm.auto import tqdm

from hm3.label_free.calibration import experts_on_other_batches
from hm3.label_free.registry import (
    Step,
    StepRun,
    non_negative_int,
    one_of,
    option,
    positive,
    positive_int,
)
from hm3.label_free.stream import NOTHING_TO_CORRECT, find_blocks, logit_kl, model_logits


@dataclass(frozen=True)
class TuneOptions:
    """Options of the `tune` step (see the module docstring)."""

    steps: int = option(48, positive_int, "optimiser steps; each takes one batch of every task")
    lr: float = option(1e-5, positive, "Adam's learning rate")
    blocks: int = option(0, non_negative_int,
                         "the last N blocks trained with the heads (0: every block)")
    teach: str = option("own", one_of("own", "all"),
                        "whose texts each expert teaches on: its task's own (own) or every "
                        "task's (all; the experts run over the others' texts first)")


@dataclass
class TuneReport:
    """What `tune` did: the blocks and steps trained, and the tasks' mean KL from the experts'
    logits to the merged model's, on the first calibration batch of every task, before and
    after (the head steps then run again)."""

    blocks: int
    steps: int
    parameters: int  # trained weights
    kl_before: float
    kl_after: float
    seconds: float

    def summary(self) -> str:
        return (f"tune ({self.seconds:.0f}s): {self.blocks} blocks and the heads "
                f"({self.parameters / 1e6:.1f}M weights), {self.steps} steps; the tasks' KL to "
                f"the experts {self.kl_before:.4f} -> {self.kl_after:.4f} (first batch of each "
                f"task's texts)")


class Tune(Step):
    """The whole merged model trained on the experts' logits (joint stage, after the heads)."""

    name = "tune"
    options = TuneOptions
    report = TuneReport
    stage = "joint"
    needs = ("expert_logits",)

    def apply(self, run: StepRun, options: TuneOptions) -> TuneReport:
        return tune_model(run.model, run.sources, run.calibrated, options, run.progress)


@dataclass
class _Stream:
    """Calibration batches, the tasks taught on them with their experts' logits on every text,
    and where each batch's texts are in those logits."""

    tasks: list
    batches: list[dict]
    offsets: list[int]
    targets: dict[str, torch.Tensor]


def tune_model(model: torch.nn.Module, sources, calibrated, options: TuneOptions,
               progress: bool = False) -> TuneReport:
    """Train `model` in place (see the module docstring). `sources`: the merge's experts and
    task groups; `calibrated`: the calibration batches and the experts' logits on them."""
    started = time.perf_counter()
    groups = sources.groups
    streams = _streams(groups, calibrated.batches, calibrated.expert_logits)
    if options.teach == "all":
        streams = _taught_by_all(streams, sources, calibrated.device, progress)
    stack = find_blocks(model)[1]
    blocks = len(stack) if options.blocks == 0 else min(options.blocks, len(stack))
    trained = trained_parameters(model, blocks)
    weight = sum(len(s.tasks) for s in streams)  # every (task, text) pair counts the same

    def loss(stream: _Stream, index: int) -> torch.Tensor:
        logits = model_logits(model, stream.batches[index])
        rows = slice(stream.offsets[index], stream.offsets[index + 1])
        return sum(logit_kl(logits[:, g.offset:g.stop], stream.targets[g.name][rows], None,
                            g.multi_label) for g in stream.tasks)

    def first_batches_kl() -> float:
        with torch.no_grad():
            return float(sum(loss(s, 0) for s in streams)) / weight

    was_training = model.training
    model.eval()  # no dropout: the experts' logits were taken without it
    before = first_batches_kl()
    steps = options.steps if before >= NOTHING_TO_CORRECT else 0
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trained, lr=options.lr)
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="tune", unit="step", disable=not progress):
                optimiser.zero_grad()
                for stream in streams:  # gradients add up over the tasks, one graph at a time
                    (loss(stream, step % len(stream.batches)) / weight).backward()
                optimiser.step()
    finally:
        for p, grad in frozen.items():
            p.requires_grad_(grad)
            p.grad = None
        model.train(was_training)
    after = first_batches_kl() if steps else before
    return TuneReport(blocks, steps, sum(p.numel() for p in trained), before, after,
                      round(time.perf_counter() - started, 1))


def trained_parameters(model: torch.nn.Module, blocks: int) -> list[torch.nn.Parameter]:
    """The last `blocks` blocks' parameters and every parameter the model registers after its
    blocks (final norm, pooler, heads; relative-position tables that every block reads): not
    the embeddings, which come before."""
    prefix, stack = find_blocks(model)
    first = len(stack) - blocks
    kept = {f"{prefix}.{i}." for i in range(first, len(stack))}
    out, past_blocks = [], False
    for name, parameter in model.named_parameters():
        in_blocks = name.startswith(f"{prefix}.")
        past_blocks = past_blocks or in_blocks
        if (in_blocks and any(name.startswith(k) for k in kept)) or \
                (past_blocks and not in_blocks):
            out.append(parameter)
    return out


def _streams(groups, batches: dict[str, list[dict]], logits: dict[str, torch.Tensor]
             ) -> list[_Stream]:
    """One stream per list of batches (tasks that share one sample share a stream)."""
    streams: list[_Stream] = []
    for group in groups:
        same = next((s for s in streams if s.batches is batches[group.name]), None)
        if same is None:
            sizes = [len(b["input_ids"]) for b in batches[group.name]]
            same = _Stream([], batches[group.name], [0, *accumulate(sizes)], {})
            streams.append(same)
        same.tasks.append(group)
        same.targets[group.name] = logits[group.name]
    return streams


def _taught_by_all(streams: list[_Stream], sources, device: str, progress: bool
                   ) -> list[_Stream]:
    """The streams with every task taught on each: each expert run (one in memory at a time)
    over the streams its task does not read."""
    names = [g.name for g in sources.groups]
    if all(name in s.targets for s in streams for name in names):
        return streams
    batches = {g.name: s.batches for s in streams for g in s.tasks}
    others = experts_on_other_batches(sources, batches, progress, device,
                                      "tune: experts on the other tasks' texts")
    out = [_Stream(list(sources.groups), s.batches, s.offsets, dict(s.targets)) for s in streams]
    for stream in out:
        first = next(name for name in names if batches[name] is stream.batches)
        for name in names:
            if name not in stream.targets:
                stream.targets[name] = others[name][first]
    return out
