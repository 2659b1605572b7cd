"""The merged multi-task classifier: one forward pass, then a softmax (or sigmoids) per task
group."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hm3.checkpoint import pickle_refused, read_config, resolve
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup, expert_labels, is_multi_label
from hm3.onnx_model import open_export


def group_probabilities(logits: np.ndarray, groups: Sequence[TaskGroup]) -> dict[str, np.ndarray]:
    """Per task, probabilities from its slice of the logits only: a softmax over the group for a
    single-label task (rows sum to 1), an independent sigmoid per label for a multi-label one."""
    out = {}
    for group in groups:
        z = logits[:, group.offset:group.stop].astype(np.float64)
        if group.multi_label:
            out[group.name] = 1.0 / (1.0 + np.exp(-z))
        else:
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            out[group.name] = e / e.sum(axis=1, keepdims=True)
    return out


def task_groups(config: dict, task: str | None, source: str) -> list[TaskGroup]:
    """The task layout of a model: its `hm3` block, or one task for a plain classifier."""
    block = config.get("hm3")
    if block:
        return [TaskGroup.from_dict(t) for t in block["tasks"]]
    labels = expert_labels(config, source)
    name = task or Path(source).name or "task"
    return [TaskGroup(name, labels, 0, is_multi_label(config))]


class MultiTaskClassifier:
    """A sequence classifier whose logits are split into task groups.

    Load with `hm3.load(path)`. Works for hm3-merged models and for any single Hugging Face
    classifier (then it has one task).
    """

    def __init__(self, model, tokenizer, groups: list[TaskGroup], max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.groups = groups
        self.max_length = max_length or _max_length(tokenizer, model.config)

    @property
    def tasks(self) -> list[str]:
        return [g.name for g in self.groups]

    def group(self, task: str) -> TaskGroup:
        for group in self.groups:
            if group.name == task:
                return group
        raise Hm3Error(f"this model has no task {task!r}; its tasks are {', '.join(self.tasks)}")

    @property
    def device(self) -> torch.device:
        return self.model.device  # a transformers model's, or the ONNX backend's (CPU)

    def encode(self, texts: Sequence[str]):
        """Tokenise a batch as the model expects (truncated to `max_length`, padded)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              padding=True, return_tensors="pt")

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many texts are longer than `max_length` tokens (and so get cut)."""
        ids = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        return sum(len(x) > self.max_length for x in ids)

    @torch.inference_mode()
    def logits(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Raw logits (n_texts, K); one string counts as a batch of one. Texts are batched by
        length, results come back in input order."""
        return self._run(texts, batch_size, embed=False)[0]

    @torch.inference_mode()
    def logits_and_embeddings(self, texts: Sequence[str], batch_size: int = 32
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits (n_texts, K) and, from the same forward pass, each text's embedding: the
        encoder's last hidden state averaged over its non-padding tokens (n_texts, hidden).
        PyTorch models only (an exported ONNX / OpenVINO model gives logits alone)."""
        if not isinstance(self.model, torch.nn.Module):
            raise Hm3Error("embeddings need the PyTorch model; give the merged or expert folder, "
                           "not an exported one")
        return self._run(texts, batch_size, embed=True)

    def _run(self, texts: str | Sequence[str], batch_size: int, embed: bool
             ) -> tuple[np.ndarray, np.ndarray | None]:
        texts, _ = as_texts(texts)
        if batch_size < 1:
            raise Hm3Error(f"batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.groups[-1].stop), dtype=np.float32)
        pooled = None
        for start in range(0, len(texts), batch_size):
            index = order[start:start + batch_size]
            batch = self.encode([texts[i] for i in index]).to(self.device)
            extra = {"output_hidden_states": True} if embed else {}
            result = self.model(**batch, **extra)
            out[index] = result.logits.float().cpu().numpy()
            if embed:
                mean = mean_pooled(result.hidden_states[-1], batch["attention_mask"])
                if pooled is None:
                    pooled = np.zeros((len(texts), mean.shape[-1]), dtype=np.float32)
                pooled[index] = mean.float().cpu().numpy()
        return out, pooled

    def predict_proba(self, texts: str | Sequence[str],
                      batch_size: int = 32) -> dict[str, np.ndarray]:
        """Per task, an (n_texts, K_task) array of probabilities (one string: one row)."""
        return group_probabilities(self.logits(texts, batch_size), self.groups)

    def predict(self, texts: str | Sequence[str], batch_size: int = 32,
                return_logits: bool = False,
                tasks: str | Sequence[str] | None = None) -> dict | list[dict]:
        """Each task's label(s) and probabilities for one text or for a list of texts.

        - `texts`: one string (gives one result, a dict) or a list of strings (a list of dicts,
        in input order).
        - `batch_size`: texts per forward pass.
        - `return_logits`: add the raw logits (all tasks') under "logits".
        - `tasks`: answer only these tasks, in this order (default: all), as the server's `tasks`.

        Returns {task: {"label", "probabilities"}} per text: for a single-label task "label" is
        the most probable label and "score" its probability; for a multi-label task "label" is
        the list of labels whose probability is over the task's threshold (possibly empty).
        """
        texts, single = as_texts(texts)
        groups = self._groups_asked(tasks)
        logits = self.logits(texts, batch_size)
        probs = group_probabilities(logits, groups)
        results = []
        for row in range(len(logits)):
            item: dict = {}
            for group in groups:
                p = probs[group.name][row]
                named = {label: round(float(v), 6) for label, v in zip(group.labels, p)}
                if group.multi_label:
                    item[group.name] = {"label": [lab for lab, v in zip(group.labels, p)
                                                  if v > group.threshold],
                                        "probabilities": named}
                else:
                    best = int(p.argmax())
                    item[group.name] = {"label": group.labels[best],
                                        "score": round(float(p[best]), 6),
                                        "probabilities": named}
            if return_logits:
                item["logits"] = [float(v) for v in logits[row]]
            results.append(item)
        return results[0] if single else results

    def _groups_asked(self, tasks: str | Sequence[str] | None) -> list[TaskGroup]:
        if tasks is None:
            return self.groups
        known = f"this model's tasks are {', '.join(self.tasks)}"
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        if not names:
            raise Hm3Error(f"tasks: expected at least one task name; {known}")
        for name in names:
            if not isinstance(name, str):
                raise Hm3Error(f"tasks: expected task names (strings), got {name!r}; {known}")
        unknown = [name for name in names if name not in self.tasks]
        if unknown:
            raise Hm3Error(f"tasks: unknown task(s) {', '.join(map(repr, unknown))}; {known}")
        return [self.group(name) for name in dict.fromkeys(names)]


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each text's hidden states (batch, tokens, d) averaged over its non-padding tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.inference_mode()
def embed_texts(path: str | Path, texts: Sequence[str], batch_size: int = 32,
                max_length: int | None = None, device: str | None = None,
                allow_pickle: bool = False) -> np.ndarray:
    """Each text's embedding by an encoder (e.g. the base model a merge started from): its last
    hidden state averaged over non-padding tokens, (n_texts, hidden).

    - `path`: directory or hub id of any transformers encoder (a classifier's head is unused).
    - `batch_size`, `max_length`, `device`, `allow_pickle`: as for `load`.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = resolve(str(path), None, allow_pickle)
    try:
        model = AutoModel.from_pretrained(folder, use_safetensors=None if allow_pickle
                                          else True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise Hm3Error(f"cannot load {path} as an encoder: {exc}") from None
    model.to(pick_device(device))
    texts = list(texts)
    limit = max_length or _max_length(tokenizer, model.config)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        index = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in index], truncation=True, max_length=limit,
                          padding=True, return_tensors="pt").to(model.device)
        out[index] = mean_pooled(model(**batch).last_hidden_state,
                                 batch["attention_mask"]).float().cpu().numpy()
    return out


def as_texts(texts: Any) -> tuple[list[str], bool]:
    """The texts as a list, and whether one string was given; anything but strings is refused
    by its index (a string is no list of its characters, bytes are not decoded for the caller)."""
    if isinstance(texts, str):
        return [texts], True
    if texts is None or isinstance(texts, (bytes, bytearray, Mapping)) or not isinstance(
            texts, Iterable):
        kind = "None" if texts is None else type(texts).__name__
        hint = "; decode it first" if isinstance(texts, (bytes, bytearray)) else ""
        raise Hm3Error(f"texts: expected a string or a list of strings, got {kind}{hint}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            if isinstance(text, (bytes, bytearray)):
                hint = "decode it first, e.g. text.decode('utf-8')"
            else:
                hint = "give every text as a str (drop missing ones, convert the others)"
            got = "None" if text is None else f"{type(text).__name__} {_short(text)}"
            raise Hm3Error(f"texts[{i}]: expected a string, got {got}; {hint}")
    return texts, False


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_device(device: str) -> str:
    """`device` as torch names it, checked before anything loads: a name torch knows, on a
    machine that has it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise Hm3Error(f"device {device!r} is not a device torch knows; use cpu, cuda or "
                       "cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise Hm3Error(f"device {device}: this machine has no CUDA GPU that torch can use "
                           f"(torch {torch.__version__}); leave --device out or use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise Hm3Error(f"device {device}: this machine has {torch.cuda.device_count()} CUDA "
                           f"GPU(s), numbered from 0")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise Hm3Error(f"device {device}: MPS is not available here; leave --device out or use "
                       "cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise Hm3Error(f"device {device!r}: hm3 runs on cpu, cuda or mps")
    return str(parsed)


def pick_device(device: str | None) -> str:
    """Where a model runs: `device` (checked, `check_device`) when given, else CUDA where this
    machine has it, else the CPU."""
    if device:
        return check_device(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(path: str | Path, task: str | None = None, device: str | None = None,
         revision: str | None = None, max_length: int | None = None,
         allow_pickle: bool = False, precision: str | None = None) -> MultiTaskClassifier:
    """Load a merged model (or any single HF sequence classifier) from a directory or hub id.

    An `hm3 export` folder loads too: it then runs on ONNX Runtime or OpenVINO (CPU).

    - `path`: directory or hub id of the model.
    - `task`: task name for a plain single-task classifier (default: the folder name).
    - `device`: "cpu", "cuda", ...; default: CUDA when available.
    - `max_length`: truncate texts to this many tokens (default: the tokenizer's maximum; for an
    export, the length it was exported for).
    - `allow_pickle`: load a model whose weights exist only as pickle `.bin` files (pickle can run
    arbitrary code, so this is refused by default, as in `hm3.merge`).
    - `precision`: for an OpenVINO export, "f32", "bf16" or "auto" (bf16 where the CPU has bf16
    units; `hm3.onnx_model.choose_precision`); default: what the export recorded, else auto.
    PyTorch models and ONNX exports compute in f32: "f32" and "auto" leave them so, "bf16" is
    refused.
    """
    # Lazy: transformers takes seconds to import; `import hm3` and `hm3 merge` do without it.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    device = pick_device(device)
    folder = resolve(str(path), revision, allow_pickle)
    exported = open_export(folder, precision)  # openvino_model.bin is no pickle
    if exported is None and precision == "bf16":
        raise Hm3Error(f"{path} is a PyTorch model, which hm3 runs in f32; bf16 is for OpenVINO "
                       f"exports (hm3 export {path} -o FOLDER --format openvino)")
    if (exported is None and not allow_pickle and not any(folder.glob("*.safetensors"))
            and any(folder.glob("*.bin"))):
        raise pickle_refused(str(path), "allow_pickle=True in Python")
    config = read_config(folder)
    groups = task_groups(config, task, str(path))
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a library call prints nothing of its own
    try:
        model = exported or AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=None if allow_pickle else True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise Hm3Error(f"cannot load {path} as a sequence classifier: {exc}") from None
    finally:
        if bars:
            logging.enable_progress_bar()
    if tokenizer.pad_token is None:  # decoder classifiers often have none; batching needs one
        tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None and max_length < 2:
        raise Hm3Error(f"max_length must be at least 2 tokens, got {max_length}")
    if exported is not None and max_length is None:  # int8 ranges were measured at this length
        max_length = exported.layout.get("max_length")
    return MultiTaskClassifier(model.to(device), tokenizer, groups, max_length)


def _max_length(tokenizer, config) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 100_000:
        return int(limit)
    return int(getattr(config, "max_position_embeddings", None) or 512)
