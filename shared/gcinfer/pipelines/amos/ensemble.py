"""The AMOS ensemble over configurations: upstream's float16 mean by its own arithmetic, and its argmax.

Upstream stores each configuration's softmax rounded to float16 (npz) and ``merge`` averages them with numpy's
float16 mean, which sums in float32. Ties are frequent (float16 resolves 2**-11 near 0.5), so the arithmetic is
reproduced exactly when memory allows (a float32 accumulator of float16-rounded channels); the float16 running
mean halves the memory when it does not.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gcinfer.engine.staged_update import StagedUpdate
from gcinfer.io import Geometry

if TYPE_CHECKING:
    from gcinfer.pipelines.amos.nnunet_v1 import Cropped

ARGMAX_SLICES = 8
"""Slices (first axis) per argmax step: bounds the int64 argmax temporary."""
ACCUMULATE_SLICES = 16
"""Slices (first axis) per step of :func:`accumulate` on the CPU: the size of its two float32 buffers."""


def accumulate(accumulator: torch.Tensor, channel: torch.Tensor, configurations: int) -> None:
    """Add one configuration's resampled probabilities of one class to the ensemble accumulator's channel.

    float32 accumulator: the channel rounded to float16, as upstream stores it in its npz, and summed as upstream's
    ``merge`` does (numpy's mean of float16 arrays sums in float32); float16: the running mean, ``channel /
    configurations`` (half the memory; ties of upstream's float16 mean may break differently).

    Both add operands of different dtypes, which the CPU computes on full-size float32 copies of the operands (fresh
    ``(z, y, x)`` temporaries per call: allocation and page faults cost more than the sum); on a CPU accumulator the
    sum goes :data:`ACCUMULATE_SLICES` slices at a time, the channel copied slab by slab from wherever it is into a
    reused float32 buffer, a float16 accumulator's slab through another
    (:class:`~gcinfer.engine.staged_update.StagedUpdate`: the same kernel in the same dtype, rounded the same way).

    Args:
        accumulator: ``(z, y, x)`` float32 or float16, one class of the ensemble accumulator.
        channel: ``(z, y, x)`` floating, any strides and device (a permuted view of the resampled channel).
    """
    sums = accumulator.dtype == torch.float32
    if accumulator.device.type != "cpu":
        _add_channel(accumulator, channel.to(accumulator.device), configurations, sums)
        return
    addend = torch.empty((min(ACCUMULATE_SLICES, len(accumulator)), *accumulator.shape[1:]))
    staging = StagedUpdate.for_op(accumulator.dtype, addend)
    for start in range(0, len(accumulator), ACCUMULATE_SLICES):
        part = accumulator[start : start + ACCUMULATE_SLICES]
        values = addend[: len(part)].copy_(channel[start : start + ACCUMULATE_SLICES])
        staging.update(part, functools.partial(_add_channel, channel=values, configurations=configurations, sums=sums))


def _add_channel(total: torch.Tensor, channel: torch.Tensor, configurations: int, sums: bool) -> None:
    """``total`` += ``channel`` rounded to float16 (``sums``: the accumulator holds float32 sums), else += ``channel /
    configurations`` (the float16 running mean; ``total`` may be its float32 staging copy)."""
    if sums:
        total.add_(channel.to(torch.float16))
    else:
        total.add_(channel, alpha=1.0 / configurations)


def ensemble_mean(accumulated: torch.Tensor, configurations: int) -> torch.Tensor:
    """The float16 mean over configurations of a part of the accumulator: a float32 sum divided and rounded as
    numpy's float16 mean does; a float16 running mean as it is."""
    return accumulated.div(configurations).half() if accumulated.dtype == torch.float32 else accumulated


def labels_in_image(
    accumulated: torch.Tensor, configurations: int, cropped: Cropped, geometry: Geometry
) -> torch.Tensor:
    """Argmax (first class of a tie, as numpy's) of the crop's float16 ensemble mean (:func:`ensemble_mean` of the
    ``accumulated`` ensemble), pasted into the full image, background outside the crop.

    Computed :data:`ARGMAX_SLICES` slices at a time by :func:`first_argmax_into`.

    Returns:
        ``(z, y, x)`` uint8 of ``geometry.shape_zyx`` on ``accumulated``'s device.
    """
    labels = torch.zeros(geometry.shape_zyx, dtype=torch.uint8, device=accumulated.device)
    region = labels[cropped.bbox]
    scratch = _Scratch.like(accumulated[0, :ARGMAX_SLICES])
    for start in range(0, region.shape[0], ARGMAX_SLICES):
        step = slice(start, start + ARGMAX_SLICES)
        first_argmax_into(region[step], accumulated[:, step], configurations, scratch.first(len(region[step])))
    return labels


@dataclass(frozen=True)
class _Scratch:
    """Buffers of one argmax slab ``(slices, y, x)``: the float16 best mean so far and its class (uint8), the current
    class's float16 mean, its float32 quotient (float32 ensemble only), the comparison (bool) and its class or 0
    (uint8)."""

    best: torch.Tensor
    label: torch.Tensor
    mean: torch.Tensor
    quotient: torch.Tensor | None
    greater: torch.Tensor
    candidate: torch.Tensor

    @classmethod
    def like(cls, slab: torch.Tensor) -> _Scratch:
        def empty(dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(slab.shape, dtype=dtype, device=slab.device)

        quotient = empty(torch.float32) if slab.dtype == torch.float32 else None
        half, byte = torch.float16, torch.uint8
        return cls(empty(half), empty(byte), empty(half), quotient, empty(torch.bool), empty(byte))

    def first(self, slices: int) -> _Scratch:
        """The buffers' first ``slices`` slices (the last slab of a crop may be shorter)."""
        return _Scratch(*(None if b is None else b[:slices] for b in dataclasses.astuple(self)))


def _mean_into(out: torch.Tensor, accumulated: torch.Tensor, configurations: int, quotient: torch.Tensor | None):
    """``out`` (float16) = :func:`ensemble_mean` of one class's ``accumulated``, without allocating."""
    if quotient is None:
        out.copy_(accumulated)
    else:
        out.copy_(torch.div(accumulated, configurations, out=quotient))


def first_argmax_into(labels: torch.Tensor, accumulated: torch.Tensor, configurations: int, scratch: _Scratch) -> None:
    """``labels`` (uint8, any strides) = argmax over classes of the float16 mean of ``accumulated`` ``(K, *slab)``,
    the first class of a tie winning and NaN the largest value, as ``torch.argmax`` (and numpy's) decide.

    A running maximum over classes: per class a few in-place element-wise passes over the slab (no ``(K, *slab)``
    temporary, no int64 index array), several times faster than ``argmax(0)`` over the class axis on the CPU. Class
    ``k`` takes the voxels where its mean is strictly greater than the best so far (the first of equal means is
    kept); as every class so far is below ``k``, that is ``max(label, k * greater)``, computed on the comparison
    viewed as uint8 (torch's bool kernels are many times slower). NaN compares false, so voxels whose best ends up
    NaN (``maximum`` propagates it) are redone with ``argmax``.
    """
    best, label = scratch.best, scratch.label
    _mean_into(best, accumulated[0], configurations, scratch.quotient)
    label.zero_()
    for k in range(1, len(accumulated)):
        _mean_into(scratch.mean, accumulated[k], configurations, scratch.quotient)
        torch.gt(scratch.mean, best, out=scratch.greater)
        torch.maximum(label, torch.mul(scratch.greater.view(torch.uint8), k, out=scratch.candidate), out=label)
        torch.maximum(best, scratch.mean, out=best)
    nan = best.isnan()
    if nan.any():
        label[nan] = ensemble_mean(accumulated[:, nan], configurations).argmax(0).to(label.dtype)
    labels.copy_(label)
