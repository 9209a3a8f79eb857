"""The AutoPET II submission's inference chain from MONAI's own components and the checkpoint files alone: the
oracle of tests and benchmarks (shares no code with gcinfer).

``LoadImaged(reader="ITKReader") -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd(bilinear) ->
ScaleIntensityRangePercentilesd(relative=False, clip=True)``, then per fold ``SlidingWindowInferer(mode="gaussian")``
-> ``Invertd(nearest_interp=False)`` -> ``Activationsd(softmax)`` -> ``AsDiscreted(argmax)``, and ``VoteEnsembled``
(or ``MeanEnsembled`` of the probabilities for ``mean``), as sw_fastedit's ``get_pre_transforms`` /
``get_post_ensemble_transforms`` do. The networks are ``monai.networks.nets.DynUNet(**network)`` with the weights
of ``torch.load(checkpoint)["net"]`` loaded strictly; the settings are read here from the container's
``config.json`` and the optional ``model.json`` beside the weights (its ``network`` entries override the config's,
its ``window`` replaces it). The label map is written with SimpleITK on the PET's own grid.

Reading the ``.mha`` through ITKReader (the submission's reader) matters: a NIfTI copy read by ``NibabelReader``
is *not* equivalent, since the NIfTI header stores the affine in float32, and on an oblique direction that ~1e-7
non-orthogonality makes MONAI's ``compute_shape_offset`` miss its corner anchor and centre the resampled grid
instead (a 0.7 mm shift on the fixture's oblique PET).

Run as ``python -m gcinfer_dev.references.autopet PET MODEL_DIR OUTPUT`` (used by ``benchmarks/bench_autopet.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from gcinfer_dev import container_config


@dataclass(frozen=True)
class ReferenceSettings:
    """What the chain needs, in MONAI's (x, y, z) axis order after ``Orientationd("RAS")``."""

    network: dict
    window: tuple[int, ...]
    target_spacing: tuple[float, ...]
    percentiles: tuple[float, float]
    overlap: float
    tile_batch_size: int
    ensemble: str


def read_settings(config_path: Path, model_dir: Path, ensemble: str | None = None) -> ReferenceSettings:
    """The container config with ``model_dir/model.json``'s overrides (``network`` entries, ``window``)."""
    config = json.loads(Path(config_path).read_text())
    overrides_path = Path(model_dir) / "model.json"
    overrides = json.loads(overrides_path.read_text()) if overrides_path.is_file() else {}
    lower, upper = config["intensity_percentiles"]
    return ReferenceSettings(
        network={**config["network"], **overrides.get("network", {})},
        window=tuple(overrides.get("window", config["window"])),
        target_spacing=tuple(config["target_spacing"]),
        percentiles=(lower, upper),
        overlap=config["overlap"],
        tile_batch_size=config["tile_batch_size"],
        ensemble=ensemble or config["ensemble"],
    )


def load_network(checkpoint: Path, settings: ReferenceSettings) -> nn.Module:
    """``DynUNet(**settings.network)`` with the checkpoint's ``"net"`` state dict (strict), in eval mode."""
    from monai.networks.nets import DynUNet

    network = DynUNet(**settings.network)
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["net"])
    return network.eval()


def pre_transforms(settings: ReferenceSettings):
    """MONAI's pre-transforms of the submission for the PET (key ``image``), non-interactive mode."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    lower, upper = settings.percentiles
    return Compose(
        [
            LoadImaged(keys="image", reader="ITKReader", image_only=False),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=settings.target_spacing),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, relative=False
            ),
        ]
    )


def post_transforms(pre, keys: Sequence[str], ensemble: str):
    """Invert each fold's logits, softmax, then argmax + vote (``vote``) or mean + argmax (``mean``); one fold: its
    argmax (MONAI's ensembles take a single key for folds already stacked along the first axis)."""
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        CopyItemsd,
        Invertd,
        MeanEnsembled,
        VoteEnsembled,
    )

    keys = list(keys)
    steps = [
        Invertd(keys=keys, orig_keys="image", transform=pre, nearest_interp=False),
        Activationsd(keys=keys, softmax=True),
    ]
    if len(keys) == 1:
        steps += [AsDiscreted(keys=keys, argmax=True), CopyItemsd(keys=keys, names="pred")]
    elif ensemble == "mean":
        steps += [MeanEnsembled(keys=keys, output_key="pred"), AsDiscreted(keys="pred", argmax=True)]
    else:
        steps += [AsDiscreted(keys=keys, argmax=True), VoteEnsembled(keys=keys, output_key="pred")]
    return Compose(steps)


def monai_segment(pet: Path, checkpoints: Sequence[Path], settings: ReferenceSettings) -> np.ndarray:
    """The reference lesion labels of the PET file, (z, y, x) uint8 on its grid, on the CPU in float32."""
    from monai.inferers import SlidingWindowInferer

    pre = pre_transforms(settings)
    data = pre({"image": str(pet)})
    inferer = SlidingWindowInferer(
        roi_size=settings.window, sw_batch_size=settings.tile_batch_size, overlap=settings.overlap, mode="gaussian"
    )
    keys = [f"pred_{i}" for i in range(len(checkpoints))]
    with torch.no_grad():
        for key, checkpoint in zip(keys, checkpoints):
            data[key] = inferer(data["image"].unsqueeze(0), load_network(checkpoint, settings))[0]
    labels = post_transforms(pre, keys, settings.ensemble)(data)["pred"]
    return np.asarray(labels[0]).astype(np.uint8).transpose(2, 1, 0)


def fold_checkpoints(model_dir: Path) -> list[Path]:
    """Every ``*.pt`` of the folder, numbered folds first in numeric order."""
    numbered = lambda path: path.stem.isdigit()  # noqa: E731
    return sorted(
        Path(model_dir).glob("*.pt"), key=lambda p: (not numbered(p), int(p.stem) if numbered(p) else 0, p.name)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Segment one PET with the MONAI chain and write the label map (the benchmark's reference run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pet", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--ensemble", choices=("vote", "mean"), default=None)
    parser.add_argument("--config", type=Path, default=container_config("autopet2"))
    args = parser.parse_args(argv)
    settings = read_settings(args.config, args.model, args.ensemble)
    labels = monai_segment(args.pet, fold_checkpoints(args.model), settings)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(sitk.ReadImage(str(args.pet)))
    sitk.WriteImage(image, str(args.output), useCompression=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
