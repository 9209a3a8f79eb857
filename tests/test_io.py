"""Grand Challenge I/O: reading with validation, atomic label-map writing, case discovery, failure isolation."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gcinfer.cases import discover_cases
from gcinfer.config import Sockets
from gcinfer.errors import InputError, shown
from gcinfer.io import Geometry, check_finite_as, read_image, write_label_map
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
            r"bad.mha: invalid voxel spacing \(0.0, 1.0, 1.0\) \(must be finite and at least 0.001 mm\)",
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

    upcoming_of = {}

    def threshold(case, stages, upcoming) -> None:
        upcoming_of[case.name] = upcoming and upcoming.name
        with stages.stage("read"):
            image, geometry = read_image(case.inputs["image"])
        write_label_map(case.output, (image > 0).astype(np.uint8), geometry)

    results = run_cases(cases, threshold, torch.device("cpu"), progress=False)
    assert [(r.name, r.ok) for r in results] == [("a", True), ("b", False), ("c", True)]
    assert upcoming_of == {"a": "b", "b": "c", "c": None}  # each case is told the one that runs next
    assert results[1].message.startswith(f"{tmp_path}/in/b.mha: cannot read image")
    assert summarize(results) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mha", "c.mha"]


# --- headers checked before any voxel is read (issue 13) --------------------------------------------------------------


def nifti_claiming(path: Path, size: tuple[int, int, int], datatype: int = 2, bitpix: int = 8) -> Path:
    """A NIfTI-1 file holding only a header (no voxel) that claims ``size`` (x, y, z) voxels of ``datatype`` (2: uint8,
    64: float64), gzip-compressed when ``path`` ends with ``.gz`` (68 bytes for 1024^3 uint8)."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *size, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, datatype, bitpix)
    struct.pack_into("<4f", header, 76, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    path.write_bytes(gzip.compress(bytes(header), mtime=0) if path.name.endswith(".gz") else bytes(header))
    return path


def test_huge_header_claim_is_refused_from_the_header_with_little_memory(tmp_path: Path) -> None:
    """A 55-byte .nii.gz claiming 1024^3 uint8 voxels, read in a fresh process after a small image: refused (its data
    is 1 GiB short) before any voxel is allocated; the peak RSS grows by less than 64 MiB (the reader before: 2.1
    GiB)."""
    path = nifti_claiming(tmp_path / "claim.nii.gz", (1024, 1024, 1024))
    assert path.stat().st_size < 100
    script = (
        "import sys\n"
        "from gcinfer.errors import InputError\n"
        "from gcinfer.io import read_image\n"
        "from gcinfer.memory.budget import rss_bytes, status_bytes\n"
        "read_image(sys.argv[2])\n"  # a small image first: ITK's readers and the budget probes are loaded
        "before = rss_bytes()\n"
        "try:\n"
        "    read_image(sys.argv[1])\n"
        "except InputError as error:\n"
        "    print(error)\n"
        "print(before, status_bytes('VmHWM'))\n"  # this process's peak (getrusage keeps the parent's across exec)
    )
    small = write_volume(tmp_path / "small.nii.gz", np.ones((4, 4, 4), np.uint8))
    command = [sys.executable, "-c", script, str(path), str(small)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    message, sizes = result.stdout.strip().splitlines()
    before, peak = map(int, sizes.split())
    print(f"peak RSS {peak / 2**20:.0f} MiB, {(peak - before) / 2**20:.1f} MiB over the RSS before read_image")
    assert message == (
        f"{path}: cannot read image (truncated NIfTI data: the header announces {352 + 1024**3} bytes up to the last "
        "voxel, the data holds 352)"
    )
    assert peak - before < 64 * 2**20


def test_image_larger_than_the_host_budget_is_refused_before_reading(tmp_path: Path) -> None:
    path = nifti_claiming(tmp_path / "huge.nii.gz", (4096, 4096, 4096), datatype=64, bitpix=64)
    with pytest.raises(InputError, match=r"huge.nii.gz: too large for this machine's memory: reading its "):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_shorter_than_its_header_is_refused(tmp_path: Path, suffix: str) -> None:
    """ITK reads the missing half as zeros; the data length is compared with the header's claim."""
    full = write_volume(tmp_path / "full.nii", np.ones((10, 12, 14), np.int16)).read_bytes()
    cut = full[: len(full) // 2]
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(gzip.compress(cut) if suffix == ".nii.gz" else cut)
    end = len(full)
    with pytest.raises(
        InputError, match=rf"cut{re.escape(suffix)}: cannot read image \(truncated NIfTI data: .* {end} "
    ):
        read_image(path)


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero", "fifo", "other.raw"])
def test_metaimage_voxels_only_from_the_file_itself(tmp_path: Path, target: str) -> None:
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    if target == "other.raw":
        (tmp_path / "other.raw").write_bytes(np.zeros(24, np.int16).tobytes())
    path = tmp_path / "elsewhere.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = 1 1 1\nElementType = MET_SHORT\n"
        f"ElementDataFile = {target}\n"
    )
    message = f"elsewhere.mha: the header reads its voxels from another file (ElementDataFile = {target}); only"
    with pytest.raises(InputError, match=re.escape(message)):
        read_image(path)


@pytest.mark.parametrize(
    ("dims", "cause"),
    [
        ("4294967296 4294967296 4294967296", r"DimSize 4294967296 4294967296 4294967296 overflows"),
        ("4 -3 2", r"invalid DimSize '4 -3 2'"),
        ("4 x 2", r"invalid DimSize '4 x 2'"),
    ],
    ids=["overflow", "negative", "text"],
)
def test_metaimage_dimsize_is_checked(tmp_path: Path, dims: str, cause: str) -> None:
    path = write_mha_header(tmp_path / "dims.mha", "1 1 1")
    path.write_bytes(path.read_bytes().replace(b"DimSize = 4 3 2", f"DimSize = {dims}".encode()))
    with pytest.raises(InputError, match=rf"dims.mha: cannot read image header \({cause}"):
        read_image(path)


@pytest.mark.parametrize(
    ("direction", "spacing"),
    [
        ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1e-9), (1.0, 1.0, 1.0)),
        ((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (1.0, 1.0, 1.0)),
        (DIRECTION, (1e-6, 1.0, 1.0)),
    ],
    ids=["nearly-singular", "sheared", "tiny-spacing"],
)
def test_degenerate_geometry_is_refused_from_the_header(tmp_path: Path, direction, spacing) -> None:
    path = tmp_path / "frame.mha"
    matrix = " ".join(map(str, np.asarray(direction).reshape(3, 3).T.ravel()))  # MetaImage: column-major
    path.write_bytes(
        (
            f"ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = {' '.join(map(str, spacing))}\n"
            f"TransformMatrix = {matrix}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
        ).encode()
        + np.ones(24, np.int16).tobytes()
    )
    cause = "invalid voxel spacing" if spacing[0] < 1 else "is not orthonormal"
    with pytest.raises(InputError, match=rf"frame.mha: .*{cause}"):
        read_image(path)


def test_float64_beyond_float32_is_refused_where_float32_is_reached(tmp_path: Path) -> None:
    array = np.ones((3, 4, 5))
    array[1, 2, 3] = 1e39
    image, _ = read_image(write_volume(tmp_path / "big.nii.gz", array))
    assert image.dtype == np.float64  # finite in the file's own dtype
    with pytest.raises(InputError, match=r"big.nii.gz: 1 voxel\(s\) beyond the range of float32, .* 1e\+39\)"):
        check_finite_as(image, np.float32, tmp_path / "big.nii.gz")
    check_finite_as(np.full((2, 2), 3e38), np.float32, "fits")


def test_duplicate_case_names_fail_both_layouts(tmp_path: Path) -> None:
    for folder in (tmp_path / "flat", tmp_path / "gc" / "images" / "ct"):
        folder.mkdir(parents=True)
        for name in ("a.mha", "a.nii.gz", "b.mha"):
            (folder / name).write_bytes(b"")
    for root in (tmp_path / "flat", tmp_path / "gc"):
        cases = discover_cases(root, tmp_path / "out", Sockets(("ct",), "seg"))
        assert [(c.name, c.error is None) for c in cases] == [("a", False), ("b", True)]
        folder = cases[0].inputs["ct"].parent
        assert (
            cases[0].error == f"{folder / 'a.mha'}, {folder / 'a.nii.gz'}: 2 images share the case name 'a'; keep one"
        )


def test_output_over_an_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"a.nii.gz: the output would overwrite the input image .*a.nii.gz; choose"):
        discover_cases(tmp_path, tmp_path / "." / "", Sockets(("ct",), "seg"))


