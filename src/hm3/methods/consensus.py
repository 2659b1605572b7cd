"""TIES consensus: elect one sign per entry, keep only the task vectors that agree with it."""

from __future__ import annotations

import torch


def elect_sign(weighted_deltas: torch.Tensor, rule: str = "sum") -> torch.Tensor:
    """The elected sign (+1 or -1) per entry: of the summed deltas (`sum`) or of a sign vote (`count`).

    A tie (zero) elects +1, as mergekit does.
    """
    if rule == "sum":
        score = weighted_deltas.sum(dim=0)
    elif rule == "count":
        score = weighted_deltas.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown sign election rule {rule!r}; use 'sum' or 'count'")
    return (score >= 0).to(weighted_deltas.dtype) * 2 - 1


def agreement_mask(weighted_deltas: torch.Tensor, rule: str = "sum") -> torch.Tensor:
    """1 where a model's delta is non-zero and has the elected sign, else 0 (shape of the input)."""
    return (weighted_deltas.sign() == elect_sign(weighted_deltas, rule)).to(weighted_deltas.dtype)
