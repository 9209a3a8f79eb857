"""The memory planner: limits, the model against what the code really allocates, the choice order, full-size cases.

The tiling model is checked against the live tensor bytes that :func:`gcinfer.engine.tiling.predict_tiled` really holds
(tracked per storage by :func:`gcinfer.memory.peak_tensor_bytes`) on small CPU cases; the nnU-Net preprocessing
shapes against nnU-Net's own preprocessing; the full-size cases (AMOS 512 x 512 x 600, AutoPET 400 x 400 x 700)
against a T4's budget. The host cost of nnU-Net's cropping and preprocessing is measured at full size by
``benchmarks/bench_memory.py`` (too slow for a unit test).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gcinfer import memory
from gcinfer.engine.tiling import MonaiTiling, Output, TileMemory, predict_tiled
from gcinfer.io import Geometry
from gcinfer.memory import budget as memory_budget
from gcinfer.memory import network as memory_network
from gcinfer.pipelines.amos import memory as amos_memory
from gcinfer.pipelines.autopet import memory as autopet_memory

with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # nnU-Net v1 prints a banner
    warnings.simplefilter("ignore", DeprecationWarning)
    from nnunet.preprocessing import preprocessing as nnunet_preprocessing
from monai.networks.nets import DynUNet

REPOSITORY = Path(__file__).resolve().parents[1]
GIB = memory.GIB
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


# --- limits and budgets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "16106127360\n"}, 15 * GIB),
        ({"memory.max": "max\n", "memory/memory.limit_in_bytes": "8589934592"}, 8 * GIB),
        ({"memory/memory.limit_in_bytes": "8589934592\n"}, 8 * GIB),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ({}, None),
    ],
    ids=["cgroup v2", "v2 unlimited, v1 set", "cgroup v1", "v1 unlimited", "no cgroup"],
)
def test_host_limit_is_the_cgroup_limit_else_physical_memory(tmp_path, files: dict, expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    no_cgroup = tmp_path / "no-proc-cgroup"
    assert memory_budget.host_limit_bytes(tmp_path, no_cgroup) == (expected or memory_budget.physical_memory_bytes())


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "expected"),
    [
        ("0::/pod/job\n", {"memory.max": "max", "pod/memory.max": "max", "pod/job/memory.max": "4294967296"}, 4),
        ("0::/pod/job\n", {"pod/memory.max": "2147483648", "pod/job/memory.max": "4294967296"}, 2),
        (
            "9:pids:/\n4:cpu,memory:/docker/abc\n0::/\n",
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/docker/abc/memory.limit_in_bytes": "3221225472",
            },
            3,
        ),
        ("0::/pod/job\n", {"memory.max": "5368709120", "elsewhere/memory.max": "1073741824"}, 5),
    ],
    ids=["v2 own cgroup", "v2 parent smaller", "v1 own cgroup", "v2 other cgroups ignored"],
)
def test_host_limit_is_the_smallest_along_the_own_cgroup(
    tmp_path, proc_cgroup: str, files: dict, expected: int
) -> None:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "cgroup.txt").write_text(proc_cgroup)
    assert memory_budget.host_limit_bytes(root, tmp_path / "cgroup.txt") == expected * GIB


def test_cpu_budget_is_shared_and_counts_what_the_process_holds() -> None:
    budget = memory.Budget.detect(CPU)
    assert budget.shared and budget.device is None
    expected = memory_budget.host_limit_bytes() - memory_budget.rss_bytes() - memory.HOST_MARGIN_BYTES
    assert abs(budget.host - expected) < 64 * 2**20
    held = memory.Budget.detect(CPU, held_bytes=GIB)
    assert abs(held.host - budget.host - GIB) < 64 * 2**20


def test_address_space_limit_bounds_the_host_budget() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = memory_budget.status_bytes("VmSize")
    try:
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 3 * GIB, hard))
        budget = memory.Budget.detect(CPU, held_bytes=GIB)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert abs(budget.host - (4 * GIB - memory.VIRTUAL_MARGIN_BYTES - memory.HOST_MARGIN_BYTES)) < 64 * 2**20


def test_explicit_device_budget_keeps_a_margin() -> None:
    budget = memory.Budget.detect(CUDA, device_bytes=memory.T4_FREE_BYTES, host_bytes=10 * GIB)
    assert not budget.shared and budget.host == 10 * GIB
    assert budget.device == int(memory.T4_FREE_BYTES * (1 - memory.DEVICE_MARGIN))
    assert 12 * GIB < budget.device < 14 * GIB


# --- measuring tensors and networks -----------------------------------------------------------------------------------


def test_peak_tensor_bytes_counts_only_tensors_alive_together() -> None:
    x = torch.zeros(1000)  # created before: not counted

    def steps() -> None:
        a = x + 1  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = b.view(10, 100) + 0  # b and c: 8000
        c.add_(1)  # in place: no new storage
        del b, c
        torch.zeros(3000)  # 12000 at once, then freed

    assert memory.peak_tensor_bytes(steps) == 12000


def test_network_cost_of_a_sequential_network_is_exact() -> None:
    network = nn.Sequential(nn.Conv3d(2, 8, 1), nn.ReLU(), nn.Conv3d(8, 3, 1))
    cost = memory.network_cost(network, (2, 4, 5, 6), None)
    voxels = 4 * 5 * 6
    assert cost.weights == 4 * (2 * 8 + 8 + 8 * 3 + 3)
    assert cost.activations == 4 * voxels * 8 * 2  # ReLU's output and the first convolution's, at once
    assert cost.autocast_cache == 0 and cost.forward(3) == 3 * cost.activations


def test_network_cost_in_half_precision_halves_activations() -> None:
    torch.manual_seed(0)
    network = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 16, 32], norm_name="instance")
    full, half = (memory.network_cost(network, (1, 32, 32, 32), dtype) for dtype in (None, torch.float16))
    parameters = sum(p.numel() for p in network.parameters())
    assert full.weights == half.weights >= 4 * parameters
    assert half.activations * 2 == full.activations > 32**3 * 8 * 4
    assert half.autocast_cache == 2 * parameters
    assert all(p.device.type == "cpu" for p in network.parameters())  # the network itself is untouched


def meta_pass_activations(network: nn.Module, tile_shape: tuple, dtype: torch.dtype) -> int:
    """The full-tile ``meta`` pass (the measurement the reduced tiles replace), as the reference."""
    meta = memory_network._meta_copy(network, dtype)
    tile = torch.empty((1, *tile_shape), device="meta", dtype=dtype)
    with torch.inference_mode():
        return memory.peak_tensor_bytes(lambda: meta(tile))


class PoolingUNet(nn.Module):
    """Max pooling, trilinear upsampling, concatenation and batch norm (a U-Net unlike DynUNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.pool = nn.Conv3d(1, 4, 3, padding=1), nn.MaxPool3d((1, 2, 2))
        self.middle = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.up = nn.Upsample(scale_factor=(1, 2, 2), mode="trilinear")
        self.out = nn.Conv3d(12, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        return self.out(torch.cat([skip, self.up(self.middle(self.pool(skip)))], 1))


REDUCED_TILE_CASES = {
    "DynUNet, anisotropic strides": (
        lambda: DynUNet(3, 1, 2, [3, 3, 3, 3], [1, 2, 2, [2, 2, 1]], [2, 2, [2, 2, 1]], filters=[4, 8, 16, 16]),
        (1, 40, 24, 16),
        (1, 8, 8, 4),
    ),
    "DynUNet, residual, instance norm": (
        lambda: DynUNet(3, 2, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], res_block=True),
        (2, 24, 24, 24),
        (2, 4, 4, 4),
    ),
    "pooling, upsampling, batch norm": (PoolingUNet, (1, 6, 20, 12), (1, 2, 2, 2)),
}


@pytest.mark.parametrize("name", REDUCED_TILE_CASES)
def test_reduced_tile_gives_the_full_meta_pass_bytes(name: str) -> None:
    """The activations measured on the exact reduced tile of the shape copy and scaled equal those of the
    full-tile meta pass, in float32 and float16 (checked: a wrong convolution output size or a tile that does not
    scale makes this fail)."""
    torch.manual_seed(0)
    build, tile, reduced = REDUCED_TILE_CASES[name]
    network = build().eval()
    assert memory_network.reduced_tile(memory_network.shape_copy(network), tile)[0] == reduced
    for dtype in (FP32, FP16):
        measured = memory.network_cost(network, tile, None if dtype == FP32 else dtype).activations
        assert measured == meta_pass_activations(network, tile, dtype)


def test_network_without_an_exact_reduced_tile_is_measured_on_the_full_tile() -> None:
    """An unpadded convolution shrinks the tile by a constant: no reduced tile scales, the meta pass measures."""
    network = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU())
    assert memory_network.reduced_tile(memory_network.shape_copy(network), (1, 8, 8, 8)) is None
    assert memory.network_cost(network, (1, 8, 8, 8), None).activations == 2 * 4 * 6**3 * 4


