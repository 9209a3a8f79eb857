"""The AutoPET II pipeline (``gcinfer autopet2``): the sw_fastedit DynUNet ensemble on the PET of each PET/CT pair.

Per case, everything on the device::

    PET (z, y, x) SUV -> (1, x, y, z) -> RAS -> target spacing (trilinear)            gcinfer.engine.spatial
      -> percentile scaling to [0, 1], clipped                                        scale_percentiles
      -> per fold: sliding-window DynUNet logits (MONAI tiling, Gaussian)             gcinfer.engine.tiling
               -> back to the PET grid (trilinear, border) -> softmax                  gcinfer.engine.spatial
      -> majority vote of the folds' argmax (MONAI VoteEnsembled) or argmax of the mean probability
      -> uint8 0/1 on exactly the PET's grid

The CT socket is only checked (present, paired by name, a readable 3D image). The DynUNet arguments, window,
spacing, percentiles, overlap and ensembling come from the container's ``config.json``; a ``model.json``
beside the weights overrides ``network`` (DynUNet keyword arguments) and ``window``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from gcinfer.cases import Case
from gcinfer.config import Sockets
from gcinfer.devices import autocast_dtype_for
from gcinfer.engine.spatial import SpatialPlan, plan_spatial
from gcinfer.engine.tiling import Output, TileMemory, predict_tiled
from gcinfer.errors import shown
from gcinfer.io import Geometry, ImageHeader, atomic_path, check_finite_as, read_header, read_image, write_label_map
from gcinfer.memory import Budget, NetworkCost, Plan, network_cost
from gcinfer.pipelines.autopet.memory import RESULT_DTYPE, AutopetCase, plan_autopet
from gcinfer.pipelines.autopet.networks import find_checkpoints, load_networks
from gcinfer.pipelines.autopet.settings import ENSEMBLES, Settings, load_settings

if TYPE_CHECKING:  # the runner hands each case a StageLog; pipelines only call it
    from gcinfer.runner import StageLog

log = logging.getLogger(__name__)

DATA_CENTRIC_JSON = "data-centric-model.json"


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile of all elements with linear interpolation (numpy's default), on the device.

    Uses ``topk`` on the nearer tail, so only ``min(q, 100 - q)`` percent of the elements are sorted.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    position = q / 100.0 * (n - 1)
    lower = int(np.floor(position))
    upper = min(lower + 1, n - 1)
    if lower < n // 2:
        tail = torch.topk(flat, upper + 1, largest=False, sorted=True).values
        low, high = tail[lower], tail[upper]
    else:
        tail = torch.topk(flat, n - lower, largest=True, sorted=True).values
        low, high = tail[n - 1 - lower], tail[n - 1 - upper]
    return float(low + (high - low) * (position - lower))


def scale_percentiles(image: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Map the ``lower``/``upper`` percentiles of ``image`` to 0/1 and clip (ScaleIntensityRangePercentiles,
    ``relative=False``, ``clip=True``); a constant image is only shifted, as MONAI does. Same shape, float32."""
    a_min, a_max = percentile(image, lower), percentile(image, upper)
    if a_max == a_min:
        return image - a_min
    return ((image - a_min) / (a_max - a_min)).clamp_(0.0, 1.0)


def preprocess(
    pet: np.ndarray, geometry: Geometry, settings: Settings, device: torch.device
) -> tuple[torch.Tensor, SpatialPlan]:
    """PET (z, y, x) -> the network input (1, x', y', z') float32 on ``device``, and the plan to invert it."""
    plan = plan_spatial(geometry, settings.target_spacing)
    image = torch.from_numpy(np.ascontiguousarray(pet, dtype=np.float32)).to(device).permute(2, 1, 0).unsqueeze(0)
    resampled = plan.to_target(image)
    return scale_percentiles(resampled, *settings.percentiles), plan


def fold_probabilities(
    image: torch.Tensor,
    plan: SpatialPlan,
    network: nn.Module,
    settings: Settings,
    device: torch.device,
    memory: TileMemory | None = None,
) -> torch.Tensor:
    """One fold: window logits on the network grid, back to the PET grid, softmax: (K, x, y, z) float32, where the
    tiling puts its result (``memory``: a memory plan's :meth:`~gcinfer.memory.Plan.tiling_options`; default: the
    settings' tile batch, float32, on ``device``)."""
    logits = predict_tiled(
        image,
        network,
        settings.window,
        settings.tiling,
        output=Output.LOGITS,
        autocast_dtype=autocast_dtype_for(device),
        memory=memory if memory is not None else TileMemory(tile_batch_size=settings.tile_batch_size),
    )
    source_logits = plan.to_source(logits)
    del logits
    return torch.softmax(source_logits, dim=0)


