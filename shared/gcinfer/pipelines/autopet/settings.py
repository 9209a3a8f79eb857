"""The AutoPET II settings: the container's ``config.json`` with the ``model.json`` overrides beside the weights,
parsed once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gcinfer.config import read_json
from gcinfer.engine.tiling import MonaiTiling, TileMemory
from gcinfer.errors import InputError

ENSEMBLES = ("vote", "mean")
MODEL_JSON = "model.json"
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
    overrides_path = Path(model_dir) / MODEL_JSON
    if overrides_path.is_file():
        overrides = read_json(overrides_path)
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
    try:  # the engine's own checks, which name the allowed values
        MonaiTiling(overlap=settings.overlap)
        TileMemory(tile_batch_size=settings.tile_batch_size)
    except ValueError as error:
        raise InputError(f"{source}: {error}") from None
    return settings
