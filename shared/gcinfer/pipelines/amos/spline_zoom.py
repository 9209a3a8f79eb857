"""The interpolation step of ``scipy.ndimage.zoom`` (scipy's ``zoom_shift`` on prefiltered coefficients) as whole-row
numpy operations: the same bits, a fraction of the time.

For each output voxel scipy's C loop starts at ``t = 0.0`` and, for each of the ``(order + 1) ** ndim`` taps in
row-major order (the last axis fastest), adds ``((c * w0) * w1) * w2``: the tap's coefficient times the spline weight
of each axis in turn. Every product and sum is one IEEE double operation, so the same operations in the same order,
each done for a block of output rows at once by numpy's loops (which never fuse a multiply and an add), give every
output voxel bit for bit; the C loop does them voxel by voxel with a type dispatch per tap. Where the order of the
products allows, they are done before a gather, on the smaller input grid: ``c * w0`` on the input plane, ``* w1``
on input columns, ``* w2`` after the last gather.

Each axis's taps are scipy's own (:func:`axis_taps`): the weights are read off 1D ``zoom_shift`` calls on combs of
period ``order + 1``, and the whole axis is checked against a 1D ``zoom_shift`` of a random line; any axis that does
not reproduce, or whose taps reach past the padded input (where scipy mirrors indices), leaves the call to scipy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import _nd_image, _ni_support

BLOCK_BYTES = 2 << 20
"""Size of the gathered block of output rows (rows x taps x output columns, float64): cache-sized."""
_NEAREST = _ni_support._extend_mode_to_code("nearest")


@dataclasses.dataclass(frozen=True)
class AxisTaps:
    """Where scipy's interpolation reads along one axis, per output index.

    Attributes:
        first: ``(size,)`` int64, the first of the ``order + 1`` consecutive input indices of each output index.
        weights: ``(size, order + 1)`` float64, their spline weights, in scipy's bits.
    """

    first: np.ndarray
    weights: np.ndarray


def _zoom_line(line: np.ndarray, size: int, zoom: float, order: int, npad: int) -> np.ndarray:
    """scipy's 1D ``zoom_shift`` of ``line`` (float64) to ``size`` samples (``grid_mode``, no shift)."""
    out = np.empty(size, dtype=np.float64)
    _nd_image.zoom_shift(line, np.array([zoom]), np.zeros(1), out, order, _NEAREST, 0.0, npad, True)
    return out


def axis_taps(length: int, size: int, zoom: float, order: int, npad: int) -> AxisTaps | None:
    """The taps of ``zoom_shift`` along an axis of ``length`` padded input samples and ``size`` output samples
    (``zoom``: input over output extent, ``npad`` samples of padding each side, ``grid_mode``), or None when scipy's
    are not reproduced: a tap outside the input, or the axis's 1D zoom not identical to scipy's."""
    taps = order + 1
    coordinates = (np.arange(size, dtype=np.float64) + 0.5) * zoom - 0.5 + npad
    first = np.floor(coordinates if order % 2 else coordinates + 0.5).astype(np.int64) - order // 2
    if size == 0 or first.min() < 0 or first.max() + order >= length:
        return None
    weights = np.empty((size, taps), dtype=np.float64)
    for residue in range(taps):
        comb = (np.arange(length) % taps == residue).astype(np.float64)
        weights[np.arange(size), (residue - first) % taps] = _zoom_line(comb, size, zoom, order, npad)
    line = np.random.default_rng(0).normal(0.0, 1000.0, length)
    ours = np.zeros(size)
    for k in range(taps):
        ours += line[first + k] * weights[:, k]
    if ours.tobytes() != _zoom_line(line, size, zoom, order, npad).tobytes():
        return None
    return AxisTaps(first, weights)


