"""AMOS 2022 task 1 (CT) and task 2 (CT or MRI) pipelines: the winning nnU-Net v1 ensembles, in memory.

Upstream (nnU-Net v1 ``documentation/amos2022/run_inference_task{1,2}.py``) predicts every configuration with
``predict_cases_amos2022`` (saving each configuration's softmax as a compressed npz per case), averages those
with ``merge``, then applies the organ-wise post-processing. This module computes the same label maps with
everything on the device and nothing written but the final label map. Per case:

1. read the image and crop it to its non-zero bounding box (nnU-Net's crop, shared by all configurations);
2. per configuration: preprocess as nnU-Net v1 does for its plans (:mod:`.nnunet_v1`; once for configurations that
   preprocess alike, the next one while the current one predicts where the plan allows: :mod:`.inputs`), predict all its
   folds in one tiled pass (:func:`gcinfer.engine.tiling.predict_tiled`, nnU-Net mode: step 0.5, Gaussian, 8 mirrors,
   fp16 autocast on CUDA), resample that fold mean per channel to the crop's shape (trilinear, as the AMOS
   inference code does), transpose it back and add it to the ensemble accumulator (:func:`accumulate`);
3. argmax of the float16 mean over configurations into the full image (background outside the crop), organ-wise
   post-processing
   (:func:`gcinfer.pipelines.amos.postprocessing.postprocess_organs`, cupy on CUDA when installed), write uint8 with the
   input's geometry.

Memory (``K`` classes, ``Nc`` voxels in the crop, ``Nt`` voxels of a configuration's network input):

- ensemble accumulator: ``(K, *crop)``, the largest buffer, in the memory plan's ensemble dtype
  (:mod:`gcinfer.memory`). float32 (``4 K Nc`` bytes) when it fits: the sum of each configuration's softmax
  rounded to float16, as upstream stores it in its npz: upstream's float16 mean by the same arithmetic, so that
  its ties break the same way (they are frequent: float16 resolves 2**-11 near 0.5). Otherwise float16
  (``2 K Nc``; a 512 x 512 x 300 CT with 16 classes: 2.5 GB instead of 5 GB), the running mean
  ``sum p / n_configurations``;
- a configuration's tiled prediction: ``(K, *network input)`` float32 (``4 K Nt`` bytes), the tiling engine's
  accumulator, freed once resampled; folds and mirrors are summed inside each tile by the engine;
- resampling: one ``Nc`` float32 channel at a time; argmax: a few slices at a time; labels: ``uint8``.

So the working memory is ``4 K Nc + 4 K Nt`` (or ``2 K Nc + 4 K Nt``) plus small terms, whatever the number of
folds and configurations; plus a network input kept for a later configuration that shares it (``4 Nt``), and with
the overlap the next configuration's preprocessing (:mod:`.memory` counts both).
The weights of one configuration's folds are on the device at a time (one network per fold, restored once per
run and kept on the host): that costs ``folds x weights`` of device memory but lets the engine run every fold
on each tile in one pass, where reloading one network per fold would need a second ``4 K Nt`` accumulator.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gcinfer.background import ReadAhead
from gcinfer.cases import Case
from gcinfer.config import Sockets
from gcinfer.devices import autocast_dtype_for
from gcinfer.engine.resampling import resize_channels_trilinear
from gcinfer.engine.tiling import NnunetTiling, TileMemory, predict_tiled
from gcinfer.errors import InputError, shown
from gcinfer.io import Geometry, ImageHeader, check_finite_as, read_header, read_image, write_label_map
from gcinfer.memory import Budget, NetworkCost, Plan
from gcinfer.pipelines.amos import nnunet_v1
from gcinfer.pipelines.amos.ensemble import accumulate, labels_in_image
from gcinfer.pipelines.amos.inputs import NetworkInputs
from gcinfer.pipelines.amos.memory import AmosCase, amos_network_costs, plan_amos
from gcinfer.pipelines.amos.postprocessing import backend_for, parse_table, postprocess_organs

if TYPE_CHECKING:  # the runner hands each case a StageLog; pipelines only call it
    from gcinfer.runner import StageLog

log = logging.getLogger(__name__)

OVERLAP_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class Settings:
    """One run's choices: the container config, overridden by the command line.

    Attributes:
        sockets: the Grand Challenge input socket (one) and output socket.
        models: configuration folder names ``<Trainer>__<Plans>`` to ensemble.
        folds: folds of every configuration to ensemble.
        checkpoint: checkpoint name in each fold folder.
        step_size: tile step as a fraction of the patch.
        mirror_axes: spatial axes mirrored at test time (empty: no test-time augmentation).
        tile_batch_size: tiles per forward pass (speed and memory only).
        postprocessing: the organ-wise post-processing table, or None to skip it.
        overlap: ``auto``, ``on`` or ``off``: preprocess the next configuration and read the next case on the host
            while one predicts (``auto``: on CUDA devices, where the host is otherwise idle; the memory plan may still
            refuse it).
    """

    sockets: Sockets
    models: tuple[str, ...]
    folds: tuple[int, ...]
    checkpoint: str
    step_size: float
    mirror_axes: tuple[int, ...]
    tile_batch_size: int
    postprocessing: dict | None
    overlap: str = "auto"

    def overlaps_on(self, device: torch.device) -> bool:
        """Whether :attr:`overlap` allows overlapping the host's preprocessing with prediction on ``device``."""
        return self.overlap == "on" or (self.overlap == "auto" and device.type == "cuda")

    @property
    def tiling(self) -> NnunetTiling:
        """nnU-Net v1's tiling at :attr:`step_size`, Gaussian weighting on."""
        return NnunetTiling(step_size=self.step_size, gaussian=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The AMOS pipelines' own flags (the CLI adds --input, --output, --model, --device, --config)."""
    parser.add_argument("--models", nargs="+", metavar="TRAINER__PLANS", help="configurations (default: the config's)")
    parser.add_argument("--folds", nargs="+", type=int, metavar="K", help="folds (default: the config's, 0 1 2 3 4)")
    parser.add_argument("--no-tta", action="store_true", help="no test-time mirroring")
    parser.add_argument("--step-size", type=float, default=None, help="tile step, fraction of the patch (default 0.5)")
    parser.add_argument("--no-postprocessing", action="store_true", help="skip the organ-wise post-processing")
    parser.add_argument(
        "--overlap",
        choices=OVERLAP_CHOICES,
        help="preprocess the next configuration and read the next case while one predicts (default: the config's, "
        "auto = on CUDA)",
    )


def settings_from(args: argparse.Namespace, config: dict, source: str) -> Settings:
    """Merge the container config (read from ``source``) with the command line.

    Raises:
        InputError: a missing or invalid config entry or option (names the config file).
    """
    sockets = Sockets.of(config, source)
    try:
        settings = Settings(
            sockets=sockets,
            models=tuple(args.models or config["models"]),
            folds=tuple(int(f) for f in (args.folds if args.folds is not None else config["folds"])),
            checkpoint=str(config.get("checkpoint", nnunet_v1.CHECKPOINT)),
            step_size=float(args.step_size if args.step_size is not None else config["step_size"]),
            mirror_axes=() if args.no_tta else tuple(int(a) for a in config["mirror_axes"]),
            tile_batch_size=int(config.get("tile_batch_size", 1)),
            postprocessing=None if args.no_postprocessing else config["postprocessing"],
            overlap=str(args.overlap or config.get("overlap", "auto")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{shown(source)}: invalid AMOS configuration (missing or malformed entry {error})") from None
    if settings.overlap not in OVERLAP_CHOICES:
        raise InputError(
            f"{shown(source)}: overlap must be one of {', '.join(OVERLAP_CHOICES)}, got {settings.overlap!r}"
        )
    if len(settings.sockets.inputs) != 1:
        raise InputError(
            f"{shown(source)}: the AMOS pipelines take exactly one input socket, got {settings.sockets.inputs}"
        )
    try:  # the engine's own checks, which name the allowed values
        NnunetTiling(step_size=settings.step_size)
        TileMemory(tile_batch_size=settings.tile_batch_size)
    except ValueError as error:
        raise InputError(f"{shown(source)}: {error}") from None
    if settings.postprocessing is not None:
        try:
            parse_table(settings.postprocessing)
        except ValueError as error:
            raise InputError(f"{shown(source)}: {error}") from None
    return settings


def load_configurations(model_dir: Path, settings: Settings) -> list[nnunet_v1.Configuration]:
    """Restore the selected configurations and folds once per run.

    Raises:
        InputError: anything missing in ``model_dir`` (named), or configurations disagreeing on the classes.
    """
    configurations = nnunet_v1.restore(model_dir, settings.models, settings.folds, settings.checkpoint)
    classes = {c.name: c.num_classes for c in configurations}
    if len(set(classes.values())) != 1:
        raise InputError(f"{shown(model_dir)}: the configurations predict different numbers of classes: {classes}")
    if max(classes.values()) > 256:
        raise InputError(f"{shown(model_dir)}: {max(classes.values())} classes do not fit a uint8 label map")
    return configurations


def ensemble_probabilities(
    cropped: nnunet_v1.Cropped,
    pipeline: AmosPipeline,
    plan: Plan,
    stages: StageLog,
    predicting: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Each configuration's mean softmax over folds and mirrors, on the crop, accumulated (:func:`accumulate`).

    The tiling accumulates and returns in ``plan``'s tiling dtype on ``plan.tiling_device``; the ensemble is
    ``plan.choice.ensemble_dtype`` on ``plan.ensemble_device``. The network inputs come from :class:`NetworkInputs`:
    configurations that preprocess alike share one, and with ``plan.choice.overlap`` the next is preprocessed while
    the current configuration predicts (the "preprocess" stage is then the wait for it). ``predicting`` is called
    once, when the first configuration's input is ready (the caller starts reading the next case there).

    Returns:
        ``(K, z, y, x)`` on ``plan.ensemble_device``, the crop's shape (``size_after_cropping``): float32 sums or a
        float16 mean (:func:`ensemble_mean` gives the mean of either).
    """
    choice, classes = plan.choice, pipeline.configurations[0].num_classes
    total = torch.zeros((classes, *cropped.shape), dtype=choice.ensemble_dtype, device=plan.ensemble_device)
    with NetworkInputs(cropped, pipeline.configurations, overlap=choice.overlap) as inputs:
        for index in range(len(pipeline.configurations)):
            predict_configuration(index, inputs, total, pipeline, plan, stages, predicting if index == 0 else None)
    return total


def predict_configuration(
    index: int,
    inputs: NetworkInputs,
    total: torch.Tensor,
    pipeline: AmosPipeline,
    plan: Plan,
    stages: StageLog,
    predicting: Callable[[], None] | None = None,
) -> None:
    """Configuration ``index``'s mean softmax over folds and mirrors, resampled to the crop and added to the ensemble
    accumulator ``total`` ``(K, z, y, x)``; ``predicting`` (if any) is called once its input is ready."""
    device, settings, configuration = pipeline.device, pipeline.settings, pipeline.configurations[index]
    with stages.stage("preprocess"):
        image = torch.from_numpy(inputs.take(index)).to(device)
    if predicting is not None:
        predicting()
    with stages.stage("predict"), configuration.networks_on(device) as networks:
        probabilities = predict_tiled(
            image,
            networks,
            configuration.patch_size,
            settings.tiling,
            mirror_axes=settings.mirror_axes,
            autocast_dtype=autocast_dtype_for(device),
            memory=plan.tiling_options(),
            progress=False,
        )
    del image
    with stages.stage("resample"):
        size = [total.shape[1 + axis] for axis in configuration.transpose_forward]
        channels = resize_channels_trilinear(probabilities, size)
        for accumulator, channel in zip(total, channels):
            accumulate(accumulator, channel.permute(configuration.transpose_backward), len(pipeline.configurations))


def postprocess(labels: torch.Tensor, spacing_zyx: Sequence[float], table: dict) -> np.ndarray:
    """Organ-wise post-processing where the labels are: cupy on CUDA (zero-copy, when installed), else numpy.

    Returns:
        ``(z, y, x)`` uint8 numpy array.
    """
    if labels.device.type == "cuda" and importlib.util.find_spec("cupy") is not None:
        import cupy

        array = cupy.from_dlpack(labels)
    else:
        array = labels.cpu().numpy()
    result = postprocess_organs(array, spacing_zyx, table)
    return backend_for(result).to_numpy(result)


def plan_memory(path: Path, header: ImageHeader, pipeline: AmosPipeline, upcoming: ImageHeader | None = None) -> Plan:
    """Where and in which dtype the accumulators of the case in ``path`` fit, from its header alone: before its voxels
    are read (the plan's first phase) and before any prediction work; with the header of the next case's image,
    whether that image can be read ahead (an overlapped choice).

    Raises:
        InputError: an axis that nnU-Net's resampling to a configuration's spacing would leave without a voxel.
        MemoryPlanError: the case fits no choice (the message names ``path``).
    """
    settings, geometry = pipeline.settings, header.geometry
    case = AmosCase.of(
        geometry.shape_zyx,
        header.dtype.itemsize,
        geometry.spacing_zyx,
        pipeline.configurations,
        pipeline.network_costs,
        bool(settings.mirror_axes),
        pipeline.device,
        0 if upcoming is None else upcoming.dtype.itemsize * math.prod(upcoming.geometry.shape_zyx),
    )
    for configuration, model in zip(pipeline.configurations, case.configurations):
        if min(model.tiling.shape) < 1:
            raise InputError(
                f"{shown(path)}: resampled to the spacing {tuple(configuration.target_spacing.tolist())} mm of "
                f"{configuration.name}, its {geometry.size} voxels of {geometry.spacing} mm leave an axis without "
                "a voxel"
            )
    budget = Budget.detect(pipeline.device)
    overlap = settings.overlaps_on(pipeline.device)
    return plan_amos(shown(path), case, settings.tile_batch_size, budget, pipeline.device, overlap)


def read_checked(path: Path) -> tuple[np.ndarray, Geometry]:
    """The image of ``path`` (``(z, y, x)``, its own dtype) and its geometry; its voxels must be finite in float32,
    the dtype nnU-Net's preprocessing computes in.

    Raises:
        InputError: unreadable, or voxels that float32 does not hold (names ``path``).
    """
    image, geometry = read_image(path)
    check_finite_as(image, np.float32, path)
    return image, geometry


def _image_of(case: Case | None) -> tuple[Path, ImageHeader] | None:
    """The path and header of ``case``'s image, None without a case or when its header is bad (that case reports
    it when it runs)."""
    if case is None:
        return None
    (path,) = case.inputs.values()
    try:
        return path, read_header(path)
    except InputError:
        return None


def predict_case(case: Case, pipeline: AmosPipeline, stages: StageLog, upcoming: Case | None = None) -> None:
    """Segment one case and write its label map (uint8, the input's geometry); nothing else is written.

    The memory is planned from the image's header, before its voxels are read (:func:`read_checked`). When host
    work may overlap (``--overlap``) and the plan has room for it, the ``upcoming`` case's image is read on a
    background thread from the first prediction on, and taken by that case's own call (its "read" stage is then
    the wait for it; its errors are reported there).
    """
    (path,) = case.inputs.values()
    ahead = pipeline.read_ahead.claim(path)
    following = _image_of(upcoming) if pipeline.settings.overlaps_on(pipeline.device) else None
    plan = plan_memory(path, read_header(path), pipeline, None if following is None else following[1])
    log.info(plan.line())
    with stages.stage("read"):
        image, geometry = read_checked(path) if ahead is None else ahead.result()
    if not image.any():
        raise InputError(f"{shown(path)}: every voxel is 0; nnU-Net's non-zero crop would be empty")
    with stages.stage("crop"):
        cropped = nnunet_v1.crop(image[None], geometry)
    del image
    read_next = None
    if following is not None and plan.choice.overlap:
        next_path = following[0]
        read_next = partial(pipeline.read_ahead.start, next_path, partial(read_checked, next_path), "read ahead")
    probabilities = ensemble_probabilities(cropped, pipeline, plan, stages, read_next)
    with stages.stage("argmax"):
        labels = labels_in_image(probabilities, len(pipeline.configurations), cropped, geometry)
    del probabilities
    table = pipeline.settings.postprocessing
    with stages.stage("postprocess"):
        result = postprocess(labels, geometry.spacing_zyx, table) if table else labels.cpu().numpy()
    with stages.stage("write"):
        write_label_map(case.output, result, geometry)


@dataclass(frozen=True)
class AmosPipeline:
    """A restored AMOS ensemble (:class:`gcinfer.pipelines.Pipeline`): the configurations with their fold networks,
    the settings, the device and each configuration's network memory (for the memory plan)."""

    configurations: list[nnunet_v1.Configuration]
    settings: Settings
    device: torch.device
    network_costs: tuple[NetworkCost, ...]
    read_ahead: ReadAhead[tuple[np.ndarray, Geometry]] = field(default_factory=ReadAhead, compare=False)

    @property
    def sockets(self) -> Sockets:
        return self.settings.sockets

    def describe(self) -> str:
        s = self.settings
        return (
            f"configurations {', '.join(s.models)}, folds {list(s.folds)}, step {s.step_size:.2f}, "
            f"mirror axes {list(s.mirror_axes)}, post-processing {'on' if s.postprocessing else 'off'}, "
            f"overlap {s.overlap}, device {self.device}"
        )

    def predict_case(self, case: Case, stages: StageLog, upcoming: Case | None = None) -> None:
        predict_case(case, self, stages, upcoming)

    def finish(self, output_dir: Path, succeeded: bool) -> None:
        """Nothing: an AMOS run writes only the label maps."""


def load(args: argparse.Namespace, config: dict, source: str) -> AmosPipeline:
    """Settings from ``config`` (read from ``source``) and the command line, configurations restored once.

    Raises:
        InputError: a bad configuration or model folder (named).
    """
    settings = settings_from(args, config, source)
    if args.device.type == "cuda" and settings.postprocessing and importlib.util.find_spec("cupy") is None:
        log.warning("cupy is not installed: the post-processing runs on the CPU")
    configurations = load_configurations(args.model, settings)
    costs = tuple(amos_network_costs(configurations, args.device))
    return AmosPipeline(configurations, settings, args.device, costs)
