"""nnU-Net v1 (1.7.1) results folders: restoring the fold networks and preprocessing exactly as nnU-Net v1 does.

A results folder for one task holds one sub-folder per configuration, named ``<Trainer>__<Plans>``, each with
``fold_<k>/model_final_checkpoint.model`` (weights) and ``fold_<k>/model_final_checkpoint.model.pkl`` (trainer
class name, its init arguments, the plans). A configuration is restored as nnU-Net's
``load_model_and_checkpoint_files`` does (trainer class found by name in ``nnunet.training.network_training``,
built from the init arguments of the first selected fold's ``.model.pkl``, hence the stage; the stored plans; the
trainer's own network), with these differences:

- nothing is written: nnU-Net's ``initialize`` creates ``<folder>/fold_0`` when missing and the trainer may log
  into it; here only the parts of ``initialize`` that build the network run and the log is ``os.devnull``, so a
  read-only model folder works (see :func:`_restore_trainer`);
- each selected fold gets its own copy of the network, loaded once per run and kept on the host; a
  configuration's networks are moved to the device only while it predicts (:meth:`Configuration.networks_on`);
- checkpoints load with ``torch.load(weights_only=True)`` and the numpy globals they hold allow-listed
  (:func:`load_checkpoint`), and ``.model.pkl`` with an unpickler that reads only plain data
  (:mod:`gcinfer.pipelines.amos.pickles`): a model folder never runs code.

Preprocessing runs on arrays already in memory: :func:`crop` gives what ``ImageCropper.crop`` (non-zero bounding
box) gives for the data ``load_case_from_list_of_files`` would have read, computed in a fraction of its time, and
:meth:`Configuration.preprocess` is the rest of ``GenericPreprocessor.preprocess_test_case`` (transpose_forward,
then ``resample_and_normalize`` of the preprocessor class named in the plans, with the stage's target spacing;
nnU-Net's own code). The crop does not depend on the plans and is shared by all configurations of a case.

Array axes: images are numpy (z, y, x) as read by SimpleITK; ``(C, z, y, x)`` with channels first. Preprocessed
arrays are in the plans' transposed order, ``(C, *transpose_forward(z, y, x))``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes

from gcinfer.background import SharedPatch
from gcinfer.errors import DESERIALIZATION_ERRORS, InputError, cause_of, shown
from gcinfer.io import Geometry
from gcinfer.pipelines.amos.pickles import load_pickle
from gcinfer.pipelines.amos.threaded_resize import threads_for_nnunet

_SILENT_STDOUT = SharedPatch(sys, "stdout", lambda _: io.StringIO())


def quiet() -> contextlib.AbstractContextManager[None]:
    """Discard what nnU-Net v1 prints to stdout (import banner, per-case preprocessing details), from any thread
    (a configuration preprocessed in the background while another thread restores or preprocesses)."""
    return _SILENT_STDOUT.applied()


with quiet(), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # nnU-Net v1 imports scipy.ndimage.filters
    import nnunet
    from nnunet.training.model_restore import recursive_find_python_class
    from nnunet.training.network_training.nnUNetTrainer import nnUNetTrainer

log = logging.getLogger(__name__)

CHECKPOINT = "model_final_checkpoint"
"""Checkpoint name inside each ``fold_<k>`` folder, as the AMOS 2022 inference used."""
MASK_FREE_SCHEMES = ("CT", "CT2", "noNorm")
"""nnU-Net v1 normalisation schemes that ignore the non-zero mask unless ``use_mask_for_norm`` asks for it."""

_NUMPY_CHECKPOINT_GLOBALS = [
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),  # name in checkpoints written with numpy < 2
    np.dtype,
    *sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__),
]
"""numpy scalars (and their dtypes) found in nnU-Net v1 checkpoints' loss and metric history."""