def test_control_characters_in_names_are_quoted() -> None:
    assert shown(Path("/in/amos é 1.nii.gz")) == "/in/amos é 1.nii.gz"
    assert shown("/in/a\nERROR forged.mha") == "'/in/a\\nERROR forged.mha'"
    assert shown("/in/\x1b[31mred.mha") == "'/in/\\x1b[31mred.mha'"
    assert shown(os.fsdecode(b"/in/\xff.mha")) == "'/in/\\udcff.mha'"


def test_deeply_nested_inputs_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "images" / "pet").mkdir(parents=True)
    (tmp_path / "inputs.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InputError, match=r"inputs.json: cannot read JSON \(RecursionError"):
        discover_cases(tmp_path, tmp_path / "out", Sockets(("pet",), "lesions"))


def test_a_bug_shows_its_traceback_and_the_other_cases_still_run(tmp_path: Path, caplog) -> None:
    """Only the library's own errors are bad inputs: a ValueError raised by the code is a bug, logged with its
    traceback; the case fails, the others are written."""
    for name in ("a", "b", "c"):
        write_volume(tmp_path / "in" / f"{name}.mha", np.ones((3, 4, 5), np.int16))
    cases = discover_cases(tmp_path / "in", tmp_path / "out", Sockets(("image",), "seg"))

    def predict(case, stages, upcoming) -> None:
        image, geometry = read_image(case.inputs["image"])
        if case.name == "b":
            raise ValueError("a bug in the pipeline")
        if case.name == "c":
            raise InputError(f"{case.inputs['image']}: a bad input")
        write_label_map(case.output, (image > 0).astype(np.uint8), geometry)

    results = run_cases(cases, predict, torch.device("cpu"), progress=False)
    assert [(r.name, r.ok, r.message) for r in results[1:]] == [
        ("b", False, "ValueError: a bug in the pipeline"),
        ("c", False, f"{tmp_path}/in/c.mha: a bad input"),
    ]
    records = {r.getMessage(): r for r in caplog.records if r.levelname == "ERROR"}
    assert records["b: failed"].exc_info is not None and records["b: failed"].exc_info[0] is ValueError
    assert records[f"c: {tmp_path}/in/c.mha: a bad input"].exc_info is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mha"]
