"""The AutoPET II pipeline: lesion Dice on the fixture pairs, parity with MONAI's own chain (the fixture model and the
container's own DynUNet), outputs, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gcinfer import cli
from gcinfer.engine.tiling import MonaiTiling
from gcinfer.errors import InputError
from gcinfer.io import read_image
from gcinfer.pipelines.autopet.networks import build_network, checked_state_dict, find_checkpoints, load_networks
from gcinfer.pipelines.autopet.pipeline import percentile, scale_percentiles, segment
from gcinfer.pipelines.autopet.settings import load_settings
from gcinfer_dev import container_config
from gcinfer_dev.metrics import dice
from gcinfer_dev.references.autopet import fold_checkpoints, monai_segment
from gcinfer_dev.references.autopet import read_settings as reference_settings

CPU = torch.device("cpu")
OUTPUT_SOCKET = "automated-petct-lesion-segmentation"
CONFIG = json.loads(container_config("autopet2").read_text())
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def autopet(fixtures_dir: Path) -> Path:
    return fixtures_dir / "autopet2"


@pytest.fixture(scope="module")
def settings(autopet):
    return load_settings(CONFIG, autopet / "model")


@pytest.fixture(scope="module")
def networks(autopet, settings):
    return load_networks(find_checkpoints(autopet / "model"), settings, CPU)


@pytest.fixture(scope="module")
def pets(autopet) -> list[Path]:
    return sorted((autopet / "input" / "images" / "pet").glob("*.mha"))


@pytest.fixture(scope="module")
def oblique_pet(pets) -> Path:
    """The fixture PET with a non-identity direction matrix and a non-zero origin."""
    path = next(p for p in pets if not np.allclose(read_image(p)[1].direction, IDENTITY))
    assert np.linalg.norm(read_image(path)[1].origin) > 1.0
    return path


def _run(argv: list[str]) -> int:
    return cli.main(["--no-progress", "autopet2", "--device", "cpu", *[str(a) for a in argv]])


@pytest.fixture(scope="module")
def pipeline_output(autopet, tmp_path_factory) -> tuple[int, Path]:
    """Exit code and output folder of ``gcinfer autopet2`` on the fixture pairs (2 folds, vote)."""
    output = tmp_path_factory.mktemp("autopet_out")
    code = _run(["--input", autopet / "input", "--output", output, "--model", autopet / "model"])
    return code, output


def _pair_input(root: Path, pairs: dict[str, tuple[Path | None, Path | None]]) -> Path:
    """A Grand Challenge input folder: for each case name, copies of the given PET and CT (None = absent)."""
    for name, (pet, ct) in pairs.items():
        for socket, source in (("pet", pet), ("ct", ct)):
            if source is not None:
                (root / "images" / socket).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, root / "images" / socket / f"{name}.mha")
    return root


def _ct_of(pet: Path) -> Path:
    return pet.parents[1] / "ct" / pet.name


def test_end_to_end_lesion_dice_and_output_files(pipeline_output, autopet, pets):
    code, output = pipeline_output
    assert code == 0
    folder = output / "images" / OUTPUT_SOCKET
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in pets)
    assert sorted(p.name for p in output.iterdir()) == ["images"]  # no data-centric JSON by default
    scores = []
    for pet in pets:
        labels, geometry = read_image(folder / pet.name)
        _, pet_geometry = read_image(pet)
        assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) <= {0, 1}
        assert geometry == pet_geometry  # size, spacing, origin and direction exactly the PET's
        truth, _ = read_image(autopet / "labels" / pet.name)
        scores.append(dice(labels, truth))
    assert min(scores) >= 0.7, scores


def monai_reference(pet: Path, model: Path, ensemble: str | None = None) -> np.ndarray:
    """The oracle's labels for ``pet``: MONAI's chain, DynUNet and ITKReader, with every checkpoint of ``model``."""
    settings = reference_settings(container_config("autopet2"), model, ensemble)
    return monai_segment(pet, fold_checkpoints(model), settings)


def test_parity_with_monai_chain(pipeline_output, pets, autopet):
    """gcinfer vs MONAI's LoadImaged(ITKReader) -> ... -> Invertd -> argmax -> VoteEnsembled on the same checkpoint
    files, CPU fp32, on both fixture PETs (one oblique with a non-zero origin): identical label maps."""
    for pet in pets:
        ours, _ = read_image(pipeline_output[1] / "images" / OUTPUT_SOCKET / pet.name)
        reference = monai_reference(pet, autopet / "model")
        differing = int(np.count_nonzero(ours != reference))
        print(
            f"vote {pet.name}: {differing} of {reference.size} voxels differ, reference lesion voxels {reference.sum()}"
        )
        assert reference.sum() > 100
        assert differing == 0


def test_mean_ensemble_parity_with_monai(oblique_pet, networks, autopet):
    settings = load_settings(CONFIG, autopet / "model", ensemble="mean")
    pet, geometry = read_image(oblique_pet)
    ours = segment(pet, geometry, networks, settings, CPU)
    reference = monai_reference(oblique_pet, autopet / "model", ensemble="mean")
    assert reference.sum() > 100
    assert int(np.count_nonzero(ours != reference)) == 0


def test_parity_with_monai_on_the_container_architecture(tmp_path, oblique_pet):
    """The network the container runs (docker/autopet2/config.json, no model.json: instance norm, residual blocks,
    strides ending [2, 2, 1], 128^3 window) with random weights (seeded): gcinfer's checkpoint loading, tiling and
    inversion against MONAI's on the oblique PET (one window: the PET is smaller than 128^3 once resampled)."""
    from monai.networks.nets import DynUNet

    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(0)
    torch.save({"net": DynUNet(**CONFIG["network"]).state_dict()}, model / "0.pt")
    settings = load_settings(CONFIG, model)
    assert settings.window == (128, 128, 128) and settings.network == CONFIG["network"]
    pet, geometry = read_image(oblique_pet)
    ours = segment(pet, geometry, load_networks(find_checkpoints(model), settings, CPU), settings, CPU)
    reference = monai_reference(oblique_pet, model)
    differing = int(np.count_nonzero(ours != reference))
    print(f"container DynUNet: {differing} of {reference.size} voxels differ, {reference.sum()} foreground")
    assert 0 < reference.sum() < reference.size  # random weights, but both classes are predicted
    assert differing == 0


