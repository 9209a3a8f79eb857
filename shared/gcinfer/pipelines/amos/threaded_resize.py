"""nnU-Net v1's image resampling (scikit-image's ``resize``, third-order spline) on several threads, byte for byte.

nnU-Net v1 resamples each channel with ``skimage.transform.resize(channel.astype(float), shape, order=3,
mode="edge", anti_aliasing=False)``, which is ``scipy.ndimage.zoom`` (``grid_mode=True``): the image padded by 12
voxels, a separable spline prefilter, then each output voxel from its 4 x 4 x 4 input neighbours, all on one
thread: the largest host cost of an AMOS case (a 512 x 512 x 600 CT: ~30 s per configuration). Here each step runs
on several threads (scipy's kernels and numpy's loops release the GIL), split where the result cannot change:

- the padding: copies, row by row;
- the prefilter: each 1D pass filters every line on its own, so the lines are split across threads;
- the interpolation: each output voxel depends only on its own coordinates, so the output is computed in slabs
  along the first axis, from order 2 on by :class:`~gcinfer.pipelines.amos.spline_zoom.SplineZoom` (scipy's loop
  as whole-row numpy operations, same bits; ``benchmarks/bench_resize.py``: the whole resize 1.7-2.2 times faster
  than with scipy's interpolation), else (or where that does not reproduce scipy) by scipy's ``zoom_shift``, the
  slab's first index given as an integer shift: ``(k + z0 + 0.5) * zoom - 0.5`` then comes from the same doubles as
  for the whole output;

then ``resize``'s own clip to the input's range. Every voxel is bit-identical (tested against ``resize`` and
``np.pad``/``spline_filter`` on random shapes, orders and thread counts).

:func:`threads_for_nnunet` puts this in place of ``resize`` inside nnU-Net's preprocessing module for the duration of
a block (only for the calls it reproduces; any other call goes to scikit-image unchanged), so that the preprocessing
itself stays nnU-Net's code.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.ndimage import _nd_image, _ni_support
from skimage.transform import _warps

from gcinfer.background import Background, SharedPatch
from gcinfer.pipelines.amos.spline_zoom import SplineZoom

MIN_SLAB_VOXELS = 1 << 18
"""Voxels below which a slab is not worth a thread of its own."""
SPLINE_PAD = 12
"""Voxels ``scipy.ndimage.zoom`` pads each side with (``mode="nearest"``) before its spline prefilter."""
_MODE = "nearest"
"""scipy's name of scikit-image's ``mode="edge"``, the mode nnU-Net passes."""


def default_threads() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resize_threaded(
    image: np.ndarray, output_shape: Sequence[int], order: int, threads: int, vectorised: bool = True
) -> np.ndarray:
    """``skimage.transform.resize(image, output_shape, order=order, mode="edge", anti_aliasing=False)`` of a float64
    image, bit for bit, the interpolation split over ``threads`` threads along the first axis.

    Args:
        image: float64, any number of dimensions (nnU-Net passes 3D channels, or 2D slices when it resamples z
            apart).
        output_shape: one positive int per dimension of ``image``.
        order: spline order, 0 to 5.
        threads: at most this many threads (fewer for small outputs).
        vectorised: interpolate with :class:`SplineZoom` where it reproduces scipy (False: scipy's ``zoom_shift``
            throughout, as the benchmark's comparison runs it).

    Returns:
        float64 array of ``output_shape``.
    """
    output_shape = tuple(int(s) for s in output_shape)
    zoom = np.ascontiguousarray(np.divide(np.array(image.shape), np.array(output_shape), dtype=np.float64))
    if order > 1:
        filtered, npad = _spline_filter(_pad_edge(image, SPLINE_PAD, threads), order, threads), SPLINE_PAD
    else:
        filtered, npad = image, 0
    output = np.empty(output_shape, dtype=np.float64)
    mode = _ni_support._extend_mode_to_code(_MODE)
    interpolation = SplineZoom.of(filtered, output_shape, zoom, order, npad) if vectorised else None

    def slab(start: int, stop: int) -> None:
        if interpolation is not None:
            interpolation.fill(output, start, stop)
            return
        shift = np.zeros(len(output_shape), dtype=np.float64)
        shift[0] = start
        _nd_image.zoom_shift(filtered, zoom, shift, output[start:stop], order, mode, 0.0, npad, True)

    _in_slabs(output.shape, 0, threads, slab)
    _warps._clip_warp_output(image, output, "edge", 0.0, True)
    return output


def _in_slabs(shape: Sequence[int], axis: int, threads: int, work: Callable[[int, int], None]) -> None:
    """``work(start, stop)`` over consecutive slabs of ``axis`` of an array of ``shape``, one thread per slab (fewer
    when small: :data:`MIN_SLAB_VOXELS`); the first failure is raised."""
    count = max(1, min(threads, shape[axis], int(np.prod(shape)) // MIN_SLAB_VOXELS))
    bounds = np.linspace(0, shape[axis], count + 1).round().astype(int).tolist()
    if count == 1:
        work(0, shape[axis])
        return
    running = [Background(lambda pair=pair: work(*pair), "resize slab") for pair in itertools.pairwise(bounds)]
    for slab in running:
        slab.result()


def _pad_edge(image: np.ndarray, pad: int, threads: int) -> np.ndarray:
    """``np.pad(image, pad, mode="edge")`` (what ``scipy.ndimage.zoom`` pads with before its spline prefilter); a 3D
    image row by row on ``threads`` threads (copies only, so the same bytes)."""
    if image.ndim != 3:
        return np.pad(image, pad, mode="edge")
    n0, n1, n2 = image.shape
    padded = np.empty((n0 + 2 * pad, n1 + 2 * pad, n2 + 2 * pad), dtype=image.dtype)

    def rows(start: int, stop: int) -> None:
        for row in range(start, stop):
            source, target = image[min(max(row - pad, 0), n0 - 1)], padded[row]
            target[pad : pad + n1, pad : pad + n2] = source
            target[:pad, pad : pad + n2] = source[0]
            target[pad + n1 :, pad : pad + n2] = source[-1]
            target[:, :pad] = target[:, pad : pad + 1]
            target[:, pad + n2 :] = target[:, pad + n2 - 1 : pad + n2]

    _in_slabs(padded.shape, 0, threads, rows)
    return padded


def _spline_filter(padded: np.ndarray, order: int, threads: int) -> np.ndarray:
    """``scipy.ndimage.spline_filter(padded, order, output=np.float64, mode="nearest")`` of a float64 array, computed in
    place (``padded`` is overwritten and returned): the same 1D filter along each axis in turn, each pass split over
    ``threads`` threads along another axis. scipy filters each line alone, read whole into its line buffer before it
    is written back, so in place gives the same bytes, without a second array of the padded image's size."""
    for axis in range(padded.ndim):
        across = 1 if axis == 0 and padded.ndim > 1 else 0

        def lines(start: int, stop: int, axis: int = axis, across: int = across) -> None:
            index = tuple(slice(start, stop) if a == across else slice(None) for a in range(padded.ndim))
            ndimage.spline_filter1d(padded[index], order, axis, output=padded[index], mode=_MODE)

        _in_slabs(padded.shape, across, threads, lines)
    return padded


def _reproduced(image: Any, output_shape: Any, order: int, kwargs: dict) -> bool:
    """Whether :func:`resize_threaded` reproduces this ``resize`` call (nnU-Net's data resampling)."""
    return (
        isinstance(image, np.ndarray)
        and image.dtype == np.float64
        and image.ndim >= 1
        and len(output_shape) == image.ndim
        and all(int(s) >= 1 for s in output_shape)
        and 0 <= order <= 5
        and kwargs == {"mode": "edge", "anti_aliasing": False}
    )


def _nnunet_resize(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def resize(image: Any, output_shape: Any, order: int = 1, **kwargs: Any) -> np.ndarray:
        if _reproduced(image, output_shape, order, kwargs):
            return resize_threaded(image, output_shape, order, default_threads())
        return original(image, output_shape, order=order, **kwargs)

    return resize


_patch_lock = threading.Lock()
_patch: list[SharedPatch] = []
"""The one patch of nnU-Net's ``resize`` (made on first use: importing nnU-Net prints, its caller silences that)."""


def threads_for_nnunet() -> contextlib.AbstractContextManager[None]:
    """Within the block, nnU-Net v1's preprocessing resamples images with :func:`resize_threaded` on
    :func:`default_threads` threads. One :class:`SharedPatch` serves every block, so that blocks may nest and
    overlap across threads (a configuration preprocessed in the background while another is)."""
    with _patch_lock:
        if not _patch:
            from nnunet.preprocessing import preprocessing

            _patch.append(SharedPatch(preprocessing, "resize", _nnunet_resize))
    return _patch[0].applied()
