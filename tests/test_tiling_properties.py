"""Property-based tests of the tiling engine (hypothesis): random volume shapes, patch sizes, steps, overlaps,
mirror axes, tile batch sizes and ensembles.

Properties:

- the result is a ``(K, *spatial)`` float32 probability map: finite, in [0, 1], summing to 1 over the classes;
- for a pointwise (1x1x1) network the tiled prediction is exactly the network applied to the whole volume, whatever
  the tiling, padding, weighting, mirroring, batching or ensemble weights (probabilities and logits);
- tile batching does not change the result;
- the tile starts equal nnU-Net v1's and MONAI's on full-size volumes (hundreds of voxels), and tiles cover the
  volume without gaps;
- parity with nnU-Net v1 ``predict_3D`` and MONAI ``sliding_window_inference`` on small random cases, with a network
  whose 5x5x5 receptive field makes tile borders, padding and Gaussian weighting visible.

Examples are few and volumes small so that the file runs in well under a minute; ``derandomize`` makes CI runs
reproducible (and no example database is written).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # nnU-Net v1 prints a banner
    warnings.simplefilter("ignore", DeprecationWarning)  # and imports scipy.ndimage.filters
    from nnunet.network_architecture.neural_network import SegmentationNetwork
    from nnunet.utilities.nd_softmax import softmax_helper
import itertools

from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from gcinfer.engine.tiling import MonaiTiling, NnunetTiling, TileMemory, TilingMode, predict_tiled
from gcinfer.engine.windows import tile_starts_monai, tile_starts_nnunet

TOLERANCE = 1e-4  # parity with the references (as tests/test_tiling.py)
EXACT = 1e-5  # float32 rounding of sums of a few terms

PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PLACEMENT = settings(max_examples=300, deadline=None, derandomize=True, database=None)

sizes = st.integers(1, 18)
patch_sizes = st.integers(1, 12)
volumes = st.tuples(st.integers(1, 2), sizes, sizes, sizes)  # (C, X, Y, Z)
patches = st.tuples(patch_sizes, patch_sizes, patch_sizes)
steps = st.floats(0.25, 1.0)
overlaps = st.floats(0.0, 0.8)
mirror_axes = st.lists(st.sampled_from((0, 1, 2)), unique=True, max_size=3).map(tuple)
classes = st.integers(2, 4)
batches = st.integers(1, 5)


class ConvNet(SegmentationNetwork):
    """Two 3x3x3 convolutions (zero padding 1, leaky ReLU): any input size, 5x5x5 receptive field.

    A nnU-Net v1 ``SegmentationNetwork`` so that ``predict_3D`` serves as the reference; also a plain module for
    the engine and MONAI.
    """

    def __init__(self, channels: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv_op = nn.Conv3d
        self.num_classes = num_classes
        self.inference_apply_nonlin = softmax_helper
        self.layers = nn.Sequential(
            nn.Conv3d(channels, 6, 3, padding=1), nn.LeakyReLU(0.01), nn.Conv3d(6, num_classes, 3, padding=1)
        )
        with torch.no_grad():  # large enough weights that the softmax is far from uniform
            self.layers[-1].weight.mul_(4.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@functools.cache
def conv_net(channels: int, num_classes: int, seed: int = 0) -> ConvNet:
    return ConvNet(channels, num_classes, seed)


def pointwise_net(channels: int, num_classes: int, seed: int) -> nn.Conv3d:
    torch.manual_seed(seed)
    network = nn.Conv3d(channels, num_classes, 1)
    with torch.no_grad():
        network.weight.mul_(4.0)
    return network.eval()


def volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A float32 (C, X, Y, Z) image of standard normal noise."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def random_tiling(data: st.DataObject, mode: str, gaussian: bool = True) -> TilingMode:
    """Random tiling options for ``mode``: a step (nnunet) or an overlap (monai)."""
    if mode == "nnunet":
        return NnunetTiling(data.draw(steps, label="step_size"), gaussian)
    return MonaiTiling(data.draw(overlaps, label="overlap"), gaussian)


MAX_FORWARD_PASSES = 2048
"""Examples whose tiles x flips exceed this are skipped (a 1-voxel patch over 18^3 voxels with 8 flips is ~47,000
forward passes, seconds of Python per example, and tests nothing a smaller count does not)."""


def affordable(shape: tuple[int, ...], patch: tuple[int, ...], tiling: TilingMode, axes: tuple[int, ...]) -> bool:
    padded = [max(s, p) for s, p in zip(shape[1:], patch)]
    return len(tiling.tiles(padded, patch)) * 2 ** len(axes) <= MAX_FORWARD_PASSES


# --- shape and distribution ---------------------------------------------------------------------------------------


@PROPERTY
@given(shape=volumes, patch=patches, k=classes, axes=mirror_axes, batch=batches, gaussian=st.booleans(), data=st.data())
def test_result_is_a_probability_map_of_the_volume_shape(shape, patch, k, axes, batch, gaussian, data) -> None:
    mode = data.draw(st.sampled_from(("nnunet", "monai")), label="mode")
    result = predict_tiled(
        volume(shape),
        conv_net(shape[0], k),
        patch,
        random_tiling(data, mode, gaussian),
        mirror_axes=axes,
        memory=TileMemory(tile_batch_size=batch),
        progress=False,
    )
    assert result.shape == (k, *shape[1:]) and result.dtype == torch.float32
    assert torch.isfinite(result).all()
    assert result.min() >= 0.0 and result.max() <= 1.0 + EXACT
    assert (result.sum(0) - 1.0).abs().max().item() <= EXACT


# --- invariances --------------------------------------------------------------------------------------------------


@PROPERTY
@given(
    shape=volumes,
    patch=patches,
    k=classes,
    axes=mirror_axes,
    batch=batches,
    gaussian=st.booleans(),
    weights=st.lists(st.floats(0.1, 3.0), min_size=1, max_size=3),
    data=st.data(),
)
def test_pointwise_network_gives_the_untiled_prediction(shape, patch, k, axes, batch, gaussian, weights, data) -> None:
    """Every tile, flip and network sees each voxel alone, so tiling must reproduce the whole-volume prediction."""
    mode = data.draw(st.sampled_from(("nnunet", "monai")), label="mode")
    output = data.draw(st.sampled_from(("probabilities", "logits")), label="output")
    tiling = random_tiling(data, mode, gaussian)
    assume(affordable(shape, patch, tiling, axes))
    networks = [pointwise_net(shape[0], k, seed) for seed in range(len(weights))]
    image = volume(shape)
    result = predict_tiled(
        image,
        networks,
        patch,
        tiling,
        mirror_axes=axes,
        memory=TileMemory(tile_batch_size=batch),
        weights=weights,
        output=output,
        progress=False,
    )
    with torch.inference_mode():
        per_network = [n(image[None])[0] for n in networks]
    if output == "probabilities":
        per_network = [torch.softmax(p, 0) for p in per_network]
    expected = sum(w * p for w, p in zip(weights, per_network)) / sum(weights)
    assert result.shape == expected.shape
    assert (result - expected).abs().max().item() <= EXACT * max(1.0, expected.abs().max().item())


@PROPERTY
@given(shape=volumes, patch=patches, axes=mirror_axes, batch=st.integers(2, 9), data=st.data())
def test_tile_batch_size_does_not_change_the_result(shape, patch, axes, batch, data) -> None:
    mode = data.draw(st.sampled_from(("nnunet", "monai")), label="mode")
    tiling, memory = random_tiling(data, mode), TileMemory(tile_batch_size=batch)
    assume(affordable(shape, patch, tiling, axes))
    network, image = conv_net(shape[0], 3), volume(shape)
    single = predict_tiled(image, network, patch, tiling, mirror_axes=axes, progress=False)
    batched = predict_tiled(image, network, patch, tiling, mirror_axes=axes, memory=memory, progress=False)
    assert (single - batched).abs().max().item() <= EXACT


# --- tile placement at full size ----------------------------------------------------------------------------------

full_sizes = st.integers(1, 800)
full_patches = st.integers(1, 320)


def assert_covers_without_gaps(starts: list[int], size: int, patch: int) -> None:
    assert starts[0] == 0 and starts[-1] + patch == size
    assert all(0 <= b - a <= patch for a, b in itertools.pairwise(starts))  # nnU-Net's rounding may repeat a start


@PLACEMENT
@given(size=full_sizes, patch=full_patches, step=st.floats(0.05, 1.0))
def test_tile_starts_match_nnunet_at_full_size(size: int, patch: int, step: float) -> None:
    size = max(size, patch)  # the engine pads to the patch first
    (starts,) = tile_starts_nnunet((size,), (patch,), step)
    assert [starts] == SegmentationNetwork._compute_steps_for_sliding_window((patch,), (size,), step)
    assert_covers_without_gaps(starts, size, patch)
    if len(starts) > 1:
        assert max(b - a for a, b in itertools.pairwise(starts)) <= patch * step + 1


@PLACEMENT
@given(size=full_sizes, patch=full_patches, overlap=st.floats(0.0, 0.95))
def test_tile_starts_match_monai_at_full_size(size: int, patch: int, overlap: float) -> None:
    size = max(size, patch)
    (starts,) = tile_starts_monai((size,), (patch,), overlap)
    interval = _get_scan_interval((size,), (patch,), 1, (overlap,))
    assert starts == [int(s[0].start) for s in dense_patch_slices((size,), (patch,), interval)]
    assert_covers_without_gaps(starts, size, patch)


# --- parity with the references -----------------------------------------------------------------------------------


def assert_close(result: torch.Tensor, reference: torch.Tensor) -> None:
    assert result.shape == reference.shape and result.dtype == torch.float32
    assert (result - reference).abs().max().item() <= TOLERANCE


@PROPERTY
@given(shape=volumes, patch=patches, step=steps, axes=mirror_axes, k=classes, gaussian=st.booleans())
def test_parity_with_nnunet_predict_3d(shape, patch, step, axes, k, gaussian) -> None:
    network, image = conv_net(shape[0], k), volume(shape)
    result = predict_tiled(image, network, patch, NnunetTiling(step, gaussian), mirror_axes=axes, progress=False)
    reference = network.predict_3D(
        image.numpy(),
        do_mirroring=bool(axes),
        mirror_axes=axes,
        use_sliding_window=True,
        step_size=step,
        patch_size=patch,
        use_gaussian=gaussian,
        all_in_gpu=False,
        verbose=False,
        mixed_precision=False,
    )[1]
    assert_close(result, torch.from_numpy(reference))


@PROPERTY
@given(shape=volumes, patch=patches, overlap=overlaps, batch=batches, k=classes, gaussian=st.booleans())
def test_parity_with_monai_sliding_window_inference(shape, patch, overlap, batch, k, gaussian) -> None:
    network, image = conv_net(shape[0], k), volume(shape)
    tiling, memory = MonaiTiling(overlap, gaussian), TileMemory(tile_batch_size=batch)
    result = predict_tiled(image, network, patch, tiling, memory=memory, progress=False)
    with torch.inference_mode():
        reference = sliding_window_inference(
            image[None],
            patch,
            batch,
            lambda tiles: torch.softmax(network(tiles), 1),
            overlap,
            mode="gaussian" if gaussian else "constant",
            sigma_scale=0.125,
            padding_mode="constant",
        )[0]
    assert_close(result, reference)
