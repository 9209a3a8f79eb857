"""nnU-Net v1 results-folder adapter: preprocessing and networks identical to nnU-Net v1's own, the stage from the
init arguments, weights_only checkpoint loading, nothing written into the model folder, clear errors.

The references are nnU-Net v1 1.7.1's own ``load_model_and_checkpoint_files`` and ``preprocess_patient`` on a
private copy of the fixture models (nnU-Net may write into a results folder).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gcinfer.errors import InputError
from gcinfer.io import Geometry, read_image
from gcinfer.pipelines.amos import nnunet_v1

with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # nnU-Net v1 imports scipy.ndimage.filters
    from nnunet.training.model_restore import load_model_and_checkpoint_files

REPOSITORY = Path(__file__).resolve().parents[1]
TASKS = ("task1", "task2")
CROPPER_PROPERTIES = ("crop_bbox", "classes", "size_after_cropping")


def models_of(task: str) -> list[str]:
    return json.loads((REPOSITORY / "docker" / f"amos_{task}" / "config.json").read_text())["models"]


def copy_configuration(fixtures_dir: Path, task: str, name: str, destination: Path) -> Path:
    """A private copy of one fixture configuration folder; returns the copy's results folder (its parent)."""
    shutil.copytree(fixtures_dir / f"amos_{task}" / "model" / name, destination / name)
    return destination


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def rewrite_pkls(folder: Path, change) -> None:
    """Apply ``change(info)`` to every fold's ``.model.pkl`` of a configuration folder."""
    for path in folder.glob("fold_*/model_final_checkpoint.model.pkl"):
        info = pickle.loads(path.read_bytes())
        change(info)
        path.write_bytes(pickle.dumps(info))


@pytest.fixture(scope="module")
def reference_trainers(fixtures_dir: Path, tmp_path_factory) -> dict[tuple[str, str], object]:
    """nnU-Net's own trainer (with its fold parameters) per (task, configuration), from a private copy."""
    trainers = {}
    for task in TASKS:
        root = tmp_path_factory.mktemp(f"reference_{task}")
        for name in models_of(task):
            copy_configuration(fixtures_dir, task, name, root)
            with (
                contextlib.redirect_stdout(io.StringIO()),
                warnings.catch_warnings(),
                mock.patch.dict(
                    os.environ,
                    {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},  # nnU-Net v1 predates weights_only
                ),
            ):
                warnings.simplefilter("ignore", UserWarning)  # torch's note about that variable
                trainers[task, name] = load_model_and_checkpoint_files(
                    str(root / name), [0, 1], mixed_precision=False, checkpoint_name="model_final_checkpoint"
                )
    return trainers


@pytest.fixture(scope="module")
def restored(fixtures_dir: Path) -> dict[tuple[str, str], nnunet_v1.Configuration]:
    configurations = {}
    for task in TASKS:
        names = models_of(task)
        for configuration in nnunet_v1.restore(fixtures_dir / f"amos_{task}" / "model", names, [0, 1]):
            configurations[task, configuration.name] = configuration
    return configurations


def case_files(fixtures_dir: Path, task: str) -> list[Path]:
    return sorted((fixtures_dir / f"amos_{task}" / "input").glob("*.nii.gz"))


@pytest.mark.parametrize("task", TASKS)
def test_preprocessing_is_nnunet_preprocess_patient(task, fixtures_dir, restored, reference_trainers) -> None:
    """Every configuration, every sample case: identical arrays and geometry properties to preprocess_patient."""
    for path in case_files(fixtures_dir, task):
        image, geometry = read_image(path)
        cropped = nnunet_v1.crop(image[None], geometry)
        for name in models_of(task):
            trainer, _ = reference_trainers[task, name]
            with contextlib.redirect_stdout(io.StringIO()):
                expected, _, properties = trainer.preprocess_patient([str(path)])
            ours = restored[task, name].preprocess(cropped)
            assert ours.data.dtype == np.float32
            assert np.array_equal(ours.data, expected), f"{path.name} {name}"
            for key in ("crop_bbox", "size_after_cropping", "size_after_resampling", "original_size_of_raw_data"):
                assert np.array_equal(ours.properties[key], properties[key]), key
            assert cropped.properties["itk_direction"] == properties["itk_direction"]


