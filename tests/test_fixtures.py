"""The fixture tree of ``gcinfer make-fixtures``: AMOS models that nnU-Net v1 itself restores and that segment the
phantoms, configurations that differ where inference must honour them, phantom geometry, determinism, caching.

nnU-Net v1 reads checkpoints with ``torch.load``, whose default is now ``weights_only=True``; the checkpoints hold
numpy scalars (as real nnU-Net checkpoints do), so numpy's scalar, dtype and Float64DType are allow-listed here.
nnU-Net may write into a results folder, so restoring works on a private copy.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gcinfer.io import read_image
from gcinfer_dev.fixtures import fixture_sources, make_fixtures, source_hash, stamp_text
from gcinfer_dev.fixtures.abdomen import ct_phantom, mri_phantom
from gcinfer_dev.fixtures.amos_specs import TASKS, TaskSpec
from gcinfer_dev.fixtures.nnunet_format import CHECKPOINT, folder_name
from gcinfer_dev.fixtures.nnunet_models import make_phantom, resample_labels
from gcinfer_dev.metrics import dice_per_label

with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # nnU-Net v1 imports scipy.ndimage.filters
    from nnunet.training.model_restore import load_model_and_checkpoint_files

NUMPY_GLOBALS = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType]
REQUIRED_ORGANS = {1, 2, 3, 6, 8, 11, 14}
CONFIGURATIONS = [(task, spec) for task in TASKS for spec in task.models]


def restore(fixtures_dir: Path, task: TaskSpec, name: str, destination: Path):
    """nnU-Net's own ``load_model_and_checkpoint_files`` on a copy of one configuration: (trainer, fold params)."""
    shutil.copytree(fixtures_dir / task.folder / "model" / name, destination / name)
    with contextlib.redirect_stdout(io.StringIO()), torch.serialization.safe_globals(NUMPY_GLOBALS):
        return load_model_and_checkpoint_files(
            str(destination / name), folds=[0, 1], checkpoint_name="model_final_checkpoint"
        )


@pytest.fixture(scope="module")
def restored(fixtures_dir: Path, tmp_path_factory) -> dict[str, tuple]:
    """(trainer, [fold_0 params, fold_1 params], copy folder) per ``<task folder>/<configuration>``."""
    result = {}
    for task, spec in CONFIGURATIONS:
        name = folder_name(spec)
        destination = tmp_path_factory.mktemp(task.folder)
        trainer, params = restore(fixtures_dir, task, name, destination)
        result[f"{task.folder}/{name}"] = trainer, params, destination / name
    return result


def sample_cases(fixtures_dir: Path, task: TaskSpec) -> list[tuple[Path, np.ndarray, object, np.ndarray]]:
    """(input path, image, geometry, ground truth) of each sample case of ``task``."""
    cases = []
    for case in task.samples:
        path = fixtures_dir / task.folder / "input" / f"{case.name}.nii.gz"
        image, geometry = read_image(path)
        truth, truth_geometry = read_image(fixtures_dir / task.folder / "labels" / f"{case.name}.nii.gz")
        assert truth_geometry == geometry, case.name
        cases.append((path, image, geometry, truth))
    return cases


def test_layout(fixtures_dir: Path) -> None:
    assert (fixtures_dir / ".stamp").read_text() == stamp_text(0)
    for task in TASKS:
        models = sorted(p.name for p in (fixtures_dir / task.folder / "model").iterdir())
        assert models == sorted(folder_name(spec) for spec in task.models)
        for name in models:
            for fold in (0, 1):
                assert (fixtures_dir / task.folder / "model" / name / f"fold_{fold}" / f"{CHECKPOINT}.pkl").is_file()
        files = sorted(f"{case.name}.nii.gz" for case in task.samples)
        for folder in ("input", "labels"):
            assert sorted(p.name for p in (fixtures_dir / task.folder / folder).iterdir()) == files


