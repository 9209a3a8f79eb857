"""The memory of an AutoPET case (:func:`gcinfer.pipelines.autopet.pipeline.predict_case`), phase by phase, and
its plan (the buffers follow the code; :func:`autopet_phases` says which step each comes from)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gcinfer.engine.spatial import MAX_GRID_VOXELS, plan_spatial
from gcinfer.io import Geometry
from gcinfer.memory.budget import Budget
from gcinfer.memory.model import (
    REDUCED_DTYPE,
    WRITE_PER_VOXEL,
    Buffer,
    Choice,
    Phase,
    Plan,
    candidates,
    choose,
    numbered,
)
from gcinfer.memory.network import NetworkCost
from gcinfer.memory.tiling import Tiling, tiling_phases

AUTOPET_PRECISIONS = ((torch.float32, torch.float32), (REDUCED_DTYPE, torch.float32))
"""AutoPET (tiling dtype, fold accumulator dtype), preferred first."""
RESULT_DTYPE = torch.float32
"""The tiled logits' dtype whatever the tiling accumulates in: they are resampled to the PET grid in float32."""
GRID_SAMPLE_BYTES = MAX_GRID_VOXELS * 16
"""``gcinfer.engine.spatial.resample``: one slab of sampling coordinates (3 x float32) and samples."""


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
        cls,
        geometry: Geometry,
        pet_itemsize: int,
        target_spacing: Sequence[float],
        window: Sequence[int],
        num_classes: int,
        folds: int,
        vote: bool,
        network: NetworkCost,
    ) -> AutopetCase:
        """From the PET's geometry and the settings, with :mod:`~gcinfer.engine.spatial`'s plan (no voxels touched)."""
        spatial = plan_spatial(geometry, tuple(target_spacing))
        tiling = Tiling(tuple(spatial.target.shape), tuple(window), num_classes)
        resampled = spatial.target is not spatial.oriented
        return cls(
            tuple(geometry.size),
            pet_itemsize,
            tiling,
            bool(spatial.reorientation.flip),
            resampled,
            folds,
            vote,
            network,
        )


def autopet_phases(case: AutopetCase, choice: Choice) -> list[Phase]:
    """The phases of :func:`gcinfer.pipelines.autopet.pipeline.predict_case` for ``case`` under ``choice``.

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
        Phase(
            "preprocess",
            (
                pet,
                Buffer("PET on device", 4 * n, True),
                Buffer("flipped PET", 4 * n if case.flips else 0, True),
                Buffer("resampled", 4 * nt, True),
                Buffer("sampling grid", GRID_SAMPLE_BYTES if case.resampled else 0, True),
                Buffer("scaling temporaries", 8 * nt, True),
            ),
        ),
    ]
    for fold in range(1, case.folds + 1):
        sum_so_far = running if fold > 1 else Buffer("running sum", 0, on)
        phases += numbered(
            [
                *tiling_phases(tiling, choice, case.network, RESULT_DTYPE, 0, (pet, sum_so_far)),
                Phase(
                    "to PET grid",
                    (
                        pet,
                        sum_so_far,
                        network_input,
                        Buffer("logits", 4 * k * nt, on),
                        Buffer("logits on PET grid", logits_bytes if case.resampled else 0, on),
                        Buffer("unflipped logits", logits_bytes if case.flips else 0, on),
                        Buffer("sampling grid", GRID_SAMPLE_BYTES if case.resampled else 0, on),
                    ),
                ),
                Phase(
                    "softmax",
                    (
                        pet,
                        sum_so_far,
                        network_input,
                        Buffer("logits on PET grid", logits_bytes, on),
                        Buffer("probabilities", logits_bytes, on),
                    ),
                ),
                Phase(
                    "vote",
                    (
                        pet,
                        running,
                        network_input,
                        Buffer("probabilities", logits_bytes, on),
                        Buffer("argmax", 12 * n if case.vote else 0, on),
                    ),
                ),
            ],
            f"fold {fold}",
        )
    phases += [
        Phase(
            "ensemble",
            (
                pet,
                running,
                network_input,
                Buffer("mean", running.nbytes, on),
                Buffer("labels", (4 if case.vote else 8) * n, on),
                Buffer("uint8 labels", 2 * n, on),
                Buffer("labels on host", n, False),
            ),
        ),
        Phase("write", (pet, Buffer("labels on host", n, False), Buffer("writing", WRITE_PER_VOXEL * n, False))),
    ]
    return phases


def plan_autopet(case_name: str, case: AutopetCase, tile_batch_size: int, budget: Budget, device: torch.device) -> Plan:
    """The most preferred choice that fits ``budget`` for an AutoPET case (see :func:`autopet_phases`).

    Raises:
        MemoryPlanError: the case fits no choice.
    """
    choices = candidates(tile_batch_size, AUTOPET_PRECISIONS, ensemble=False)
    return choose(case_name, lambda c: autopet_phases(case, c), choices, budget, device)
