"""The AutoPET II submission's inference chain from MONAI's own components: the oracle of tests and benchmarks.

``LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd(bilinear) -> ScaleIntensityRangePercentilesd
(relative=False, clip=True)``, then per fold ``SlidingWindowInferer(mode="gaussian")`` ->
``Invertd(nearest_interp=False)`` -> ``Activationsd(softmax)`` -> ``AsDiscreted(argmax)``, and ``VoteEnsembled`` (or
``MeanEnsembled`` of the probabilities for ``mean``), as sw_fastedit's ``get_pre_transforms`` /
``get_post_ensemble_transforms`` do.

Loading: the submission used ``LoadImaged(reader="ITKReader")``, which needs the ``itk`` package (not installed
here: a ~300 MB dependency for one reader). :class:`SimpleITKReader` is a MONAI ``ImageReader`` doing what
ITKReader's ``get_data`` does with SimpleITK instead of ITK: the array in ITK's (x, y, z) index order and the float64
affine ``orientation_ras_lps([direction @ diag(spacing) | origin])`` with ``space = RAS``; ``LoadImaged`` builds the
MetaTensor from it as usual. A NIfTI copy read by ``NibabelReader`` is *not* equivalent: the NIfTI header stores the
affine in float32, and on an oblique direction that ~1e-7 non-orthogonality makes MONAI's ``compute_shape_offset``
miss its corner anchor and centre the resampled grid instead (a 0.7 mm shift on the fixture's oblique PET).

Run as ``python -m gcinfer_dev.references.autopet PET MODEL_DIR OUTPUT`` (used by ``benchmarks/bench_autopet.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from gcinfer.io import Geometry, write_label_map
from gcinfer.pipelines.autopet.networks import find_checkpoints, load_networks
from gcinfer.pipelines.autopet.settings import Settings, load_settings
from gcinfer_dev import container_config


def simpleitk_reader():
    """A MONAI ``ImageReader`` equivalent to ITKReader (``affine_lps_to_ras=True``, ``reverse_indexing=True``)."""
    from monai.data import ImageReader
    from monai.data.utils import orientation_ras_lps
    from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

    class SimpleITKReader(ImageReader):
        def verify_suffix(self, filename) -> bool:
            return True

        def read(self, data, **kwargs):
            (path,) = ensure_tuple(data)
            return sitk.ReadImage(str(path))

        def get_data(self, img) -> tuple[np.ndarray, dict]:
            array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
            affine = np.eye(4)
            affine[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
            affine[:3, 3] = img.GetOrigin()
            affine = orientation_ras_lps(affine)
            meta = {
                "spacing": np.asarray(img.GetSpacing()),
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            }
            return array, meta

    return SimpleITKReader()


def pre_transforms(settings: Settings):
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
            LoadImaged(keys="image", reader=simpleitk_reader(), image_only=False),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=settings.target_spacing),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, relative=False
            ),
        ]
    )


def post_transforms(pre, keys: Sequence[str], ensemble: str):
    """Invert each fold's logits, softmax, then argmax + vote (``vote``) or mean + argmax (``mean``)."""
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, MeanEnsembled, VoteEnsembled

    keys = list(keys)
    steps = [
        Invertd(keys=keys, orig_keys="image", transform=pre, nearest_interp=False),
        Activationsd(keys=keys, softmax=True),
    ]
    if ensemble == "mean":
        steps += [MeanEnsembled(keys=keys, output_key="pred"), AsDiscreted(keys="pred", argmax=True)]
    else:
        steps += [AsDiscreted(keys=keys, argmax=True), VoteEnsembled(keys=keys, output_key="pred")]
    return Compose(steps)


def monai_segment(image_path: Path, networks: Sequence[nn.Module], settings: Settings) -> np.ndarray:
    """The reference lesion labels, (z, y, x) uint8 on the PET's grid, on the CPU in float32."""
    from monai.inferers import SlidingWindowInferer

    pre = pre_transforms(settings)
    data = pre({"image": str(image_path)})
    inferer = SlidingWindowInferer(
        roi_size=settings.window, sw_batch_size=settings.tile_batch_size, overlap=settings.overlap, mode="gaussian"
    )
    keys = [f"pred_{i}" for i in range(len(networks))]
    with torch.no_grad():
        for key, network in zip(keys, networks):
            data[key] = inferer(data["image"].unsqueeze(0), network.eval())[0]
    labels = post_transforms(pre, keys, settings.ensemble)(data)["pred"]
    return np.asarray(labels[0]).astype(np.uint8).transpose(2, 1, 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Segment one PET with the MONAI chain and write the label map (the benchmark's reference run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pet", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--ensemble", choices=("vote", "mean"), default=None)
    parser.add_argument("--config", type=Path, default=container_config("autopet2"))
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    settings = load_settings(config, args.model, args.ensemble)
    networks = load_networks(find_checkpoints(args.model), settings, torch.device("cpu"))
    labels = monai_segment(args.pet, networks, settings)
    write_label_map(args.output, labels, Geometry.of(sitk.ReadImage(str(args.pet))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
