"""Grand Challenge I/O: reading with validation, atomic label-map writing, case discovery, failure isolation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gcinfer.cases import discover_cases
from gcinfer.config import Sockets
from gcinfer.errors import InputError
from gcinfer.io import Geometry, read_image, write_label_map
from gcinfer.runner import run_cases, summarize

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def write_volume(path: Path, array: np.ndarray, spacing=(0.8, 0.7, 2.5), origin=(-10.0, 20.0, 5.5)) -> Path:
    image = sitk.GetImageFromArray(array, isVector=False)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_mha_header(path: Path, spacing: str, dims: str = "4 3 2") -> Path:
    """A raw-data .mha written by hand, for spacings SimpleITK refuses to write."""
    n = int(np.prod([int(d) for d in dims.split()]))
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementSpacing = {spacing}\n"
        "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.zeros(n, np.int16).tobytes())
    return path


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii"])
def test_label_map_round_trip_keeps_geometry(tmp_path: Path, suffix: str) -> None:
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    image, geometry = read_image(write_volume(tmp_path / f"in{suffix}", array))
    assert image.shape == (5, 6, 7) and geometry.size == (7, 6, 5)
    np.testing.assert_allclose(geometry.spacing, (0.8, 0.7, 2.5), rtol=1e-6)
    labels = (image % 3).astype(np.uint8)
    out = write_label_map(tmp_path / "out" / f"seg{suffix}", labels, geometry)
    written = sitk.ReadImage(str(out))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert Geometry.of(written).size == geometry.size
    np.testing.assert_allclose(written.GetSpacing(), geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), geometry.origin, atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), geometry.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    assert sorted(p.name for p in out.parent.iterdir()) == [f"seg{suffix}"]


def test_mha_output_is_compressed(tmp_path: Path) -> None:
    geometry = Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    out = write_label_map(tmp_path / "seg.mha", np.zeros((64, 64, 64), np.uint8), geometry)
    assert "CompressedData = True" in out.read_bytes()[:1000].decode(errors="replace")
    assert out.stat().st_size < 64**3 // 10


def test_mismatched_label_map_is_refused_before_any_file_exists(tmp_path: Path) -> None:
    geometry = Geometry((4, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match=r"seg.mha: label map shape \(3, 3, 3\) != image shape \(2, 3, 4\)"):
        write_label_map(tmp_path / "seg.mha", np.zeros((3, 3, 3), np.uint8), geometry)
    assert list(tmp_path.iterdir()) == []


WRITE_IMAGE = sitk.WriteImage


def _fail_after_writing(image: sitk.Image, path: str, *args) -> None:
    """SimpleITK's writer failing once the file exists (ITK's words for a full disk)."""
    WRITE_IMAGE(image, path, *args)
    raise RuntimeError("ITK ERROR: ImageFileWriter(0x55d0c0ffee00): No space left on device")


def _write_other_labels(image: sitk.Image, path: str, *args) -> None:
    """SimpleITK's writer reporting no error although the file does not hold the labels (a short write)."""
    WRITE_IMAGE(image != 1, path, *args)


@pytest.mark.parametrize(
    ("writer", "cause"),
    [
        (_fail_after_writing, "No space left on device"),
        (_write_other_labels, "the written file does not read back: disk full?"),
    ],
    ids=["writer-error", "silent-short-write"],
)
def test_write_failure_after_the_temporary_file_exists_leaves_the_output_untouched(
    writer, cause: str, tmp_path: Path, monkeypatch
) -> None:
    geometry = Geometry((4, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    previous = tmp_path / "seg.mha"
    previous.write_bytes(b"an earlier run's output")
    temporaries = []

    def failing_writer(image: sitk.Image, path: str, *args, **kwargs) -> None:
        temporaries.append(Path(path))
        writer(image, path, *args)
        assert Path(path).stat().st_size > 0

    monkeypatch.setattr(sitk, "WriteImage", failing_writer)
    with pytest.raises(InputError) as error:
        write_label_map(previous, np.ones((2, 3, 4), np.uint8), geometry)
    assert str(error.value) == f"{previous}: cannot write output ({cause})"
    assert temporaries and temporaries[0].parent == tmp_path and temporaries[0] != previous
    assert sorted(tmp_path.iterdir()) == [previous] and previous.read_bytes() == b"an earlier run's output"


def test_unwritable_output_folder_is_named(tmp_path: Path) -> None:
    geometry = Geometry((4, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(InputError, match=r"not_a_folder/seg.mha: cannot write output"):
        write_label_map(blocker / "seg.mha", np.zeros((2, 3, 4), np.uint8), geometry)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"not an image at all"), r"bad.mha: cannot read image"),
        (lambda p: write_volume(p, np.zeros((6, 7), np.int16)), r"bad.mha: expected a 3D image, got 2D"),
        (
            lambda p: write_volume(p, np.zeros((2, 3, 4, 5), np.int16)),
            r"bad.mha: expected a 3D image, got 4D",
        ),
        (
            lambda p: write_volume(p, np.full((3, 4, 5), np.nan, np.float32)),
            r"bad.mha: 60 non-finite voxel\(s\) \(NaN or Inf\)",
        ),
        (
            lambda p: write_mha_header(p, "0 1 1"),
            r"bad.mha: cannot read image \(Zero-valued spacing is not supported",
        ),
        (
            lambda p: p.write_bytes(write_mha_header(p, "1 1 1").read_bytes()[:-10]),
            r"bad.mha: cannot read image \(File cannot be read: .*bad.mha for reading.\)",
        ),
    ],
    ids=["corrupt", "2d", "4d", "nan", "zero-spacing", "truncated-raw"],
)
def test_bad_inputs_name_file_and_cause(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.mha"
    make(path)
    with pytest.raises(InputError, match=message):
        read_image(path)


def test_vector_pixels_are_refused(tmp_path: Path) -> None:
    image = sitk.Image([4, 3, 2], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(image, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match=r"rgb.mha: expected a scalar image, got 3 components per voxel"):
        read_image(tmp_path / "rgb.mha")


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "cut.nii.gz", np.ones((20, 20, 20), np.float32))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match=r"cut.nii.gz: cannot read image \(corrupt or truncated gzip data"):
        read_image(path)


