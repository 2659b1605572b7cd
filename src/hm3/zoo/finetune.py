"""Fine-tune a sequence classifier from the base encoder with a plain, seeded PyTorch loop."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as transformers_logging

from hm3.heads import MULTI_LABEL
from hm3.zoo.splits import Example


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of one fine-tuning run (AdamW, linear warmup then linear decay)."""

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 64
    # Weight the loss by inverse class frequency so that rare classes (TREC's ABBR is 1.6%) are
    # learned from few examples: the experts are judged by macro-F1.
    balance_classes: bool = True
    seed: int = 0


def finetune(
    base: Path,
    train: Sequence[Example],
    labels: Sequence[str],
    config: TrainingConfig,
    *,
    progress: bool = True,
    description: str = "fine-tune",
    multi_label: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Fine-tune the whole base encoder plus a new classification head on `train`.

    - `base`: directory of the base encoder (any BERT-like checkpoint with a tokenizer).
    - `train`: (text, label name) pairs; every label must be in `labels`. For a multi-label task
    each label is a tuple of names (possibly empty).
    - `labels`: label names in head order.
    - `config`: hyperparameters and seed; on one machine, the same config and data give the same
    model.
    - `multi_label`: train one sigmoid per label (binary cross-entropy) and save the model with
    `problem_type: multi_label_classification`; else one softmax over the labels.
    - `device`: where to train; the model comes back on the CPU.

    Returns (model in eval mode, its tokenizer), ready for `save_pretrained`.
    """
    label_ids = {label: index for index, label in enumerate(labels)}
    torch.manual_seed(config.seed)  # seeds the new head's initialisation and dropout
    tokenizer = AutoTokenizer.from_pretrained(base)
    # its load report would only say that the new head is new
    with _transformers_warnings_silenced():
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label_ids,
            problem_type=MULTI_LABEL if multi_label else "single_label_classification",
        )
    model.to(device)
    texts = [text for text, _ in train]
    if multi_label:
        targets = torch.zeros(len(train), len(labels))
        for row, (_, names) in enumerate(train):
            targets[row, [label_ids[name] for name in names]] = 1.0
        weights = _positive_weights(targets) if config.balance_classes else None
    else:
        targets = torch.tensor([label_ids[label] for _, label in train])
        weights = _balanced_class_weights(targets, len(labels)) if config.balance_classes else None
    targets = targets.to(device)
    weights = None if weights is None else weights.to(device)

    total_steps = config.epochs * math.ceil(len(texts) / config.batch_size)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay),
                                  lr=config.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps),
                                               total_steps)
    batch_order = torch.Generator().manual_seed(config.seed)

    model.train()
    with tqdm(total=total_steps, desc=description, disable=not progress) as bar:
        for _ in range(config.epochs):
            for batch in torch.randperm(len(texts), generator=batch_order).split(config.batch_size):
                inputs = _encode(tokenizer, [texts[i] for i in batch], config.max_length).to(device)
                logits = model(**inputs).logits
                if multi_label:
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        logits, targets[batch], pos_weight=weights)
                else:
                    loss = torch.nn.functional.cross_entropy(logits, targets[batch], weight=weights)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model.cpu(), tokenizer


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict:
    # Padding to the longest text in the batch, not to max_length, halves the cost of short texts.
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt")


@contextmanager
def _transformers_warnings_silenced() -> Iterator[None]:
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def _balanced_class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    # sklearn's "balanced" weights: every class carries the same total weight.
    counts = torch.bincount(targets, minlength=n_classes).clamp(min=1)
    return len(targets) / (n_classes * counts.float())


def _positive_weights(targets: torch.Tensor) -> torch.Tensor:
    # Per label, negatives / positives: a rare label's few positives weigh as much as its negatives.
    positives = targets.sum(dim=0).clamp(min=1)
    return (len(targets) - positives) / positives


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # As in BERT's recipe: no weight decay on biases and LayerNorm gains.
    decayed, exempt = [], []
    for name, parameter in model.named_parameters():
        (exempt if name.endswith("bias") or "LayerNorm" in name else decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": exempt, "weight_decay": 0.0}]