@pytest.mark.parametrize("task", TASKS)
def test_preprocessing_within_the_non_zero_mask_is_nnunets(
    task, fixtures_dir, restored, reference_trainers, monkeypatch, tmp_path
) -> None:
    """Plans with ``use_mask_for_norm`` (nnU-Net sets it when the non-zero crop removed much of an MRI): the int8
    mask is resampled and normalised within as preprocess_patient does with its int64 one; without the flag the
    mask is skipped. Each sample gets a zeroed corner block, which the bounding box cannot crop away, so that the
    flag changes the result (checked: this test can fail)."""
    mask_mattered = False
    for source in case_files(fixtures_dir, task):
        image, geometry = read_image(source)
        image[:4, :12, :12] = 0
        path = tmp_path / source.name
        sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(image)), str(path))
        cropped = nnunet_v1.crop(image[None], geometry)
        assert cropped.seg.dtype == np.int8
        for name in models_of(task):
            trainer, _ = reference_trainers[task, name]
            monkeypatch.setattr(trainer, "use_mask_for_norm", OrderedDict({0: True}))
            with contextlib.redirect_stdout(io.StringIO()):
                expected, _, _ = trainer.preprocess_patient([str(path)])
            configuration = restored[task, name]
            preprocessor = copy.copy(configuration.preprocessor)
            preprocessor.use_nonzero_mask = OrderedDict({0: True})
            ours = dataclasses.replace(configuration, preprocessor=preprocessor).preprocess(cropped)
            assert np.array_equal(ours.data, expected), f"{path.name} {name}"
            mask_mattered |= not np.array_equal(ours.data, configuration.preprocess(cropped).data)
    assert mask_mattered


def test_crop_is_shared_untouched(fixtures_dir, restored) -> None:
    """Preprocessing works on a copy: the crop shared by the configurations is unchanged."""
    image, geometry = read_image(case_files(fixtures_dir, "task1")[0])
    cropped = nnunet_v1.crop(image[None], geometry)
    before = cropped.data.copy()
    for name in models_of("task1"):
        restored["task1", name].preprocess(cropped)
    assert np.array_equal(cropped.data, before)


def crop_cases() -> dict[str, np.ndarray]:
    """``(C, z, y, x)`` arrays for the crop: a CT (no zero), zero borders around a body with an enclosed hole (filled
    by nnU-Net) and a notch open to a face of the box that is not the image's border (not filled), two channels
    non-zero in different places, float64 values that float32 rounds to 0, a crop of one voxel."""
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, (1, 9, 10, 11)).astype(np.int16)
    ct[ct == 0] = 1
    body = np.zeros((1, 12, 14, 16), np.int16)
    body[0, 2:10, 3:12, 1:15] = rng.integers(1, 100, (8, 9, 14))
    body[0, 4:7, 5:8, 5:8] = 0  # enclosed hole
    body[0, 3:5, 3:6, 1:4] = 0  # notch open to the box's y- and x-faces
    two = np.zeros((2, 8, 9, 10), np.float32)
    two[0, 1:3, 2:5, 3:4] = 1.5
    two[1, 5:7, 1:2, 6:9] = -2.0
    tiny = np.zeros((1, 6, 7, 8), np.float64)
    tiny[0, 2:4, 2:5, 3:6] = 3.0
    tiny[0, 0, 0, 0] = 1e-50  # 0 in float32: outside nnU-Net's box
    single = np.zeros((1, 5, 5, 5), np.uint8)
    single[0, 4, 0, 2] = 7
    return {"ct": ct, "body": body, "two": two, "tiny": tiny, "single": single}