def test_negative_spacing_is_a_flipped_axis_not_an_error(tmp_path: Path) -> None:
    _, geometry = read_image(write_mha_header(tmp_path / "neg.mha", "1 -2 1"))
    assert geometry.spacing == (1.0, 2.0, 1.0)
    assert geometry.direction == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def test_flat_layout(tmp_path: Path) -> None:
    for name in ("amos_0002.nii.gz", "amos_0001.nii.gz", "notes.txt"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"")
    cases = discover_cases(tmp_path / "in", tmp_path / "out", Sockets(("ct",), "seg"))
    assert [(c.name, c.inputs["ct"].name, c.output) for c in cases] == [
        ("amos_0001", "amos_0001.nii.gz", tmp_path / "out" / "amos_0001.nii.gz"),
        ("amos_0002", "amos_0002.nii.gz", tmp_path / "out" / "amos_0002.nii.gz"),
    ]


def test_grand_challenge_layout_pairs_sockets(tmp_path: Path) -> None:
    for socket, name in (("pet", "a1"), ("ct", "b2")):
        (tmp_path / "images" / socket).mkdir(parents=True)
        (tmp_path / "images" / socket / f"{name}.mha").write_bytes(b"")
    (cases,) = discover_cases(tmp_path, tmp_path / "out", Sockets(("pet", "ct"), "lesions"))
    assert case_tuple(cases) == ("a1", "a1.mha", "b2.mha", tmp_path / "out" / "images" / "lesions" / "a1.mha")


def case_tuple(case) -> tuple:
    return (case.name, case.inputs["pet"].name, case.inputs["ct"].name, case.output)


def test_pet_without_ct_is_a_failed_case_not_a_crash(tmp_path: Path) -> None:
    for socket, names in (("pet", ("x", "y")), ("ct", ("x",))):
        (tmp_path / "images" / socket).mkdir(parents=True)
        for name in names:
            (tmp_path / "images" / socket / f"{name}.mha").write_bytes(b"")
    cases = discover_cases(tmp_path, tmp_path / "out", Sockets(("pet", "ct"), "lesions"))
    assert next(c.error for c in cases) is None
    assert cases[1].error == f"{tmp_path}/images/pet/y.mha: no matching image named 'y' in socket(s) ct"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, r"in: input folder not found"),
        (lambda root: (root / "in").mkdir(), r"in: no .mha, .nii or .nii.gz image found"),
        (lambda root: (root / "in" / "images" / "pet").mkdir(parents=True), r"images/pet: no image for input socket"),
    ],
    ids=["missing", "empty", "empty-socket"],
)
def test_missing_or_empty_input(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(InputError, match=message):
        discover_cases(tmp_path / "in", tmp_path / "out", Sockets(("pet",), "lesions"))


def test_inputs_json_must_list_the_sockets(tmp_path: Path) -> None:
    (tmp_path / "images" / "pet").mkdir(parents=True)
    entries = [{"interface": {"slug": "ct-image", "relative_path": "images/ct"}}]
    (tmp_path / "inputs.json").write_text(json.dumps(entries))
    with pytest.raises(InputError, match=r"inputs.json: socket\(s\) pet not listed \(has: ct\)"):
        discover_cases(tmp_path, tmp_path / "out", Sockets(("pet",), "lesions"))


def test_a_bad_case_does_not_stop_the_others(tmp_path: Path) -> None:
    write_volume(tmp_path / "in" / "a.mha", np.ones((3, 4, 5), np.int16))
    (tmp_path / "in" / "b.mha").write_bytes(b"corrupt")
    write_volume(tmp_path / "in" / "c.mha", np.ones((3, 4, 5), np.int16))
    cases = discover_cases(tmp_path / "in", tmp_path / "out", Sockets(("image",), "seg"))

    def threshold(case, stages) -> None:
        with stages.stage("read"):
            image, geometry = read_image(case.inputs["image"])
        write_label_map(case.output, (image > 0).astype(np.uint8), geometry)

    results = run_cases(cases, threshold, torch.device("cpu"), progress=False)
    assert [(r.name, r.ok) for r in results] == [("a", True), ("b", False), ("c", True)]
    assert results[1].message.startswith(f"{tmp_path}/in/b.mha: cannot read image")
    assert summarize(results) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mha", "c.mha"]