def test_single_checkpoint_and_data_centric_json(tmp_path, autopet, pets, settings, networks):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(autopet / "model" / "0.pt", model / "checkpoint.pt")
    shutil.copy(autopet / "model" / "model.json", model / "model.json")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "write_data_centric_json": True}))
    inputs = _pair_input(tmp_path / "in", {"case": (pets[0], _ct_of(pets[0]))})
    output = tmp_path / "out"
    assert _run(["--input", inputs, "--output", output, "--model", model, "--config", config]) == 0
    assert json.loads((output / "data-centric-model.json").read_text()) is False
    written, _ = read_image(output / "images" / OUTPUT_SOCKET / "case.mha")
    pet, geometry = read_image(pets[0])
    np.testing.assert_array_equal(written, segment(pet, geometry, networks[:1], settings, CPU))


def test_unpaired_pet_and_ct_fail_by_name_and_the_pair_is_still_written(tmp_path, autopet, pets, caplog):
    pairs = {"good": (pets[0], _ct_of(pets[0])), "lonely": (pets[1], None), "stray": (None, _ct_of(pets[1]))}
    inputs = _pair_input(tmp_path / "in", pairs)
    output = tmp_path / "out"
    code = _run(["--input", inputs, "--output", output, "--model", autopet / "model", "--checkpoints", "0.pt"])
    assert code == 1
    assert sorted(p.name for p in (output / "images" / OUTPUT_SOCKET).iterdir()) == ["good.mha"]
    images = inputs / "images"
    assert f"{images / 'pet' / 'lonely.mha'}: no matching image named 'lonely' in socket(s) ct" in caplog.text
    assert f"{images / 'ct' / 'stray.mha'}: no matching image named 'stray' in socket(s) pet" in caplog.text


def test_missing_ct_socket_and_unreadable_ct(tmp_path, autopet, pets, caplog):
    no_ct = _pair_input(tmp_path / "no_ct", {"case": (pets[0], None)})
    assert _run(["--input", no_ct, "--output", tmp_path / "out1", "--model", autopet / "model"]) == 1
    assert f"{no_ct / 'images' / 'ct'}: no image for input socket 'ct'" in caplog.text
    assert not (tmp_path / "out1").exists()
    broken = _pair_input(tmp_path / "broken", {"case": (pets[0], _ct_of(pets[0]))})
    (broken / "images" / "ct" / "case.mha").write_bytes(b"not an image")
    assert _run(["--input", broken, "--output", tmp_path / "out2", "--model", autopet / "model"]) == 1
    assert f"{broken / 'images' / 'ct' / 'case.mha'}: cannot read image header" in caplog.text
    assert not list((tmp_path / "out2").rglob("*.mha"))