@pytest.mark.parametrize("name", sorted(crop_cases()))
def test_crop_is_nnunets_image_cropper(name: str) -> None:
    """The crop, its mask and every property equal nnU-Net's ``ImageCropper.crop`` (hole filling, bounding box,
    ``classes``), for masks with holes, open notches, several channels and values float32 rounds to 0."""
    from nnunet.preprocessing.cropping import ImageCropper

    channels = crop_cases()[name]
    geometry = Geometry(channels.shape[:0:-1], (0.8, 0.9, 2.5), (1.0, -2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    cropped = nnunet_v1.crop(channels, geometry)
    with contextlib.redirect_stdout(io.StringIO()):
        given = OrderedDict((k, v) for k, v in cropped.properties.items() if k not in CROPPER_PROPERTIES)
        data, seg, properties = ImageCropper.crop(channels.astype(np.float32), given)
    assert cropped.data.dtype == channels.dtype and np.array_equal(cropped.data.astype(np.float32), data)
    assert cropped.seg.dtype == np.int8 and np.array_equal(cropped.seg, seg)
    assert list(cropped.properties) == list(properties)
    for key, value in properties.items():
        assert np.array_equal(cropped.properties[key], value), key
        assert np.asarray(cropped.properties[key]).dtype == np.asarray(value).dtype, key


@pytest.mark.parametrize("task", TASKS)
def test_fold_networks_are_nnunets(task, restored, reference_trainers) -> None:
    """Each fold's network gives exactly the logits of nnU-Net's trainer network with that fold's parameters."""
    for name in models_of(task):
        trainer, params = reference_trainers[task, name]
        configuration = restored[task, name]
        assert configuration.patch_size == tuple(int(p) for p in trainer.patch_size)
        assert configuration.transpose_forward == tuple(int(a) for a in trainer.transpose_forward)
        torch.manual_seed(0)
        batch = torch.randn(1, 1, *configuration.patch_size)
        for network, param in zip(configuration.networks, params):
            trainer.load_checkpoint_ram(param, False)
            trainer.network.eval()
            trainer.network.decoder.deep_supervision = False
            with torch.no_grad():
                assert torch.equal(network(batch), trainer.network(batch))
        assert not torch.equal(configuration.networks[0](batch), configuration.networks[1](batch))


def test_stage_comes_from_the_init_arguments(fixtures_dir, tmp_path) -> None:
    """The two-stage fixture plan was trained on stage 1 (its init arguments say so), not on the plans' stage 0."""
    name = models_of("task1")[0]
    root = copy_configuration(fixtures_dir, "task1", name, tmp_path)
    info = pickle.loads((root / name / "fold_0" / "model_final_checkpoint.model.pkl").read_bytes())
    stages = info["plans"]["plans_per_stage"]
    assert len(stages) == 2 and info["init"][5] == 1
    (configuration,) = nnunet_v1.restore(root, [name], [0, 1])
    assert configuration.stage == 1
    assert configuration.patch_size == tuple(stages[1]["patch_size"])
    assert np.array_equal(configuration.target_spacing, stages[1]["current_spacing"])

    rewrite_pkls(root / name, lambda info: info.update(init=(*info["init"][:5], 0, *info["init"][6:])))
    (low,) = nnunet_v1.restore(root, [name], [0, 1])
    assert low.stage == 0 and low.patch_size == tuple(stages[0]["patch_size"]) != configuration.patch_size


def test_restore_writes_nothing_into_the_model_folder(fixtures_dir, tmp_path) -> None:
    """nnU-Net would create fold_0 (here absent: only fold 1 is used) and may log there; the adapter writes nothing."""
    name = models_of("task1")[1]
    root = copy_configuration(fixtures_dir, "task1", name, tmp_path)
    shutil.rmtree(root / name / "fold_0")
    before = snapshot(root)
    (configuration,) = nnunet_v1.restore(root, [name], [1])
    assert configuration.folds == (1,) and len(configuration.networks) == 1
    assert snapshot(root) == before


def test_checkpoint_with_numpy_scalars_loads_weights_only(tmp_path) -> None:
    """numpy scalars in the loss history (numpy 2 and numpy 1 pickle names) load without weights_only=False."""
    history = ([np.float64(0.5), np.float32(0.25)], [np.int64(3)], [], [np.float64(0.9)])
    path = tmp_path / "model_final_checkpoint.model"
    torch.save({"state_dict": {"w": torch.ones(2)}, "plot_stuff": history, "epoch": 1000}, path)
    checkpoint = nnunet_v1.load_checkpoint(path)
    assert checkpoint["plot_stuff"] == history and torch.equal(checkpoint["state_dict"]["w"], torch.ones(2))

    legacy = pickle.dumps(history, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with torch.serialization.safe_globals(nnunet_v1._NUMPY_CHECKPOINT_GLOBALS):
        assert torch._weights_only_unpickler.load(io.BytesIO(legacy), encoding="latin1") == history


def test_unreadable_checkpoint_is_named(tmp_path) -> None:
    path = tmp_path / "model_final_checkpoint.model"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: cannot load checkpoint"):
        nnunet_v1.load_checkpoint(path)


def test_missing_folds_are_named_with_a_hint(fixtures_dir) -> None:
    root = fixtures_dir / "amos_task1" / "model"
    names = models_of("task1")
    with pytest.raises(InputError) as error:
        nnunet_v1.restore(root, names, [0, 1, 2, 3, 4])
    hint = "pass --folds 0 1 to use the available ones"
    expected = [f"fold_2, fold_3, fold_4 missing in {root / n}; {hint}" for n in names]
    assert str(error.value).splitlines() == expected


def test_missing_configuration_and_file_are_named(fixtures_dir, tmp_path) -> None:
    names = models_of("task1")
    root = copy_configuration(fixtures_dir, "task1", names[0], tmp_path)
    (root / names[0] / "fold_1" / "model_final_checkpoint.model").unlink()
    with pytest.raises(InputError) as error:
        nnunet_v1.restore(root, names[:2], [0, 1])
    assert str(error.value).splitlines() == [
        f"configuration(s) {names[1]} missing in {root} (found: {names[0]}); pass --models {names[0]} to use the "
        "available ones",
        f"{root / names[0] / 'fold_1' / 'model_final_checkpoint.model'}: file missing",
    ]
    with pytest.raises(InputError, match=r"^/nonexistent/models: model folder not found$"):
        nnunet_v1.restore(Path("/nonexistent/models"), names, [0])


def test_unknown_trainer_and_preprocessor_are_named(fixtures_dir, tmp_path) -> None:
    name = models_of("task1")[0]
    root = copy_configuration(fixtures_dir, "task1", name, tmp_path)
    pkl = root / name / "fold_0" / "model_final_checkpoint.model.pkl"
    original = pkl.read_bytes()
    rewrite_pkls(root / name, lambda info: info.update(name="nnUNetTrainerV2_DoesNotExist"))
    with pytest.raises(InputError, match=rf"^{re.escape(str(pkl))}: unknown trainer 'nnUNetTrainerV2_DoesNotExist'"):
        nnunet_v1.restore(root, [name], [0])

    pkl.write_bytes(original)
    rewrite_pkls(root / name, lambda info: info["plans"].update(preprocessor_name="NoSuchPreprocessor"))
    with pytest.raises(InputError, match=r"unknown preprocessor 'NoSuchPreprocessor' in the plans"):
        nnunet_v1.restore(root, [name], [0])


def test_slim_results_folder_is_restored_by_nnunet_with_identical_networks(fixtures_dir, tmp_path) -> None:
    """The slim copy of a results folder (``export.sh``'s model tarball): no optimizer state, smaller, other files
    byte for byte; nnU-Net 1.7.1's own ``load_model_and_checkpoint_files`` + ``load_checkpoint_ram(train=False)``
    restore it with torch's default ``weights_only=True`` (no environment override) and get the full checkpoints'
    weights; restored here, each fold network gives exactly the full folder's logits."""
    from gcinfer_dev.slim import INFERENCE_KEYS, is_checkpoint, slim_results_folder

    source, slim = fixtures_dir / "amos_task1" / "model", tmp_path / "slim"
    before, after = slim_results_folder(source, slim)
    assert after < before
    for path in source.rglob("*"):
        if path.is_file() and not is_checkpoint(path):
            assert (slim / path.relative_to(source)).read_bytes() == path.read_bytes()
    name = models_of("task1")[0]
    with contextlib.redirect_stdout(io.StringIO()):
        trainer, parameters = load_model_and_checkpoint_files(
            str(slim / name), [0, 1], mixed_precision=False, checkpoint_name="model_final_checkpoint"
        )
    for fold, checkpoint in zip((0, 1), parameters):
        assert set(checkpoint) == set(INFERENCE_KEYS)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.load_checkpoint_ram(checkpoint, False)
        full = nnunet_v1.load_checkpoint(source / name / f"fold_{fold}" / "model_final_checkpoint.model")
        state = trainer.network.state_dict()
        assert all(torch.equal(state[key], value) for key, value in full["state_dict"].items())
    ours, theirs = (nnunet_v1.restore(root, [name], [0, 1])[0] for root in (slim, source))
    tile = torch.randn((1, 1, *ours.patch_size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for slim_network, full_network in zip(ours.networks, theirs.networks):
            assert torch.equal(slim_network(tile), full_network(tile))
