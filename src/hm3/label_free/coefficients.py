"""`coefficients`: learned merge coefficients (AdaMerging-style; Yang et al. 2023,
"AdaMerging: Adaptive Model Merging for Multi-Task Learning", arXiv:2310.02575): one coefficient
per expert per transformer block scales that expert's share of the recipe method's merge,

    theta_block = base_block + sum_i lambda[i, block] * share_i,block,

fitted on unlabelled texts so that, on each task's texts, the merged model's probabilities for
that task's group match its expert's (KL to the expert, over that group only). All coefficients
start at 1 (the method's own merge) and stay clamped in [low, high]; heads are left as merged.
The step is the merge stage: it merges the body in place of the recipe method's plain merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from hm3.engine import Sources, TaskVectorSquares, is_embedding, job_inputs, merge_job
from hm3.errors import Hm3Error
from hm3.label_free.calibration import tokenize
from hm3.label_free.registry import Step, StepRun, finite, option, positive, positive_int
from hm3.label_free.stream import logit_kl
from hm3.methods import get_method


@dataclass(frozen=True)
class CoefficientsOptions:
    """Options of the `coefficients` step."""

    steps: int = option(40, positive_int, "Adam steps")
    lr: float = option(0.05, positive, "Adam's learning rate")
    low: float = option(0.0, finite, "the smallest coefficient")
    high: float = option(1.5, finite, "the largest coefficient")
    batch_size: int = option(16, positive_int, "texts per task in each step")


@dataclass
class CoefficientsReport:
    """What `coefficients` did: the blocks, each expert's coefficient per block, the KL to the
    experts before and after (on the first batch of every task), and the options it ran with."""

    blocks: list[str]
    coefficients: dict[str, list[float]]
    objective_before: float
    objective_after: float
    steps: int
    lr: float
    low: float
    high: float
    batch_size: int

    def summary(self) -> str:
        return (f"coefficients: {len(self.blocks)} blocks x {len(self.coefficients)} experts, "
                f"KL to the experts {self.objective_before:.4f} -> {self.objective_after:.4f}")


class Coefficients(Step):
    """AdaMerging-style coefficients fitted to the experts' outputs (merge stage)."""

    name = "coefficients"
    options = CoefficientsOptions
    report = CoefficientsReport
    stage = "merge"
    needs = ("expert_logits",)
    search_refusal = ("would be fitted again on every trial (minutes each); search without "
                      "them, then add them to the best recipe (best.json) and run `hm3 merge`")
    reference = "https://arxiv.org/abs/2310.02575"

    def validate(self, options: CoefficientsOptions) -> CoefficientsOptions:
        if not options.low < options.high:
            raise Hm3Error(f"coefficients: low ({options.low}) must be below high "
                           f"({options.high})")
        return options

    def check(self, sources: Sources, options: CoefficientsOptions) -> None:
        if get_method(sources.recipe.method).spectral:
            raise Hm3Error(f"coefficients scale each expert's share of the merge, and "
                           f"{sources.recipe.method} has none (it merges a weight matrix's task "
                           "vectors by their spectrum); use another method or drop "
                           "`coefficients`")

    def apply(self, run: StepRun, options: CoefficientsOptions) -> CoefficientsReport:
        sources, calibrated = run.sources, run.calibrated
        spec = sources.recipe.label_free.calibration
        tasks = [e.task for e in sources.recipe.experts]
        batches = {task: tokenize(calibrated.tokenizer, calibrated.calibration.texts[task],
                                  spec.max_length, options.batch_size) for task in tasks}
        # The experts' logits on the calibration texts, cut into the fit's batches (both keep the
        # texts' order).
        targets = {task: list(calibrated.expert_logits[task].split(options.batch_size))
                   for task in tasks}
        return CoefficientsReport(**fit_coefficients(run.model, sources, batches, targets,
                                                     options, run.progress, run.squares))

_BLOCK = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def block_of(name: str) -> str:
    """The transformer block a tensor belongs to: `layer.3`, `embeddings`, or `other`."""
    match = _BLOCK.search(f".{name}")
    if match:
        return f"layer.{int(match.group(1))}"
    return "embeddings" if is_embedding(name) else "other"


