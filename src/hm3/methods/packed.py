"""A sparsified task vector held as its non-zero entries: what TIES-style merges keep of every
expert while they elect signs, so that memory grows by a fraction of a tensor per expert."""

from __future__ import annotations

import torch


class Packed:
    """A tensor flattened, kept as (positions, values) of its non-zero entries when that is
    smaller than the tensor (a delta trimmed to density 0.2 takes 0.4 of it: int32 positions),
    else as the tensor itself. `part(start, stop)` gives back a dense slice, exactly."""

    def __init__(self, tensor: torch.Tensor):
        flat = tensor.reshape(-1)
        self.numel, self.dtype = flat.numel(), flat.dtype
        position = torch.int32 if self.numel < 2**31 else torch.int64
        entry_bytes = flat.element_size() + position.itemsize
        if int(torch.count_nonzero(flat)) * entry_bytes >= self.numel * flat.element_size():
            self.dense, self.positions, self.values = flat, None, None
            return
        positions = flat.nonzero().squeeze(1)
        self.dense, self.values = None, flat[positions]
        self.positions = positions.to(position)

    def part(self, start: int, stop: int) -> torch.Tensor:
        """Entries start..stop-1 of the flattened tensor (a view when it is kept dense)."""
        if self.dense is not None:
            return self.dense[start:stop]
        stop = min(stop, self.numel)
        low, high = (int(torch.searchsorted(self.positions, bound)) for bound in (start, stop))
        out = torch.zeros(stop - start, dtype=self.dtype)
        out[(self.positions[low:high] - start).long()] = self.values[low:high]
        return out
