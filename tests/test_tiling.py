"""Tiling engine: parity with nnU-Net v1 ``predict_3D`` and MONAI ``sliding_window_inference``, the out-of-memory
fallback, and behaviour (ensembles, memory, dtypes, progress, validation).

Everything runs on the CPU in float32 with small networks on small odd-sized volumes; the references run on the same
weights and inputs. Probabilities must agree to 1e-4 (they agree to ~2e-7).
"""

from __future__ import annotations

import gc
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gcinfer.engine import tiling
from gcinfer.engine.staged_update import StagedUpdate
from gcinfer.engine.tiling import (
    MonaiTiling,
    NnunetTiling,
    Output,
    TileMemory,
    _fallback_attempts,
    look_up_option,
    predict_tiled,
)
from gcinfer.engine.windows import gaussian_monai, gaussian_nnunet, mirror_flips, tile_starts_monai, tile_starts_nnunet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # nnU-Net v1 imports scipy.ndimage.filters
    from nnunet.network_architecture.generic_modular_residual_UNet import FabiansUNet
    from nnunet.network_architecture.generic_modular_UNet import get_default_network_config
    from nnunet.network_architecture.generic_UNet import Generic_UNet
    from nnunet.network_architecture.neural_network import SegmentationNetwork
    from nnunet.utilities.nd_softmax import softmax_helper
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.networks.nets import DynUNet

PATCH = (16, 12, 20)  # anisotropic, divisible by 4 (two poolings)
CHANNELS, CLASSES = 2, 3
TOLERANCE = 1e-4


def generic_unet(seed: int) -> Generic_UNet:
    """A small nnU-Net v1 3d_fullres-style Generic_UNet (instance norm, leaky ReLU), deep supervision off."""
    torch.manual_seed(seed)
    network = Generic_UNet(
        CHANNELS,
        4,
        CLASSES,
        2,
        conv_op=nn.Conv3d,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=nn.Dropout3d,
        dropout_op_kwargs={"p": 0, "inplace": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        deep_supervision=False,
        final_nonlin=lambda x: x,
        pool_op_kernel_sizes=[[2, 2, 2]] * 2,
        conv_kernel_sizes=[[3, 3, 3]] * 3,
    )
    network.do_ds = False
    network.inference_apply_nonlin = softmax_helper
    return network.eval()


def fabians_unet(seed: int) -> FabiansUNet:
    """A small nnU-Net v1 FabiansUNet (residual encoder), deep supervision off."""
    torch.manual_seed(seed)
    props = get_default_network_config(3, None, norm_type="in")
    network = FabiansUNet(
        CHANNELS,
        4,
        (1, 1, 1),
        2,
        [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        [[3, 3, 3]] * 3,
        props,
        CLASSES,
        (1, 1),
        deep_supervision=False,
        max_features=32,
    )
    network.decoder.deep_supervision = False
    network.inference_apply_nonlin = softmax_helper
    return network.eval()


def dynunet(seed: int) -> DynUNet:
    """A small MONAI DynUNet (the AutoPET architecture), deep supervision off."""
    torch.manual_seed(seed)
    return DynUNet(3, CHANNELS, CLASSES, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], norm_name="instance").eval()


NNUNET_NETWORKS = {"Generic_UNet": generic_unet, "FabiansUNet": fabians_unet}


def volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A float32 (C, X, Y, Z) test image."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def nnunet_reference(
    network: SegmentationNetwork, image: torch.Tensor, step: float, axes: tuple[int, ...], gaussian: bool = True
) -> torch.Tensor:
    """nnU-Net v1 predict_3D softmax probabilities (K, X, Y, Z), sliding window, CPU, fp32."""
    probabilities = network.predict_3D(
        image.numpy(),
        do_mirroring=bool(axes),
        mirror_axes=axes,
        use_sliding_window=True,
        step_size=step,
        patch_size=PATCH,
        use_gaussian=gaussian,
        all_in_gpu=False,
        verbose=False,
        mixed_precision=False,
    )[1]
    return torch.from_numpy(probabilities)