@pytest.mark.parametrize("task, spec", CONFIGURATIONS, ids=[f"{t.folder}-{s.plans}" for t, s in CONFIGURATIONS])
def test_nnunet_restores_the_configuration(task, spec, restored) -> None:
    """nnU-Net's restore accepts the folder: right trainer, stage, transposition, fold weights load and differ, and
    the epoch and loss history agree (else nnU-Net writes a warning into the model folder)."""
    trainer, params, copy = restored[f"{task.folder}/{folder_name(spec)}"]
    assert type(trainer).__name__ == spec.trainer
    assert trainer.stage == len(spec.stages) - 1
    assert list(trainer.patch_size) == list(spec.stages[-1].patch_size)
    assert [int(a) for a in trainer.transpose_forward] == list(spec.transpose_forward)
    assert trainer.num_classes == 16
    assert trainer.normalization_schemes[0] == ("CT" if task.modality == "CT" else "nonCT")
    assert trainer.plans["preprocessor_name"] == spec.preprocessor
    plans = pickle.loads((copy / "plans.pkl").read_bytes())
    assert plans["plans_per_stage"].keys() == trainer.plans["plans_per_stage"].keys()
    weights = []
    for fold_params in params:
        trainer.load_checkpoint_ram(fold_params, False)
        assert trainer.epoch == len(fold_params["plot_stuff"][0]) > 0
        weights.append(trainer.network.decoder.segmentation_output.weight.detach().clone())
    assert not torch.equal(weights[0], weights[1])
    assert not list(copy.rglob("*.txt")), "nnU-Net wrote a training log: the checkpoint history is inconsistent"


@pytest.mark.parametrize("task, spec", CONFIGURATIONS, ids=[f"{t.folder}-{s.plans}" for t, s in CONFIGURATIONS])
def test_each_configuration_segments_the_samples(task, spec, restored, fixtures_dir) -> None:
    """Fold 0 alone, without mirroring, through nnU-Net's own preprocessing and prediction: mean organ Dice >= 0.8
    on the network's grid (the ensemble with mirroring does better; tests/test_amos.py checks it)."""
    trainer, params, _ = restored[f"{task.folder}/{folder_name(spec)}"]
    trainer.load_checkpoint_ram(params[0], False)
    for path, _, _, truth in sample_cases(fixtures_dir, task):
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, properties = trainer.preprocess_patient([str(path)])
            prediction = trainer.predict_preprocessed_data_return_seg_and_softmax(
                data, do_mirroring=False, mirror_axes=(0, 1, 2), mixed_precision=False
            )[0]
        expected = resample_labels(truth, properties, trainer.transpose_forward, data.shape[1:])
        scores = dice_per_label(prediction, expected)
        organs = sorted(set(np.unique(expected).tolist()) - {0})
        print(
            f"{task.folder} {spec.plans} {path.name}: fold 0 mean organ Dice "
            f"{np.mean([scores.get(k, 0.0) for k in organs]):.3f}"
        )
        assert np.mean([scores.get(k, 0.0) for k in organs]) >= 0.8, (path.name, scores)


def test_configurations_differ_where_inference_must_follow() -> None:
    """Distinct target spacings and patch sizes, a non-self-inverse transposition, a two-stage plan, both
    preprocessors, and task 2 with a CT and an MRI-like sample."""
    specs = [spec for _, spec in CONFIGURATIONS]
    assert len({spec.stages[-1].spacing for spec in specs}) == len(specs)
    assert len({spec.stages[-1].patch_size for spec in specs}) > 1
    transposes = [spec.transpose_forward for spec in specs if spec.transpose_forward != (0, 1, 2)]
    assert any(tuple(np.argsort(t)) != t for t in transposes)  # not its own inverse
    assert any(len(spec.stages) == 2 for spec in specs)
    assert {spec.preprocessor for spec in specs} == {"GenericPreprocessor", "Preprocessor3DBetterResampling"}
    assert {case.kind for case in TASKS[1].samples} == {"ct", "mri"}