@dataclass(frozen=True)
class Cropped:
    """An image cropped to its non-zero bounding box, as nnU-Net v1's ``ImageCropper.crop`` crops it.

    Attributes:
        data: ``(C, z, y, x)``, the crop in the image's dtype (nnU-Net's is float32: the same values once cast).
        properties: nnU-Net's case properties: ``original_size_of_raw_data``, ``original_spacing`` (z, y, x),
            ``itk_origin``/``itk_spacing``/``itk_direction``, ``crop_bbox`` (``[[z0, z1], [y0, y1], [x0, x1]]``),
            ``size_after_cropping`` (z, y, x), ``classes``.
    """

    data: np.ndarray
    properties: dict

    @functools.cached_property
    def seg(self) -> np.ndarray:
        """``(1, z, y, x)`` int8: -1 outside nnU-Net's hole-filled non-zero mask, 0 inside (nnU-Net keeps it as
        int64, 8 bytes a voxel, for the same values). Built on first use (only ``use_mask_for_norm`` and the
        per-image z-score schemes read it) and kept for the other configurations.

        Filling the holes of the crop's mask gives the crop of nnU-Net's filled full-image mask: outside the box
        everything is background connected to the image border, so a background region of the crop is a hole in
        the full image exactly when it does not touch the crop's faces.
        """
        filled = binary_fill_holes(_nonzero(self.data))
        return (filled.astype(np.int8) - 1)[None]

    @property
    def bbox(self) -> tuple[slice, slice, slice]:
        """The crop's position in the full (z, y, x) image."""
        return tuple(slice(int(start), int(stop)) for start, stop in self.properties["crop_bbox"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``size_after_cropping``, (z, y, x)."""
        return tuple(int(s) for s in self.properties["size_after_cropping"])


@dataclass(frozen=True)
class Preprocessed:
    """One configuration's network input for a case.

    Attributes:
        data: ``(C, *transposed spatial)`` float32: cropped, transposed by ``transpose_forward``, resampled to the
            stage's target spacing and normalised per the plans.
        properties: nnU-Net's properties after preprocessing (adds ``size_after_resampling``,
            ``spacing_after_resampling``).
    """

    data: np.ndarray
    properties: dict


def crop(channels: np.ndarray, geometry: Geometry) -> Cropped:
    """Crop a case to its non-zero bounding box exactly as nnU-Net v1's ``preprocess_test_case`` does.

    nnU-Net fills the holes of the non-zero mask of all channels, takes the bounding box of the filled mask (that
    of the mask: filling adds no voxel outside it) and records ``np.unique`` of the crop's mask (-1 outside, 0
    inside) as ``classes``: ``[-1, 0]`` exactly when a face of the crop has a zero voxel (background left after
    filling touches the border). This computes the same from per-axis reductions of the mask, in milliseconds
    per slice; the filled mask itself is built only where the normalisation reads it (:attr:`Cropped.seg`).

    nnU-Net casts the image to float32 first; the crop keeps the image's dtype instead (a view of it when the box
    is the whole image, as for most CTs, whose air is not 0): :meth:`Configuration.preprocess` casts in the copy
    it makes anyway, to the same values.

    Args:
        channels: ``(C, z, y, x)``, any numeric dtype; at least one voxel must be non-zero (once cast to float32).
        geometry: the image's geometry (of the first channel, as nnU-Net takes it).
    """
    mask = _nonzero(channels)
    bbox = [_extent(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    box_slices = tuple(slice(start, stop) for start, stop in bbox)
    view = channels[(slice(None), *box_slices)]
    data = view if view.shape == channels.shape else view.copy()
    box = mask[box_slices]
    border_zero = any(not face.all() for axis in range(3) for face in (box.take(0, axis), box.take(-1, axis)))
    properties = OrderedDict(
        original_size_of_raw_data=np.array(geometry.size)[[2, 1, 0]],
        original_spacing=np.array(geometry.spacing)[[2, 1, 0]],
        list_of_data_files=[],
        seg_file=None,
        itk_origin=geometry.origin,
        itk_spacing=geometry.spacing,
        itk_direction=geometry.direction,
        crop_bbox=bbox,
        classes=np.array([-1, 0] if border_zero else [0]),
        size_after_cropping=data[0].shape,
    )
    return Cropped(data, properties)


def _nonzero(channels: np.ndarray) -> np.ndarray:
    """``(z, y, x)`` bool: voxels non-zero in any channel of ``(C, z, y, x)`` once cast to float32 (as nnU-Net tests
    them); dtypes that float32 holds exactly are tested without the cast."""
    if not np.can_cast(channels.dtype, np.float32):
        channels = channels.astype(np.float32)
    return np.any(channels != 0, axis=0) if len(channels) > 1 else channels[0] != 0


def _extent(profile: np.ndarray) -> list[int]:
    """``[first, last + 1]`` of the true entries of a 1D bool array (nnU-Net's bounding-box convention)."""
    (indices,) = np.nonzero(profile)
    return [int(indices[0]), int(indices[-1]) + 1]


@dataclass(frozen=True)
class Configuration:
    """One restored nnU-Net v1 configuration: the networks of its selected folds and its preprocessing.

    Attributes:
        name: ``<Trainer>__<Plans>``.
        folder: the configuration's folder.
        folds: the selected folds, one network each.
        networks: per fold, the nnU-Net network in eval mode with deep supervision off, returning
            ``(B, num_classes, *patch)`` logits; on the host between predictions.
        stage: the plans' stage the trainer was built for.
        patch_size: the stage's patch size, transposed (z, y, x) order.
        num_classes: output channels, background included.
        transpose_forward: the plans' axis permutation from (z, y, x) to the network's order.
        transpose_backward: its inverse.
        mirror_axes: the trainer's test-time mirroring axes (``data_aug_params['mirror_axes']``).
        preprocessor: an instance of the preprocessor class named in the plans.
        target_spacing: the stage's ``current_spacing``, transposed order, mm.
    """

    name: str
    folder: Path
    folds: tuple[int, ...]
    networks: list[torch.nn.Module]
    stage: int
    patch_size: tuple[int, int, int]
    num_classes: int
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    mirror_axes: tuple[int, ...]
    preprocessor: Any
    target_spacing: np.ndarray

    def preprocess(self, cropped: Cropped) -> Preprocessed:
        """The rest of ``GenericPreprocessor.preprocess_test_case`` after the crop, on a copy of ``cropped``: nnU-Net's
        own code, its image resampling on every CPU (:mod:`.threaded_resize`, bit for bit).

        Returns:
            The network input in transposed order, and nnU-Net's properties for the case.
        """
        axes = (0, *[a + 1 for a in self.transpose_forward])
        data = np.array(cropped.data.transpose(axes), dtype=np.float32)
        seg = np.array(cropped.seg.transpose(axes)) if self.normalisation_reads_mask(len(data)) else None
        with quiet(), threads_for_nnunet():
            data, _, properties = self.preprocessor.resample_and_normalize(
                data, self.target_spacing, copy.deepcopy(cropped.properties), seg, force_separate_z=None
            )
        return Preprocessed(data.astype(np.float32), properties)

    def normalisation_reads_mask(self, channels: int) -> bool:
        """Whether nnU-Net's normalisation of these channels reads the resampled non-zero mask: channels normalised
        within it (``use_mask_for_norm``) and the per-image z-score schemes (which take its shape); the ``CT``,
        ``CT2`` and ``noNorm`` schemes without the mask do not, so the mask is then not resampled at all."""
        masked, schemes = self.preprocessor.use_nonzero_mask, self.preprocessor.normalization_scheme_per_modality
        return any(masked[c] or schemes[c] not in MASK_FREE_SCHEMES for c in range(channels))

    @contextlib.contextmanager
    def networks_on(self, device: torch.device) -> Iterator[list[torch.nn.Module]]:
        """The fold networks on ``device`` for the block, back on the host afterwards (a no-op on the CPU).

        Device memory thus holds one configuration's weights at a time.
        """
        try:
            yield [network.to(device) for network in self.networks]
        finally:
            for network in self.networks:
                network.to("cpu")


def fold_folders(folder: Path) -> list[int]:
    """The folds present in a configuration folder (``fold_<k>`` sub-folders), sorted."""
    names = (p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("fold_"))
    return sorted(int(n[5:]) for n in names if n[5:].isdigit())


def check_results_folder(root: Path, names: Sequence[str], folds: Sequence[int], checkpoint: str = CHECKPOINT) -> None:
    """Check that every configuration, fold and checkpoint file asked for is present.

    Raises:
        InputError: naming everything missing, one line per problem, e.g. ``fold_2, fold_3 missing in
            <folder>; pass --folds 0 1 to use the available ones``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{shown(root)}: model folder not found")
    problems = []
    present = [n for n in names if (root / n).is_dir()]
    if len(present) < len(names):
        missing = [n for n in names if n not in present]
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and "__" in p.name)
        hint = f"; pass --models {' '.join(present)} to use the available ones" if present else ""
        problems.append(
            f"configuration(s) {', '.join(missing)} missing in {shown(root)} "
            f"(found: {', '.join(found) or 'none'}){hint}"
        )
    for name in present:
        folder = root / name
        available = fold_folders(folder)
        absent = [f for f in folds if f not in available]
        if absent:
            usable = [f for f in available if f not in absent]
            hint = f"; pass --folds {' '.join(map(str, usable))} to use the available ones" if usable else ""
            problems.append(f"{', '.join(f'fold_{f}' for f in absent)} missing in {shown(folder)}{hint}")
        for fold in (f for f in folds if f in available):
            for suffix in (".model", ".model.pkl"):
                path = folder / f"fold_{fold}" / f"{checkpoint}{suffix}"
                if not path.is_file():
                    problems.append(f"{shown(path)}: file missing")
    if problems:
        raise InputError("\n".join(problems))


def restore(
    root: Path, names: Sequence[str], folds: Sequence[int], checkpoint: str = CHECKPOINT
) -> list[Configuration]:
    """Restore the configurations ``names`` of the results folder ``root`` with the networks of ``folds``.

    Raises:
        InputError: missing configuration, fold or file (all named, see :func:`check_results_folder`),
            unreadable file, unknown trainer or preprocessor class, unsupported configuration, or weights that do
            not fit the network built from the plans.
    """
    if not names or not folds:
        raise InputError(f"{shown(root)}: no configuration or no fold selected")
    check_results_folder(root, names, folds, checkpoint)
    return [restore_configuration(Path(root) / name, folds, checkpoint) for name in names]


def restore_configuration(folder: Path, folds: Sequence[int], checkpoint: str = CHECKPOINT) -> Configuration:
    """Restore one configuration folder (see the module docstring) with one network per fold in ``folds``."""
    files = [folder / f"fold_{fold}" / f"{checkpoint}.model" for fold in folds]
    pkl_path = files[0].with_name(files[0].name + ".pkl")
    trainer = _restore_trainer(pkl_path)
    template = trainer.network.cpu()
    networks = [template, *(copy.deepcopy(template) for _ in folds[1:])]
    for network, path in zip(networks, files):
        _load_weights(network, path, pkl_path)
        _disable_deep_supervision(network)
        network.eval()
    return Configuration(
        name=folder.name,
        folder=folder,
        folds=tuple(folds),
        networks=networks,
        stage=int(trainer.stage),
        patch_size=tuple(int(p) for p in trainer.patch_size),
        num_classes=int(trainer.num_classes),
        transpose_forward=tuple(int(a) for a in trainer.transpose_forward),
        transpose_backward=tuple(int(a) for a in trainer.transpose_backward),
        mirror_axes=tuple(int(a) for a in trainer.data_aug_params["mirror_axes"]),
        preprocessor=_preprocessor(trainer, pkl_path),
        target_spacing=np.array(trainer.plans["plans_per_stage"][trainer.stage]["current_spacing"]),
    )


def load_checkpoint(path: Path) -> dict:
    """``torch.load`` an nnU-Net v1 checkpoint onto the CPU with ``weights_only=True``.

    The numpy scalars and dtypes nnU-Net v1 keeps in a checkpoint's loss history are allow-listed (under numpy 2's and
    numpy 1's names); anything else is refused: a model folder never runs code (there is no full-pickle fallback).

    Raises:
        InputError: the file cannot be read, holds other objects, or is not a checkpoint (names the file).
    """
    try:
        with torch.serialization.safe_globals(_NUMPY_CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except DESERIALIZATION_ERRORS as error:
        raise InputError(f"{shown(path)}: cannot load checkpoint ({cause_of(error)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise InputError(f"{shown(path)}: not an nnU-Net v1 checkpoint (no 'state_dict')")
    return checkpoint


def _load_model_info(path: Path) -> dict:
    """The ``.model.pkl`` of a fold (:func:`gcinfer.pipelines.amos.pickles.load_pickle`): trainer name, init
    arguments, plans."""
    info = load_pickle(path)
    if not isinstance(info, dict) or not {"name", "init", "plans"} <= set(info):
        raise InputError(f"{shown(path)}: not an nnU-Net v1 .model.pkl (needs 'name', 'init' and 'plans')")
    if not isinstance(info["init"], (tuple, list)) or not isinstance(info["plans"], dict):
        raise InputError(f"{shown(path)}: not an nnU-Net v1 .model.pkl ('init' must be a sequence, 'plans' a dict)")
    return info


def _trainer_class(name: str, pkl_path: Path) -> type:
    """The nnU-Net v1 trainer class called ``name``, searched as ``restore_model`` does."""
    search_in = os.path.join(nnunet.__path__[0], "training", "network_training")
    with quiet():
        trainer_class = recursive_find_python_class([search_in], name, "nnunet.training.network_training")
    if trainer_class is None:
        raise InputError(
            f"{shown(pkl_path)}: unknown trainer {name!r} (not found in nnunet {_nnunet_version()} "
            "nnunet.training.network_training)"
        )
    if not issubclass(trainer_class, nnUNetTrainer):
        raise InputError(f"{shown(pkl_path)}: trainer {name!r} is not an nnUNetTrainer")
    return trainer_class


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunet")


@contextlib.contextmanager
def _cudnn_flags_kept() -> Iterator[None]:
    """nnU-Net's trainer constructor sets global cudnn flags (deterministic, no benchmark); undo that."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _restore_trainer(pkl_path: Path) -> nnUNetTrainer:
    """A trainer with its plans processed and its network built, from a ``.model.pkl``, writing nothing.

    As ``restore_model`` + ``initialize(False)``: the trainer class called ``name``, built from the stored init
    arguments (hence the stage), then ``process_plans`` of the stored plans, ``setup_DA_params`` (test-time mirror
    axes) and ``initialize_network``. The rest of ``initialize`` is left out: it creates the output folder (the
    training machine's path, or the model folder), wraps the training loss and builds the optimizer (whose first
    construction imports ``torch._dynamo``, seconds for nothing). The trainer's log goes to ``os.devnull``.
    """
    info = _load_model_info(pkl_path)
    trainer_class = _trainer_class(str(info["name"]), pkl_path)
    with quiet(), _cudnn_flags_kept():
        try:
            trainer = trainer_class(*info["init"])
            trainer.log_file = os.devnull
            trainer.process_plans(info["plans"])
            trainer.setup_DA_params()
            trainer.initialize_network()
        except (KeyError, IndexError, AssertionError, TypeError, ValueError, AttributeError, OverflowError) as error:
            raise InputError(
                f"{shown(pkl_path)}: cannot build {info['name']!r} from its init arguments and plans ({error!r})"
            ) from None
    if not trainer.threeD:
        raise InputError(f"{shown(pkl_path)}: a 2D configuration; only 3D configurations are supported")
    if getattr(trainer, "regions_class_order", None) is not None:
        raise InputError(f"{shown(pkl_path)}: region-based training (regions_class_order) is not supported")
    return trainer


def _preprocessor(trainer: nnUNetTrainer, pkl_path: Path) -> Any:
    """The preprocessor named in the plans, built as ``nnUNetTrainer.preprocess_patient`` builds it."""
    name = trainer.plans.get("preprocessor_name") or "GenericPreprocessor"
    search_in = os.path.join(nnunet.__path__[0], "preprocessing")
    with quiet():
        preprocessor_class = recursive_find_python_class([search_in], name, "nnunet.preprocessing")
    if preprocessor_class is None:
        raise InputError(
            f"{shown(pkl_path)}: unknown preprocessor {name!r} in the plans (not found in nnunet.preprocessing)"
        )
    return preprocessor_class(
        trainer.normalization_schemes,
        trainer.use_mask_for_norm,
        trainer.transpose_forward,
        trainer.intensity_properties,
    )


def _load_weights(network: torch.nn.Module, path: Path, pkl_path: Path) -> None:
    """Load a fold's weights, dropping a ``module.`` (DataParallel) prefix as ``load_checkpoint_ram`` does."""
    state = load_checkpoint(path)["state_dict"]
    expected = set(network.state_dict())
    fixed = OrderedDict((k[7:] if k not in expected and k.startswith("module.") else k, v) for k, v in state.items())
    try:
        network.load_state_dict(fixed)
    except RuntimeError as error:
        cause = str(error).strip().splitlines()[0]
        raise InputError(
            f"{shown(path)}: weights do not fit the network built from {shown(pkl_path)} ({cause})"
        ) from None


def _disable_deep_supervision(network: torch.nn.Module) -> None:
    """Make the network return only the full-resolution logits, as nnU-Net v1's trainers do before predicting.

    ``Generic_UNet`` has ``do_ds``; the residual ``FabiansUNet`` of the AMOS trainers has
    ``decoder.deep_supervision``.
    """
    if hasattr(network, "do_ds"):
        network.do_ds = False
    decoder = getattr(network, "decoder", None)
    if hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False
