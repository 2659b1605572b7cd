"""The merged model's files: safetensors shards streamed from the merge (or from a model in
memory), config.json relabelled as one K-label model with its `hm3` block, the model card and
the tokenizer; and the same architecture as an (empty) model in memory."""

from __future__ import annotations

import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch

from hm3 import __version__
from hm3.card import write_card
from hm3.checkpoint import TOKENIZER_FILES, TORCH_DTYPES, ShardedWriter, write_json_atomic
from hm3.engine.plan import TensorJob
from hm3.engine.sources import Sources
from hm3.engine.stream import TaskVectorSquares, merged_tensors, task_vector_norms
from hm3.errors import Hm3Warning
from hm3.heads import MULTI_LABEL
from hm3.recipe import Recipe

# A fine-tune moves its weights by a few percent; this much suggests another base.
IMPLAUSIBLE_TASK_VECTOR = 0.5
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_model(sources: Sources, folder: Path,
                tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                notes: dict | None = None, progress: bool = False,
                squares: TaskVectorSquares | None = None) -> dict[str, float]:
    """Write a merged model into `folder` (an empty folder, e.g. an `atomic_directory`):
    safetensors shards streamed from `tensors` (default: `merged_tensors`, merging as it
    writes), config.json with the `hm3` block (plus `notes`), the tokenizer files. Returns each
    expert's relative task-vector norm, from `squares`: those the merge that made `tensors`
    filled (none recorded without them), or, merging here, those this merge measures."""
    recipe = sources.recipe
    out_dtypes = {job.name: _output_dtype(recipe, sources, job) for job in sources.jobs}
    if tensors is None:
        if squares is None:
            squares = TaskVectorSquares.zeros(len(sources.experts))
        tensors = merged_tensors(sources, progress=progress, squares=squares)
    writer = ShardedWriter(folder, {job.name: (job.shape, out_dtypes[job.name])
                                    for job in sources.jobs}, recipe.max_shard_size)
    # Each tensor is written by a second thread while the next one is merged: a file write
    # releases the GIL, so on two cores the copy into the page cache and the merge overlap.
    # Memory holds the tensor being written and the one being merged.
    with ThreadPoolExecutor(max_workers=1) as background:
        writing = None
        for name, tensor in tensors:
            tensor = tensor.to(out_dtypes[name])
            if writing is not None:
                writing.result()
            writing = background.submit(writer.write, name, tensor)
            del tensor
        if writing is not None:
            writing.result()
    writer.close()
    norms = task_vector_norms(sources, squares) if squares is not None else {}
    config = merged_config(sources, out_dtypes, norms)
    config["hm3"].update(notes or {})
    write_json_atomic(folder / "config.json", config)
    write_card(folder, config)
    _copy_tokenizer(sources, folder)
    return norms


def warn_implausible(norms: dict[str, float]) -> None:
    """A warning for each expert that moved too far from the base to be fine-tuned from it."""
    for task, norm in norms.items():
        if norm > IMPLAUSIBLE_TASK_VECTOR:
            warnings.warn(f"expert {task}'s weights differ from the base by {norm:.0%} of the "
                          "base's norm; it was probably not fine-tuned from this base",
                          Hm3Warning, stacklevel=3)


def build_model(sources: Sources):
    """An (uninitialised) model of the merged architecture and labels, to `merge_into`."""
    # Lazy: transformers takes seconds to import; a merge to disk never needs it.
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = merged_config(sources, {}, {})
    config.pop("hm3")
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForSequenceClassification.from_config(config).eval()


def merged_config(sources: Sources, out_dtypes: dict[str, torch.dtype],
                  norms: dict[str, float]) -> dict:
    """The first expert's config, relabelled as one K-label model with an `hm3` block."""
    recipe = sources.recipe
    config = dict(sources.experts[0].config)
    for key in ("num_labels", "_name_or_path", "torch_dtype"):
        config.pop(key, None)
    names = [f"{g.name}/{label}" for g in sources.groups for label in g.labels]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    kinds = {g.multi_label for g in sources.groups}
    if kinds == {True}:
        config["problem_type"] = MULTI_LABEL
    elif kinds == {False}:
        config["problem_type"] = "single_label_classification"
    else:
        config.pop("problem_type", None)  # mixed: no single loss fits; hm3 reads the groups
    float_dtypes = {str(d).removeprefix("torch.") for d in out_dtypes.values()
                    if d.is_floating_point}
    if len(float_dtypes) == 1:
        config["dtype"] = float_dtypes.pop()
    config["hm3"] = {
        "version": __version__,
        "tasks": [g.to_dict() for g in sources.groups],
        "sources": [{"task": e.task, "model": e.model} for e in recipe.experts],
        "base": recipe.base,
        "method": recipe.method,
        "parameters": recipe.parameters,
        "seed": recipe.seed,
        "recipe": recipe.to_dict(),
        "task_vector_norms": {k: round(v, 6) for k, v in norms.items()},
    }
    return config


def _output_dtype(recipe: Recipe, sources: Sources, job: TensorJob) -> torch.dtype:
    stored = TORCH_DTYPES[sources.experts[0].dtype(job.name)]
    if not job.floating:
        return stored
    if recipe.dtype:
        return _DTYPES[recipe.dtype]
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float32


def _copy_tokenizer(sources: Sources, folder: Path) -> None:
    for root in (sources.base.path, sources.experts[0].path):
        present = [name for name in TOKENIZER_FILES if (root / name).is_file()]
        if present:
            for name in present:
                shutil.copyfile(root / name, folder / name)
            return
