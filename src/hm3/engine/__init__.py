"""The merge engine, in the order a merge runs (after mergekit's io / plan / merge split):

    sources.py   open the base and the experts, check they fit together (`open_sources`)
    plan.py      one `TensorJob` per output tensor: its inputs, its shape, its head role
    stream.py    per job: read -> task vectors -> sparsify -> expand head -> the method's kernel
                 (`hm3.methods`), one tensor at a time, into a writer or a model in memory
    write.py     sharded safetensors, config.json with the `hm3` block, card, tokenizer

It knows nothing of calibration texts: the label-free steps and `hm3.pipeline` build on it.
The public `hm3.merge` (a function, `hm3.pipeline.merge`) runs a whole recipe through it."""

from hm3.engine.plan import TensorJob, is_embedding
from hm3.engine.sources import Sources, open_sources, with_recipe
from hm3.engine.stream import (
                               TaskVectorSquares,
                               job_inputs,
                               merge_into,
                               merge_job,
                               merged_tensors,
                               state_tensors,
                               task_vector_norms,
)
from hm3.engine.write import build_model, warn_implausible, write_model

__all__ = ["Sources", "TaskVectorSquares", "TensorJob", "build_model", "is_embedding", "job_inputs",
           "merge_into", "merge_job", "merged_tensors", "open_sources", "state_tensors",
           "task_vector_norms", "warn_implausible", "with_recipe", "write_model"]