def monai_reference(
    network: nn.Module, image: torch.Tensor, overlap: float, sw_batch_size: int, softmax: bool = True
) -> torch.Tensor:
    """MONAI sliding_window_inference (gaussian, sigma 0.125, constant padding) of softmax or logits, (K, X, Y, Z)."""

    def predictor(tiles: torch.Tensor) -> torch.Tensor:
        return torch.softmax(network(tiles), 1) if softmax else network(tiles)

    with torch.inference_mode():
        return sliding_window_inference(
            image[None],
            PATCH,
            sw_batch_size,
            predictor,
            overlap,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
        )[0]


def assert_close(result: torch.Tensor, reference: torch.Tensor) -> None:
    assert result.shape == reference.shape and result.dtype == torch.float32
    assert reference.max() - reference.min() > 0.3, "degenerate reference: the comparison would prove little"
    assert (result - reference).abs().max().item() <= TOLERANCE


# --- tile placement and importance maps -------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0])
def test_tile_starts_match_nnunet(step: float) -> None:
    for size in range(1, 90):
        for patch in range(1, size + 1):
            expected = SegmentationNetwork._compute_steps_for_sliding_window((patch,), (size,), step)
            assert tile_starts_nnunet((size,), (patch,), step) == expected, (size, patch)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_tile_starts_match_monai(overlap: float) -> None:
    for size in range(1, 90):
        for patch in range(1, size + 1):
            interval = _get_scan_interval((size,), (patch,), 1, (overlap,))
            expected = [int(s[0].start) for s in dense_patch_slices((size,), (patch,), interval)]
            assert tile_starts_monai((size,), (patch,), overlap) == [expected], (size, patch)


@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 3, 5), (16, 12, 20), (7, 12, 9), (64, 48, 33), (28, 96, 80)])
def test_gaussians_match_references_exactly(patch: tuple[int, int, int]) -> None:
    assert torch.equal(gaussian_nnunet(patch), torch.from_numpy(SegmentationNetwork._get_gaussian(patch, 1 / 8)))
    assert torch.equal(gaussian_monai(patch), compute_importance_map(patch, "gaussian", 0.125, "cpu"))


def test_mirror_flips_are_all_subsets_as_tensor_dims() -> None:
    assert mirror_flips(()) == [()]
    assert mirror_flips((2, 0)) == [(), (2,), (4,), (2, 4)]
    assert len(mirror_flips((0, 1, 2))) == 8 and len(set(mirror_flips((0, 1, 2)))) == 8


# --- parity with nnU-Net v1 predict_3D ---------------------------------------------------------------------------

NNUNET_CASES = {
    "odd sizes, step 0.5": ((CHANNELS, 37, 29, 45), 0.5, ()),
    "odd sizes, step 0.5, mirroring": ((CHANNELS, 21, 17, 27), 0.5, (0, 1, 2)),
    "odd sizes, step 0.7, mirroring x and z": ((CHANNELS, 27, 21, 33), 0.7, (0, 2)),
    "odd sizes, step 1": ((CHANNELS, 37, 29, 45), 1.0, ()),
    "smaller than the patch in x and y, mirroring": ((CHANNELS, 11, 9, 27), 0.5, (0, 1, 2)),
    "smaller than the patch everywhere (one tile, no Gaussian)": ((CHANNELS, 11, 9, 13), 0.5, (1,)),
}


@pytest.mark.parametrize("architecture", NNUNET_NETWORKS)
@pytest.mark.parametrize("case", NNUNET_CASES)
def test_parity_with_nnunet_predict_3d(architecture: str, case: str) -> None:
    shape, step, axes = NNUNET_CASES[case]
    network, image = NNUNET_NETWORKS[architecture](0), volume(shape)
    result = predict_tiled(image, network, PATCH, NnunetTiling(step_size=step), mirror_axes=axes, progress=False)
    assert_close(result, nnunet_reference(network, image, step, axes))


def test_parity_with_nnunet_without_gaussian() -> None:
    network, image = generic_unet(0), volume((CHANNELS, 37, 29, 45))
    result = predict_tiled(image, network, PATCH, NnunetTiling(gaussian=False), progress=False)
    assert_close(result, nnunet_reference(network, image, 0.5, (), gaussian=False))