class SplineZoom:
    """The interpolation of one 2D or 3D zoom: the taps of every axis, computed once; :meth:`fill` then computes any
    slab of output planes (from several threads at once: each call has its own buffers).

    Args:
        coefficients: the prefiltered, padded image, float64, C-contiguous, 2D (y, x) or 3D (z, y, x).
        axes: :func:`axis_taps` per axis, same order.
    """

    def __init__(self, coefficients: np.ndarray, axes: Sequence[AxisTaps]) -> None:
        self.coefficients = coefficients
        self.axes = tuple(axes)
        self.taps = self.axes[0].weights.shape[1]
        rows, columns = self.axes[-2], self.axes[-1]
        width = len(columns.first)
        self.block_rows = max(1, BLOCK_BYTES // (self.taps * width * 8))
        self.column_index = (columns.first[None, :] + np.arange(self.taps)[:, None]).reshape(-1)
        self.column_weights = np.ascontiguousarray(columns.weights.T).reshape(-1, 1)
        starts = range(0, len(rows.first), self.block_rows)
        self.row_span = max(
            rows.first[min(y + self.block_rows, len(rows.first)) - 1] - rows.first[y] + self.taps for y in starts
        )

    @classmethod
    def of(
        cls, coefficients: np.ndarray, output_shape: Sequence[int], zoom: Sequence[float], order: int, npad: int
    ) -> SplineZoom | None:
        """The interpolation of ``coefficients`` to ``output_shape`` as ``zoom_shift(coefficients, zoom, 0, output,
        order, "nearest", 0.0, npad, grid_mode=True)`` computes it, or None when this class does not reproduce it
        (not 2D/3D float64, order below 2, a tap at the input's edge)."""
        if coefficients.ndim not in (2, 3) or order < 2 or coefficients.dtype != np.float64:
            return None
        axes = [axis_taps(n, s, float(z), order, npad) for n, s, z in zip(coefficients.shape, output_shape, zoom)]
        if any(axis is None for axis in axes):
            return None
        return cls(np.ascontiguousarray(coefficients), axes)

    def fill(self, output: np.ndarray, start: int, stop: int) -> None:
        """Compute ``output[start:stop]`` (output: float64, the whole output's shape; ``start:stop`` along its first
        axis)."""
        rows = self.axes[-2]
        buffers = _Buffers(self)
        if self.coefficients.ndim == 2:
            for y0 in range(start, stop, self.block_rows):
                y1 = min(y0 + self.block_rows, stop)
                r0, r1 = rows.first[y0], rows.first[y1 - 1] + self.taps
                total = buffers.total(y1 - y0)
                self._add_rows(self.coefficients[r0:r1], y0, y1, r0, total, True, buffers)
                np.copyto(output[y0:y1], total.T)
            return
        planes = self.axes[0]
        for z in range(start, stop):
            for y0 in range(0, len(rows.first), self.block_rows):
                y1 = min(y0 + self.block_rows, len(rows.first))
                r0, r1 = rows.first[y0], rows.first[y1 - 1] + self.taps
                total, fresh = buffers.total(y1 - y0), True
                for i in range(self.taps):
                    scaled = buffers.span[: r1 - r0]
                    np.multiply(self.coefficients[planes.first[z] + i, r0:r1], planes.weights[z, i], out=scaled)
                    fresh = self._add_rows(scaled, y0, y1, r0, total, fresh, buffers)
                np.copyto(output[z, y0:y1], total.T)

    def _add_rows(
        self, plane: np.ndarray, y0: int, y1: int, r0: int, total: np.ndarray, fresh: bool, buffers: _Buffers
    ) -> bool:
        """Add the taps of the last two axes for output rows ``y0:y1`` to ``total`` (transposed: ``(width, y1 -
        y0)``; replaced instead when ``fresh``): ``plane`` is input rows ``r0:`` already multiplied by the leading
        axes' weights. Each row tap's rows are gathered and weighted, then transposed, so that the column taps are
        gathered as whole rows too (an element-wise gather costs several times more). The gathers' indices are in
        range (checked by :func:`axis_taps`): ``mode="clip"`` only spares ``take`` the buffer it writes through in
        its default mode. Returns False (``total`` holds a sum from now on)."""
        rows, taps, count = self.axes[-2], self.taps, y1 - y0
        picked, flipped, terms = buffers.work(count)
        by_tap = terms.reshape(taps, -1, count)
        for j in range(taps):
            np.take(plane, rows.first[y0:y1] + (j - r0), axis=0, out=picked, mode="clip")
            np.multiply(picked, rows.weights[y0:y1, j, None], out=picked)
            np.copyto(flipped, picked.T)
            np.take(flipped, self.column_index, axis=0, out=terms, mode="clip")
            np.multiply(terms, self.column_weights, out=terms)
            for k in range(taps):
                if fresh:
                    np.add(by_tap[k], 0.0, out=total)
                    fresh = False
                else:
                    np.add(total, by_tap[k], out=total)
        return fresh


class _Buffers:
    """One :meth:`SplineZoom.fill` call's working arrays, sized for a block of output rows; smaller blocks (the
    last) use contiguous leading parts."""

    def __init__(self, zoom: SplineZoom) -> None:
        columns, width = zoom.coefficients.shape[-1], len(zoom.axes[-1].first)
        self.columns, self.width, self.taps = columns, width, zoom.taps
        self.span = np.empty((zoom.row_span, columns)) if zoom.coefficients.ndim == 3 else None
        """3D: the input rows of a block times a plane tap's weight."""
        self._picked = np.empty(zoom.block_rows * columns)
        self._flipped = np.empty(zoom.block_rows * columns)
        self._terms = np.empty(zoom.block_rows * zoom.taps * width)
        self._total = np.empty(zoom.block_rows * width)

    def total(self, count: int) -> np.ndarray:
        """``(width, count)``: a block's sum, transposed."""
        return self._total[: self.width * count].reshape(self.width, count)

    def work(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(count, columns)`` gathered rows, ``(columns, count)`` the same transposed, ``(taps * width, count)``
        gathered columns (tap-major)."""
        return (
            self._picked[: count * self.columns].reshape(count, self.columns),
            self._flipped[: count * self.columns].reshape(self.columns, count),
            self._terms[: count * self.taps * self.width].reshape(self.taps * self.width, count),
        )
