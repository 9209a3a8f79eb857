"""The AMOS 2022 reference pipeline on the CPU, built from nnU-Net v1 1.7.1's own pieces (tests and benchmark).

Upstream (``documentation/amos2022/run_inference_task{1,2}.py``) runs ``predict_cases_amos2022`` per
configuration with ``save_npz=True``, ``merge``s the npz softmaxes, then applies the organ-wise post-processing.
``predict_cases_amos2022`` hard-codes CUDA (``all_in_gpu=True``, resampling on ``cuda:0``), so its per-case body is
reproduced here with its CPU settings and its CPU fallback resampling, everything else being nnU-Net's code:
``load_model_and_checkpoint_files``, ``preprocess_patient`` (reads the file), ``load_checkpoint_ram`` +
``predict_preprocessed_data_return_seg_and_softmax`` per fold (``all_in_gpu=False``, ``mixed_precision=False``),
the per-channel ``F.interpolate(mode='trilinear')``, ``save_segmentation_nifti_from_softmax`` (writes the
per-configuration segmentation, npz and pkl), ``merge`` (writes the merged segmentation), then the oracle's own
transcription of upstream's organ-wise post-processing (:mod:`gcinfer_dev.references.amos_postprocessing`, which
says why not upstream's summing code) on the merged map, written with the merged image's geometry. All files go
under ``work_dir``. Nothing here comes from gcinfer.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import SimpleITK as sitk
import torch
from torch.nn import functional as F

with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # nnU-Net v1 imports scipy.ndimage.filters
    from nnunet.inference.ensemble_predictions import merge
    from nnunet.inference.segmentation_export import save_segmentation_nifti_from_softmax
    from nnunet.training.model_restore import load_model_and_checkpoint_files

from gcinfer_dev.references.amos_postprocessing import postprocess


def case_name(path: Path) -> str:
    """nnU-Net's case identifier: the file name without ``.nii.gz`` (or the last suffix)."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def _predict_configuration(
    model_folder: Path, folds: Sequence[int], inputs: Sequence[Path], out_folder: Path, step_size: float, tta: bool
) -> None:
    """``predict_cases_amos2022(..., save_npz=True)`` for one configuration, CPU settings."""
    out_folder.mkdir(parents=True, exist_ok=True)
    with mock.patch.dict(os.environ, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note that this env var disables weights_only
        trainer, params = load_model_and_checkpoint_files(
            str(model_folder), list(folds), mixed_precision=False, checkpoint_name="model_final_checkpoint"
        )  # nnU-Net v1 predates torch.load's weights_only
    for path in inputs:
        output = out_folder / f"{case_name(path)}.nii.gz"
        d, _, dct = trainer.preprocess_patient([str(path)])
        with torch.no_grad():
            softmax = None
            for p in params:
                trainer.load_checkpoint_ram(p, False)
                prediction = trainer.predict_preprocessed_data_return_seg_and_softmax(
                    d,
                    do_mirroring=tta,
                    mirror_axes=trainer.data_aug_params["mirror_axes"],
                    use_sliding_window=True,
                    step_size=step_size,
                    use_gaussian=True,
                    all_in_gpu=False,
                    mixed_precision=False,
                )[1]
                softmax = prediction if softmax is None else softmax + prediction
            softmax /= len(params)
            transpose_forward = trainer.plans.get("transpose_forward")
            transpose_backward = trainer.plans.get("transpose_backward")
            target_shape = [dct.get("size_after_cropping")[i] for i in transpose_forward]
            softmax_cpu = torch.from_numpy(softmax).float()
            resampled = torch.zeros((softmax.shape[0], *target_shape))
            for c in range(len(softmax_cpu)):
                resampled[c] = F.interpolate(softmax_cpu[c][None, None], size=target_shape, mode="trilinear")[0, 0]
            resampled = resampled.half().numpy()
        resampled = resampled.transpose([0] + [i + 1 for i in transpose_backward])
        save_segmentation_nifti_from_softmax(
            resampled, str(output), dct, 1, None, None, None, str(output)[:-7] + ".npz", None, False, 1
        )


def run_reference(
    model_dir: Path,
    models: Sequence[str],
    folds: Sequence[int],
    inputs: Sequence[Path],
    work_dir: Path,
    postprocessing: str | None,
    step_size: float = 0.5,
    tta: bool = True,
) -> dict[str, Path]:
    """Run the reference on ``inputs``; returns ``{case name: final label map path}`` (``work_dir/final``).

    ``postprocessing``: the submission whose post-processing to apply (``"task1"`` or ``"task2"``), or None.

    Intermediate files stay in ``work_dir/<configuration>/`` and ``work_dir/merged/`` for the caller to measure.
    """
    work_dir = Path(work_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        for name in models:
            _predict_configuration(Path(model_dir) / name, folds, inputs, work_dir / name, step_size, tta)
        merge([str(work_dir / name) for name in models], str(work_dir / "merged"), 1, True, None, False)
    final = work_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for path in inputs:
        merged_path = work_dir / "merged" / f"{case_name(path)}.nii.gz"
        merged = sitk.ReadImage(str(merged_path))
        labels = sitk.GetArrayFromImage(merged)
        if postprocessing is not None:
            labels = postprocess(labels, list(merged.GetSpacing())[::-1], postprocessing)
        image = sitk.GetImageFromArray(labels.astype(np.uint8))
        image.CopyInformation(merged)
        outputs[case_name(path)] = final / merged_path.name
        sitk.WriteImage(image, str(outputs[case_name(path)]))
    return outputs


def copy_models(model_dir: Path, models: Sequence[str], destination: Path) -> Path:
    """A private copy of the configurations (nnU-Net's restore may write into a results folder)."""
    for name in models:
        shutil.copytree(Path(model_dir) / name, Path(destination) / name)
    return Path(destination)