@pytest.mark.parametrize("weights", [None, (1.0, 3.0)])
def test_ensemble_is_the_weighted_mean_of_nnunet_predictions(weights: tuple[float, float] | None) -> None:
    """nnU-Net v1 ensembles average the folds' predict_3D probabilities; weighted here when weights are given."""
    networks, image, axes = [generic_unet(1), fabians_unet(2)], volume((CHANNELS, 21, 17, 27)), (1, 2)
    result = predict_tiled(image, networks, PATCH, mirror_axes=axes, weights=weights, progress=False)
    w = np.array(weights or (1.0, 1.0)) / sum(weights or (1.0, 1.0))
    reference = sum(wi * nnunet_reference(n, image, 0.5, axes) for wi, n in zip(w, networks))
    assert_close(result, reference)


# --- parity with MONAI sliding_window_inference ----------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0.25, 0.75])
@pytest.mark.parametrize("batch", [1, 8])
def test_parity_with_monai_sliding_window_inference(overlap: float, batch: int) -> None:
    network, image = dynunet(0), volume((CHANNELS, 29, 23, 37))
    tiling, memory = MonaiTiling(overlap=overlap), TileMemory(tile_batch_size=batch)
    result = predict_tiled(image, network, PATCH, tiling, memory=memory, progress=False)
    assert_close(result, monai_reference(network, image, overlap, batch))


def test_parity_with_monai_smaller_than_the_patch() -> None:
    network, image = dynunet(0), volume((CHANNELS, 11, 29, 13))
    result = predict_tiled(image, network, PATCH, MonaiTiling(overlap=0.5), progress=False)
    assert_close(result, monai_reference(network, image, 0.5, 1))


def test_parity_with_monai_constant_blending() -> None:
    network, image = dynunet(0), volume((CHANNELS, 29, 23, 37))
    result = predict_tiled(image, network, PATCH, MonaiTiling(gaussian=False), progress=False)
    with torch.inference_mode():
        reference = sliding_window_inference(
            image[None], PATCH, 1, lambda tiles: torch.softmax(network(tiles), 1), 0.25, mode="constant"
        )[0]
    assert_close(result, reference)


def test_logits_are_the_weighted_mean_of_logits_as_monai() -> None:
    network, image = dynunet(0), volume((CHANNELS, 29, 23, 37))
    result = predict_tiled(image, network, PATCH, MonaiTiling(), output=Output.LOGITS, progress=False)
    assert_close(result, monai_reference(network, image, 0.25, 1, softmax=False))


# --- out-of-memory fallback ----------------------------------------------------------------------------------------


class FailingNetwork(nn.Module):
    """Forwards to ``inner`` but raises ``torch.OutOfMemoryError`` on the calls numbered in ``failing_calls``."""

    def __init__(self, inner: nn.Module, failing_calls: set[int]) -> None:
        super().__init__()
        self.inner, self.failing_calls, self.calls = inner, failing_calls, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls - 1 in self.failing_calls:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return self.inner(x)


@pytest.mark.parametrize("failing_calls", [{0}, {5}], ids=["first call", "mid-volume"])
def test_out_of_memory_falls_back_with_the_same_result(failing_calls: set[int], caplog) -> None:
    network, image = generic_unet(0), volume((CHANNELS, 21, 17, 27))
    expected = predict_tiled(image, network, PATCH, mirror_axes=(0,), progress=False)
    failing = FailingNetwork(network, failing_calls)
    with caplog.at_level(logging.WARNING, logger="gcinfer.engine.tiling"):
        result = predict_tiled(image, failing, PATCH, mirror_axes=(0,), progress=False)
    assert torch.equal(result, expected)
    assert len(caplog.records) == 1 and "out of memory" in caplog.records[0].getMessage()


