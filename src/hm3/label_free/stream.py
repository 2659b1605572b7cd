"""A model's stack of transformer blocks, run one block at a time: where the blocks are, what
the first block is called with (hidden states, attention mask, position terms), and one block
called on cached hidden states with its weights given as tensors.

Architecture-independent: the blocks are the model's longest list of identical modules, and
their call is recorded by a hook on the first block, so a block is called exactly as the model
calls it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch.func import functional_call

_HIDDEN_KEYS = ("hidden_states", "hidden_state", "x", "hidden")
# An error (relative) or KL at rounding level: nothing for a step to correct. Adam would rescale
# the gradient of rounding noise into steps of its full learning rate, so the steps stop there.
NOTHING_TO_CORRECT = 1e-7


@dataclass
class BlockCall:
    """One batch's call of a block: the hidden states and the other arguments, and which tokens
    are real (not padding)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    key: str | None  # the keyword the hidden states were passed by; None: first positional
    mask: torch.Tensor  # (batch, tokens) bool

    def with_hidden(self, hidden: torch.Tensor) -> tuple[tuple, dict]:
        if self.key is None:
            return (hidden, *self.args), self.kwargs
        return self.args, {**self.kwargs, self.key: hidden}


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's transformer blocks: its longest ModuleList of modules of one class, by name
    (`bert.encoder.layer`)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 \
                and len({type(m) for m in module}) == 1 \
                and any(True for _ in module[0].parameters()) \
                and (best is None or len(module) > len(best[1])):
            best = name, module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer blocks")
    return best


class _Stop(Exception):
    pass


@torch.no_grad()
def first_block_calls(model: torch.nn.Module, blocks: torch.nn.ModuleList, batches: list[dict],
                      run_whole: bool = False) -> tuple[list[BlockCall], torch.Tensor | None]:
    """What the model passes its first block on each batch; with `run_whole`, also the model's
    logits (else the pass stops at the first block)."""
    device = next(model.parameters()).device
    calls: list[BlockCall] = []
    logits = []

    def hook(_module, args, kwargs):
        if args:
            hidden, rest, key = args[0], tuple(args[1:]), None
        else:
            key = next(k for k in _HIDDEN_KEYS if k in kwargs)
            hidden, rest = kwargs[key], ()
            kwargs = {k: v for k, v in kwargs.items() if k != key}
        calls.append(BlockCall(hidden.detach(), rest, dict(kwargs), key, state["mask"]))
        if not run_whole:
            raise _Stop

    state: dict = {}
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = batch["attention_mask"].bool()
            try:
                logits.append(model_logits(model, batch))
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls, (torch.cat(logits) if run_whole else None)


def _takes_cache(model: torch.nn.Module) -> bool:
    return getattr(model.config, "use_cache", None) is not None


def block_output(block: torch.nn.Module, call: BlockCall, hidden: torch.Tensor,
                 weights: dict[str, torch.Tensor] | None = None, whole: bool = False):
    """The block on `hidden` with the call's other arguments; with `weights` (name -> tensor,
    as in `block.named_parameters()`), with those weights instead of its own (differentiable).
    The output hidden states, or with `whole` what the block returns as it is."""
    args, kwargs = call.with_hidden(hidden)
    out = block(*args, **kwargs) if weights is None else functional_call(block, weights, args,
                                                                          kwargs)
    if whole:
        return out
    return out[0] if isinstance(out, (tuple, list)) else out


class _Given(torch.nn.Module):
    """Stands in for a model's blocks: returns a given block output, whatever it is called with;
    other attributes are the last block's (some models read one, e.g. its attention type)."""

    def __init__(self, output, block: torch.nn.Module) -> None:
        super().__init__()
        self.output = output
        self.__dict__["_block"] = block  # not a submodule: its weights stay out of this one

    def forward(self, *args, **kwargs):
        return self.output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@contextlib.contextmanager
def blocks_replaced(model: torch.nn.Module, prefix: str, output):
    """Within the block, `model`'s stack of blocks (at `prefix`) is ONE stand-in that returns
    `output` (what the last block returns): a forward pass then runs the embeddings, skips the
    blocks, and runs what follows them (final norm, pooler, heads) on `output`, differentiably."""
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList([_Given(output, blocks[-1])]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


def model_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """`model`'s logits on one tokenised batch (on the model's device)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch, use_cache=False) if _takes_cache(model) else model(**batch)
    return out.logits.float()


def block_from(template: torch.nn.Module, prefix: str, checkpoint) -> torch.nn.Module:
    """A copy of `template` with the weights a checkpoint stores under `prefix` (read from its
    files: one block in memory, not the whole model)."""
    block = copy.deepcopy(template)
    with torch.no_grad():
        for name, tensor in block.state_dict(keep_vars=True).items():
            full = f"{prefix}.{name}"
            if full in checkpoint:
                tensor.copy_(checkpoint.tensor(full))
    return block


def logit_kl(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None,
             multi_label: bool) -> torch.Tensor:
    """KL(expert || merged) per text, averaged over the `rows` that count (None: every text):
    over the labels' softmax, or each label's on/off probability (summed over labels) for a
    multi-label task. `logits` the merged model's on one task's labels, `target` its expert's."""
    if rows is not None:
        if not bool(rows.any()):
            return logits.sum() * 0
        logits, target = logits[rows], target[rows]
    target = target.to(logits.device)
    if multi_label:
        p = torch.sigmoid(target)
        kl = (p * (torch.nn.functional.logsigmoid(target) - torch.nn.functional.logsigmoid(logits))
              + (1 - p) * (torch.nn.functional.logsigmoid(-target)
                           - torch.nn.functional.logsigmoid(-logits))).sum(-1)
    else:
        p = torch.softmax(target, -1)
        kl = (p * (torch.log_softmax(target, -1) - torch.log_softmax(logits, -1))).sum(-1)
    return kl.mean()
