"""Where the tiles of a sliding window go and how much each voxel of a tile counts, as each reference computes it.

- nnU-Net v1 (``SegmentationNetwork``): tile starts of ``_compute_steps_for_sliding_window``, the Gaussian of
  ``_get_gaussian(patch, 1/8)``;
- MONAI (``monai.inferers.utils``): tile starts of ``_get_scan_interval`` + ``dense_patch_slices``, the map of
  ``compute_importance_map(patch, "gaussian", sigma_scale=0.125)``;
- both: constant-0 padding to at least the patch size, split as nnU-Net's ``pad_nd_image`` and MONAI's
  ``sliding_window_inference`` do, and the mirror flips of test-time augmentation.

Pure functions of sizes (and the device of the maps they return); :mod:`gcinfer.engine.tiling` runs the tiles.
Axis conventions: images ``(C, X, Y, Z)``, tile batches ``(B, C, *patch)``: spatial axis ``a`` of the image is
dimension ``a + 2`` of a tile batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SIGMA_SCALE = 0.125  # sigma = patch / 8 in both references
_SCIPY_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default kernel radius, in sigmas
_MONAI_MIN_WEIGHT = 1e-3  # compute_importance_map clamps the map to at least this

Slices = tuple[slice, ...]


def tile_starts_nnunet(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Tile start coordinates per spatial axis, as nnU-Net v1's ``_compute_steps_for_sliding_window``.

    The step is at most ``patch * step_size`` voxels; the tiles are spread evenly so that the first starts at 0
    and the last ends at the image border (e.g. size 110, patch 64, step 0.5: starts 0, 23, 46).

    Args:
        image_size: spatial size, each at least the patch size (pad first).
        patch_size: spatial patch size.
        step_size: step as a fraction of the patch, in (0, 1].
    """
    starts = []
    for size, patch in zip(image_size, patch_size):
        num_steps = math.ceil((size - patch) / (patch * step_size)) + 1
        actual_step = (size - patch) / (num_steps - 1) if num_steps > 1 else 0.0
        starts.append([round(actual_step * i) for i in range(num_steps)])  # round half to even, as np.round
    return starts


def tile_starts_monai(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[list[int]]:
    """Tile start coordinates per spatial axis, as MONAI's ``_get_scan_interval`` + ``dense_patch_slices``.

    The interval is ``int(patch * (1 - overlap))`` (at least 1; the patch itself when it equals the image size);
    the last tile is shifted back to end at the image border.

    Args:
        image_size: spatial size, each at least the patch size (pad first).
        patch_size: spatial patch size.
        overlap: fraction of the patch shared by neighbouring tiles, in [0, 1).
    """
    starts = []
    for size, patch in zip(image_size, patch_size):
        interval = patch if patch == size else max(int(patch * (1 - overlap)), 1)
        num = next(d + 1 for d in range(math.ceil(size / interval)) if d * interval + patch >= size)
        starts.append([min(d * interval, size - patch) for d in range(num)])
    return starts


def gaussian_nnunet(patch_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """nnU-Net v1's ``_get_gaussian(patch_size, 1/8)`` without scipy: shape ``patch_size``, float32, max 1.

    ``gaussian_filter`` of a unit impulse at ``patch // 2`` is the outer product of scipy's normalised 1D kernels
    (radius ``int(4 * sigma + 0.5)``, zero beyond); it is computed here in float64 like scipy, scaled to max 1,
    cast to float32, and its zeros are replaced by its smallest non-zero value.
    """
    gaussian = torch.ones((), dtype=torch.float64, device=device)
    for size in patch_size:
        sigma = size * SIGMA_SCALE
        radius = int(_SCIPY_TRUNCATE * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        kernel = torch.exp(-0.5 / (sigma * sigma) * x**2)
        kernel = kernel / kernel.sum()
        offsets = torch.arange(size, device=device) - size // 2
        profile = torch.where(offsets.abs() <= radius, kernel[(offsets + radius).clamp(0, 2 * radius)], 0.0)
        gaussian = gaussian.unsqueeze(-1) * profile
    gaussian = (gaussian / gaussian.max()).float()
    gaussian[gaussian == 0] = gaussian[gaussian != 0].min()
    return gaussian


def gaussian_monai(patch_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """MONAI's ``compute_importance_map(patch_size, "gaussian", sigma_scale=0.125)``: shape ``patch_size``, float32.

    The product of unnormalised 1D Gaussians centred at ``(size - 1) / 2``, clamped to at least
    ``max(min, 1e-3)``; computed in float32 with the same operations as MONAI.
    """
    gaussian = torch.ones((), dtype=torch.float32, device=device)
    for size in patch_size:
        sigma = size * SIGMA_SCALE
        x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        gaussian = gaussian.unsqueeze(-1) * torch.exp(x**2 / (-2 * sigma**2))
    return gaussian.clamp_(min=max(gaussian.min().item(), _MONAI_MIN_WEIGHT))


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All ``2**k`` subsets of the spatial ``mirror_axes``, as dimensions of a ``(B, C, X, Y, Z)`` tensor.

    The first entry is the empty tuple (no flip), e.g. ``(0, 2) -> [(), (2,), (4,), (2, 4)]``.
    """
    axes = sorted(set(mirror_axes))
    return [tuple(a + 2 for a in subset) for r in range(len(axes) + 1) for subset in itertools.combinations(axes, r)]


def pad_to_patch(image: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, Slices]:
    """Pad ``image`` (C, *spatial) with zeros to at least ``patch_size``; return it and the spatial crop back.

    A missing ``d`` voxels are split ``d // 2`` before and ``d - d // 2`` after, as both references do. The
    image itself is returned (no copy) when no padding is needed.
    """
    missing = [max(p - s, 0) for s, p in zip(image.shape[1:], patch_size)]
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(missing, image.shape[1:]))
    if not any(missing):
        return image, crop
    pad = [n for d in reversed(missing) for n in (d // 2, d - d // 2)]  # F.pad wants the last axis first
    return F.pad(image, pad, mode="constant", value=0.0), crop


def tile_slices(starts: Sequence[Sequence[int]], patch_size: Sequence[int]) -> list[Slices]:
    """Spatial slices of every tile, the last axis varying fastest (the references' order)."""
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch_size)) for corner in itertools.product(*starts)]