@pytest.mark.parametrize("failing_calls", [{0}, {5}], ids=["first call", "mid-volume"])
def test_out_of_memory_with_the_result_on_another_device_retries_accumulating_on_the_host(
    failing_calls: set[int], caplog
) -> None:
    """The GPU path's second tier, on the CPU: the result asked on a device other than the networks' (``cpu:0``, a
    distinct torch.device whose tensors live on the host, stands for the accelerator: tiles are moved to it and
    accumulated there until the injected out-of-memory), then the retry with the networks where they were and the
    accumulator on the host."""
    network, image = generic_unet(0), volume((CHANNELS, 21, 17, 27))
    counting = FailingNetwork(network, set())
    expected = predict_tiled(image, counting, PATCH, mirror_axes=(0,), progress=False)
    failing = FailingNetwork(network, failing_calls)
    other = torch.device("cpu", 0)
    assert other != torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="gcinfer.engine.tiling"):
        result = predict_tiled(
            image, failing, PATCH, mirror_axes=(0,), memory=TileMemory(result_device=other), progress=False
        )
    assert torch.equal(result, expected)
    assert failing.calls == max(failing_calls) + 1 + counting.calls  # up to the failure, then a whole run
    assert [r.getMessage() for r in caplog.records] == [
        "out of memory with networks on cpu and result on cpu:0; retrying with networks on cpu and result on cpu"
    ]


def test_out_of_memory_on_the_cpu_is_raised_after_the_host_attempt(caplog) -> None:
    failing = FailingNetwork(generic_unet(0), {0, 1})
    with caplog.at_level(logging.WARNING, logger="gcinfer.engine.tiling"), pytest.raises(torch.OutOfMemoryError):
        predict_tiled(volume((CHANNELS, 16, 12, 20)), failing, PATCH, progress=False)
    assert failing.calls == 2 and len(caplog.records) == 1


def test_fallback_order_host_accumulation_then_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert _fallback_attempts(cuda, cuda) == [(cuda, cuda), (cuda, cpu), (cpu, cpu)]
    assert _fallback_attempts(cpu, cpu) == [(cpu, cpu), (cpu, cpu)]
    assert _fallback_attempts(cuda, cpu) == [(cuda, cpu), (cuda, cpu), (cpu, cpu)]


# --- behaviour ---------------------------------------------------------------------------------------------------


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable from Python."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class MemoryProbe(nn.Module):
    """Forwards to ``inner``; records the largest :func:`live_tensor_bytes` seen at every ``every``-th call.

    The scan is slow (all Python objects), so it is sampled; with ``every`` = the ensemble size, it runs during
    each tile's last network, when that tile's buffers are largest.
    """

    def __init__(self, inner: nn.Module, every: int) -> None:
        super().__init__()
        self.inner, self.every, self.calls, self.peak = inner, every, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % self.every == 0:
            self.peak = max(self.peak, live_tensor_bytes())
        return self.inner(x)


def test_memory_does_not_grow_with_the_number_of_networks() -> None:
    image = volume((1, 48, 48, 16))
    accumulator_bytes = CLASSES * image[0].numel() * 4
    peaks = []
    for count in (1, 4):
        probe = MemoryProbe(nn.Conv3d(1, CLASSES, 1), every=count)
        predict_tiled(image, [probe] * count, (16, 16, 16), NnunetTiling(step_size=1.0), progress=False)
        peaks.append(probe.peak)
    assert peaks[0] > accumulator_bytes  # the probe sees the accumulator
    # growth is a few tile-sized buffers (~0.2 accumulators here); one accumulator per network would add 3
    assert peaks[1] - peaks[0] < accumulator_bytes / 2


def test_result_shape_dtype_device_and_eval_mode() -> None:
    network, image = generic_unet(0), volume((CHANNELS, 23, 13, 21))
    expected = predict_tiled(image, network, PATCH, progress=False)
    network.train()
    memory = TileMemory(result_device=torch.device("cpu"))
    result = predict_tiled(image, network, PATCH, device="cpu", memory=memory, progress=False)
    assert not network.training
    assert result.shape == (CLASSES, 23, 13, 21) and result.dtype == torch.float32 and result.device.type == "cpu"
    assert result.is_contiguous() and torch.equal(result, expected)
    assert torch.allclose(result.sum(0), torch.ones(()), atol=1e-5)


