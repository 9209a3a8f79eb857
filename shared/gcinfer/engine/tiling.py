"""Tiled (sliding-window) prediction of a 3D volume with one network or an ensemble, on any torch device.

One engine serves both pipelines, with the exact tile placement, importance weighting and padding of each reference:

- ``mode="nnunet"``: nnU-Net v1 ``SegmentationNetwork._internal_predict_3D_3Dconv_tiled`` (tile starts of
  ``_compute_steps_for_sliding_window``, the Gaussian of ``_get_gaussian`` used only when there is more than one
  tile, constant-0 padding to at least the patch size split as ``pad_nd_image`` does, cropped back);
- ``mode="monai"``: ``monai.inferers.sliding_window_inference`` with ``mode="gaussian"``, ``sigma_scale=0.125``,
  ``padding_mode="constant"`` (tile starts of ``dense_patch_slices``, the map of ``compute_importance_map``).

Axis conventions: images are ``(C, X, Y, Z)`` (channel first, then the three spatial axes in whatever order the
network was trained on); tile batches are ``(B, C, *patch)``; predictions ``(B, K, *patch)``; the result is
``(K, X, Y, Z)``. Spatial axis ``a`` of the image is dimension ``a + 2`` of a tile batch.

The prediction of a tile is the weighted mean, over networks and mirror flips, of the softmax (or of the logits);
it is multiplied by the importance map and added into one accumulator, which is divided by the summed importance
at the end. Networks and flips are looped inside each tile, so memory does not grow with the number of networks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)

MODES = ("nnunet", "monai")
OUTPUTS = ("probabilities", "logits")
ACCUMULATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
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


def _tile_slices(starts: Sequence[Sequence[int]], patch_size: Sequence[int]) -> list[Slices]:
    """Spatial slices of every tile, the last axis varying fastest (the references' order)."""
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch_size)) for corner in itertools.product(*starts)]


def _plan(
    padded_size: Sequence[int],
    patch_size: Sequence[int],
    mode: str,
    step_size: float,
    overlap: float,
    gaussian: bool,
    device: torch.device,
) -> tuple[list[Slices], torch.Tensor | None]:
    """The tiles of a padded image and their importance map (``patch_size``, float32, on ``device``).

    The map is None for uniform weights: when ``gaussian`` is off, or in nnU-Net mode with a single tile.
    """
    if mode == "nnunet":
        tiles = _tile_slices(tile_starts_nnunet(padded_size, patch_size, step_size), patch_size)
        use_map = gaussian and len(tiles) > 1
        return tiles, gaussian_nnunet(patch_size, device) if use_map else None
    tiles = _tile_slices(tile_starts_monai(padded_size, patch_size, overlap), patch_size)
    return tiles, gaussian_monai(patch_size, device) if gaussian else None


