"""nnU-Net v1's image resampling on several threads (:mod:`gcinfer.pipelines.amos.threaded_resize`): bit for bit
scikit-image's ``resize`` as nnU-Net calls it, and nnU-Net's own ``resample_patient`` unchanged by it."""

from __future__ import annotations

import numpy as np
import pytest
from nnunet.preprocessing import preprocessing
from skimage.transform import resize

from gcinfer.pipelines.amos import threaded_resize
from gcinfer.pipelines.amos.threaded_resize import resize_threaded, threads_for_nnunet


@pytest.fixture
def small_slabs(monkeypatch):
    """Threads even for the small test volumes."""
    monkeypatch.setattr(threaded_resize, "MIN_SLAB_VOXELS", 1)


def random_cases(count: int, ndim: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(s) for s in rng.integers(2, 30, ndim))
        output = tuple(max(1, round(s * f)) for s, f in zip(shape, rng.uniform(0.3, 2.6, ndim)))
        yield rng.normal(0, 300, shape), output, int(rng.integers(0, 6)), int(rng.integers(1, 6))


@pytest.mark.parametrize("ndim", [2, 3])
def test_every_voxel_is_scikit_images(small_slabs, ndim: int) -> None:
    for image, output, order, threads in random_cases(40, ndim, seed=ndim):
        expected = resize(image, output, order=order, mode="edge", anti_aliasing=False)
        ours = resize_threaded(image, output, order, threads)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape
        assert ours.tobytes() == expected.tobytes(), (image.shape, output, order, threads)


def test_the_padding_and_the_prefilter_are_scipys(small_slabs) -> None:
    from scipy import ndimage
    from scipy.ndimage._interpolation import _prepad_for_spline_filter

    for image, _, order, threads in random_cases(20, 3, seed=7):
        padded, npad = _prepad_for_spline_filter(image, "nearest", 0.0)
        assert npad == threaded_resize.SPLINE_PAD
        ours = threaded_resize._pad_edge(image, npad, threads)
        assert ours.tobytes() == padded.tobytes()
        expected = ndimage.spline_filter(padded, max(order, 2), output=np.float64, mode="nearest")
        assert threaded_resize._spline_filter(ours, max(order, 2), threads).tobytes() == expected.tobytes()


@pytest.mark.parametrize("order", [1, 3], ids=["scipy's zoom", "vectorised zoom"])
def test_a_failing_slab_is_raised(small_slabs, monkeypatch, order: int) -> None:
    def fail(*_args):
        raise RuntimeError("slab failed")

    if order == 1:
        monkeypatch.setattr(threaded_resize._nd_image, "zoom_shift", fail)
    else:
        monkeypatch.setattr(threaded_resize.SplineZoom, "fill", fail)
    with pytest.raises(RuntimeError, match="slab failed"):
        resize_threaded(np.ones((8, 8, 8)), (16, 16, 16), order, 2)


@pytest.mark.parametrize("spacing", [(1.25, 0.78, 0.78), (4.0, 0.8, 0.8)], ids=["3D", "z apart"])
def test_nnunets_resampling_is_unchanged_within_the_block(small_slabs, monkeypatch, spacing) -> None:
    """nnU-Net's ``resample_patient`` (3D, and in-plane slice by slice when z is resampled apart) goes through the
    threaded resize inside the block, and gives the same bytes as outside it."""
    calls = []
    original = threaded_resize.resize_threaded
    monkeypatch.setattr(threaded_resize, "resize_threaded", lambda *args: calls.append(args[1:]) or original(*args))
    monkeypatch.setattr(threaded_resize, "default_threads", lambda: 3)
    data = np.random.default_rng(2).normal(0, 300, (1, 12, 40, 36)).astype(np.float32)
    target = np.array([1.5, 1.0, 1.0])
    outside, _ = preprocessing.resample_patient(data, None, np.array(spacing), target, 3, 1, force_separate_z=None)
    with threads_for_nnunet():
        assert preprocessing.resize is not resize
        inside, _ = preprocessing.resample_patient(data, None, np.array(spacing), target, 3, 1, force_separate_z=None)
    assert preprocessing.resize is resize
    assert calls and all(threads == 3 for *_, threads in calls)
    assert inside.tobytes() == outside.tobytes()


def test_overlapping_blocks_restore_scikit_images_resize_whatever_order_they_close_in() -> None:
    first, second = threads_for_nnunet(), threads_for_nnunet()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert preprocessing.resize is not resize  # the second block is still open
    second.__exit__(None, None, None)
    assert preprocessing.resize is resize


def test_calls_it_does_not_reproduce_go_to_scikit_image(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(threaded_resize, "resize_threaded", lambda *args: calls.append(args))
    image = np.random.default_rng(3).normal(0, 1, (6, 7, 8))
    with threads_for_nnunet():
        float32 = preprocessing.resize(image.astype(np.float32), (9, 9, 9), order=3, mode="edge", anti_aliasing=False)
        other_mode = preprocessing.resize(image, (9, 9, 9), order=3, mode="constant", anti_aliasing=False)
    assert not calls
    assert (
        float32.tobytes()
        == resize(image.astype(np.float32), (9, 9, 9), order=3, mode="edge", anti_aliasing=False).tobytes()
    )
    assert other_mode.tobytes() == resize(image, (9, 9, 9), order=3, mode="constant", anti_aliasing=False).tobytes()
