"""The memory of an AMOS case (:func:`gcinfer.pipelines.amos.pipeline.predict_case`), phase by phase, and its plan.

The host cost of the non-zero crop and of nnU-Net v1's preprocessing (float64 spline resampling of the image and of
the mask) is given per voxel, as measured with nnU-Net 1.7.1 on this project's
machines (``benchmarks/bench_memory.py`` checks the model against the measured peak RSS of full-size cases). The
other buffers follow the code (:func:`amos_phases` says which step each comes from).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gcinfer.devices import autocast_dtype_for
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
from gcinfer.memory.network import NetworkCost, network_cost
from gcinfer.memory.tiling import Tiling, tiling_phases
from gcinfer.pipelines.amos.ensemble import ARGMAX_SLICES
from gcinfer.pipelines.amos.inputs import input_sources

if TYPE_CHECKING:
    from gcinfer.pipelines.amos import nnunet_v1

AMOS_PRECISIONS = ((torch.float32, torch.float32), (torch.float32, torch.float16), (REDUCED_DTYPE, torch.float16))
"""AMOS (tiling dtype, ensemble dtype), preferred first: upstream's exact result; a float16 running mean of the
configurations (ties of upstream's float16 values may then break the other way); a 16-bit tiling accumulator."""

# nnU-Net v1 host costs, bytes per voxel (Nc: voxels of the non-zero crop, Nt: of a configuration's network input)
NNUNET_CROP_PER_VOXEL = 9
"""``nnunet_v1.crop``, an upper bound: the non-zero mask (bool), the crop (a view of the image when the box is the
whole image, else a copy in the image's dtype, at most 4 bytes here), and a float32 cast of the image first when its
dtype is one float32 does not hold exactly."""
NNUNET_CROPPED_MASK_PER_VOXEL = 1
"""What a crop keeps besides the image's voxels (a view, or a copy in the image's dtype): once the normalisation
reads it, the hole-filled non-zero mask as int8 (nnU-Net's is int64); filling it (a few bool arrays) costs less than
the preprocessing that follows."""
NNUNET_PREPROCESS_PER_VOXEL = ((42, 10), (22, 32))
"""``Configuration.preprocess`` with 3D resampling: the largest of these (per Nc, per Nt) forms (float64 copies of the
image and of the int64 mask, spline prefilters, outputs), plus :data:`NNUNET_PREPROCESS_FIXED`. Measured peaks:
7.06 GB (Nc 157 M, Nt 126 M) and 6.68 GB (Nc 157 M, Nt 80 M) at full size, 150-690 MB at 2-8 M voxels, measured
while the int64 mask was resampled for every scheme and the spline prefilter wrote a second float64 copy of the
padded image: an upper bound now that CT configurations skip the mask and the prefilter runs in place."""
NNUNET_PREPROCESS_SEPARATE_Z_PER_VOXEL = ((42, 10), (16, 76))
"""The same with separate-z resampling, whose ``map_coordinates`` step builds int64 and float64 grids of Nt."""
NNUNET_PREPROCESS_FIXED = 32 * 2**20
"""Bytes ``Configuration.preprocess`` needs whatever the size (library buffers, and the vectorised interpolation's
per thread, sized from its ``BLOCK_BYTES``: ~4 MB for 580-voxel rows; matters only for small images)."""
NNUNET_SEPARATE_Z_THRESHOLD = 3.0
"""nnU-Net v1's ``RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD``: max/min spacing above which z is resampled apart."""
NNUNET_NO_SEPARATE_Z = ("Preprocessor3DBetterResampling",)
"""Preprocessor classes that never resample z separately."""
POSTPROCESS_PER_VOXEL = 8
"""Organ-wise post-processing on the host: a mask and its component labels per organ, bounding-box copies."""


@dataclass(frozen=True)
class AmosConfiguration:
    """One nnU-Net configuration of a case: its tiled prediction and preprocessing, its fold networks, and the index
    of the earlier configuration whose network input it takes (:func:`~gcinfer.pipelines.amos.inputs.input_sources`;
    None: it preprocesses its own)."""

    tiling: Tiling
    separate_z: bool
    network: NetworkCost
    folds: int
    input_of: int | None = None


@dataclass(frozen=True)
class AmosCase:
    """What :func:`amos_phases` needs of a case.

    Attributes:
        image_shape: (z, y, x) of the image; its crop is taken as large (the non-zero box is not known yet).
        image_itemsize: bytes per voxel of the image as read.
        num_classes: K, background included.
        configurations: in prediction order.
        weights_on_host: the networks already live where they run (CPU device), so their weights are not added.
        upcoming_image_bytes: bytes of the next case's image (its header's voxels times their size), read ahead
            while this case predicts when the choice overlaps host work; 0 when no case follows.
    """

    image_shape: tuple[int, int, int]
    image_itemsize: int
    num_classes: int
    configurations: tuple[AmosConfiguration, ...]
    weights_on_host: bool = False
    upcoming_image_bytes: int = 0

    @property
    def voxels(self) -> int:
        return math.prod(self.image_shape)

    @classmethod
    def of(
        cls,
        image_shape: Sequence[int],
        image_itemsize: int,
        spacing_zyx: Sequence[float],
        configurations: Sequence[nnunet_v1.Configuration],
        costs: Sequence[NetworkCost],
        mirrored: bool,
        device: torch.device,
        upcoming_image_bytes: int = 0,
    ) -> AmosCase:
        """From the image's shape, pixel size and spacing, the restored configurations (with their
        :func:`amos_network_costs`), whether tiles are mirrored and the next case's image bytes; network input shapes
        as nnU-Net v1's preprocessing gives them."""
        sources = input_sources(configurations, spacing_zyx, 1)
        models = tuple(
            AmosConfiguration(
                Tiling(
                    nnunet_network_shape(image_shape, spacing_zyx, c.target_spacing, c.transpose_forward),
                    tuple(c.patch_size),
                    c.num_classes,
                    1,
                    mirrored,
                ),
                nnunet_separate_z(type(c.preprocessor), spacing_zyx, c.target_spacing),
                cost,
                len(c.networks),
                None if source == index else source,
            )
            for index, (c, cost, source) in enumerate(zip(configurations, costs, sources))
        )
        return cls(
            tuple(image_shape),
            image_itemsize,
            configurations[0].num_classes,
            models,
            weights_on_host=device.type == "cpu",
            upcoming_image_bytes=upcoming_image_bytes,
        )


def amos_network_costs(configurations: Sequence[nnunet_v1.Configuration], device: torch.device) -> list[NetworkCost]:
    """:func:`network_cost` of each configuration's network (one input channel), computing as on ``device``."""
    return [network_cost(c.networks[0], (1, *c.patch_size), autocast_dtype_for(device)) for c in configurations]


def nnunet_network_shape(
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    target_spacing: Sequence[float],
    transpose_forward: Sequence[int],
) -> tuple[int, int, int]:
    """The network input shape nnU-Net v1's ``resample_patient`` gives: ``round(spacing / target * shape)`` in the
    transposed axis order (``target_spacing`` already transposed, as in the plans)."""
    return tuple(int(round(spacing_zyx[a] / t * shape_zyx[a])) for a, t in zip(transpose_forward, target_spacing))


def nnunet_separate_z(preprocessor_class: type, spacing_zyx: Sequence[float], target_spacing: Sequence[float]) -> bool:
    """Whether nnU-Net v1 resamples z separately (``force_separate_z=None``): never for the classes of
    :data:`NNUNET_NO_SEPARATE_Z`, else when the image's or the target's spacing is anisotropic beyond the threshold."""
    if any(c.__name__ in NNUNET_NO_SEPARATE_Z for c in preprocessor_class.__mro__):
        return False
    return any(max(s) / min(s) > NNUNET_SEPARATE_Z_THRESHOLD for s in (spacing_zyx, target_spacing))


def _preprocess_bytes(cropped: int, configuration: AmosConfiguration) -> int:
    if configuration.input_of is not None:
        return 0
    forms = NNUNET_PREPROCESS_SEPARATE_Z_PER_VOXEL if configuration.separate_z else NNUNET_PREPROCESS_PER_VOXEL
    per_voxel = max(per_crop * cropped + per_input * configuration.tiling.voxels for per_crop, per_input in forms)
    return per_voxel + NNUNET_PREPROCESS_FIXED


def _kept_inputs(case: AmosCase, index: int, own: bool) -> list[Buffer]:
    """Network inputs kept on the host at configuration ``index`` for later configurations that take them: those of
    earlier configurations, and with ``own`` configuration ``index``'s (a host copy only when the device is not the
    CPU; on the CPU it is the network input itself)."""
    models = case.configurations
    later = {m.input_of for m in models[index + 1 :]} - {None}
    return [
        Buffer(f"input of {source + 1} kept", 4 * models[source].tiling.channels * models[source].tiling.voxels, False)
        for source in sorted(later)
        if source < index or (own and source == index and not case.weights_on_host)
    ]


def _background_preprocessing(case: AmosCase, index: int, choice: Choice) -> list[Buffer]:
    """With ``choice.overlap``, the preprocessing of the next configuration that needs its own, running while
    configuration ``index`` predicts and resamples."""
    upcoming = next((m for m in case.configurations[index + 1 :] if m.input_of is None), None)
    if not choice.overlap or upcoming is None:
        return []
    return [Buffer("next preprocessing", _preprocess_bytes(case.voxels, upcoming), False)]


def _read_ahead(case: AmosCase, choice: Choice) -> list[Buffer]:
    """With ``choice.overlap``, the next case's image, read ahead from the first configuration's prediction on (the
    SimpleITK image and its numpy copy, as in the read phase)."""
    if not choice.overlap or not case.upcoming_image_bytes:
        return []
    return [Buffer("next case's image", 2 * case.upcoming_image_bytes, False)]


def amos_phases(case: AmosCase, choice: Choice) -> list[Phase]:
    """The phases of :func:`gcinfer.pipelines.amos.pipeline.predict_case` for ``case`` under ``choice``.

    - read: the SimpleITK image and its numpy copy;
    - crop: the image and nnU-Net's cropping (:data:`NNUNET_CROP_PER_VOXEL`);
    - per configuration: preprocess (the crop, nnU-Net's resampling unless the configuration takes an earlier
      one's input, the ensemble accumulator ``(K, *crop)``), the tiled prediction (:func:`tiling_phases`, result in
      the tiling dtype, the configuration's fold weights on the device) and the per-channel resampling back to the
      crop (the ensemble, the prediction, one resampled channel where the tiling is, its copy where the ensemble is
      when that differs, and its float16 rounding when the ensemble is float32); prediction and resampling also hold
      :func:`_kept_inputs` and :func:`_background_preprocessing`, and every phase from the first prediction on
      :func:`_read_ahead`;
    - argmax into the uint8 label map ``(z, y, x)`` where the ensemble is (a slab of 8 slices at a time, per voxel of
      the slab: the best float16 mean and its class, the current class's float16 mean, its float32 quotient when the
      ensemble is float32, the comparison and two bool/uint8 temporaries);
    - post-processing and writing on the host.
    The crop (the image's voxels and :data:`NNUNET_CROPPED_MASK_PER_VOXEL`) stays on the host throughout.
    """
    n0, k = case.voxels, case.num_classes
    cropped = Buffer("nnU-Net crop", (case.image_itemsize + NNUNET_CROPPED_MASK_PER_VOXEL) * n0, False)
    ensemble = Buffer("ensemble accumulator", choice.ensemble_dtype.itemsize * k * n0, choice.ensemble_on_device)
    slab_voxels = ARGMAX_SLICES * n0 // case.image_shape[0]
    slab = slab_voxels * (8 + (4 if choice.ensemble_dtype == torch.float32 else 0))
    ahead = _read_ahead(case, choice)
    phases = [
        Phase("read", (Buffer("image", 2 * case.image_itemsize * n0, False),)),
        Phase(
            "crop",
            (Buffer("image", case.image_itemsize * n0, False), Buffer("cropping", NNUNET_CROP_PER_VOXEL * n0, False)),
        ),
    ]
    for number, configuration in enumerate(case.configurations, 1):
        tiling, on = configuration.tiling, choice.tiling_on_device
        weights = 0 if case.weights_on_host else configuration.network.weights * configuration.folds
        channel = choice.tiling_dtype.itemsize * n0
        index = number - 1
        resident = (
            cropped,
            ensemble,
            *_kept_inputs(case, index, own=True),
            *_background_preprocessing(case, index, choice),
            *ahead,
        )
        phases += numbered(
            [
                Phase(
                    "preprocess",
                    (
                        cropped,
                        ensemble,
                        *_kept_inputs(case, index, own=False),
                        Buffer("preprocessing", _preprocess_bytes(n0, configuration), False),
                        *(ahead if index else ()),
                    ),
                ),
                *tiling_phases(tiling, choice, configuration.network, choice.tiling_dtype, weights, resident),
                Phase(
                    "resample",
                    (
                        *resident,
                        Buffer("probabilities", choice.tiling_dtype.itemsize * k * tiling.voxels, on),
                        Buffer("resampled channel", channel, on),
                        Buffer(
                            "channel copy", channel if on != choice.ensemble_on_device else 0, choice.ensemble_on_device
                        ),
                        Buffer(
                            "float16 channel",
                            2 * n0 if choice.ensemble_dtype == torch.float32 else 0,
                            choice.ensemble_on_device,
                        ),
                    ),
                ),
            ],
            str(number),
        )
    phases += [
        Phase(
            "argmax",
            (
                cropped,
                ensemble,
                Buffer("labels", n0, choice.ensemble_on_device),
                Buffer("argmax slab", slab, choice.ensemble_on_device),
                *ahead,
            ),
        ),
        Phase(
            "postprocess",
            (
                cropped,
                Buffer("labels", n0, choice.ensemble_on_device),
                Buffer("labels on host", n0, False),
                Buffer("post-processing", POSTPROCESS_PER_VOXEL * n0, False),
                *ahead,
            ),
        ),
        Phase(
            "write",
            (cropped, Buffer("labels on host", n0, False), Buffer("writing", WRITE_PER_VOXEL * n0, False), *ahead),
        ),
    ]
    return phases


def plan_amos(
    case_name: str, case: AmosCase, tile_batch_size: int, budget: Budget, device: torch.device, overlap: bool = False
) -> Plan:
    """The most preferred choice that fits ``budget`` for an AMOS case (see :func:`amos_phases`); with ``overlap``,
    each choice overlapped (the next configuration preprocessed and the next case read while one predicts) when that
    fits too.

    Raises:
        MemoryPlanError: the case fits no choice.
    """
    choices = candidates(tile_batch_size, AMOS_PRECISIONS, overlap=overlap)
    return choose(case_name, lambda c: amos_phases(case, c), choices, budget, device)