@pytest.mark.parametrize("task", TASKS, ids=[t.folder for t in TASKS])
def test_sample_geometry_and_labels(task, fixtures_dir) -> None:
    """Anisotropic spacing, non-identity direction, non-zero origin, odd sizes, the required organs with the small
    adrenal, right kidney at low x; a sample with an exactly-zero border (nnU-Net's crop must act)."""
    zero_faces = 0
    for path, image, geometry, truth in sample_cases(fixtures_dir, task):
        spacing = np.array(geometry.spacing)
        assert spacing[2] > 3 * spacing[0] and np.isclose(spacing[0], spacing[1], rtol=0.1), path.name
        assert not np.allclose(np.reshape(geometry.direction, (3, 3)), np.eye(3)), path.name
        assert np.all(np.abs(geometry.origin) > 1.0), path.name
        assert all(s % 2 == 1 for s in geometry.size), path.name
        organs = set(np.unique(truth).tolist()) - {0}
        assert organs >= REQUIRED_ORGANS, path.name
        volumes = {k: int(np.count_nonzero(truth == k)) for k in organs}
        assert volumes[11] < volumes[2] / 2 and volumes[11] <= min(volumes[k] for k in organs - {11, 12}), volumes
        half = truth.shape[2] / 2
        assert np.argwhere(truth == 2)[:, 2].mean() < half < np.argwhere(truth == 3)[:, 2].mean()
        assert np.argwhere(truth == 11)[:, 2].mean() < half
        zero_faces += bool(np.all(image[:, :, 0] == 0))
    assert zero_faces == 1


def test_phantom_intensities(fixtures_dir) -> None:
    """CT: int16 HU with air near -1000 and the liver in the soft-tissue range; MRI-like: another dtype, no HU."""
    _, ct_image, _, ct_truth = sample_cases(fixtures_dir, TASKS[0])[0]
    assert ct_image.dtype == np.int16
    assert np.median(ct_image[:, 0, :]) < -950
    assert 0 < np.median(ct_image[ct_truth == 6]) < 400
    kinds = [case.kind for case in TASKS[1].samples]
    _, mri_image, _, _ = sample_cases(fixtures_dir, TASKS[1])[kinds.index("mri")]
    assert mri_image.dtype != np.int16 and mri_image.min() >= 0


@pytest.mark.parametrize("phantom", [ct_phantom, mri_phantom])
def test_phantoms_are_deterministic(phantom) -> None:
    first, again, other = phantom(7), phantom(7), phantom(8)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.labels, again.labels)
    assert first.image.dtype == again.image.dtype and first.geometry == again.geometry
    assert first.geometry != other.geometry


def test_samples_are_those_of_the_seed(fixtures_dir) -> None:
    """The cached sample cases are what the code makes for seed 0 (the stamp is honest)."""
    task = TASKS[0]
    case = task.samples[1]
    image, geometry = read_image(fixtures_dir / task.folder / "input" / f"{case.name}.nii.gz")
    phantom = make_phantom(0, case)
    assert np.array_equal(image, phantom.image) and geometry.size == phantom.geometry.size


def test_make_fixtures_returns_at_once_when_current(fixtures_dir, monkeypatch) -> None:
    """A current stamp short-cuts the build (nothing is imported or rebuilt)."""
    import gcinfer_dev.fixtures as fixtures

    monkeypatch.setattr(fixtures, "_build", lambda root, seed: pytest.fail("rebuilt a current fixture tree"))
    make_fixtures(fixtures_dir, seed=0)


def test_the_stamp_covers_the_autopet_code_the_models_are_trained_through(monkeypatch) -> None:
    """Changing the AutoPET preprocessing, network building or container config invalidates the cached fixtures."""
    sources = fixture_sources()
    for name in (
        "fixtures/petct.py",
        "gcinfer/pipelines/autopet/pipeline.py",
        "gcinfer/pipelines/autopet/networks.py",
        "gcinfer/pipelines/autopet/settings.py",
        "gcinfer/engine/spatial.py",
        "docker/autopet2/config.json",
    ):
        assert sources[name].is_file(), name
    before = source_hash()
    read_bytes = Path.read_bytes
    edited = sources["gcinfer/engine/spatial.py"]
    monkeypatch.setattr(Path, "read_bytes", lambda path: read_bytes(path) + (b"#" if path == edited else b""))
    assert source_hash() != before
