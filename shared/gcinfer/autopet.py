"""The AutoPET II pipeline (``gcinfer autopet2``): the sw_fastedit DynUNet ensemble on the PET of each PET/CT pair.

Per case, everything on the device::

    PET (z, y, x) SUV -> (1, x, y, z) -> RAS -> target spacing (trilinear)            gcinfer.spatial
      -> percentile scaling to [0, 1], clipped                                        scale_percentiles
      -> per fold: sliding-window DynUNet logits (MONAI tiling, Gaussian)             gcinfer.tiling
               -> back to the PET grid (trilinear, border) -> softmax                  gcinfer.spatial
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gcinfer import memory
from gcinfer.devices import autocast_dtype_for
from gcinfer.io import Geometry, InputError, atomic_path, read_header, read_image, write_label_map
from gcinfer.layout import Case, Sockets, discover_cases
from gcinfer.runner import EXIT_OK, StageLog, run_cases, summarize
from gcinfer.spatial import SpatialPlan, plan_spatial
from gcinfer.tiling import predict_tiled

log = logging.getLogger("gcinfer")

ENSEMBLES = ("vote", "mean")
MODEL_JSON = "model.json"
DATA_CENTRIC_JSON = "data-centric-model.json"
OVERRIDABLE = ("network", "window")


@dataclass(frozen=True)
class Settings:
    """Everything that defines the prediction, from ``config.json`` (+ ``model.json``).

    Attributes:
        network: DynUNet keyword arguments.
        window: sliding-window size along the reoriented (x, y, z) axes.
        target_spacing: mm along the reoriented (x, y, z) axes.
        percentiles: (lower, upper) percentiles mapped to 0 and 1.
        overlap: sliding-window overlap fraction (MONAI's ``overlap``).
        tile_batch_size: windows per network call.
        ensemble: ``"vote"`` (majority of the folds' labels) or ``"mean"`` (argmax of the mean probability).
        write_data_centric_json: also write ``<output>/data-centric-model.json`` (``false``).
    """

    network: dict
    window: tuple[int, int, int]
    target_spacing: tuple[float, float, float]
    percentiles: tuple[float, float]
    overlap: float
    tile_batch_size: int
    ensemble: str
    write_data_centric_json: bool


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def load_settings(config: dict, model_dir: Path, ensemble: str | None = None, source: str = "config") -> Settings:
    """Settings from the container ``config`` with ``model_dir/model.json`` overrides and an optional ensemble mode.

    Raises:
        InputError: a missing or malformed key (named with ``source`` or the model.json path).
    """
    merged = dict(config)
    overrides_path = Path(model_dir) / MODEL_JSON
    if overrides_path.is_file():
        overrides = _read_json(overrides_path)
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:
            allowed = ", ".join(OVERRIDABLE)
            raise InputError(f"{overrides_path}: unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
        merged["network"] = {**config.get("network", {}), **overrides.get("network", {})}
        merged["window"] = overrides.get("window", config.get("window"))
        source = f"{source} + {overrides_path}"
    if ensemble is not None:
        merged["ensemble"] = ensemble
    try:
        settings = Settings(
            network=dict(merged["network"]),
            window=tuple(int(w) for w in merged["window"]),
            target_spacing=tuple(float(s) for s in merged["target_spacing"]),
            percentiles=tuple(float(p) for p in merged["intensity_percentiles"]),
            overlap=float(merged["overlap"]),
            tile_batch_size=int(merged["tile_batch_size"]),
            ensemble=str(merged["ensemble"]),
            write_data_centric_json=bool(merged.get("write_data_centric_json", False)),
        )
    except KeyError as error:
        raise InputError(f"{source}: missing key {error}") from None
    except (TypeError, ValueError) as error:
        raise InputError(f"{source}: malformed setting ({error})") from None
    if settings.ensemble not in ENSEMBLES:
        raise InputError(f"{source}: ensemble '{settings.ensemble}' is not one of {', '.join(ENSEMBLES)}")
    if len(settings.window) != 3 or len(settings.target_spacing) != 3 or len(settings.percentiles) != 2:
        raise InputError(f"{source}: window and target_spacing need 3 values, intensity_percentiles 2")
    return settings


def find_checkpoints(model_dir: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The checkpoints to ensemble: ``names`` in ``model_dir``, else every ``*.pt`` there (``0.pt``, ``1.pt``, ...).

    Raises:
        InputError: the folder has no ``*.pt`` file, or a named checkpoint is missing.
    """
    model_dir = Path(model_dir)
    if names:
        paths = [model_dir / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{', '.join(missing)}: checkpoint not found")
        return paths
    paths = sorted(model_dir.glob("*.pt"), key=_checkpoint_order)
    if not paths:
        raise InputError(f"{model_dir}: no *.pt checkpoint (expected 0.pt ... 4.pt or checkpoint.pt)")
    return paths


def _checkpoint_order(path: Path) -> tuple[bool, int, str]:
    """Numbered folds first, in numeric order (``2.pt`` before ``10.pt``), then other names."""
    numbered = path.stem.isdigit()
    return not numbered, int(path.stem) if numbered else 0, path.name


def build_network(settings: Settings) -> nn.Module:
    """The DynUNet of ``settings.network`` (MONAI's implementation), in eval mode."""
    from monai.networks.nets import DynUNet

    try:
        return DynUNet(**settings.network).eval()
    except (TypeError, ValueError, AssertionError) as error:
        raise InputError(f"invalid DynUNet arguments {settings.network}: {error}") from None


def _aliases(network: nn.Module) -> dict[str, str]:
    """State-dict key -> the first key naming the same tensor (DynUNet repeats its blocks under ``skip_layers``)."""
    first: dict[int, str] = {}
    return {key: first.setdefault(id(tensor), key) for key, tensor in network.state_dict(keep_vars=True).items()}


def _summarize_keys(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def checked_state_dict(path: Path, network: nn.Module) -> dict[str, torch.Tensor]:
    """The ``"net"`` state dict of a MONAI CheckpointSaver file, completed over DynUNet's aliased keys.

    A tensor stored under any of its aliases (e.g. ``skip_layers.*`` or ``input_block.*``) serves all of them.

    Raises:
        InputError: unreadable file, no ``"net"`` dict, missing, unexpected or wrongly shaped keys (named).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise InputError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("net"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"{path}: expected a MONAI checkpoint {{'net': state_dict}}, found keys {found}")
    stored = checkpoint["net"]
    aliases = _aliases(network)
    expected = network.state_dict()
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise InputError(f"{path}: unexpected key(s) in 'net': {_summarize_keys(unexpected)}")
    by_group = {aliases[key]: value for key, value in stored.items()}
    missing = sorted(set(aliases.values()) - set(by_group))
    if missing:
        raise InputError(f"{path}: missing key(s) in 'net': {_summarize_keys(missing)}")
    complete = {key: by_group[aliases[key]] for key in expected}
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in complete.items()
             if v.shape != expected[k].shape]  # fmt: skip
    if wrong:
        shapes = _summarize_keys(wrong)
        raise InputError(f"{path}: wrongly shaped tensor(s) in 'net' (checkpoint != network): {shapes}")
    return complete


def load_networks(paths: Sequence[Path], settings: Settings, device: torch.device) -> list[nn.Module]:
    """One DynUNet per checkpoint, weights loaded and checked, in eval mode on ``device``."""
    networks = []
    for path in paths:
        network = build_network(settings)
        network.load_state_dict(checked_state_dict(path, network))
        networks.append(network.to(device).eval())
    return networks


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
    image: torch.Tensor, plan: SpatialPlan, network: nn.Module, settings: Settings, device: torch.device,
    tiling: dict | None = None,
) -> torch.Tensor:
    """One fold: window logits on the network grid, back to the PET grid, softmax: (K, x, y, z) float32, where the
    tiling puts its result (``tiling``: a memory plan's :meth:`~gcinfer.memory.Plan.tiling_options`; default: the
    settings' tile batch, float32, on ``device``)."""
    logits = predict_tiled(
        image,
        network,
        settings.window,
        mode="monai",
        overlap=settings.overlap,
        gaussian=True,
        autocast_dtype=autocast_dtype_for(device),
        output="logits",
        **(tiling or {"tile_batch_size": settings.tile_batch_size}),
    )
    source_logits = plan.to_source(logits)
    del logits
    return torch.softmax(source_logits, dim=0)


def segment(
    pet: np.ndarray, geometry: Geometry, networks: Sequence[nn.Module], settings: Settings, device: torch.device,
    stages: StageLog | None = None, tiling: dict | None = None,
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
                probabilities = fold_probabilities(image, plan, network, settings, device, tiling)
                if settings.ensemble == "vote":
                    probabilities = probabilities.argmax(dim=0, keepdim=True).float()
                total = probabilities if total is None else total.add_(probabilities.to(total.device))
                del probabilities
        with stage("ensemble"):
            mean = total / len(networks)
            labels = mean.argmax(dim=0) if settings.ensemble == "mean" else torch.round(mean[0])
            return labels.to(torch.uint8).permute(2, 1, 0).contiguous().cpu().numpy()


def check_companion(path: Path) -> None:
    """A socket image the model does not read (the CT) must still be a readable 3D image; header only.

    Raises:
        InputError: unreadable or not 3D.
    """
    reader = read_header(path)
    if reader.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, got {reader.GetDimension()}D of size {reader.GetSize()}")


def plan_memory(
    path: Path, pet: np.ndarray, geometry: Geometry, folds: int, settings: Settings, network_cost: memory.NetworkCost,
    device: torch.device,
) -> memory.Plan:
    """Where the accumulators of the PET read from ``path`` fit, and the tile batch, before any prediction work.

    Raises:
        memory.MemoryPlanError: the case fits no choice (the message names ``path``).
    """
    case = memory.AutopetCase.of(
        geometry, pet.itemsize, settings.target_spacing, settings.window, int(settings.network["out_channels"]), folds,
        settings.ensemble == "vote", network_cost,
    )  # fmt: skip
    budget = memory.Budget.detect(device, held_bytes=pet.nbytes)
    return memory.plan_autopet(str(path), case, settings.tile_batch_size, budget, device)


def predict_case(
    case: Case, stages: StageLog, *, model_socket: str, networks: Sequence[nn.Module], settings: Settings,
    device: torch.device, network_cost: memory.NetworkCost,
) -> None:
    """Read the PET of ``case``, check its companions, plan the memory, segment, and write ``case.output``
    atomically."""
    with stages.stage("read"):
        for socket, path in case.inputs.items():
            if socket != model_socket:
                check_companion(path)
        pet, geometry = read_image(case.inputs[model_socket])
    plan = plan_memory(case.inputs[model_socket], pet, geometry, len(networks), settings, network_cost, device)
    log.info(plan.line())
    labels = segment(pet, geometry, networks, settings, device, stages, plan.tiling_options())
    with stages.stage("write"):
        write_label_map(case.output, labels, geometry)


def write_data_centric_json(output_dir: Path) -> Path:
    """``<output>/data-centric-model.json`` holding the JSON boolean ``false``, written atomically."""
    path = Path(output_dir) / DATA_CENTRIC_JSON
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(False))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ensemble", choices=ENSEMBLES, default=None,
        help="vote: majority of the folds' labels (the submission); mean: argmax of the mean probability "
        "(default: the config's)",
    )
    parser.add_argument(
        "--checkpoints", nargs="+", default=None, metavar="NAME",
        help="checkpoint files in --model to use (default: every *.pt there)",
    )


def run(args: argparse.Namespace, config: dict) -> int:
    """Predict every PET/CT pair of ``args.input`` into ``args.output``; returns the exit code."""
    source = str(getattr(args, "config", None) or "config")
    settings = load_settings(config, args.model, args.ensemble, source=source)
    try:
        sockets = Sockets(tuple(config["sockets"]["inputs"]), str(config["sockets"]["output"]))
    except (KeyError, TypeError) as error:
        raise InputError(f"{source}: missing or malformed 'sockets' ({error})") from None
    cases = discover_cases(args.input, args.output, sockets)
    checkpoints = find_checkpoints(args.model, args.checkpoints)
    names = ", ".join(p.name for p in checkpoints)
    log.info("autopet2: %d case(s), checkpoint(s) %s, ensemble %s", len(cases), names, settings.ensemble)
    networks = load_networks(checkpoints, settings, args.device)
    tile = (int(settings.network["in_channels"]), *settings.window)
    cost = memory.network_cost(networks[0], tile, autocast_dtype_for(args.device))
    predict = partial(
        predict_case, model_socket=sockets.inputs[0], networks=networks, settings=settings, device=args.device,
        network_cost=cost,
    )
    code = summarize(run_cases(cases, predict, args.device))
    if code == EXIT_OK and settings.write_data_centric_json:
        write_data_centric_json(args.output)
    return code