def _predict_batch(
    batch: torch.Tensor,
    networks: Sequence[torch.nn.Module],
    coefficients: Sequence[float],
    flips: Sequence[tuple[int, ...]],
    probabilities: bool,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Weighted mean over networks and flips of one tile batch's softmax (or logits).

    Args:
        batch: ``(B, C, *patch)`` on the networks' device.
        coefficients: per network, its normalised ensemble weight divided by the number of flips.
        flips: tensor dimensions to flip, one entry per mirror combination (see :func:`mirror_flips`).
        probabilities: softmax over the class dimension before averaging, else average the logits.
        autocast_dtype: run the networks under autocast to this dtype (None: off, or unsupported by the device).

    Returns:
        ``(B, K, *patch)`` float32 on the batch's device. Each flip's sum over networks is flipped back once.
    """
    autocast = torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    total = None
    for dims in flips:
        flipped = batch.flip(dims) if dims else batch
        flip_sum = None
        for network, coefficient in zip(networks, coefficients):
            with autocast:
                prediction = network(flipped).float()
            if probabilities:
                prediction = torch.softmax(prediction, 1)
            if flip_sum is None:
                flip_sum = prediction * coefficient if coefficient != 1.0 else prediction
            else:
                flip_sum.add_(prediction, alpha=coefficient)
        flip_sum = flip_sum.flip(dims) if dims else flip_sum
        total = flip_sum if total is None else total.add_(flip_sum)
    return total


def _importance_sum(
    padded_size: Sequence[int],
    tiles: Sequence[Slices],
    weight_map: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``(1, *padded_size)``: the summed importance of all tiles at each voxel (the tile count without a map)."""
    total = torch.zeros((1, *padded_size), dtype=dtype, device=device)
    for tile in tiles:
        total[(slice(None), *tile)] += weight_map if weight_map is not None else 1.0
    return total


def _predict_on(
    image: torch.Tensor,
    networks: Sequence[torch.nn.Module],
    patch_size: Sequence[int],
    coefficients: Sequence[float],
    flips: Sequence[tuple[int, ...]],
    *,
    mode: str,
    step_size: float,
    overlap: float,
    gaussian: bool,
    tile_batch_size: int,
    autocast_dtype: torch.dtype | None,
    accumulate_dtype: torch.dtype,
    result_dtype: torch.dtype,
    probabilities: bool,
    device: torch.device,
    result_device: torch.device,
    progress: bool,
) -> torch.Tensor:
    """One tiled prediction with the networks (already) on ``device`` and the accumulator on ``result_device``.

    Returns:
        ``(K, *image.shape[1:])`` ``result_dtype`` on ``result_device``.
    """
    padded, crop = pad_to_patch(image.to(device), patch_size)
    padded_size = padded.shape[1:]
    tiles, weight_map = _plan(padded_size, patch_size, mode, step_size, overlap, gaussian, result_device)
    importance = _importance_sum(padded_size, tiles, weight_map, accumulate_dtype, result_device)
    accumulator = None
    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not progress) as bar:
        for first in range(0, len(tiles), tile_batch_size):
            batch_tiles = tiles[first : first + tile_batch_size]
            batch = torch.stack([padded[(slice(None), *tile)] for tile in batch_tiles])
            prediction = _predict_batch(batch, networks, coefficients, flips, probabilities, autocast_dtype)
            prediction = prediction.to(result_device)
            if accumulator is None:
                shape = (prediction.shape[1], *padded_size)
                accumulator = torch.zeros(shape, dtype=accumulate_dtype, device=result_device)
            for tile, tile_prediction in zip(batch_tiles, prediction):
                region = accumulator[(slice(None), *tile)]
                if weight_map is None:
                    region.add_(tile_prediction)
                else:
                    region.addcmul_(tile_prediction, weight_map)
            del batch, prediction, tile_prediction, region  # freed before the next batch is built
            bar.update(len(batch_tiles))
    result = accumulator.div_(importance)[(slice(None), *crop)]
    return result.to(result_dtype).contiguous()  # no copy unless cropped or cast


def _fallback_attempts(device: torch.device, result_device: torch.device) -> list[tuple[torch.device, torch.device]]:
    """(network device, result device) to try in turn after out-of-memory errors.

    As asked; then accumulating on the host while the tiles still run on ``device``; then fully on the CPU
    (skipped when ``device`` is the CPU, where the host attempt already is fully on the CPU).
    """
    cpu = torch.device("cpu")
    attempts = [(device, result_device), (device, cpu)]
    if device.type != "cpu":
        attempts.append((cpu, cpu))
    return attempts


