"""Classification heads: finding each expert's final projection, the task layout, HM3 expansion."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from hm3.errors import Hm3Error
from hm3.recipe import HeadNames

# Final projections, most specific first. Hidden head layers (RoBERTa/ELECTRA classifier.dense,
# DistilBERT pre_classifier, BERT/DeBERTa pooler, ModernBERT head) have equal shapes across
# experts and are merged like the body.
FINAL_PROJECTIONS = ("classifier.out_proj", "classifier", "score")
MULTI_LABEL = "multi_label_classification"


@dataclass(frozen=True)
class TaskGroup:
    """One task's slice of the merged logits: rows [offset, offset + len(labels))."""

    name: str
    labels: tuple[str, ...]
    offset: int
    multi_label: bool = False
    threshold: float = 0.5  # for multi-label tasks: a label is on when its sigmoid exceeds this

    @property
    def stop(self) -> int:
        return self.offset + len(self.labels)

    @property
    def logit_threshold(self) -> float:
        """`threshold` on the logit scale: a multi-label logit above it is a label that is on."""
        return math.log(self.threshold / (1 - self.threshold))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TaskGroup":
        return cls(name=data["name"], labels=tuple(data["labels"]), offset=int(data["offset"]),
                   multi_label=bool(data.get("multi_label", False)),
                   threshold=float(data.get("threshold", 0.5)))


def expert_labels(config: dict, source: str) -> tuple[str, ...]:
    """An expert's label names in id order, from its config.json."""
    id2label = config.get("id2label")
    if id2label:
        try:
            ordered = sorted(((int(i), str(name)) for i, name in id2label.items()))
        except ValueError:
            raise Hm3Error(f"{source}: config.json id2label has non-integer ids") from None
        if [i for i, _ in ordered] != list(range(len(ordered))):
            raise Hm3Error(f"{source}: config.json id2label ids must be 0..{len(ordered) - 1}")
        return tuple(name for _, name in ordered)
    count = int(config.get("num_labels", 2))
    return tuple(f"LABEL_{i}" for i in range(count))


def is_multi_label(config: dict) -> bool:
    return config.get("problem_type") == MULTI_LABEL


def layout(tasks: list[str], labels: list[tuple[str, ...]],
           multi_label: list[bool]) -> list[TaskGroup]:
    """Task groups laid end to end in expert order: o_i = sum of K_j for j < i."""
    groups, offset = [], 0
    for task, names, multi in zip(tasks, labels, multi_label):
        groups.append(TaskGroup(task, names, offset, multi))
        offset += len(names)
    return groups


def find_head(keys, shape_of, num_labels: int, source: str,
              override: HeadNames | None = None) -> HeadNames:
    """The final projection's tensor names: the override if given, else the first known name
    whose weight has one row per label."""
    if override is not None:
        for name in (override.weight, override.bias):
            if name is not None and name not in keys:
                raise Hm3Error(f"{source}: head tensor {name} named in the recipe does not exist")
        return override
    for prefix in FINAL_PROJECTIONS:
        weight = f"{prefix}.weight"
        if weight in keys and len(shape_of(weight)) == 2 and shape_of(weight)[0] == num_labels:
            bias = f"{prefix}.bias"
            return HeadNames(weight, bias if bias in keys else None)
    looked = ", ".join(f"{p}.weight" for p in FINAL_PROJECTIONS)
    raise Hm3Error(f"{source}: cannot find the classification head (looked for {looked} with "
                   f"{num_labels} rows); name it in the recipe, e.g. "
                   "`head: {weight: my_head.weight, bias: my_head.bias}`")


def expand_head(block: torch.Tensor, offset: int, total_rows: int) -> torch.Tensor:
    """HM3 expansion: a (total_rows, ...) tensor of zeros holding `block` at rows [offset, ...)."""
    expanded = torch.zeros((total_rows, *block.shape[1:]), dtype=block.dtype)
    expanded[offset:offset + block.shape[0]] = block
    return expanded
