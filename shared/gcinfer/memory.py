"""Memory planning: before a case is predicted, what its buffers need, and where (device or host) and in which
dtype they fit.

Grand Challenge's GPU instance has a T4 (16 GB) and 15 GiB of RAM for the container; exceeding the RAM kills the
container (exit code 137) and the case is lost. Before predicting a case, :func:`plan_amos` or :func:`plan_autopet`
models the memory its pipeline will use for the case's size, number of classes and configuration, and picks the
first :class:`Choice` that fits both budgets, in this order of preference (results first, then speed):

1. precision (:data:`AMOS_PRECISIONS`, :data:`AUTOPET_PRECISIONS`): float32 accumulators (AMOS: the ensemble exactly
   as upstream computes it), else a float16 ensemble (AMOS), else a 16-bit tiling accumulator too
   (:data:`REDUCED_DTYPE`);
2. the tiling accumulator on the device, else on the host (the tiles still run on the device; nnU-Net v1 itself
   accumulated on the host);
3. the ensemble accumulator on the device (AMOS), else on the host;
4. the configured number of tiles per forward pass, else half as many, down to one.

A case that fits no choice raises :class:`MemoryPlanError` (an ``InputError``: the runner reports the case as
failed and goes on with the others) before any prediction work.

Model. A case runs as phases (read, crop, preprocess, predict, resample, ...), each holding :class:`Buffer` s on the
device or on the host; a pool's peak is its largest phase total. When the device is the CPU both pools are the
host's memory and a phase's device and host buffers add up. Buffer sizes follow the pipelines' code (the docstrings
of :func:`amos_phases`, :func:`autopet_phases` and :func:`tiling_phases` say which step each comes from), with one
exception: the host cost of nnU-Net v1's cropping and preprocessing
(``np.where`` of the non-zero mask, float64 spline resampling of the image and of the int64 mask) is given per voxel,
as measured with nnU-Net 1.7.1 on this project's machines (``benchmarks/bench_memory.py`` checks the model against
the measured peak RSS of full-size cases). Network weights and activations come from :func:`network_cost`, which
runs the network once on the ``meta`` device (no memory, no compute) and records the live tensor bytes.

Budgets (:class:`Budget`): the host's is the cgroup memory limit when there is one (the container's ``--memory``),
else the physical memory, minus what the process already holds (weights, libraries) and a margin, and at most the
address space ``ulimit -v`` leaves; the device's is its free memory plus PyTorch's cached free blocks, minus a
margin for cuDNN workspaces and fragmentation. Tests and the benchmark pass budgets explicitly, e.g.
:data:`T4_FREE_BYTES`.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gcinfer.devices import autocast_dtype_for
from gcinfer.io import Geometry, InputError

if TYPE_CHECKING:
    from gcinfer import nnunet_v1

GIB = 2**30
T4_FREE_BYTES = (15360 - 600) * 2**20
"""A T4 as Grand Challenge's instances report it (15,360 MiB) minus ~600 MiB of CUDA context and cuDNN kernels."""
HOST_MARGIN_BYTES = 512 * 2**20
"""Kept free on the host: allocator fragmentation, library buffers, thread stacks."""
DEVICE_MARGIN = 0.08
"""Fraction of the device budget kept free: cuDNN workspaces and the caching allocator's fragmentation."""
CGROUP_ROOT = Path("/sys/fs/cgroup")