def _state(autopet) -> dict[str, torch.Tensor]:
    return torch.load(autopet / "model" / "0.pt", weights_only=True)["net"]


def test_checkpoint_with_only_one_alias_of_each_tensor_loads(tmp_path, autopet, settings, networks):
    state = {k: v for k, v in _state(autopet).items() if not k.startswith("skip_layers.")}
    path = tmp_path / "0.pt"
    torch.save({"net": state}, path)
    network = build_network(settings)
    network.load_state_dict(checked_state_dict(path, network))
    for key, value in networks[0].state_dict().items():
        torch.testing.assert_close(network.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: {"model": s}, "expected a MONAI checkpoint {'net': state_dict}, found keys ['model']"),
        (lambda s: {"net": {**s, "extra.weight": torch.zeros(1)}}, "unexpected key(s) in 'net': extra.weight"),
        (
            lambda s: {"net": {k: v for k, v in s.items() if not k.startswith("output_block.")}},
            "missing key(s) in 'net': output_block.conv.conv.bias, output_block.conv.conv.weight",
        ),
        (
            lambda s: {"net": {**s, "output_block.conv.conv.bias": torch.zeros(3)}},
            "wrongly shaped tensor(s) in 'net' (checkpoint != network): output_block.conv.conv.bias (3,) != (2,)",
        ),
    ],
    ids=["no-net", "unexpected", "missing", "shape"],
)
def test_bad_checkpoint_names_file_and_keys(tmp_path, autopet, settings, change, message):
    path = tmp_path / "0.pt"
    torch.save(change(_state(autopet)), path)
    with pytest.raises(InputError) as error:
        checked_state_dict(path, build_network(settings))
    assert str(error.value) == f"{path}: {message}"


def test_model_folder_errors(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}: no \\*.pt checkpoint"):
        find_checkpoints(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"overlap": 0.5}))
    with pytest.raises(InputError, match=r"model.json: unknown key\(s\) overlap"):
        load_settings(CONFIG, tmp_path)
    (tmp_path / "2.pt").touch()
    (tmp_path / "10.pt").touch()
    (tmp_path / "1.pt").touch()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["1.pt", "2.pt", "10.pt"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"overlap": 1.0}, r"overlap 1.0 must be in \[0, 1\)"),
        ({"tile_batch_size": 0}, r"tile_batch_size 0 must be at least 1"),
    ],
)
def test_tiling_settings_are_checked_when_loaded(tmp_path, change, message):
    with pytest.raises(InputError, match=f"^config.json: {message}$"):
        load_settings({**CONFIG, **change}, tmp_path, source="config.json")
    assert load_settings(CONFIG, tmp_path).tiling == MonaiTiling(overlap=CONFIG["overlap"], gaussian=True)


@pytest.mark.parametrize("shape", [(1,), (2,), (7, 5, 3), (40, 31, 17)])
def test_percentile_matches_numpy(shape):
    values = torch.from_numpy(np.random.default_rng(len(shape)).gamma(0.5, 2.0, shape).astype(np.float32))
    for q in (0.0, 0.05, 12.5, 50.0, 99.95, 100.0):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values.numpy(), q)), rel=1e-5, abs=1e-6)


def test_percentile_scaling_matches_monai():
    from monai.transforms import ScaleIntensityRangePercentiles

    image = torch.from_numpy(np.random.default_rng(3).gamma(0.5, 3.0, (1, 30, 20, 10)).astype(np.float32))
    monai = ScaleIntensityRangePercentiles(0.05, 99.95, 0.0, 1.0, clip=True, relative=False)
    torch.testing.assert_close(scale_percentiles(image, 0.05, 99.95), torch.as_tensor(monai(image)), rtol=0, atol=1e-6)
    constant = torch.full((1, 4, 4, 4), 3.0)
    with pytest.warns(Warning):
        expected = torch.as_tensor(monai(constant))
    torch.testing.assert_close(scale_percentiles(constant, 0.05, 99.95), expected)
