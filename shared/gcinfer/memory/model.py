"""The memory model: buffers alive per phase of a case, the choices of dtype and placement, and the plan.

A case runs as phases (read, crop, preprocess, predict, resample, ...), each holding :class:`Buffer` s on the
device or on the host; a pool's peak is its largest phase total. When the device is the CPU both pools are the
host's memory and a phase's device and host buffers add up. Each pipeline describes its own phases next to its code
(``gcinfer.pipelines.<name>.memory``); :func:`choose` picks the first :class:`Choice` that fits the
:class:`~gcinfer.memory.budget.Budget`, in this order of preference (results first, then speed):

1. precision (the pipeline's precisions, e.g. float32 accumulators, else 16-bit ones, :data:`REDUCED_DTYPE`);
2. the tiling accumulator on the device, else on the host (the tiles still run on the device; nnU-Net v1 itself
   accumulated on the host);
3. the ensemble accumulator on the device (AMOS), else on the host;
4. the configured number of tiles per forward pass, else half as many, down to one;
5. where the pipeline can overlap host work with the device's (AMOS: preprocessing the next configuration and
   reading the next case while one predicts), overlapped, else one after the other.

A case that fits no choice raises :class:`MemoryPlanError` (an ``InputError``: the runner reports the case as
failed and goes on with the others) before any prediction work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from gcinfer.engine.tiling import TileMemory
from gcinfer.errors import MemoryPlanError
from gcinfer.memory.budget import GIB, Budget

REDUCED_DTYPE = torch.bfloat16
"""The 16-bit accumulator dtype. Not float16: nnU-Net's Gaussian weights fall to ~e^-24 at a tile's corner, which
float16 flushes to 0, so that the volume's corners divide 0 by 0 (NaN) and its edges lose all precision."""
WRITE_PER_VOXEL = 2
"""``gcinfer.io.write_label_map``: the SimpleITK image and the compression buffer."""


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
        ensemble_dtype: the AMOS cross-configuration accumulator (AMOS: float32 holds upstream's exact
            sum, float16 a running mean); AutoPET's fold accumulator is float32 whatever this says.
        overlap: the next configuration is preprocessed, and the next case read, on the host while the current
            configuration predicts (AMOS).
    """

    tiling_dtype: torch.dtype
    ensemble_dtype: torch.dtype
    tiling_on_device: bool
    ensemble_on_device: bool
    tile_batch_size: int
    overlap: bool = False

    def describe(self, device: torch.device | str = "device") -> str:
        where = lambda on_device: str(device) if on_device else "host"  # noqa: E731
        return (
            f"tiling {_dtype_name(self.tiling_dtype)} on {where(self.tiling_on_device)}, "
            f"ensemble {_dtype_name(self.ensemble_dtype)} on {where(self.ensemble_on_device)}, "
            f"{self.tile_batch_size} tile(s)/batch" + (", host work overlapped" if self.overlap else "")
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


Precisions = Sequence[tuple[torch.dtype, torch.dtype]]
"""(tiling dtype, ensemble dtype) pairs, preferred first."""


def candidates(
    tile_batch_size: int, precisions: Precisions, ensemble: bool = True, overlap: bool = False
) -> list[Choice]:
    """Every choice, most preferred first (see the module docstring).

    Args:
        tile_batch_size: the configured tiles per forward pass; halved down to 1 by the later choices.
        precisions: the pipeline's (tiling dtype, ensemble dtype) pairs, preferred first.
        ensemble: the pipeline has an ensemble accumulator (AMOS) placed apart from the tiling's (never on the
            device while the tiling accumulates on the host); else it lives where the tiling result is.
        overlap: the pipeline may overlap host work with the device's: each choice is offered overlapped first.
    """
    batches = sorted({max(tile_batch_size >> k, 1) for k in range(max(tile_batch_size, 1).bit_length())}, reverse=True)
    placements = ((True, True), (True, False), (False, False)) if ensemble else ((True, True), (False, False))
    return [
        Choice(tiling_dtype, ensemble_dtype, tiling, ensemble_on_device, batch, overlapped)
        for tiling_dtype, ensemble_dtype in precisions
        for tiling, ensemble_on_device in placements
        for batch in batches
        for overlapped in ((True, False) if overlap else (False,))
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

    def tiling_options(self, result_dtype: torch.dtype | None = None) -> TileMemory:
        """This plan's memory choices for :func:`~gcinfer.engine.tiling.predict_tiled`: the tile batch, the
        accumulator in the tiling dtype on :attr:`tiling_device`, and the result in ``result_dtype`` (None: the
        tiling dtype, no cast copy; the pipeline's phases model the same dtype)."""
        return TileMemory(
            tile_batch_size=self.choice.tile_batch_size,
            accumulate_dtype=self.choice.tiling_dtype,
            result_dtype=self.choice.tiling_dtype if result_dtype is None else result_dtype,
            result_device=self.tiling_device,
        )

    def line(self) -> str:
        """One log line: ``case: memory plan: tiling fp32 on cuda, ... | cuda 9.1/13.6 GiB (predict 2) | host ...``."""
        e, b = self.estimate, self.budget
        pools = [] if b.shared else [f"{self.device} {e.device / GIB:.1f}/{b.device / GIB:.1f} GiB ({e.device_phase})"]
        pools.append(f"host {e.host / GIB:.1f}/{b.host / GIB:.1f} GiB ({e.host_phase})")
        return f"{self.case}: memory plan: {self.choice.describe(self.device)} | " + " | ".join(pools)


def choose(
    case: str,
    phases_of: Callable[[Choice], Sequence[Phase]],
    choices: Sequence[Choice],
    budget: Budget,
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


def numbered(phases: Sequence[Phase], suffix: str) -> list[Phase]:
    return [replace(p, name=f"{p.name} {suffix}") for p in phases]