def test_tile_batch_size_does_not_change_the_result() -> None:
    network, image = fabians_unet(0), volume((CHANNELS, 29, 23, 37))
    single = predict_tiled(image, network, PATCH, mirror_axes=(1,), progress=False)
    batched = predict_tiled(
        image, network, PATCH, mirror_axes=(1,), memory=TileMemory(tile_batch_size=5), progress=False
    )
    assert (single - batched).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "options, tolerance",
    [
        ({"memory": TileMemory(accumulate_dtype=torch.float64)}, 1e-6),
        ({"memory": TileMemory(accumulate_dtype=torch.bfloat16)}, 2e-2),
        ({"autocast_dtype": torch.bfloat16}, 5e-2),
        ({"autocast_dtype": torch.float16}, 1e-2),
    ],
    ids=["accumulate fp64", "accumulate bf16", "autocast bf16", "autocast fp16"],
)
def test_reduced_and_extended_precision(options: dict, tolerance: float) -> None:
    network, image = generic_unet(0), volume((CHANNELS, 23, 13, 21))
    expected = predict_tiled(image, network, PATCH, progress=False)
    result = predict_tiled(image, network, PATCH, progress=False, **options)
    assert result.dtype == torch.float32
    assert (result - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("gaussian", [True, False], ids=["gaussian", "uniform"])
def test_bfloat16_accumulation_through_the_staging_buffer_changes_no_byte(monkeypatch, gaussian: bool) -> None:
    """On the CPU a bfloat16 accumulator takes the float32 tile predictions (and Gaussian) through a float32 buffer;
    the result is the in-place mixed-dtype op's, byte for byte (that op, with no staging, is the reference)."""
    network, image = generic_unet(0), volume((CHANNELS, 29, 23, 37))
    memory = TileMemory(accumulate_dtype=torch.bfloat16, result_dtype=torch.bfloat16)
    options = {"tiling": NnunetTiling(gaussian=gaussian), "mirror_axes": (0,), "memory": memory, "progress": False}
    buffers = []
    for_op = StagedUpdate.for_op

    def spy(dtype: torch.dtype, values: torch.Tensor) -> StagedUpdate:
        buffers.append(for_op(dtype, values).buffer)
        return StagedUpdate(values.shape, buffers[-1].dtype)

    monkeypatch.setattr(StagedUpdate, "for_op", spy)
    staged = predict_tiled(image, network, PATCH, **options)
    assert len(buffers) == (2 if gaussian else 1) and all(b is not None and b.dtype == torch.float32 for b in buffers)
    monkeypatch.setattr(StagedUpdate, "for_op", lambda dtype, values: StagedUpdate(values.shape, None))
    plain = predict_tiled(image, network, PATCH, **options)
    assert staged.dtype == torch.bfloat16 and torch.equal(staged, plain)


@pytest.mark.parametrize("networks", [1, 2])
@pytest.mark.parametrize("mirror_axes", [(), (0, 2)], ids=["no mirroring", "mirroring"])
def test_the_reused_softmax_buffer_changes_no_byte(monkeypatch, networks: int, mirror_axes: tuple) -> None:
    """The softmax of every tile batch goes into one reused buffer (a shorter last batch included: 4 tiles per pass);
    the result is byte for byte that of a fresh ``torch.softmax`` per forward pass, whether the buffer is the batch's
    result itself (one network, no mirroring) or summed over networks and flips."""
    ensemble, image = [generic_unet(seed) for seed in range(networks)], volume((CHANNELS, 29, 23, 37))
    options = {"mirror_axes": mirror_axes, "memory": TileMemory(tile_batch_size=4), "progress": False}
    assert len(NnunetTiling().tiles((29, 23, 37), PATCH)) % 4 != 0
    reused = predict_tiled(image, ensemble, PATCH, **options)
    monkeypatch.setattr(tiling._SoftmaxBuffer, "__call__", lambda self, logits: torch.softmax(logits, 1))
    fresh = predict_tiled(image, ensemble, PATCH, **options)
    assert torch.equal(reused, fresh)


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys) -> None:
    network, image = nn.Conv3d(1, CLASSES, 1), volume((1, 32, 24, 20))
    tiling = NnunetTiling(step_size=1.0)
    predict_tiled(image, network, (16, 12, 20), tiling, progress=True)
    assert "4/4" in capsys.readouterr().err
    predict_tiled(image, network, (16, 12, 20), tiling)  # pytest's stderr is not a terminal
    predict_tiled(image, network, (16, 12, 20), tiling, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"image": torch.zeros(1, 8, 8)},
            r"image must be a floating \(C, X, Y, Z\) tensor, got torch.float32 \(1, 8, 8\)",
        ),
        (
            {"image": torch.zeros(1, 8, 8, 8, dtype=torch.int16)},
            r"image must be a floating .* got torch.int16 \(1, 8, 8, 8\)",
        ),
        ({"patch_size": (4, 4)}, r"patch_size must be 3 positive ints, got \(4, 4\)"),
        ({"tiling": "monai"}, r"tiling must be one of NnunetTiling, MonaiTiling, got 'monai'"),
        ({"mirror_axes": (3,)}, r"mirror_axes must be distinct spatial axes among 0, 1, 2, got \(3,\)"),
        ({"mirror_axes": (0, 0)}, r"mirror_axes must be distinct spatial axes among 0, 1, 2, got \(0, 0\)"),
        ({"output": "labels"}, r"output must be one of 'probabilities', 'logits', got 'labels'"),
        ({"weights": (1.0, 2.0)}, r"weights must be 1 non-negative numbers with a positive sum, got \[1.0, 2.0\]"),
        ({"networks": []}, r"at least one network is needed"),
    ],
)
def test_invalid_arguments_are_refused(arguments: dict, message: str) -> None:
    call = {"image": torch.zeros(1, 8, 8, 8), "networks": nn.Conv3d(1, 2, 1), "patch_size": (4, 4, 4)} | arguments
    with pytest.raises(ValueError, match=f"^{message}$"):
        predict_tiled(call.pop("image"), call.pop("networks"), call.pop("patch_size"), **call)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NnunetTiling(step_size=0.0), r"step_size must be in \(0, 1\], got 0.0"),
        (lambda: NnunetTiling(step_size=1.5), r"step_size must be in \(0, 1\], got 1.5"),
        (lambda: MonaiTiling(overlap=1.0), r"overlap must be in \[0, 1\), got 1.0"),
        (lambda: MonaiTiling(overlap=-0.1), r"overlap must be in \[0, 1\), got -0.1"),
        (lambda: TileMemory(tile_batch_size=0), r"tile_batch_size must be at least 1, got 0"),
        (
            lambda: TileMemory(accumulate_dtype=torch.int32),
            r"accumulate_dtype must be one of torch.float32, torch.bfloat16, torch.float64, got torch.int32 \(",
        ),
        (lambda: TileMemory(result_dtype=torch.uint8), r"result_dtype must be a floating dtype, got torch.uint8"),
    ],
)
def test_invalid_options_are_refused_when_made_with_the_allowed_values(make, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        make()


def test_each_mode_takes_only_its_own_placement_option() -> None:
    assert NnunetTiling() == NnunetTiling(step_size=0.5, gaussian=True)
    assert MonaiTiling() == MonaiTiling(overlap=0.25, gaussian=True)
    with pytest.raises(TypeError, match="overlap"):
        NnunetTiling(overlap=0.5)
    with pytest.raises(TypeError, match="step_size"):
        MonaiTiling(step_size=0.5)


def test_look_up_option_returns_the_enum_member_or_names_the_allowed_values() -> None:
    assert look_up_option("output", "logits", Output) is Output.LOGITS
    assert look_up_option("output", Output.PROBABILITIES, Output) is Output.PROBABILITIES
    assert look_up_option("dtype", torch.bfloat16, (torch.float32, torch.bfloat16)) is torch.bfloat16
    with pytest.raises(ValueError, match=r"^dtype must be one of torch.float32, got torch.float16 \(why\)$"):
        look_up_option("dtype", torch.float16, (torch.float32,), " (why)")


def test_memory_options_keep_their_device_as_a_torch_device() -> None:
    assert TileMemory(result_device="cpu").result_device == torch.device("cpu")
    assert TileMemory().result_device is None


def test_float16_accumulation_is_refused_because_gaussian_corners_underflow() -> None:
    """The reason for the refusal: nnU-Net's Gaussian at a 64^3 tile's corner is below float16's smallest
    subnormal, so a float16 importance sum would be 0 there (0/0 = NaN); bfloat16 keeps float32's range."""
    corner = gaussian_nnunet((64, 64, 64))[0, 0, 0]
    assert 0 < corner < 2**-24 and corner.to(torch.float16) == 0 and corner.to(torch.bfloat16) > 0
    with pytest.raises(ValueError, match=r"accumulate_dtype must be one of .* got torch.float16 \(float16 flushes"):
        TileMemory(accumulate_dtype=torch.float16)
