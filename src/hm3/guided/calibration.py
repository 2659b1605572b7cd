"""Unlabelled calibration texts, and running models over them with hooks on linear layers."""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from hm3.check import text_key
from hm3.errors import Hm3Error, Hm3Warning
from hm3.evaluate import FILE_TYPES, hub_texts, read_texts
from hm3.guided.config import CalibrationSpec


@dataclass
class Calibration:
    """Each task's unlabelled texts, and where they came from (for the merged model's report)."""

    texts: dict[str, list[str]]
    provenance: dict[str, dict]


def source_texts(source: dict) -> list[str]:
    """The texts of one calibration source: a local file, or a split of a Hugging Face dataset
    (`subset`, `split`, default "train"); labels are ignored either way."""
    path = Path(source["path"]).expanduser()
    if path.suffix.lower() in (".txt", *FILE_TYPES) or path.exists():
        if source.get("subset") or source.get("split"):
            raise Hm3Error(f"calibration {source['path']}: subset and split apply to Hugging Face "
                           "datasets only")
        return read_texts(path, source["text_column"])
    return hub_texts(source["path"], source.get("subset"), source.get("split") or "train",
                     source["text_column"])


def load_calibration(spec: CalibrationSpec, tasks: Sequence[str],
                     held_out: dict[str, Sequence[str]] | None = None) -> Calibration:
    """Read every task's calibration texts: its own source first, then the shared one (each
    source is read once), deduplicated, texts found in any held-out (validation / test) data
    removed, then the first `spec.limit` kept."""
    held = {text_key(t) for texts in (held_out or {}).values() for t in texts}
    cache: dict[str, list[str]] = {}

    def read(source: dict) -> list[str]:
        name = repr(sorted(source.items()))
        if name not in cache:
            cache[name] = source_texts(source)
        return cache[name]

    out, provenance = {}, {}
    for task in tasks:
        seen, kept, dropped, used = set(), [], 0, []
        for source in spec.sources_of(task):
            count = 0
            for text in read(source):
                if len(kept) == spec.limit:
                    break
                text = text.strip()
                key = text_key(text)
                if not key or key in seen:
                    continue
                seen.add(key)
                if key in held:
                    dropped += 1
                    continue
                kept.append(text)
                count += 1
            used.append({"path": source["path"], "shared": source is spec.shared,
                         "texts": count})
        if not kept:
            paths = " and ".join(s["path"] for s in spec.sources_of(task))
            raise Hm3Error(f"calibration texts of {task}: {paths} gave no usable texts "
                           "(empty, or every text is also in the held-out data)")
        if dropped:
            warnings.warn(f"calibration texts of {task}: {dropped} also appear in the held-out "
                          "(validation or test) data and were left out", Hm3Warning, stacklevel=2)
        out[task] = kept
        digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]
        provenance[task] = {"path": " + ".join(u["path"] for u in used if u["texts"]),
                            "sources": used, "texts": len(kept), "held_out_removed": dropped,
                            "sha256_16": digest}
    return Calibration(out, provenance)


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


def base_as_classifier(sources) -> torch.nn.Module:
    """The base's weights in the merged architecture; tensors the base lacks (the head) are 0."""
    from hm3.merge import build_model

    model = build_model(sources)
    state = model.state_dict()
    with torch.no_grad():
        for job in sources.jobs:
            if job.name in state:
                state[job.name].copy_(sources.base.tensor(job.base_name) if job.base_name
                                      else torch.zeros(job.shape))
    return model


def expert_classifier(checkpoint) -> torch.nn.Module:
    """One expert as its own sequence classifier."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar per expert load would drown the merge's own
    try:
        return AutoModelForSequenceClassification.from_pretrained(checkpoint.path).eval()
    finally:
        if was_enabled:
            logging.enable_progress_bar()