# nnU-Net v1 host costs, bytes per voxel (Nc: voxels of the non-zero crop, Nt: of a configuration's network input)
NNUNET_CROP_PER_VOXEL = 32
"""``ImageCropper.crop``: float32 copy, the mask and its hole filling, and the three int64 arrays of ``np.where``."""
NNUNET_CROPPED_PER_VOXEL = 5
"""What a crop keeps: float32 image and the non-zero mask as int8 (``gcinfer.nnunet_v1.crop`` casts nnU-Net's int64)."""
NNUNET_PREPROCESS_PER_VOXEL = ((42, 10), (22, 32))
"""``Configuration.preprocess`` with 3D resampling: the largest of these (per Nc, per Nt) forms (float64 copies of the
image and of the int64 mask, spline prefilters, outputs), plus :data:`NNUNET_PREPROCESS_FIXED`. Measured peaks:
7.06 GB (Nc 157 M, Nt 126 M) and 6.68 GB (Nc 157 M, Nt 80 M) at full size, 150-690 MB at 2-8 M voxels, measured
while the int64 mask was resampled for every scheme: an upper bound now that CT configurations skip it."""
NNUNET_PREPROCESS_SEPARATE_Z_PER_VOXEL = ((42, 10), (16, 76))
"""The same with separate-z resampling, whose ``map_coordinates`` step builds int64 and float64 grids of Nt."""
NNUNET_PREPROCESS_FIXED = 32 * 2**20
"""Bytes ``Configuration.preprocess`` needs whatever the size (library buffers; matters only for small images)."""
NNUNET_SEPARATE_Z_THRESHOLD = 3.0
"""nnU-Net v1's ``RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD``: max/min spacing above which z is resampled apart."""
NNUNET_NO_SEPARATE_Z = ("Preprocessor3DBetterResampling",)
"""Preprocessor classes that never resample z separately."""
POSTPROCESS_PER_VOXEL = 8
"""Organ-wise post-processing on the host: a mask and its component labels per organ, bounding-box copies."""
WRITE_PER_VOXEL = 2
"""``write_label_map``: the SimpleITK image and the compression buffer."""
REDUCED_DTYPE = torch.bfloat16
"""The 16-bit accumulator dtype. Not float16: nnU-Net's Gaussian weights fall to ~e^-24 at a tile's corner, which
float16 flushes to 0, so that the volume's corners divide 0 by 0 (NaN) and its edges lose all precision."""
GRID_SAMPLE_BYTES = (1 << 24) * 16
"""``gcinfer.spatial.resample``: one slab of ``MAX_GRID_VOXELS`` sampling coordinates (3 x float32) and samples."""


class MemoryPlanError(InputError):
    """A case that cannot fit in memory with any choice; the message names the file and the sizes."""


# --- budgets ----------------------------------------------------------------------------------------------------------


def _read_limit(path: Path) -> int | None:
    """A cgroup memory limit file's value in bytes; None when absent, unreadable or unlimited (``max``)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_limit_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The process's memory limit: cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes`` when set, else (or when
    larger) the physical memory."""
    physical = physical_memory_bytes()
    for path in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        limit = _read_limit(path)
        if limit is not None:
            return min(limit, physical)
    return physical


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmSize``) in bytes."""
    with open("/proc/self/status") as status:
        return next((int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:")), 0)


def rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``)."""
    return status_bytes("VmRSS")


