"""Tiled (sliding-window) prediction of a 3D volume with one network or an ensemble, on any torch device.

One engine serves both pipelines, with the exact tile placement, importance weighting and padding of each reference
(:mod:`gcinfer.engine.windows`); the mode is the type of the tiling options, which hold only what that mode reads:

- :class:`NnunetTiling` (``step_size``, ``gaussian``): nnU-Net v1
  ``SegmentationNetwork._internal_predict_3D_3Dconv_tiled`` (the Gaussian used only when there is more than one tile,
  constant-0 padding to at least the patch, cropped back);
- :class:`MonaiTiling` (``overlap``, ``gaussian``): ``monai.inferers.sliding_window_inference`` with
  ``mode="gaussian"`` (or ``"constant"``), ``sigma_scale=0.125``, ``padding_mode="constant"``.

:class:`TileMemory` holds the choices that change memory and speed but not what is computed (tiles per forward pass,
the accumulator's dtype, the result's dtype and device): the memory planner's
(:meth:`gcinfer.memory.Plan.tiling_options`). :class:`Output` says what is averaged. Every option is checked when
it is made, with the allowed values in the error.

Axis conventions: images are ``(C, X, Y, Z)`` (channel first, then the three spatial axes in whatever order the
network was trained on); tile batches are ``(B, C, *patch)``; predictions ``(B, K, *patch)``; the result is
``(K, X, Y, Z)``.

The prediction of a tile is the weighted mean, over networks and mirror flips, of the softmax (or of the logits);
it is multiplied by the importance map and added into one accumulator, which is divided by the summed importance
at the end. Networks and flips are looped inside each tile, so memory does not grow with the number of networks.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from gcinfer.engine.staged_update import StagedUpdate
from gcinfer.engine.windows import (
    Slices,
    gaussian_monai,
    gaussian_nnunet,
    mirror_flips,
    pad_to_patch,
    tile_slices,
    tile_starts_monai,
    tile_starts_nnunet,
)

log = logging.getLogger(__name__)

ACCUMULATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_FLOAT16_REASON = " (float16 flushes the Gaussian weights at tile corners, ~e^-24, to 0: their voxels would be 0/0)"


def look_up_option(name: str, value: object, allowed: Iterable[Any], reason: str = "") -> Any:
    """The member of ``allowed`` that ``value`` equals (an :class:`enum.Enum` member for its value), as MONAI's
    ``look_up_option``.

    Raises:
        ValueError: ``"<name> must be one of <allowed>, got <value>"``, then ``reason``.
    """
    allowed = tuple(allowed)
    for option in allowed:
        if value == option:
            return option
    listed = ", ".join(repr(o.value) if isinstance(o, enum.Enum) else str(o) for o in allowed)
    raise ValueError(f"{name} must be one of {listed}, got {value!r}{reason}")


class Output(str, enum.Enum):
    """What the tiles average over networks and mirror flips: the softmax over classes, or the raw logits."""

    PROBABILITIES = "probabilities"
    LOGITS = "logits"


@dataclass(frozen=True)
class NnunetTiling:
    """nnU-Net v1's tiling.

    Attributes:
        step_size: step between tiles as a fraction of the patch, in (0, 1].
        gaussian: Gaussian importance weighting (only when there is more than one tile, as nnU-Net).
    """

    step_size: float = 0.5
    gaussian: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")

    def tiles(self, padded_size: Sequence[int], patch_size: Sequence[int]) -> list[Slices]:
        return tile_slices(tile_starts_nnunet(padded_size, patch_size, self.step_size), patch_size)

    def importance(self, patch_size: Sequence[int], tiles: int, device: torch.device) -> torch.Tensor | None:
        """The importance map (``patch_size`` float32 on ``device``), None for uniform weights."""
        return gaussian_nnunet(patch_size, device) if self.gaussian and tiles > 1 else None


@dataclass(frozen=True)
class MonaiTiling:
    """MONAI's ``sliding_window_inference`` tiling.

    Attributes:
        overlap: fraction of the patch shared by neighbouring tiles, in [0, 1).
        gaussian: Gaussian importance weighting (MONAI ``mode="gaussian"``), else constant (``"constant"``).
    """

    overlap: float = 0.25
    gaussian: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")

    def tiles(self, padded_size: Sequence[int], patch_size: Sequence[int]) -> list[Slices]:
        return tile_slices(tile_starts_monai(padded_size, patch_size, self.overlap), patch_size)

    def importance(self, patch_size: Sequence[int], tiles: int, device: torch.device) -> torch.Tensor | None:
        """The importance map (``patch_size`` float32 on ``device``), None for uniform weights."""
        return gaussian_monai(patch_size, device) if self.gaussian else None


TilingMode = NnunetTiling | MonaiTiling
MODES = (NnunetTiling, MonaiTiling)


@dataclass(frozen=True)
class TileMemory:
    """How a tiled prediction holds its memory; none of these changes the result beyond the accumulator's rounding.

    Attributes:
        tile_batch_size: tiles per forward pass.
        accumulate_dtype: dtype of the accumulator and the importance sum, one of :data:`ACCUMULATE_DTYPES`
            (bfloat16 halves the accumulator's memory; float16 is refused, its range is too small).
        result_dtype: dtype of the result; the accumulator's own (e.g. bfloat16) returns it without a float32 copy.
        result_device: where the accumulator and result live; None: where the networks run. When it differs from
            there, each tile batch's prediction is copied to it (the host-accumulation fallback does this).
    """

    tile_batch_size: int = 1
    accumulate_dtype: torch.dtype = torch.float32
    result_dtype: torch.dtype = torch.float32
    result_device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be at least 1, got {self.tile_batch_size}")
        look_up_option("accumulate_dtype", self.accumulate_dtype, ACCUMULATE_DTYPES, _FLOAT16_REASON)
        if not self.result_dtype.is_floating_point:
            raise ValueError(f"result_dtype must be a floating dtype, got {self.result_dtype}")
        if self.result_device is not None:
            object.__setattr__(self, "result_device", torch.device(self.result_device))


@dataclass(frozen=True)
class _Pass:
    """What every attempt of one :func:`predict_tiled` call computes (checked): the tiles, flips and networks'
    coefficients, the output, and the memory choices."""

    patch_size: tuple[int, ...]
    tiling: TilingMode
    flips: list[tuple[int, ...]]
    coefficients: list[float]
    probabilities: bool
    memory: TileMemory
    progress: bool


class _SoftmaxBuffer:
    """``torch.softmax(logits, 1)`` written into one buffer that every tile batch of a pass reuses: the same kernel
    (``aten::_softmax``), without a fresh ``(B, K, *patch)`` float32 tensor per forward pass, whose pages the CPU
    faults in anew each time (three times the softmax's own cost there). A result is valid until the next call."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        buffer = self._buffer
        if (
            buffer is None
            or buffer.shape[1:] != logits.shape[1:]
            or len(buffer) < len(logits)
            or (buffer.dtype, buffer.device) != (logits.dtype, logits.device)
        ):
            buffer = self._buffer = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return torch.ops.aten._softmax.out(logits, 1, False, out=buffer[: len(logits)])


def _predict_batch(
    batch: torch.Tensor,
    networks: Sequence[torch.nn.Module],
    job: _Pass,
    autocast_dtype: torch.dtype | None,
    softmax: _SoftmaxBuffer,
) -> torch.Tensor:
    """Weighted mean over networks and flips of one tile batch's softmax (or logits).

    Args:
        batch: ``(B, C, *patch)`` on the networks' device.
        job: the flips (tensor dimensions, see :func:`~gcinfer.engine.windows.mirror_flips`), each network's
            coefficient (its normalised ensemble weight divided by the number of flips), and whether to take the
            softmax over the class dimension before averaging.
        autocast_dtype: run the networks under autocast to this dtype (None: off, or unsupported by the device).
        softmax: the pass's softmax buffer.

    Returns:
        ``(B, K, *patch)`` float32 on the batch's device. Each flip's sum over networks is flipped back once. With one
        network and no mirroring it is the softmax buffer itself: to be used before the next call.
    """
    autocast = torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    total = None
    for dims in job.flips:
        flipped = batch.flip(dims) if dims else batch
        flip_sum = None
        for network, coefficient in zip(networks, job.coefficients):
            with autocast:
                prediction = network(flipped).float()
            if job.probabilities:
                prediction = softmax(prediction)
            if flip_sum is None:
                flip_sum = prediction * coefficient if coefficient != 1.0 else prediction
            else:
                flip_sum.add_(prediction, alpha=coefficient)
        flip_sum = flip_sum.flip(dims) if dims else flip_sum
        total = flip_sum if total is None else total.add_(flip_sum)
    return total


def _add_into(
    region: torch.Tensor, values: torch.Tensor, weight_map: torch.Tensor | None, staging: StagedUpdate
) -> None:
    """``region += values * weight_map`` (``+= values`` without a map), computed in the two dtypes' promoted dtype
    and rounded once to the region's; through ``staging`` (:meth:`StagedUpdate.for_op` of the accumulator and
    ``values``), which on the CPU spares a bfloat16 accumulator the in-place op's two fresh tile-sized temporaries
    per call (allocation and page faults made it several times slower than the float32 one)."""
    if weight_map is None:
        staging.update(region, lambda target: target.add_(values))
    else:
        staging.update(region, lambda target: target.addcmul_(values, weight_map))


def _importance_sum(
    padded_size: Sequence[int],
    tiles: Sequence[Slices],
    weight_map: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``(1, *padded_size)``: the summed importance of all tiles at each voxel (the tile count without a map)."""
    total = torch.zeros((1, *padded_size), dtype=dtype, device=device)
    if weight_map is None:
        for tile in tiles:
            total[(slice(None), *tile)] += 1.0
        return total
    weights = weight_map[None]
    staging = StagedUpdate.for_op(dtype, weights)
    for tile in tiles:
        _add_into(total[(slice(None), *tile)], weights, None, staging)
    return total


def _predict_on(
    image: torch.Tensor,
    networks: Sequence[torch.nn.Module],
    job: _Pass,
    device: torch.device,
    result_device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One tiled prediction with the networks (already) on ``device`` and the accumulator on ``result_device``.

    Returns:
        ``(K, *image.shape[1:])`` ``job.memory.result_dtype`` on ``result_device``.
    """
    padded, crop = pad_to_patch(image.to(device), job.patch_size)
    padded_size = padded.shape[1:]
    tiles = job.tiling.tiles(padded_size, job.patch_size)
    weight_map = job.tiling.importance(job.patch_size, len(tiles), result_device)
    accumulate_dtype, batch_size = job.memory.accumulate_dtype, job.memory.tile_batch_size
    importance = _importance_sum(padded_size, tiles, weight_map, accumulate_dtype, result_device)
    accumulator = staging = None
    softmax = _SoftmaxBuffer()
    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not job.progress) as bar:
        for first in range(0, len(tiles), batch_size):
            batch_tiles = tiles[first : first + batch_size]
            batch = torch.stack([padded[(slice(None), *tile)] for tile in batch_tiles])
            prediction = _predict_batch(batch, networks, job, autocast_dtype, softmax).to(result_device)
            if accumulator is None:
                shape = (prediction.shape[1], *padded_size)
                accumulator = torch.zeros(shape, dtype=accumulate_dtype, device=result_device)
                staging = StagedUpdate.for_op(accumulate_dtype, prediction[0])
            for tile, tile_prediction in zip(batch_tiles, prediction):
                _add_into(accumulator[(slice(None), *tile)], tile_prediction, weight_map, staging)
            del batch, prediction, tile_prediction  # freed before the next batch is built
            bar.update(len(batch_tiles))
    del softmax, staging  # the tile buffers are not held while the result is made
    result = accumulator.div_(importance)[(slice(None), *crop)]
    return result.to(job.memory.result_dtype).contiguous()  # no copy unless cropped or cast


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


def _validate(image: torch.Tensor, patch_size: Sequence[int], tiling: object, mirror_axes: Sequence[int]) -> None:
    """Raise ValueError for a call the engine cannot honour (the option objects have checked themselves)."""
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(f"image must be a floating (C, X, Y, Z) tensor, got {image.dtype} {tuple(image.shape)}")
    if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
    if not isinstance(tiling, MODES):
        raise ValueError(f"tiling must be one of {', '.join(m.__name__ for m in MODES)}, got {tiling!r}")
    if any(a not in (0, 1, 2) for a in mirror_axes) or len(set(mirror_axes)) != len(mirror_axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {mirror_axes}")


def predict_tiled(
    image: torch.Tensor,
    networks: torch.nn.Module | Sequence[torch.nn.Module],
    patch_size: Sequence[int],
    tiling: TilingMode | None = None,
    *,
    mirror_axes: Sequence[int] = (),
    output: Output | str = Output.PROBABILITIES,
    weights: Sequence[float] | None = None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    memory: TileMemory | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Sliding-window prediction of ``image`` by one network or the weighted mean of an ensemble.

    Args:
        image: ``(C, X, Y, Z)`` floating tensor on any device.
        networks: one network or the ensemble members, all fed the same ``(B, C, *patch)`` input; each returns
            ``(B, K, *patch)`` logits (nnU-Net networks with deep supervision off). They are put in eval mode and
            run under ``torch.inference_mode``; the caller has already moved them to ``device``.
        patch_size: spatial tile size (3 ints).
        tiling: :class:`NnunetTiling` or :class:`MonaiTiling` (placement, weighting and padding of that
            reference); None: ``NnunetTiling()`` (step 0.5, Gaussian).
        mirror_axes: spatial axes (0, 1, 2) to mirror; the mean is over all ``2**k`` flip combinations.
        output: :class:`Output` or its value: ``"probabilities"`` (mean of the softmax over mirrors and networks) or
            ``"logits"`` (mean of the logits).
        weights: per-network ensemble weights, normalised to sum 1; None for equal weights.
        autocast_dtype: None (off), ``torch.float16`` or ``torch.bfloat16``; autocast only where the device
            supports it. Outputs are cast to float32 before the softmax.
        device: where the networks run; default ``image.device``.
        memory: tile batch, accumulator and result dtypes, result device (:class:`TileMemory`); None: its defaults
            (one tile per pass, float32, on ``device``).
        progress: tqdm bar over tiles; None shows it only when stderr is a terminal.

    Returns:
        ``(K, X, Y, Z)`` ``memory.result_dtype`` on ``memory.result_device``; on the CPU after an out-of-memory
        fallback.

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
    tiling = NnunetTiling() if tiling is None else tiling
    memory = TileMemory() if memory is None else memory
    _validate(image, patch_size, tiling, mirror_axes)
    flips = mirror_flips(mirror_axes)
    job = _Pass(
        patch_size=tuple(int(p) for p in patch_size),
        tiling=tiling,
        flips=flips,
        coefficients=[w / len(flips) for w in _normalised_weights(weights, len(networks))],
        probabilities=look_up_option("output", output, Output) is Output.PROBABILITIES,
        memory=memory,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    device = torch.device(device) if device is not None else image.device
    result_device = memory.result_device if memory.result_device is not None else device
    for network in networks:
        network.eval()

    def attempt(net_device: torch.device, acc_device: torch.device) -> torch.Tensor:
        autocast = autocast_dtype if torch.amp.is_autocast_available(net_device.type) else None
        with torch.inference_mode(), _networks_on(networks, net_device):
            return _predict_on(image, networks, job, net_device, acc_device, autocast)

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