def test_network_cost_does_not_import_dynamo() -> None:
    """Measuring the AutoPET architecture in a fresh process leaves ``torch._dynamo`` unimported (a second of
    start-up per container run otherwise)."""
    code = (
        "import sys, json; from pathlib import Path; from gcinfer import memory; "
        "from gcinfer.pipelines.autopet.networks import build_network; "
        "from gcinfer.pipelines.autopet.settings import load_settings; "
        "config = json.loads(Path('docker/autopet2/config.json').read_text()); "
        "network = build_network(load_settings(config, Path('/nonexistent'))).eval(); "
        "memory.network_cost(network, (1, 128, 128, 128), None); "
        "print('torch._dynamo' in sys.modules)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[-1] == "False"


# --- the tiling model against the engine ------------------------------------------------------------------------------


class Pointwise(nn.Module):
    """1x1x1 convolution as ``einsum``."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, channels, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bc...,kc->bk...", x, self.weight)


TILING_CASES = {
    "nnunet, mirrors, batch 3": ((2, 40, 36, 44), (16, 20, 24), 4, 3, FP32, {"mirror_axes": (0, 2)}),
    "padded (smaller than the patch)": ((1, 12, 30, 10), (16, 16, 16), 3, 2, FP32, {}),
    "bf16 accumulator, float32 result": ((1, 40, 36, 44), (16, 20, 24), 5, 1, BF16, {}),
    "monai, logits": ((1, 50, 40, 30), (24, 24, 24), 2, 4, FP32, {"tiling": MonaiTiling(0.5), "output": Output.LOGITS}),
}


@pytest.mark.parametrize("name", TILING_CASES)
def test_tiling_model_bounds_what_the_engine_holds(name: str) -> None:
    shape, patch, k, batch, dtype, options = TILING_CASES[name]
    network, image = Pointwise(shape[0], k).eval(), torch.randn(shape)
    measured = memory.peak_tensor_bytes(
        lambda: predict_tiled(
            image, network, patch, memory=TileMemory(batch, accumulate_dtype=dtype), progress=False, **options
        )
    )
    tiling = memory.Tiling(shape[1:], patch, k, shape[0], mirrored=bool(options.get("mirror_axes")))
    cost = memory.network_cost(network, (shape[0], *patch), None)
    phases = memory.tiling_phases(tiling, memory.Choice(dtype, FP32, True, True, batch), cost, FP32, 0, ())
    modelled = memory.estimate(phases, shared=True).host - 4 * image.numel()  # the input exists before the call
    assert measured <= modelled <= 2 * measured  # fixed tile costs weigh here; accumulators dominate at full size


# --- choices and plans ------------------------------------------------------------------------------------------------


def test_candidates_prefer_precision_then_device_then_batch() -> None:
    choices = memory.candidates(4, amos_memory.AMOS_PRECISIONS)
    assert choices[0] == memory.Choice(FP32, FP32, True, True, 4)
    assert [c.tile_batch_size for c in choices[:3]] == [4, 2, 1]
    assert choices[3] == memory.Choice(FP32, FP32, True, False, 4)
    assert choices[6] == memory.Choice(FP32, FP32, False, False, 4)
    assert choices[9] == memory.Choice(FP32, FP16, True, True, 4)
    assert choices[18] == memory.Choice(memory.REDUCED_DTYPE, FP16, True, True, 4)
    assert len(choices) == 27 and len(set(choices)) == 27
    single = memory.candidates(1, autopet_memory.AUTOPET_PRECISIONS, ensemble=False)
    assert single == [memory.Choice(d, FP32, p, p, 1) for d in (FP32, BF16) for p in (True, False)]


def synthetic_phases(choice: memory.Choice) -> list[memory.Phase]:
    """Accumulators of 8 GiB (fp32) on the chosen pools, 1 GiB per tile."""
    return [
        memory.Phase(
            "predict",
            (
                memory.Buffer("tiling", int(6 * GIB * choice.tiling_dtype.itemsize / 4), choice.tiling_on_device),
                memory.Buffer("ensemble", int(2 * GIB * choice.ensemble_dtype.itemsize / 4), choice.ensemble_on_device),
                memory.Buffer("tiles", choice.tile_batch_size * GIB, True),
                memory.Buffer("crop", GIB, False),
            ),
        )
    ]


@pytest.mark.parametrize(
    ("device_gib", "host_gib", "expected"),
    [
        (20, 4, memory.Choice(FP32, FP32, True, True, 2)),
        (9.5, 4, memory.Choice(FP32, FP32, True, True, 1)),
        (8, 4, memory.Choice(FP32, FP32, True, False, 2)),
        (8, 1.5, memory.Choice(FP32, FP16, True, True, 1)),
        (3, 16, memory.Choice(FP32, FP32, False, False, 2)),
        (6, 3, memory.Choice(BF16, FP16, True, True, 2)),
    ],
)
def test_the_first_choice_that_fits_wins(device_gib: float, host_gib: float, expected: memory.Choice) -> None:
    budget = memory.Budget(int(device_gib * GIB), int(host_gib * GIB))
    plan = memory.choose("case", synthetic_phases, memory.candidates(2, amos_memory.AMOS_PRECISIONS), budget, CUDA)
    assert plan.choice == expected
    assert plan.estimate.fits(budget)


def test_a_case_that_fits_nowhere_is_refused_naming_it() -> None:
    budget = memory.Budget(int(0.5 * GIB), 2 * GIB)
    with pytest.raises(
        memory.MemoryPlanError,
        match=(
            r"^in/big.mha: too large for this machine's memory: even with tiling bf16 on host, ensemble fp16 on host, "
            r"1 tile\(s\)/batch it needs 1.0 GiB on cuda \(0.5 GiB available\) and 5.0 GiB of host memory "
            r"\(2.0 GiB available\)$"
        ),
    ):
        memory.choose("in/big.mha", synthetic_phases, memory.candidates(2, amos_memory.AMOS_PRECISIONS), budget, CUDA)


def test_shared_pools_add_device_and_host_buffers() -> None:
    plan = memory.choose(
        "case", synthetic_phases, memory.candidates(2, amos_memory.AMOS_PRECISIONS), memory.Budget(None, 12 * GIB), CPU
    )
    assert plan.choice == memory.Choice(FP32, FP32, True, True, 2)
    assert plan.estimate.host == 11 * GIB and plan.estimate.device == 0
    assert plan.line() == (
        "case: memory plan: tiling fp32 on cpu, ensemble fp32 on cpu, 2 tile(s)/batch | host 11.0/12.0 GiB (predict)"
    )


def test_plan_line_names_both_pools_and_their_peak_phases() -> None:
    plan = memory.choose(
        "amos_0001",
        synthetic_phases,
        memory.candidates(2, amos_memory.AMOS_PRECISIONS),
        memory.Budget(9 * GIB, 8 * GIB),
        CUDA,
    )
    assert plan.line() == (
        "amos_0001: memory plan: tiling fp32 on cuda, ensemble fp32 on cuda, 1 tile(s)/batch "
        "| cuda 9.0/9.0 GiB (predict) | host 1.0/8.0 GiB (predict)"
    )
    assert plan.tiling_device == CUDA and plan.ensemble_device == CUDA


def test_plan_hands_the_tiling_engine_its_memory_choices_as_typed_options() -> None:
    budget = memory.Budget(int(6 * GIB), 4 * GIB)
    plan = memory.choose("case", synthetic_phases, memory.candidates(2, amos_memory.AMOS_PRECISIONS), budget, CUDA)
    assert plan.choice == memory.Choice(BF16, FP16, True, True, 2)
    assert plan.tiling_options() == TileMemory(2, accumulate_dtype=BF16, result_dtype=BF16, result_device=CUDA)
    host = memory.Plan("case", memory.Choice(BF16, FP32, False, False, 1), plan.estimate, budget, CUDA)
    assert host.tiling_options(autopet_memory.RESULT_DTYPE) == TileMemory(1, BF16, FP32, CPU)


# --- AMOS -------------------------------------------------------------------------------------------------------------


def nnunet_configuration(preprocessor: str, target: tuple, patch: tuple, transpose: tuple = (0, 1, 2)):
    from gcinfer.pipelines.amos import nnunet_v1

    intensities = {0: {"mean": 80.0, "sd": 120.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0}}
    backward = tuple(int(a) for a in np.argsort(transpose))
    pre = getattr(nnunet_preprocessing, preprocessor)({0: "CT"}, {0: False}, list(transpose), intensities)
    return nnunet_v1.Configuration(
        preprocessor,
        None,
        (0, 1),
        [Pointwise(1, 16), Pointwise(1, 16)],
        0,
        patch,
        16,
        transpose,
        backward,
        (0, 1, 2),
        pre,
        np.array(target),
    )


@pytest.mark.parametrize(
    ("preprocessor", "spacing_zyx", "target", "transpose"),
    [
        ("GenericPreprocessor", (2.5, 0.8, 0.7), (1.5, 1.0, 1.0), (0, 1, 2)),
        ("Preprocessor3DBetterResampling", (1.0, 0.9, 0.9), (2.0, 0.68825, 0.68825), (0, 1, 2)),
        ("GenericPreprocessor", (5.0, 0.8, 0.8), (1.0, 1.6, 1.6), (2, 0, 1)),
    ],
)
def test_amos_network_shapes_are_nnunets(
    preprocessor: str, spacing_zyx: tuple, target: tuple, transpose: tuple
) -> None:
    from gcinfer.pipelines.amos import nnunet_v1

    configuration = nnunet_configuration(preprocessor, target, (8, 8, 8), transpose)
    image = np.random.default_rng(0).normal(50, 30, (9, 21, 17)).astype(np.float32)
    geometry = Geometry(image.shape[::-1], spacing_zyx[::-1], (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    preprocessed = configuration.preprocess(nnunet_v1.crop(image[None], geometry))
    costs = amos_memory.amos_network_costs([configuration], CPU)
    case = amos_memory.AmosCase.of(image.shape, 4, spacing_zyx, [configuration], costs, True, CPU)
    assert case.configurations[0].tiling.shape == preprocessed.data.shape[1:]
    assert case.configurations[0].folds == 2 and case.num_classes == 16 and case.weights_on_host


@pytest.mark.parametrize(
    ("preprocessor", "spacing", "target", "expected"),
    [
        ("GenericPreprocessor", (5.0, 0.8, 0.8), (1.5, 1.0, 1.0), True),
        ("GenericPreprocessor", (1.25, 0.8, 0.8), (1.5, 1.0, 1.0), False),
        ("GenericPreprocessor", (1.0, 1.0, 1.0), (4.0, 1.0, 1.0), True),
        ("Preprocessor3DBetterResampling", (5.0, 0.8, 0.8), (1.5, 1.0, 1.0), False),
    ],
)
def test_separate_z_follows_nnunet(preprocessor: str, spacing: tuple, target: tuple, expected: bool) -> None:
    from nnunet.preprocessing.preprocessing import get_do_separate_z

    cls = getattr(nnunet_preprocessing, preprocessor)
    assert amos_memory.nnunet_separate_z(cls, spacing, target) == expected
    if cls is nnunet_preprocessing.GenericPreprocessor:
        assert expected == (get_do_separate_z(np.array(spacing)) or get_do_separate_z(np.array(target)))


AMOS_COST = memory.NetworkCost(weights=288 * 2**20, activations=1400 * 2**20, autocast_cache=144 * 2**20)
"""The FabiansUNet of the AMOS plans (32 features, 160^3 patch) in fp16, as network_cost measures it."""


def amos_full_size(shape_zyx=(600, 512, 512), spacing=(1.25, 0.78, 0.78)) -> amos_memory.AmosCase:
    """A task 1 case with its three configurations (5 folds each)."""
    configurations = tuple(
        amos_memory.AmosConfiguration(
            memory.Tiling(amos_memory.nnunet_network_shape(shape_zyx, spacing, target, (0, 1, 2)), patch, 16, 1, True),
            False,
            AMOS_COST,
            5,
        )
        for target, patch in (
            ((1.5, 1, 1), (160, 160, 160)),
            ((2, 0.688, 0.688), (80, 192, 192)),
            ((1.5, 1, 1), (160, 160, 160)),
        )
    )
    return amos_memory.AmosCase(shape_zyx, 2, 16, configurations)


def test_full_size_amos_case_fits_a_t4_with_the_ensemble_on_the_host() -> None:
    budget = memory.Budget.detect(CUDA, device_bytes=memory.T4_FREE_BYTES, host_bytes=20 * GIB)
    plan = amos_memory.plan_amos("amos_full", amos_full_size(), 2, budget, CUDA)
    assert plan.choice == memory.Choice(FP32, FP32, True, False, 1)
    assert plan.estimate.device <= budget.device and plan.estimate.device_phase == "predict 2"
    k, n0 = 16, 600 * 512 * 512
    assert plan.estimate.host >= 2 * k * n0  # the ensemble accumulator lives there


def test_full_size_amos_accumulators_dominate_the_device_estimate() -> None:
    case, choice = amos_full_size(), memory.Choice(FP32, FP16, True, True, 2)
    phase = next(p for p in amos_memory.amos_phases(case, choice) if p.name == "predict 2")
    sizes = {b.name: b.nbytes for b in phase.buffers}
    nt = math.prod(case.configurations[1].tiling.shape)
    assert case.configurations[1].tiling.shape == (375, 580, 580)
    assert sizes["tiling accumulator"] == 4 * 16 * nt and sizes["ensemble accumulator"] == 2 * 16 * 600 * 512 * 512
    assert sizes["weights"] == 5 * AMOS_COST.weights


def test_huge_case_is_refused_before_any_work() -> None:
    budget = memory.Budget.detect(CUDA, device_bytes=memory.T4_FREE_BYTES, host_bytes=15 * GIB)
    with pytest.raises(memory.MemoryPlanError, match=r"^amos_huge: too large for this machine's memory"):
        amos_memory.plan_amos("amos_huge", amos_full_size((1500, 1024, 1024)), 2, budget, CUDA)


# --- AutoPET ----------------------------------------------------------------------------------------------------------


def test_autopet_case_follows_the_spatial_plan() -> None:
    cost = memory.NetworkCost(1000, 2000, 0)
    flipped = Geometry((40, 30, 20), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    case = autopet_memory.AutopetCase.of(flipped, 4, (4.0, 4.0, 3.0), (16, 16, 16), 2, 2, True, cost)
    assert case.flips and case.resampled and case.tiling.shape == (20, 16, 20)  # round((n - 1) * 2 / 4 + 1)
    same = Geometry((40, 30, 20), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    identity = autopet_memory.AutopetCase.of(same, 4, (2.0, 2.0, 3.0), (16, 16, 16), 2, 2, True, cost)
    assert not identity.resampled and identity.tiling.shape == (40, 30, 20)


def test_full_size_autopet_case_on_a_t4_reduces_the_tile_batch_only_when_needed() -> None:
    geometry = Geometry((400, 400, 700), (2.03642011, 2.03642011, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    budget = memory.Budget.detect(CUDA, device_bytes=memory.T4_FREE_BYTES, host_bytes=10 * GIB)
    for activations, batch in ((700 * 2**20, 8), (1800 * 2**20, 4)):  # DynUNet 128^3 fp16 per tile; a heavier one
        cost = memory.NetworkCost(124 * 2**20, activations, 62 * 2**20)
        case = autopet_memory.AutopetCase.of(
            geometry, 4, (2.03642011, 2.03642011, 3.0), (128, 128, 128), 2, 5, True, cost
        )
        plan = autopet_memory.plan_autopet("case", case, 8, budget, CUDA)
        assert plan.choice == memory.Choice(FP32, FP32, True, True, batch)


# --- the planner in the pipelines ---------------------------------------------------------------------------------


def pipeline_run(fixtures_dir: Path, name: str, output: Path) -> tuple[int, list[Path], list[Path]]:
    """``gcinfer <name>`` on its fixture inputs (AMOS: task 2, fold 0): exit code, the case inputs the plan must
    name (the AMOS image, the AutoPET PET), and the files written."""
    from gcinfer import cli

    folder = "amos_task2" if name == "amos" else "autopet2"
    inputs = fixtures_dir / folder / "input"
    options = ["amos-task2", "--folds", "0"] if name == "amos" else ["autopet2"]
    code = cli.main(
        [
            "--no-progress",
            *options,
            "--device",
            "cpu",
            "--input",
            str(inputs),
            "--output",
            str(output),
            "--model",
            str(fixtures_dir / folder / "model"),
        ]
    )
    named = sorted(inputs.glob("*.nii.gz")) if name == "amos" else sorted((inputs / "images" / "pet").glob("*.mha"))
    return code, named, sorted(p for p in output.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["amos", "autopet"])
def test_pipelines_log_one_plan_per_case(name: str, fixtures_dir: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="gcinfer"):
        code, named, written = pipeline_run(fixtures_dir, name, tmp_path / "out")
    assert code == 0 and len(written) == len(named) == 2
    plans = [r.getMessage() for r in caplog.records if "memory plan:" in r.getMessage()]
    assert [p.split(": memory plan: ")[0] for p in plans] == [str(p) for p in named]
    for line in plans:  # the CPU's single pool, the preferred choice for these small cases
        assert re.search(
            r": memory plan: tiling fp32 on cpu, ensemble fp32 on cpu, \d+ tile\(s\)/batch \| host "
            r"\d+\.\d/\d+\.\d GiB \(\w[\w ]*\)$",
            line,
        ), line


@pytest.mark.parametrize("name", ["amos", "autopet"])
def test_a_case_that_fits_nowhere_fails_before_any_work(
    name: str, fixtures_dir: Path, tmp_path: Path, caplog, monkeypatch
) -> None:
    """With 1 MiB of memory left every case is refused by the planner: named, exit 1, nothing written, and no
    prediction stage ran."""
    from gcinfer.pipelines.amos import pipeline as amos
    from gcinfer.pipelines.autopet import pipeline as autopet

    monkeypatch.setattr(memory.Budget, "detect", classmethod(lambda cls, device, **_: cls(None, 2**20)))
    predictions = []
    for module in (amos, autopet):
        monkeypatch.setattr(module, "predict_tiled", lambda *args, **kwargs: predictions.append(args))
    with caplog.at_level(logging.INFO, logger="gcinfer"):
        code, named, written = pipeline_run(fixtures_dir, name, tmp_path / "out")
    assert code == 1 and written == []
    for path in named:
        expected = (
            f"FAILED .*{re.escape(str(path))}: too large for this machine's memory: even with tiling "
            r"bf16 on \w+, .*GiB of host memory \(0.0 GiB available\)"
        )
        assert re.search(expected, caplog.text), caplog.text
    assert predictions == []
