"""Resampling of volumes on the torch device, exactly as each reference pipeline does it.

One function per reference; each works on any device and keeps the tensor where it is:

- :func:`resize_channels_trilinear`: the AMOS 2022 nnU-Net v1 inference code (``nnunet/inference/amos2022/
  inference_code.py``), which brings each model's softmax back to the cropped original shape with one
  ``F.interpolate(mode="trilinear")`` per channel (``align_corners`` left at its default, False).

Tensors are channel-first ``(C, *spatial)``, spatial axes in the order the caller's network uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def resize_channels_trilinear(volume: torch.Tensor, size: Sequence[int]) -> Iterator[torch.Tensor]:
    """Resize every channel of ``volume`` to ``size`` by trilinear interpolation, one channel at a time.

    Identical to the AMOS 2022 inference code's ``F.interpolate(softmax[c][None, None], size=target_shape,
    mode='trilinear')[0, 0]`` loop: the same kernel (``aten::upsample_trilinear3d``, ``align_corners=False``, scales
    from the sizes), writing every channel into one output buffer. Yielding channels one by one lets the caller
    accumulate them without a ``(C, *size)`` temporary, and reusing the buffer spares a fresh allocation (page faults
    on the CPU) per channel.

    Args:
        volume: ``(C, X, Y, Z)`` floating tensor on any device.
        size: the output spatial size (3 ints), in the same axis order.

    Yields:
        ``C`` tensors of shape ``size``, in channel order, with ``volume``'s dtype and device: views of one buffer,
        each overwritten by the next channel (copy one to keep it).
    """
    if volume.ndim != 4 or not volume.is_floating_point():
        raise ValueError(f"volume must be a floating (C, X, Y, Z) tensor, got {volume.dtype} {tuple(volume.shape)}")
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be 3 positive ints, got {tuple(size)}")
    size = [int(s) for s in size]
    output = torch.empty((1, 1, *size), dtype=volume.dtype, device=volume.device)
    for channel in volume:
        torch.ops.aten.upsample_trilinear3d.out(channel[None, None], size, False, None, None, None, out=output)
        yield output[0, 0]