def segment(
    pet: np.ndarray,
    geometry: Geometry,
    networks: Sequence[nn.Module],
    settings: Settings,
    device: torch.device,
    stages: StageLog | None = None,
    memory: TileMemory | None = None,
) -> np.ndarray:
    """Lesion labels (z, y, x) uint8 on the PET's own grid; folds are run and inverted one by one.

    Only a running sum is kept on the PET grid: of the probabilities for ``mean`` (argmax of the mean), of the
    argmax labels for ``vote`` (MONAI VoteEnsembled: ``round(mean label)``, ties rounding half to even, so an
    even split between background and lesion gives background).
    """
    stage = stages.stage if stages else lambda name: contextlib.nullcontext()
    with torch.inference_mode():
        with stage("preprocess"):
            image, plan = preprocess(pet, geometry, settings, device)
        total = None
        for network in networks:
            with stage("predict"):
                probabilities = fold_probabilities(image, plan, network, settings, device, memory)
                if settings.ensemble == "vote":
                    probabilities = probabilities.argmax(dim=0, keepdim=True).float()
                total = probabilities if total is None else total.add_(probabilities.to(total.device))
                del probabilities
        with stage("ensemble"):
            mean = total / len(networks)
            labels = mean.argmax(dim=0) if settings.ensemble == "mean" else torch.round(mean[0])
            return labels.to(torch.uint8).permute(2, 1, 0).contiguous().cpu().numpy()


def plan_memory(
    path: Path,
    header: ImageHeader,
    folds: int,
    settings: Settings,
    cost: NetworkCost,
    device: torch.device,
) -> Plan:
    """Where the accumulators of the PET in ``path`` fit, and the tile batch, from its header alone: before its voxels
    are read (the plan's first phase) and before any prediction work.

    Raises:
        MemoryPlanError: the case fits no choice (the message names ``path``).
    """
    case = AutopetCase.of(
        header.geometry,
        header.dtype.itemsize,
        settings.target_spacing,
        settings.window,
        int(settings.network["out_channels"]),
        folds,
        settings.ensemble == "vote",
        cost,
    )
    budget = Budget.detect(device)
    return plan_autopet(shown(path), case, settings.tile_batch_size, budget, device)


def write_data_centric_json(output_dir: Path) -> Path:
    """``<output>/data-centric-model.json`` holding the JSON boolean ``false``, written atomically."""
    path = Path(output_dir) / DATA_CENTRIC_JSON
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(False))
    return path


@dataclass(frozen=True)
class AutopetPipeline:
    """A restored AutoPET fold ensemble (:class:`gcinfer.pipelines.Pipeline`).

    Attributes:
        checkpoints: the files the networks were restored from, in ensemble order.
        network_cost: one fold's device memory (for the memory plan).
    """

    settings: Settings
    sockets: Sockets
    checkpoints: tuple[Path, ...]
    networks: tuple[nn.Module, ...]
    device: torch.device
    network_cost: NetworkCost

    def describe(self) -> str:
        names = ", ".join(shown(p.name) for p in self.checkpoints)
        return f"checkpoint(s) {names}, ensemble {self.settings.ensemble}, device {self.device}"

    def predict_case(self, case: Case, stages: StageLog, upcoming: Case | None = None) -> None:
        """Check the headers of the companions (the CT: a readable 3D scalar image) and of the PET, plan the memory
        from the PET's header, read the PET (finite in float32, the dtype the pipeline computes in), segment, and
        write ``case.output`` atomically. Nothing is read ahead (``upcoming`` is not used): a PET's read is a small
        part of a case."""
        model_socket = self.sockets.inputs[0]
        for socket, path in case.inputs.items():
            if socket != model_socket:
                read_header(path)
        path = case.inputs[model_socket]
        header = read_header(path)
        plan = plan_memory(path, header, len(self.networks), self.settings, self.network_cost, self.device)
        log.info(plan.line())
        with stages.stage("read"):
            pet, geometry = read_image(path)
            check_finite_as(pet, np.float32, path)
        memory = plan.tiling_options(RESULT_DTYPE)
        labels = segment(pet, geometry, self.networks, self.settings, self.device, stages, memory)
        with stages.stage("write"):
            write_label_map(case.output, labels, geometry)

    def finish(self, output_dir: Path, succeeded: bool) -> None:
        """The data-centric flag file, when the settings ask for it and every case was written."""
        if succeeded and self.settings.write_data_centric_json:
            write_data_centric_json(output_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The AutoPET pipeline's own flags (the CLI adds --input, --output, --model, --device, --config)."""
    parser.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default=None,
        help="vote: majority of the folds' labels (the submission); mean: argmax of the mean probability "
        "(default: the config's)",
    )
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        default=None,
        metavar="NAME",
        help="checkpoint files in --model to use (default: every *.pt there)",
    )


def load(args: argparse.Namespace, config: dict, source: str) -> AutopetPipeline:
    """Settings from ``config`` (read from ``source``), ``model.json`` and the command line; networks restored once.

    Raises:
        InputError: a bad configuration, model.json or checkpoint (named).
    """
    settings = load_settings(config, args.model, args.ensemble, source=source)
    sockets = Sockets.of(config, source)
    checkpoints = tuple(find_checkpoints(args.model, args.checkpoints))
    networks = tuple(load_networks(checkpoints, settings, args.device))
    tile = (int(settings.network["in_channels"]), *settings.window)
    cost = network_cost(networks[0], tile, autocast_dtype_for(args.device))
    return AutopetPipeline(settings, sockets, checkpoints, networks, args.device, cost)
