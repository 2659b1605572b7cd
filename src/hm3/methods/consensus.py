"""TIES consensus: elect one sign per entry, keep only the task vectors that agree with it."""

from __future__ import annotations

from typing import Sequence

import torch


def elect_sign(weighted_deltas: Sequence[torch.Tensor], rule: str = "sum") -> torch.Tensor:
    """The elected sign (+1 or -1) per entry: of the summed deltas (`sum`) or of a sign vote
    (`count`).

    Takes the models' weighted deltas as a list (or stacked along dim 0). A tie (zero) elects +1,
    as mergekit does.
    """
    if rule not in ("sum", "count"):
        raise ValueError(f"unknown sign election rule {rule!r}; use 'sum' or 'count'")
    score = None
    for delta in weighted_deltas:  # in model order, one running sum: no stacked copy
        term = delta if rule == "sum" else delta.sign()
        score = term.clone() if score is None else score.add_(term)
    return (score >= 0).to(score.dtype) * 2 - 1


def agrees(weighted_delta: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """1 where one model's delta is non-zero and has the elected sign, else 0."""
    return (weighted_delta.sign() == elected).to(weighted_delta.dtype)


def agreement_mask(weighted_deltas: Sequence[torch.Tensor], rule: str = "sum") -> torch.Tensor:
    """`agrees` for every model, stacked along dim 0."""
    elected = elect_sign(weighted_deltas, rule)
    return torch.stack([agrees(delta, elected) for delta in weighted_deltas])
