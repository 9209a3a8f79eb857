"""scipy's zoom interpolation as whole-row numpy operations (:mod:`gcinfer.pipelines.amos.spline_zoom`): every voxel
bit for bit scipy's ``zoom_shift``, in any slabs, and scipy's own call wherever that is not assured."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import _nd_image

from gcinfer.pipelines.amos import spline_zoom, threaded_resize
from gcinfer.pipelines.amos.spline_zoom import SplineZoom, axis_taps
from gcinfer.pipelines.amos.threaded_resize import SPLINE_PAD, resize_threaded

NEAREST = spline_zoom._NEAREST


def scipy_zoom(coefficients: np.ndarray, output_shape: tuple[int, ...], order: int, npad: int) -> np.ndarray:
    zoom = np.divide(np.array(coefficients.shape) - 2 * npad, np.array(output_shape), dtype=np.float64)
    output = np.empty(output_shape)
    _nd_image.zoom_shift(coefficients, zoom, np.zeros(len(output_shape)), output, order, NEAREST, 0.0, npad, True)
    return output


def ours(coefficients: np.ndarray, output_shape: tuple[int, ...], order: int, npad: int, slabs: int) -> np.ndarray:
    zoom = np.divide(np.array(coefficients.shape) - 2 * npad, np.array(output_shape), dtype=np.float64)
    interpolation = SplineZoom.of(coefficients, output_shape, zoom, order, npad)
    assert interpolation is not None
    output = np.full(output_shape, np.nan)
    bounds = np.linspace(0, output_shape[0], slabs + 1).round().astype(int)
    for start, stop in itertools.pairwise(bounds.tolist()):
        interpolation.fill(output, start, stop)
    return output


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_every_voxel_is_scipys_zoom_shift(monkeypatch, ndim: int, order: int) -> None:
    """Random coefficients (with exact zeros, negatives and large values), shrinking and growing axes, the output in
    one slab or several, blocks of a few rows: the same bytes as scipy."""
    monkeypatch.setattr(spline_zoom, "BLOCK_BYTES", 3 * 8 * (order + 1) * 40)
    rng = np.random.default_rng(order * 10 + ndim)
    for _ in range(6):
        shape = tuple(int(s) for s in rng.integers(3, 40, ndim))
        output_shape = tuple(max(1, round(s * f)) for s, f in zip(shape, rng.uniform(0.3, 2.6, ndim)))
        coefficients = rng.normal(0, 300, tuple(s + 2 * SPLINE_PAD for s in shape))
        coefficients[rng.random(coefficients.shape) < 0.1] = 0.0
        expected = scipy_zoom(coefficients, output_shape, order, SPLINE_PAD)
        for slabs in (1, 3):
            assert ours(coefficients, output_shape, order, SPLINE_PAD, slabs).tobytes() == expected.tobytes()


def test_the_taps_are_scipys_weights_and_indices() -> None:
    """Along one axis: the weights sum to one, and each output sample is its taps' weighted sum as scipy adds it."""
    taps = axis_taps(64 + 2 * SPLINE_PAD, 91, 64 / 91, 3, SPLINE_PAD)
    assert taps is not None and taps.weights.shape == (91, 4)
    np.testing.assert_allclose(taps.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(np.diff(taps.first) >= 0) and taps.first[0] == SPLINE_PAD - 2


def test_taps_past_the_input_leave_the_zoom_to_scipy() -> None:
    """Without padding the first and last taps fall outside the input, where scipy mirrors indices: not reproduced."""
    assert axis_taps(20, 30, 20 / 30, 3, 0) is None
    assert SplineZoom.of(np.zeros((20, 20)), (30, 30), (20 / 30, 20 / 30), 3, 0) is None
    assert SplineZoom.of(np.zeros((44, 44)), (30, 30), (20 / 30, 20 / 30), 1, SPLINE_PAD) is None
    assert SplineZoom.of(np.zeros((44, 44), np.float32), (30, 30), (20 / 30, 20 / 30), 3, SPLINE_PAD) is None


def test_an_axis_scipy_computes_otherwise_leaves_the_zoom_to_scipy(monkeypatch) -> None:
    """Should scipy's 1D zoom of the check line differ from the taps' sum (another scipy's coordinates or sum
    order), the axis is not used and ``resize_threaded`` falls back to scipy's call: still scikit-image's bytes."""
    from skimage.transform import resize

    scipy_line = spline_zoom._zoom_line

    def disagreeing(line, size, zoom, order, npad):
        result = scipy_line(line, size, zoom, order, npad)
        return result if set(np.unique(line)) <= {0.0, 1.0} else np.nextafter(result, np.inf)

    monkeypatch.setattr(spline_zoom, "_zoom_line", disagreeing)
    assert axis_taps(64 + 2 * SPLINE_PAD, 91, 64 / 91, 3, SPLINE_PAD) is None
    fills = []
    monkeypatch.setattr(SplineZoom, "fill", lambda *args: fills.append(args))
    image = np.random.default_rng(5).normal(0, 300, (9, 17, 13))
    expected = resize(image, (14, 11, 20), order=3, mode="edge", anti_aliasing=False)
    assert resize_threaded(image, (14, 11, 20), 3, 2).tobytes() == expected.tobytes()
    assert not fills


def test_resize_threaded_interpolates_with_it_from_order_two_on(monkeypatch) -> None:
    monkeypatch.setattr(threaded_resize, "MIN_SLAB_VOXELS", 1)
    fills, zoom_shifts = [], []
    fill, zoom_shift = SplineZoom.fill, threaded_resize._nd_image.zoom_shift
    monkeypatch.setattr(SplineZoom, "fill", lambda *args: fills.append(args[2:]) or fill(*args))
    monkeypatch.setattr(  # the image's zoom, not the 1D calls that read the taps
        threaded_resize._nd_image, "zoom_shift", lambda *a: (a[0].ndim > 1 and zoom_shifts.append(a)) or zoom_shift(*a)
    )
    image = np.random.default_rng(6).normal(0, 300, (12, 10, 14))
    resize_threaded(image, (20, 8, 9), 3, 2)
    assert sorted(fills) == [(0, 10), (10, 20)] and not zoom_shifts
    resize_threaded(image, (20, 8, 9), 1, 2)
    assert len(fills) == 2 and len(zoom_shifts) == 2


def test_the_resize_benchmark_compares_the_three_ways_byte_for_byte() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_resize.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--planes", "4"], capture_output=True, text=True, check=True, timeout=300
    )
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| 2 x") or line.startswith("| 1.5 x")]
    assert len(rows) == 6 and all(row.endswith("| yes |") for row in rows), completed.stdout
    assert "| 2 x 0.68825 x 0.68825 | 2 x 580 x 580 | scikit-image resize (reference) |" in completed.stdout