@contextlib.contextmanager
def _networks_on(networks: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move networks whose parameters are on another type of device to ``device`` (in place), and back afterwards.

    A no-op in the normal case, where the caller has put the networks on ``device``; used by the CPU fallback.
    """
    moved = []
    for network in networks:
        parameter = next(itertools.chain(network.parameters(), network.buffers()), None)
        if parameter is not None and parameter.device.type != device.type:
            moved.append((network, parameter.device))
            network.to(device)
    try:
        yield
    finally:
        for network, original in moved:
            network.to(original)


def _release_cached_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks on an accelerator ``device`` to the driver."""
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.empty_cache()


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Ensemble weights summing to 1 (equal when None).

    Raises:
        ValueError: a weight count other than ``count``, a negative weight, or a zero sum.
    """
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {count} non-negative numbers with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _validate(
    image: torch.Tensor,
    patch_size: Sequence[int],
    mode: str,
    step_size: float,
    overlap: float,
    mirror_axes: Sequence[int],
    tile_batch_size: int,
    accumulate_dtype: torch.dtype,
    output: str,
) -> None:
    """Raise ValueError for arguments the engine cannot honour."""
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(f"image must be a floating (C, X, Y, Z) tensor, got {image.dtype} {tuple(image.shape)}")
    if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "nnunet" and not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    if mode == "monai" and not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if any(a not in (0, 1, 2) for a in mirror_axes) or len(set(mirror_axes)) != len(mirror_axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {mirror_axes}")
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be at least 1, got {tile_batch_size}")
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise ValueError(
            f"accumulate_dtype must be one of {ACCUMULATE_DTYPES}, got {accumulate_dtype} (float16 flushes the"
            " Gaussian weights at tile corners, ~e^-24, to 0: their voxels would be 0/0)"
        )
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def predict_tiled(
    image: torch.Tensor,
    networks: torch.nn.Module | Sequence[torch.nn.Module],
    patch_size: Sequence[int],
    *,
    mode: str = "nnunet",
    step_size: float = 0.5,
    overlap: float = 0.25,
    mirror_axes: Sequence[int] = (),
    gaussian: bool = True,
    tile_batch_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    result_dtype: torch.dtype = torch.float32,
    output: str = "probabilities",
    weights: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    result_device: torch.device | str | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Sliding-window prediction of ``image`` by one network or the weighted mean of an ensemble.

    Args:
        image: ``(C, X, Y, Z)`` floating tensor on any device.
        networks: one network or the ensemble members, all fed the same ``(B, C, *patch)`` input; each returns
            ``(B, K, *patch)`` logits (nnU-Net networks with deep supervision off). They are put in eval mode and
            run under ``torch.inference_mode``; the caller has already moved them to ``device``.
        patch_size: spatial tile size (3 ints).
        mode: ``"nnunet"`` (nnU-Net v1 placement, Gaussian and padding) or ``"monai"`` (MONAI's
            ``sliding_window_inference`` with ``mode="gaussian"``, ``sigma_scale=0.125``, constant padding).
        step_size: nnunet mode: step between tiles as a fraction of the patch, in (0, 1].
        overlap: monai mode: overlap between tiles as a fraction of the patch, in [0, 1).
        mirror_axes: spatial axes (0, 1, 2) to mirror; the mean is over all ``2**k`` flip combinations.
        gaussian: Gaussian importance weighting (nnunet mode: only when there is more than one tile, as nnU-Net).
        tile_batch_size: tiles per forward pass.
        autocast_dtype: None (off), ``torch.float16`` or ``torch.bfloat16``; autocast only where the device
            supports it. Outputs are cast to float32 before the softmax.
        accumulate_dtype: dtype of the accumulator and the importance sum, one of :data:`ACCUMULATE_DTYPES`
            (bfloat16 halves the accumulator's memory; float16 is refused, its range is too small).
        result_dtype: dtype of the result; the accumulator's own (e.g. bfloat16) returns it without a float32 copy.
        output: ``"probabilities"`` (mean of the softmax over mirrors and networks) or ``"logits"`` (mean of the
            logits).
        weights: per-network ensemble weights, normalised to sum 1; None for equal weights.
        device: where the networks run; default ``image.device``.
        result_device: where the accumulator and result live; default ``device``. When it differs from ``device``,
            each tile batch's prediction is copied there (the host-accumulation fallback does this).
        progress: tqdm bar over tiles; None shows it only when stderr is a terminal.

    Returns:
        ``(K, X, Y, Z)`` ``result_dtype`` on ``result_device``; on the CPU after an out-of-memory fallback.

    On ``torch.OutOfMemoryError`` the prediction is retried, with a warning logged, first accumulating on the CPU
    while the tiles still run on ``device``, then fully on the CPU (networks moved there and back); the error is
    re-raised when the last attempt fails too.

    Raises:
        ValueError: invalid arguments.
        torch.OutOfMemoryError: out of memory even on the CPU.
    """
    networks = [networks] if isinstance(networks, torch.nn.Module) else list(networks)
    if not networks:
        raise ValueError("at least one network is needed")
    _validate(image, patch_size, mode, step_size, overlap, mirror_axes, tile_batch_size, accumulate_dtype, output)
    flips = mirror_flips(mirror_axes)
    coefficients = [w / len(flips) for w in _normalised_weights(weights, len(networks))]
    device = torch.device(device) if device is not None else image.device
    result_device = torch.device(result_device) if result_device is not None else device
    for network in networks:
        network.eval()
    options = {
        "mode": mode,
        "step_size": step_size,
        "overlap": overlap,
        "gaussian": gaussian,
        "tile_batch_size": tile_batch_size,
        "accumulate_dtype": accumulate_dtype,
        "result_dtype": result_dtype,
        "probabilities": output == "probabilities",
        "progress": sys.stderr.isatty() if progress is None else progress,
    }

    def attempt(net_device: torch.device, acc_device: torch.device) -> torch.Tensor:
        autocast = autocast_dtype if torch.amp.is_autocast_available(net_device.type) else None
        with torch.inference_mode(), _networks_on(networks, net_device):
            return _predict_on(
                image,
                networks,
                [int(p) for p in patch_size],
                coefficients,
                flips,
                autocast_dtype=autocast,
                device=net_device,
                result_device=acc_device,
                **options,
            )

    attempts = _fallback_attempts(device, result_device)
    for (net_device, acc_device), retry in itertools.pairwise(attempts):
        try:
            return attempt(net_device, acc_device)
        except torch.OutOfMemoryError:
            log.warning(
                "out of memory with networks on %s and result on %s; retrying with networks on %s and result on %s",
                net_device,
                acc_device,
                *retry,
            )
        _release_cached_memory(net_device)  # outside the except block: its traceback no longer pins the tensors
    return attempt(*attempts[-1])
