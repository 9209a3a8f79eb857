"""In-place updates of a lower-precision tensor on the CPU through a reused buffer, byte for byte the in-place op.

On the CPU an in-place op whose target has a lower precision than the dtype the op computes in (a bfloat16 tiling
accumulator ``+=`` float32 tiles, a float16 ensemble ``+=`` a float32 channel times ``1 / n``) computes on fresh
full-size copies of its operands in that dtype (TensorIterator's CPU casting), and every fresh tensor's pages are
faulted in anew: several times the cost of the arithmetic. :class:`StagedUpdate` runs the same op on a copy of the
target in a buffer of the computing dtype reused from call to call, then copies the result back: the same
arithmetic, rounded once to the target's dtype as the in-place op rounds. CUDA converts inside its kernels, and a
target of the computing dtype is updated where it is: no buffer then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class StagedUpdate:
    """Where an in-place op on regions of one tensor runs: through a reused buffer, or on the region itself.

    Args:
        shape: the largest region's shape; a region with fewer leading elements uses the buffer's leading part.
        dtype: the buffer's dtype (the op's computing dtype), or None for no buffer.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype | None) -> None:
        self.buffer = None if dtype is None else torch.empty(tuple(shape), dtype=dtype)

    @classmethod
    def for_op(cls, target_dtype: torch.dtype, operand: torch.Tensor) -> StagedUpdate:
        """The staging of in-place ops on regions shaped like ``operand`` (on its device) of a ``target_dtype``
        tensor: a buffer of the op's computing dtype on the CPU when that is not the target's."""
        computing = torch.promote_types(target_dtype, operand.dtype)
        needed = operand.device.type == "cpu" and computing != target_dtype
        return cls(operand.shape, computing if needed else None)

    def update(self, region: torch.Tensor, op: Callable[[torch.Tensor], object]) -> None:
        """Apply ``op`` (an in-place op of its one argument) to ``region``: to a copy in the buffer, copied back."""
        if self.buffer is None:
            op(region)
            return
        work = self.buffer[: len(region)].copy_(region)
        op(work)
        region.copy_(work)
