"""The AMOS ensemble over configurations: upstream's float16 mean by its own arithmetic, and its argmax.

Upstream stores each configuration's softmax rounded to float16 (npz) and ``merge`` averages them with numpy's
float16 mean, which sums in float32. Ties are frequent (float16 resolves 2**-11 near 0.5), so the arithmetic is
reproduced exactly when memory allows (a float32 accumulator of float16-rounded channels); the float16 running
mean halves the memory when it does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gcinfer.io import Geometry

if TYPE_CHECKING:
    from gcinfer.pipelines.amos.nnunet_v1 import Cropped

ARGMAX_SLICES = 8
"""Slices (first axis) per argmax step: bounds the int64 argmax temporary."""


def accumulate(accumulator: torch.Tensor, channel: torch.Tensor, configurations: int) -> None:
    """Add one configuration's resampled probabilities of one class to the ensemble accumulator's channel.

    float32 accumulator: the channel rounded to float16, as upstream stores it in its npz, and summed as upstream's
    ``merge`` does (numpy's mean of float16 arrays sums in float32); float16: the running mean, ``channel /
    configurations`` (half the memory; ties of upstream's float16 mean may break differently).
    """
    if accumulator.dtype == torch.float32:
        accumulator.add_(channel.to(accumulator.device, torch.float16))
    else:
        accumulator.add_(channel.to(accumulator.device), alpha=1.0 / configurations)


def ensemble_mean(accumulated: torch.Tensor, configurations: int) -> torch.Tensor:
    """The float16 mean over configurations of a part of the accumulator: a float32 sum divided and rounded as
    numpy's float16 mean does; a float16 running mean as it is."""
    return accumulated.div(configurations).half() if accumulated.dtype == torch.float32 else accumulated


def labels_in_image(
    accumulated: torch.Tensor, configurations: int, cropped: Cropped, geometry: Geometry
) -> torch.Tensor:
    """Argmax (first class of a tie, as numpy's) of the crop's float16 ensemble mean (:func:`ensemble_mean` of the
    ``accumulated`` ensemble), pasted into the full image, background outside the crop.

    Returns:
        ``(z, y, x)`` uint8 of ``geometry.shape_zyx`` on ``accumulated``'s device.
    """
    labels = torch.zeros(geometry.shape_zyx, dtype=torch.uint8, device=accumulated.device)
    region = labels[cropped.bbox]
    for start in range(0, region.shape[0], ARGMAX_SLICES):
        step = slice(start, start + ARGMAX_SLICES)
        region[step] = ensemble_mean(accumulated[:, step], configurations).argmax(0)
    return labels
