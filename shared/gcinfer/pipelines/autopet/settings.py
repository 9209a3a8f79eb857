"""The AutoPET II settings: the container's ``config.json`` with the ``model.json`` overrides beside the weights,
parsed once."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

from gcinfer.config import read_json
from gcinfer.engine.tiling import MonaiTiling
from gcinfer.errors import InputError, shown

ENSEMBLES = ("vote", "mean")
MODEL_JSON = "model.json"
OVERRIDABLE = ("network", "window")
MAX_WINDOW = 512
"""Largest sliding-window edge accepted (voxels): the submission's is 128; a larger one is a typo."""
NETWORK_CHANNELS = {"in_channels": 1, "out_channels": 2}
"""The DynUNet's channels the pipeline is built for: the PET in, background and lesion out (the vote and the binary
lesion mask need exactly two classes)."""


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

    @property
    def tiling(self) -> MonaiTiling:
        """MONAI's sliding window at :attr:`overlap`, Gaussian blending (sw_fastedit's ``mode="gaussian"``)."""
        return MonaiTiling(overlap=self.overlap, gaussian=True)


def load_settings(config: dict, model_dir: Path, ensemble: str | None = None, source: str = "config") -> Settings:
    """Settings from the container ``config`` with ``model_dir/model.json`` overrides and an optional ensemble mode.

    Raises:
        InputError: a missing or malformed key (named with ``source`` or the model.json path).
    """
    merged = dict(config)
    source = shown(source)
    overrides_path = Path(model_dir) / MODEL_JSON
    if overrides_path.is_file():
        overrides = read_json(overrides_path)
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:
            allowed = ", ".join(OVERRIDABLE)
            raise InputError(f"{shown(overrides_path)}: unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
        if not isinstance(overrides.get("network", {}), dict):
            raise InputError(f"{shown(overrides_path)}: 'network' must be an object of DynUNet arguments")
        merged["network"] = {**config.get("network", {}), **overrides.get("network", {})}
        merged["window"] = overrides.get("window", config.get("window"))
        source = f"{source} + {shown(overrides_path)}"
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
    check_settings(settings, source)
    return settings


def _dynunet_parameters() -> set[str]:
    from monai.networks.nets import DynUNet

    return set(inspect.signature(DynUNet).parameters)


def check_settings(settings: Settings, source: str) -> None:
    """Refuse settings the pipeline cannot run as meant: unknown DynUNet arguments, other channels than
    :data:`NETWORK_CHANNELS`, a window edge outside 1 .. :data:`MAX_WINDOW`, a spacing that is not finite and
    positive, percentiles not in 0 <= lower < upper <= 100, an overlap outside [0, 1), or no tile per batch.

    Raises:
        InputError: names ``source`` (the config file, with the model.json path when it overrides it) and the value.
    """
    problems = []
    if settings.ensemble not in ENSEMBLES:
        problems.append(f"ensemble {settings.ensemble!r} is not one of {', '.join(ENSEMBLES)}")
    if len(settings.window) != 3 or len(settings.target_spacing) != 3 or len(settings.percentiles) != 2:
        problems.append("window and target_spacing need 3 values, intensity_percentiles 2")
    unknown = sorted(set(settings.network) - _dynunet_parameters())
    if unknown:
        problems.append(f"unknown DynUNet argument(s) {', '.join(map(repr, unknown))} in 'network'")
    for key, expected in NETWORK_CHANNELS.items():
        if settings.network.get(key) != expected:
            problems.append(f"network {key} must be {expected}, got {settings.network.get(key)!r}")
    if not all(1 <= w <= MAX_WINDOW for w in settings.window):
        problems.append(f"window {settings.window} must have edges of 1 to {MAX_WINDOW} voxels")
    if not all(math.isfinite(s) and s > 0 for s in settings.target_spacing):
        problems.append(f"target_spacing {settings.target_spacing} must be finite and > 0 mm")
    lower, upper = (*settings.percentiles, 0.0, 0.0)[:2]
    if not 0 <= lower < upper <= 100:
        problems.append(f"intensity_percentiles {settings.percentiles} must satisfy 0 <= lower < upper <= 100")
    if not 0 <= settings.overlap < 1:
        problems.append(f"overlap {settings.overlap} must be in [0, 1)")
    if settings.tile_batch_size < 1:
        problems.append(f"tile_batch_size {settings.tile_batch_size} must be at least 1")
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))
