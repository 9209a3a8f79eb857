"""The memory of one call of :func:`gcinfer.engine.tiling.predict_tiled`, as phases of the memory model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gcinfer.memory.model import Buffer, Choice, Phase
from gcinfer.memory.network import NetworkCost


@dataclass(frozen=True)
class Tiling:
    """One call of :func:`gcinfer.engine.tiling.predict_tiled`: its input grid, patch, classes, channels, and whether it
    mirrors (which holds more tile buffers at once)."""

    shape: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    num_classes: int
    channels: int = 1
    mirrored: bool = False

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def padded_voxels(self) -> int:
        return math.prod(max(s, p) for s, p in zip(self.shape, self.patch_size))

    @property
    def padded(self) -> bool:
        return any(s < p for s, p in zip(self.shape, self.patch_size))


def tiling_phases(
    tiling: Tiling,
    choice: Choice,
    network: NetworkCost,
    result_dtype: torch.dtype,
    weights_on_device: int,
    resident: Sequence[Buffer],
) -> list[Phase]:
    """:func:`gcinfer.engine.tiling.predict_tiled` while it predicts and when it returns.

    Predicting: the input on the device (and its zero-padded copy when smaller than the patch), the accumulator
    ``(K, *padded)`` and the importance sum ``(1, *padded)`` in the tiling dtype where the choice puts them, the
    Gaussian map, the tile buffers, the prediction's copy to the host when accumulating there, and the network's
    forward pass (its output included). Tile buffers (a batch and its prediction are freed before the next batch is
    stacked; the softmax buffer and, on the CPU with a reduced-precision accumulator, the float32 buffer each tile is
    added through are reused by every batch and freed before the result is made): ``(B, C, *patch)`` the batch, and
    with mirroring the flipped batch; ``(B, K, *patch)`` float32 the softmax and the weighted copy (or that float32
    buffer), and with mirroring the flip sum, its flip back and the total.
    Returning: the accumulator, the importance sum and the cropped or cast result ``(K, *shape)`` in
    ``result_dtype`` (no copy when neither cropped nor cast).
    """
    k, c, patch = tiling.num_classes, tiling.channels, math.prod(tiling.patch_size)
    batch, acc_bytes, on = choice.tile_batch_size, choice.tiling_dtype.itemsize, choice.tiling_on_device
    common = [
        *resident,
        Buffer("network input", 4 * c * tiling.voxels, True),
        Buffer("padded input", 4 * c * tiling.padded_voxels if tiling.padded else 0, True),
        Buffer("tiling accumulator", acc_bytes * k * tiling.padded_voxels, on),
        Buffer("importance sum", acc_bytes * tiling.padded_voxels, on),
        Buffer("weights", weights_on_device, True),
    ]
    tiles = (2 * c + 5 * k) if tiling.mirrored else (c + 2 * k)
    last = [
        Buffer("gaussian", 4 * patch, on),
        Buffer("tile predictions on host", 0 if on else 4 * batch * patch * k, False),
    ]
    predicting = [
        *last,
        Buffer("tile buffers", 4 * batch * patch * tiles, True),
        Buffer("forward pass", network.forward(batch), True),
    ]
    copied = tiling.padded or result_dtype != choice.tiling_dtype
    returning = [
        *last,
        Buffer("tiling result", result_dtype.itemsize * k * tiling.voxels if copied else 0, on),
    ]
    return [Phase("predict", tuple(common + predicting)), Phase("predict end", tuple(common + returning))]