def address_space_left_bytes() -> int | None:
    """Address space this process may still map under ``RLIMIT_AS`` (``ulimit -v``); None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft - status_bytes("VmSize")


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` (driver's free memory plus PyTorch's cached free blocks); None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass(frozen=True)
class Budget:
    """Bytes a case may still use, after what the process already holds.

    Attributes:
        device: on the device; None when the device is the CPU (device buffers then live on the host).
        host: on the host.
    """

    device: int | None
    host: int

    @classmethod
    def detect(
        cls, device: torch.device, held_bytes: int = 0, device_bytes: int | None = None, host_bytes: int | None = None
    ) -> Budget:
        """The budget of ``device`` and this host now.

        Args:
            held_bytes: host memory the process holds now that the model counts itself (e.g. the image just read).
            device_bytes, host_bytes: override the detection (before the margins), e.g. :data:`T4_FREE_BYTES`.
        """
        if host_bytes is None:
            left = [host_limit_bytes() - rss_bytes(), address_space_left_bytes()]
            host_bytes = min(x for x in left if x is not None) + held_bytes - HOST_MARGIN_BYTES
        if device_bytes is None:
            device_bytes = device_free_bytes(device)
        if device_bytes is not None:
            device_bytes = int(device_bytes * (1 - DEVICE_MARGIN))
        return cls(device_bytes, max(int(host_bytes), 0))

    @property
    def shared(self) -> bool:
        """Device and host are the same memory (CPU device)."""
        return self.device is None


# --- model ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buffer:
    """One allocation alive during a phase: its name, size and pool."""

    name: str
    nbytes: int
    on_device: bool


@dataclass(frozen=True)
class Phase:
    name: str
    buffers: tuple[Buffer, ...]

    def total(self, on_device: bool | None) -> int:
        """Bytes on the device (True), on the host (False) or both (None)."""
        return sum(b.nbytes for b in self.buffers if on_device is None or b.on_device == on_device)


@dataclass(frozen=True)
class Estimate:
    """Peak bytes per pool and the phase where each peak is reached (device fields are 0 and '' when shared)."""

    device: int
    host: int
    device_phase: str
    host_phase: str

    def fits(self, budget: Budget) -> bool:
        return self.host <= budget.host and (budget.shared or self.device <= budget.device)


def estimate(phases: Sequence[Phase], shared: bool) -> Estimate:
    """The peaks of ``phases``; with ``shared`` pools every buffer counts on the host."""
    host = max(phases, key=lambda p: p.total(None if shared else False))
    if shared:
        return Estimate(0, host.total(None), "", host.name)
    device = max(phases, key=lambda p: p.total(True))
    return Estimate(device.total(True), host.total(False), device.name, host.name)


@dataclass(frozen=True)
class Choice:
    """Where and in which dtype a case's accumulators live, and how many tiles run per forward pass.

    Attributes:
        tiling_dtype: the tiling engine's accumulator and result.
        ensemble_dtype: the AMOS cross-configuration accumulator (``gcinfer.amos``: float32 holds upstream's exact
            sum, float16 a running mean); AutoPET's fold accumulator is float32 whatever this says.
    """

    tiling_dtype: torch.dtype
    ensemble_dtype: torch.dtype
    tiling_on_device: bool
    ensemble_on_device: bool
    tile_batch_size: int

    def describe(self, device: torch.device | str = "device") -> str:
        where = lambda on_device: str(device) if on_device else "host"  # noqa: E731
        return (
            f"tiling {_dtype_name(self.tiling_dtype)} on {where(self.tiling_on_device)}, "
            f"ensemble {_dtype_name(self.ensemble_dtype)} on {where(self.ensemble_on_device)}, "
            f"{self.tile_batch_size} tile(s)/batch"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


AMOS_PRECISIONS = ((torch.float32, torch.float32), (torch.float32, torch.float16), (REDUCED_DTYPE, torch.float16))
"""AMOS (tiling dtype, ensemble dtype), preferred first: upstream's exact result; a float16 running mean of the
configurations (ties of upstream's float16 values may then break the other way); a 16-bit tiling accumulator."""
AUTOPET_PRECISIONS = ((torch.float32, torch.float32), (REDUCED_DTYPE, torch.float32))
"""AutoPET (tiling dtype, fold accumulator dtype), preferred first."""


def candidates(tile_batch_size: int, ensemble: bool = True) -> list[Choice]:
    """Every choice, most preferred first (see the module docstring).

    Args:
        tile_batch_size: the configured tiles per forward pass; halved down to 1 by the later choices.
        ensemble: the pipeline has an ensemble accumulator (AMOS) whose dtype and placement are chosen apart from
            the tiling's (never on the device while the tiling accumulates on the host); else the AutoPET choices.
    """
    batches = sorted({max(tile_batch_size >> k, 1) for k in range(max(tile_batch_size, 1).bit_length())}, reverse=True)
    placements = ((True, True), (True, False), (False, False)) if ensemble else ((True, True), (False, False))
    return [
        Choice(tiling_dtype, ensemble_dtype, tiling, ensemble_on_device, batch)
        for tiling_dtype, ensemble_dtype in (AMOS_PRECISIONS if ensemble else AUTOPET_PRECISIONS)
        for tiling, ensemble_on_device in placements
        for batch in batches
    ]


@dataclass(frozen=True)
class Plan:
    """The chosen :class:`Choice` for a case, its estimate and the budget it was checked against."""

    case: str
    choice: Choice
    estimate: Estimate
    budget: Budget
    device: torch.device

    @property
    def tiling_device(self) -> torch.device:
        return self.device if self.choice.tiling_on_device else torch.device("cpu")

    @property
    def ensemble_device(self) -> torch.device:
        return self.device if self.choice.ensemble_on_device else torch.device("cpu")

    def tiling_options(self) -> dict:
        """The :func:`gcinfer.tiling.predict_tiled` keyword arguments of this plan (batch, dtype, result device)."""
        return {"tile_batch_size": self.choice.tile_batch_size, "accumulate_dtype": self.choice.tiling_dtype,
                "result_device": self.tiling_device}  # fmt: skip

    def line(self) -> str:
        """One log line: ``case: memory plan: tiling fp32 on cuda, ... | cuda 9.1/13.6 GiB (predict 2) | host ...``."""
        e, b = self.estimate, self.budget
        pools = [] if b.shared else [f"{self.device} {e.device / GIB:.1f}/{b.device / GIB:.1f} GiB ({e.device_phase})"]
        pools.append(f"host {e.host / GIB:.1f}/{b.host / GIB:.1f} GiB ({e.host_phase})")
        return f"{self.case}: memory plan: {self.choice.describe(self.device)} | " + " | ".join(pools)


def choose(
    case: str, phases_of: Callable[[Choice], Sequence[Phase]], choices: Sequence[Choice], budget: Budget,
    device: torch.device,
) -> Plan:
    """The first of ``choices`` whose phases fit ``budget``.

    Raises:
        MemoryPlanError: none fits; names ``case`` and what the last (leanest on the device) choice needs against
            the budget.
    """
    for choice in choices:
        guess = estimate(phases_of(choice), budget.shared)
        if guess.fits(budget):
            return Plan(case, choice, guess, budget, device)
    needs = [f"{guess.host / GIB:.1f} GiB of host memory ({budget.host / GIB:.1f} GiB available)"]
    if not budget.shared:
        needs.insert(0, f"{guess.device / GIB:.1f} GiB on {device} ({budget.device / GIB:.1f} GiB available)")
    raise MemoryPlanError(
        f"{case}: too large for this machine's memory: even with {choice.describe(device)} it needs "
        + " and ".join(needs)
    )


# --- networks ---------------------------------------------------------------------------------------------------------


class _LiveTensorBytes(TorchDispatchMode):
    """Records the peak of the bytes of tensor storages created under it and still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, tensors referencing it]
        self.current = self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self.live.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage()._cdata
                if key in self.live or key not in inputs:  # not a view of (or the same as) a tensor made before
                    self._track(tensor)
        return out


def peak_tensor_bytes(function: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``function`` creates and holds at once (inputs created before it not counted)."""
    mode = _LiveTensorBytes()
    with mode:
        function()
    return mode.peak


@dataclass(frozen=True)
class NetworkCost:
    """Device memory of one network.

    Attributes:
        weights: parameters and buffers as stored (bytes).
        activations: peak of the tensors one forward pass of a single tile creates (output included), in the
            compute dtype; a batch of ``B`` tiles needs ``B`` times as much.
        autocast_cache: the half-precision weight copies autocast keeps during a forward pass (0 without).
    """

    weights: int
    activations: int
    autocast_cache: int

    def forward(self, tile_batch_size: int) -> int:
        """Bytes one forward pass of ``tile_batch_size`` tiles adds to the weights."""
        return self.activations * tile_batch_size + self.autocast_cache


def _meta_copy(network: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``network`` whose parameters and floating buffers are ``meta`` tensors of ``dtype`` (its real
    tensors are not copied: they are mapped to their stand-ins in ``deepcopy``'s memo; shared ones stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*network.parameters(), *network.buffers()):
        stand_in = torch.empty_like(tensor, device="meta", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        memo[id(tensor)] = torch.nn.Parameter(stand_in, False) if isinstance(tensor, torch.nn.Parameter) else stand_in
    return copy.deepcopy(network, memo)


def network_cost(network: torch.nn.Module, tile_shape: Sequence[int], compute_dtype: torch.dtype | None) -> NetworkCost:
    """Measure ``network`` (in eval mode) for ``(C, *patch)`` tiles, computing in ``compute_dtype`` (None: float32).

    A ``meta`` copy of the network runs once (no memory, no compute; the network itself is untouched); autocast is
    modelled by a copy in ``compute_dtype``.
    """
    parameters = list(network.parameters())
    weights = sum(t.numel() * t.element_size() for t in (*parameters, *network.buffers()))
    dtype = compute_dtype or torch.float32
    meta, tile = _meta_copy(network, dtype), torch.empty((1, *tile_shape), device="meta", dtype=dtype)
    with torch.inference_mode():
        activations = peak_tensor_bytes(lambda: meta(tile))
    cache = sum(p.numel() for p in parameters) * dtype.itemsize if compute_dtype is not None else 0
    return NetworkCost(weights, activations, cache)


# --- tiling -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """One call of :func:`gcinfer.tiling.predict_tiled`: its input grid, patch, classes, channels, and whether it
    mirrors (which holds more tile buffers at once)."""

    shape: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    num_classes: int
    channels: int = 1
    mirrored: bool = False

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def padded_voxels(self) -> int:
        return math.prod(max(s, p) for s, p in zip(self.shape, self.patch_size))

    @property
    def padded(self) -> bool:
        return any(s < p for s, p in zip(self.shape, self.patch_size))


def tiling_phases(
    tiling: Tiling, choice: Choice, network: NetworkCost, result_dtype: torch.dtype, weights_on_device: int,
    resident: Sequence[Buffer],
) -> list[Phase]:
    """:func:`gcinfer.tiling.predict_tiled` while it predicts and when it returns.

    Predicting: the input on the device (and its zero-padded copy when smaller than the patch), the accumulator
    ``(K, *padded)`` and the importance sum ``(1, *padded)`` in the tiling dtype where the choice puts them, the
    Gaussian map, the tile buffers, the prediction's copy to the host when accumulating there, and the network's
    forward pass (its output included). Tile buffers (a batch and its prediction are freed before the next batch is
    stacked): ``(B, C, *patch)`` the batch, and with mirroring the flipped batch; ``(B, K, *patch)`` float32 the
    softmax and the weighted copy, and with mirroring the flip sum, its flip back and the total.
    Returning: the accumulator, the importance sum and the cropped or cast result ``(K, *shape)`` in
    ``result_dtype`` (no copy when neither cropped nor cast).
    """
    k, c, patch = tiling.num_classes, tiling.channels, math.prod(tiling.patch_size)
    batch, acc_bytes, on = choice.tile_batch_size, choice.tiling_dtype.itemsize, choice.tiling_on_device
    common = [
        *resident,
        Buffer("network input", 4 * c * tiling.voxels, True),
        Buffer("padded input", 4 * c * tiling.padded_voxels if tiling.padded else 0, True),
        Buffer("tiling accumulator", acc_bytes * k * tiling.padded_voxels, on),
        Buffer("importance sum", acc_bytes * tiling.padded_voxels, on),
        Buffer("weights", weights_on_device, True),
    ]
    tiles = (2 * c + 5 * k) if tiling.mirrored else (c + 2 * k)
    last = [
        Buffer("gaussian", 4 * patch, on),
        Buffer("tile predictions on host", 0 if on else 4 * batch * patch * k, False),
    ]
    predicting = [
        *last,
        Buffer("tile buffers", 4 * batch * patch * tiles, True),
        Buffer("forward pass", network.forward(batch), True),
    ]
    copied = tiling.padded or result_dtype != choice.tiling_dtype
    returning = [
        *last,
        Buffer("tiling result", result_dtype.itemsize * k * tiling.voxels if copied else 0, on),
    ]
    return [Phase("predict", tuple(common + predicting)), Phase("predict end", tuple(common + returning))]


def _numbered(phases: Sequence[Phase], suffix: str) -> list[Phase]:
    return [replace(p, name=f"{p.name} {suffix}") for p in phases]


# --- AMOS -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmosConfiguration:
    """One nnU-Net configuration of a case: its tiled prediction and preprocessing, and its fold networks."""

    tiling: Tiling
    separate_z: bool
    network: NetworkCost
    folds: int


@dataclass(frozen=True)
class AmosCase:
    """What :func:`amos_phases` needs of a case.

    Attributes:
        image_shape: (z, y, x) of the image; its crop is taken as large (the non-zero box is not known yet).
        image_itemsize: bytes per voxel of the image as read.
        num_classes: K, background included.
        configurations: in prediction order.
        weights_on_host: the networks already live where they run (CPU device), so their weights are not added.
    """

    image_shape: tuple[int, int, int]
    image_itemsize: int
    num_classes: int
    configurations: tuple[AmosConfiguration, ...]
    weights_on_host: bool = False

    @property
    def voxels(self) -> int:
        return math.prod(self.image_shape)

    @classmethod
    def of(
        cls, image_shape: Sequence[int], image_itemsize: int, spacing_zyx: Sequence[float],
        configurations: Sequence[nnunet_v1.Configuration], costs: Sequence[NetworkCost], mirrored: bool,
        device: torch.device,
    ) -> AmosCase:
        """From the image's shape, pixel size and spacing, the restored configurations (with their
        :func:`amos_network_costs`) and whether tiles are mirrored; network input shapes as nnU-Net v1's
        preprocessing gives them."""
        models = tuple(
            AmosConfiguration(
                Tiling(nnunet_network_shape(image_shape, spacing_zyx, c.target_spacing, c.transpose_forward),
                       tuple(c.patch_size), c.num_classes, 1, mirrored),
                nnunet_separate_z(type(c.preprocessor), spacing_zyx, c.target_spacing),
                cost,
                len(c.networks),
            )
            for c, cost in zip(configurations, costs)
        )  # fmt: skip
        return cls(tuple(image_shape), image_itemsize, configurations[0].num_classes, models,
                   weights_on_host=device.type == "cpu")  # fmt: skip


def amos_network_costs(configurations: Sequence[nnunet_v1.Configuration], device: torch.device) -> list[NetworkCost]:
    """:func:`network_cost` of each configuration's network (one input channel), computing as on ``device``."""
    return [network_cost(c.networks[0], (1, *c.patch_size), autocast_dtype_for(device)) for c in configurations]


def nnunet_network_shape(
    shape_zyx: Sequence[int], spacing_zyx: Sequence[float], target_spacing: Sequence[float],
    transpose_forward: Sequence[int],
) -> tuple[int, int, int]:
    """The network input shape nnU-Net v1's ``resample_patient`` gives: ``round(spacing / target * shape)`` in the
    transposed axis order (``target_spacing`` already transposed, as in the plans)."""
    return tuple(
        int(round(spacing_zyx[a] / t * shape_zyx[a])) for a, t in zip(transpose_forward, target_spacing)
    )  # fmt: skip


def nnunet_separate_z(preprocessor_class: type, spacing_zyx: Sequence[float], target_spacing: Sequence[float]) -> bool:
    """Whether nnU-Net v1 resamples z separately (``force_separate_z=None``): never for the classes of
    :data:`NNUNET_NO_SEPARATE_Z`, else when the image's or the target's spacing is anisotropic beyond the threshold."""
    if any(c.__name__ in NNUNET_NO_SEPARATE_Z for c in preprocessor_class.__mro__):
        return False
    return any(max(s) / min(s) > NNUNET_SEPARATE_Z_THRESHOLD for s in (spacing_zyx, target_spacing))


def _preprocess_bytes(cropped: int, configuration: AmosConfiguration) -> int:
    forms = NNUNET_PREPROCESS_SEPARATE_Z_PER_VOXEL if configuration.separate_z else NNUNET_PREPROCESS_PER_VOXEL
    per_voxel = max(per_crop * cropped + per_input * configuration.tiling.voxels for per_crop, per_input in forms)
    return per_voxel + NNUNET_PREPROCESS_FIXED


def amos_phases(case: AmosCase, choice: Choice) -> list[Phase]:
    """The phases of :func:`gcinfer.amos.predict_case` for ``case`` under ``choice``.

    - read: the SimpleITK image and its numpy copy;
    - crop: the image and nnU-Net's cropping (:data:`NNUNET_CROP_PER_VOXEL`);
    - per configuration: preprocess (the crop, nnU-Net's resampling, the ensemble accumulator ``(K, *crop)``),
      the tiled prediction (:func:`tiling_phases`, result in the tiling dtype, the configuration's fold weights on
      the device) and the per-channel resampling back to the crop (the ensemble, the prediction, one resampled
      channel where the tiling is, its copy where the ensemble is when that differs, and its float16 rounding
      when the ensemble is float32);
    - argmax into the uint8 label map ``(z, y, x)`` where the ensemble is (8 slices at a time: their float16 mean,
      from a float32 quotient when the ensemble is float32, and the int64 argmax);
    - post-processing and writing on the host.
    The crop (:data:`NNUNET_CROPPED_PER_VOXEL`) stays on the host throughout.
    """
    n0, k = case.voxels, case.num_classes
    cropped = Buffer("nnU-Net crop", NNUNET_CROPPED_PER_VOXEL * n0, False)
    ensemble = Buffer("ensemble accumulator", choice.ensemble_dtype.itemsize * k * n0, choice.ensemble_on_device)
    slab_voxels = 8 * n0 // case.image_shape[0]  # ARGMAX_SLICES slices
    slab = slab_voxels * (8 + (6 * k if choice.ensemble_dtype == torch.float32 else 0))
    phases = [
        Phase("read", (Buffer("image", 2 * case.image_itemsize * n0, False),)),
        Phase("crop", (Buffer("image", case.image_itemsize * n0, False),
                       Buffer("cropping", NNUNET_CROP_PER_VOXEL * n0, False))),
    ]  # fmt: skip
    for number, configuration in enumerate(case.configurations, 1):
        tiling, on = configuration.tiling, choice.tiling_on_device
        weights = 0 if case.weights_on_host else configuration.network.weights * configuration.folds
        channel = choice.tiling_dtype.itemsize * n0
        phases += _numbered([
            Phase("preprocess", (cropped, ensemble,
                                 Buffer("preprocessing", _preprocess_bytes(n0, configuration), False))),
            *tiling_phases(tiling, choice, configuration.network, choice.tiling_dtype, weights, (cropped, ensemble)),
            Phase("resample", (
                cropped, ensemble,
                Buffer("probabilities", choice.tiling_dtype.itemsize * k * tiling.voxels, on),
                Buffer("resampled channel", channel, on),
                Buffer("channel copy", channel if on != choice.ensemble_on_device else 0, choice.ensemble_on_device),
                Buffer("float16 channel", 2 * n0 if choice.ensemble_dtype == torch.float32 else 0,
                       choice.ensemble_on_device),
            )),
        ], str(number))  # fmt: skip
    phases += [
        Phase("argmax", (cropped, ensemble, Buffer("labels", n0, choice.ensemble_on_device),
                         Buffer("argmax slab", slab, choice.ensemble_on_device))),
        Phase("postprocess", (cropped, Buffer("labels", n0, choice.ensemble_on_device),
                              Buffer("labels on host", n0, False),
                              Buffer("post-processing", POSTPROCESS_PER_VOXEL * n0, False))),
        Phase("write", (cropped, Buffer("labels on host", n0, False), Buffer("writing", WRITE_PER_VOXEL * n0, False))),
    ]  # fmt: skip
    return phases


def plan_amos(case_name: str, case: AmosCase, tile_batch_size: int, budget: Budget, device: torch.device) -> Plan:
    """The most preferred choice that fits ``budget`` for an AMOS case (see :func:`amos_phases`).

    Raises:
        MemoryPlanError: the case fits no choice.
    """
    return choose(case_name, lambda c: amos_phases(case, c), candidates(tile_batch_size), budget, device)


# --- AutoPET ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutopetCase:
    """What :func:`autopet_phases` needs of a case.

    Attributes:
        pet_shape: the PET's (x, y, z) size.
        pet_itemsize: bytes per PET voxel as read.
        tiling: the network grid (RAS, target spacing), the window and the classes.
        flips: the reorientation to RAS flips an axis (``torch.flip`` copies).
        resampled: the target grid differs from the PET's (else resampling is skipped).
        folds: networks run one after the other.
        vote: majority vote (the running sum has one channel) rather than the mean probability (K channels).
        network: one fold's cost; its weights are resident on the device from the start of the run.
    """

    pet_shape: tuple[int, int, int]
    pet_itemsize: int
    tiling: Tiling
    flips: bool
    resampled: bool
    folds: int
    vote: bool
    network: NetworkCost

    @property
    def voxels(self) -> int:
        return math.prod(self.pet_shape)

    @classmethod
    def of(
        cls, geometry: Geometry, pet_itemsize: int, target_spacing: Sequence[float], window: Sequence[int],
        num_classes: int, folds: int, vote: bool, network: NetworkCost,
    ) -> AutopetCase:
        """From the PET's geometry and the settings, with :mod:`gcinfer.spatial`'s own plan (no voxels touched)."""
        from gcinfer.spatial import plan_spatial

        spatial = plan_spatial(geometry, tuple(target_spacing))
        tiling = Tiling(tuple(spatial.target.shape), tuple(window), num_classes)
        resampled = spatial.target is not spatial.oriented
        return cls(tuple(geometry.size), pet_itemsize, tiling, bool(spatial.reorientation.flip), resampled, folds,
                   vote, network)  # fmt: skip


def autopet_phases(case: AutopetCase, choice: Choice) -> list[Phase]:
    """The phases of :func:`gcinfer.autopet.predict_case` for ``case`` under ``choice``.

    - read: the SimpleITK PET and its numpy copy (the CT's header only);
    - preprocess: the PET on the device, its flipped copy, the resampled (or contiguous) copy, the sampling grid,
      and the two temporaries of the percentile scaling;
    - per fold: the tiled logits (result float32), their resampling to the PET grid (output and flipped copy),
      softmax, and the vote (int64 argmax and its float32 copy) or the mean, added to the running sum;
    - ensemble: the mean, the labels (int64 or float32 rounding), uint8 and its contiguous and host copies;
    - write on the host.
    The PET array stays on the host throughout; everything after preprocessing lives where the tiling result is.
    """
    n, k, tiling, on = case.voxels, case.tiling.num_classes, case.tiling, choice.tiling_on_device
    nt = tiling.voxels
    pet = Buffer("PET", case.pet_itemsize * n, False)
    network_input = Buffer("network input", 4 * nt, True)
    running = Buffer("running sum", 4 * n * (1 if case.vote else k), on)
    logits_bytes = 4 * k * n
    phases = [
        Phase("read", (Buffer("PET", 2 * case.pet_itemsize * n, False),)),
        Phase("preprocess", (
            pet, Buffer("PET on device", 4 * n, True), Buffer("flipped PET", 4 * n if case.flips else 0, True),
            Buffer("resampled", 4 * nt, True),
            Buffer("sampling grid", GRID_SAMPLE_BYTES if case.resampled else 0, True),
            Buffer("scaling temporaries", 8 * nt, True),
        )),
    ]  # fmt: skip
    for fold in range(1, case.folds + 1):
        sum_so_far = running if fold > 1 else Buffer("running sum", 0, on)
        phases += _numbered([
            *tiling_phases(tiling, choice, case.network, torch.float32, 0, (pet, sum_so_far)),
            Phase("to PET grid", (
                pet, sum_so_far, network_input, Buffer("logits", 4 * k * nt, on),
                Buffer("logits on PET grid", logits_bytes if case.resampled else 0, on),
                Buffer("unflipped logits", logits_bytes if case.flips else 0, on),
                Buffer("sampling grid", GRID_SAMPLE_BYTES if case.resampled else 0, on),
            )),
            Phase("softmax", (pet, sum_so_far, network_input, Buffer("logits on PET grid", logits_bytes, on),
                              Buffer("probabilities", logits_bytes, on))),
            Phase("vote", (pet, running, network_input, Buffer("probabilities", logits_bytes, on),
                           Buffer("argmax", 12 * n if case.vote else 0, on))),
        ], f"fold {fold}")  # fmt: skip
    phases += [
        Phase("ensemble", (
            pet, running, network_input, Buffer("mean", running.nbytes, on),
            Buffer("labels", (4 if case.vote else 8) * n, on), Buffer("uint8 labels", 2 * n, on),
            Buffer("labels on host", n, False),
        )),
        Phase("write", (pet, Buffer("labels on host", n, False), Buffer("writing", WRITE_PER_VOXEL * n, False))),
    ]  # fmt: skip
    return phases


def plan_autopet(case_name: str, case: AutopetCase, tile_batch_size: int, budget: Budget, device: torch.device) -> Plan:
    """The most preferred choice that fits ``budget`` for an AutoPET case (see :func:`autopet_phases`).

    Raises:
        MemoryPlanError: the case fits no choice.
    """
    choices = candidates(tile_batch_size, ensemble=False)
    return choose(case_name, lambda c: autopet_phases(case, c), choices, budget, device)