class CoefficientMerge:
    """The method's merge split into per-expert shares, with one coefficient per expert per
    block."""

    def __init__(self, model: torch.nn.Module, sources: Sources, progress: bool = False,
                 squares: TaskVectorSquares | None = None):
        method = get_method(sources.recipe.method)
        state = model.state_dict()
        device = next(model.parameters()).device  # the shares live where the model runs
        self.fixed: dict[str, torch.Tensor] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.shares: dict[str, list[torch.Tensor]] = {}
        for job in tqdm(sources.jobs, desc="merge shares", unit="tensor", disable=not progress):
            if job.name not in state:
                continue
            if not job.floating or job.head_role is not None:  # no coefficient: merged as is
                self.fixed[job.name] = merge_job(sources, job).to(device)
            else:
                base, deltas, weights = job_inputs(sources, job, squares)  # measured as a merge
                self.base[job.name] = base.to(device)
                self.shares[job.name] = [share.to(device) for share in method.contributions(
                    base, deltas, weights, sources.recipe.parameters)]
        self.blocks = sorted({block_of(name) for name in self.shares}, key=_block_order)
        self.index = {name: self.blocks.index(block_of(name)) for name in self.shares}
        self.experts = len(sources.experts)

    def parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the model for these coefficients (experts x blocks)."""
        out = dict(self.fixed)
        for name, shares in self.shares.items():
            column = coefficients[:, self.index[name]]
            merged = self.base[name]
            for i, share in enumerate(shares):
                merged = merged + column[i] * share
            out[name] = merged
        return out


def _block_order(block: str) -> tuple[int, int]:
    if block == "embeddings":
        return (0, 0)
    if block.startswith("layer."):
        return (1, int(block.split(".")[1]))
    return (2, 0)


def fit_coefficients(model: torch.nn.Module, sources: Sources, batches: dict[str, list[dict]],
                     targets: dict[str, list[torch.Tensor]], config: CoefficientsOptions,
                     progress: bool = False, squares: TaskVectorSquares | None = None) -> dict:
    """Fit the coefficients, write the merged weights into `model`, and return the table and
    the objective before and after (on the first batch of every task). With `squares`, adds
    each expert's task-vector size to it, as the method's merge would."""
    merge = CoefficientMerge(model, sources, progress, squares)
    groups = {g.name: g for g in sources.groups}
    tasks = list(batches)
    device = next(model.parameters()).device
    coefficients = torch.ones(merge.experts, len(merge.blocks), dtype=torch.float32,
                              device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=config.lr)

    def loss_on(step_batches: Sequence[tuple[str, int]]) -> torch.Tensor:
        params = merge.parameters(coefficients)
        losses = []
        for task, index in step_batches:
            batch = {key: value.to(device) for key, value in batches[task][index].items()}
            logits = functional_call(model, params, args=(), kwargs=batch).logits
            group = groups[task]
            losses.append(logit_kl(logits.float()[:, group.offset:group.stop],
                                   targets[task][index], None, group.multi_label))
        return torch.stack(losses).mean()

    probe = [(task, 0) for task in tasks]
    with torch.no_grad():
        before = float(loss_on(probe))
    bar = tqdm(range(config.steps), desc="coefficients", unit="step", disable=not progress)
    for step in bar:
        chosen = [(task, step % len(batches[task])) for task in tasks]
        optimizer.zero_grad()
        loss = loss_on(chosen)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            coefficients.clamp_(config.low, config.high)
        bar.set_postfix(kl=f"{loss.item():.4f}")
    with torch.no_grad():
        after = float(loss_on(probe))
        final = merge.parameters(coefficients)
        state = model.state_dict()
        for name, tensor in final.items():
            state[name].copy_(tensor)
    return {"blocks": merge.blocks,
            "coefficients": {spec.task: [round(float(v), 4) for v in row]
                             for spec, row in zip(sources.recipe.experts,
                                                  coefficients.detach().cpu())},
            "objective_before": round(before, 6), "objective_after": round(after, 6),
            **{k: v for k, v in config.__dict__.items()}}
