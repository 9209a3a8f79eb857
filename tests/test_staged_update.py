"""In-place updates through a reused buffer (:mod:`gcinfer.engine.staged_update`): where a buffer is used, and byte for
byte the in-place op it replaces."""

from __future__ import annotations

import pytest
import torch

from gcinfer.engine.staged_update import StagedUpdate


def test_a_buffer_only_where_the_cpu_would_compute_on_fresh_copies() -> None:
    values = torch.zeros(2, 3)
    assert StagedUpdate.for_op(torch.float32, values).buffer is None
    assert StagedUpdate.for_op(torch.float64, values).buffer is None
    assert StagedUpdate.for_op(torch.bfloat16, torch.zeros(2, 3, dtype=torch.bfloat16)).buffer is None
    buffer = StagedUpdate.for_op(torch.bfloat16, values).buffer
    assert buffer is not None and buffer.shape == (2, 3) and buffer.dtype == torch.float32
    assert StagedUpdate.for_op(torch.float16, torch.zeros(2, dtype=torch.bfloat16)).buffer.dtype == torch.float32
    assert StagedUpdate.for_op(torch.bfloat16, torch.zeros(2, 3, device="meta")).buffer is None  # not the CPU


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16])
def test_the_staged_op_is_the_in_place_op_byte_for_byte(target_dtype: torch.dtype) -> None:
    """A lower-precision target += float32 values (times a map, or scaled): the staged update equals the in-place
    mixed-dtype op, for a full region and for a shorter last one."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(5, 7, 9, generator=generator).to(target_dtype)
    expected = target.clone()
    values, weights = torch.rand(4, 7, 9, generator=generator), torch.rand(4, 7, 9, generator=generator)
    staging = StagedUpdate.for_op(target_dtype, values)
    assert staging.buffer is not None
    for region in (slice(0, 4), slice(4, 5)):
        n = region.stop - region.start
        staging.update(target[region], lambda t, n=n: t.addcmul_(values[:n], weights[:n]))
        expected[region].addcmul_(values[:n], weights[:n])
        staging.update(target[region], lambda t, n=n: t.add_(values[:n], alpha=1.0 / 3))
        expected[region].add_(values[:n], alpha=1.0 / 3)
    assert target.dtype == target_dtype and torch.equal(target, expected)
