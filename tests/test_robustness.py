"""Adversarial inputs, interruption and determinism, at the command-line level (``gcinfer.cli.main``) on the
fixture models.

Every :class:`Row` of :data:`ROWS` is one input problem and the behaviour expected of the pipelines:

- *refused*: an error naming the file and the cause, exit code 1, no output for that case and no temporary file
  left, while the other cases of the same run are still written (model and folder problems stop the whole run
  before any output);
- *processed*: written on the input's own grid and, when the voxels are those of the clean case (a float64 copy, a
  symlink, ...), with the clean case's very labels.

Rows of one pipeline share one run (module-scoped fixtures), so that one ``gcinfer`` invocation exercises all of
them at once; rows whose test lives elsewhere only link to it. ``docs/bad_inputs.md`` is generated from the rows by
``python tests/bad_inputs_table.py`` and :func:`test_bad_inputs_table_is_current` keeps it so.

The AMOS runs use the three task 1 configurations, folds 0 and 1, without test-time mirroring (input handling does
not depend on it; determinism neither), on a crop of a fixture phantom; interruption runs the full phantoms with
mirroring, so that a case lasts long enough to be interrupted in its middle.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gcinfer import cli
from gcinfer.io import Geometry, read_image

REPOSITORY = Path(__file__).resolve().parents[1]
AMOS_SOCKET, AMOS_OUTPUT = "ct-image", "abdominal-organ-segmentation"
AUTOPET_OUTPUT = "automated-petct-lesion-segmentation"
AMOS_ARGS = ("amos-task1", "--folds", "0", "1", "--device", "cpu")
AUTOPET_ARGS = ("autopet2", "--device", "cpu")
TOO_LARGE = r"too large for this machine's memory"


# --- images -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clean:
    """The clean case a row's input is made from: (z, y, x) voxels and geometry (the PET's for AutoPET, with its CT)."""

    array: np.ndarray
    geometry: Geometry
    path: Path
    companion: Path | None = None


def write(path: Path, array: np.ndarray, geometry: Geometry | None = None, vector: bool = False) -> Path:
    """Write ``array`` (z, y, x), with ``geometry`` when it is a 3D image (2D and 4D ones keep ITK's defaults)."""
    image = sitk.GetImageFromArray(array, isVector=vector)
    if geometry is not None and image.GetDimension() == 3:
        geometry.apply_to(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.suffix != ".mha")
    return path


def raw_mha(
    path: Path, array: np.ndarray, spacing: str, direction: str = "1 0 0 0 1 0 0 0 1", data: bytes | None = None
) -> Path:
    """An uncompressed .mha written by hand, for headers SimpleITK will not write (zero or negative spacing,
    singular directions) and header/data mismatches (``data`` shorter than the header says)."""
    element = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.float32): "MET_FLOAT"}[array.dtype]
    z, y, x = array.shape
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {x} {y} {z}\nElementSpacing = {spacing}\n"
        f"TransformMatrix = {direction}\nElementType = {element}\nElementDataFile = LOCAL\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + (array.tobytes() if data is None else data))
    return path


def spacing_text(geometry: Geometry, change: Callable[[list[float]], None] = lambda s: None) -> str:
    spacing = list(geometry.spacing)
    change(spacing)
    return " ".join(f"{s:.9g}" for s in spacing)


def with_extremes(array: np.ndarray) -> np.ndarray:
    """float32 copy with a few voxels at +-3e38 (near float32's largest finite value)."""
    extreme = array.astype(np.float32)
    extreme.flat[:: max(extreme.size // 7, 1)] = 3e38
    extreme.flat[3 :: max(extreme.size // 7, 1)] = -3e38
    return extreme


SHEAR = (1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # non-orthonormal direction (a shear)
SINGULAR = "1 0 0 1 0 0 0 0 1"
NEARLY_SINGULAR = "1 0 0 0 1 0 0 0 1e-9"


# --- rows -------------------------------------------------------------------------------------------------------------

Maker = Callable[..., Path]


@dataclass(frozen=True)
class Row:
    """One adversarial input and the expected behaviour.

    Attributes:
        id: pytest id (and the case's file name stem).
        problem: what is wrong with the input (table text).
        expected: ``"refused"`` or ``"processed"``.
        cause: refused: regex of the cause the error states after the file name; processed: how the result is
            checked (table text).
        make: writes the input into a folder from the clean case (AutoPET: also the case name); returns the file
            the error must name. None for rows tested elsewhere (``test`` links there).
        same: processed rows whose output must equal the clean case's labels.
        test: where the row is tested (pytest node id), default this module's test of the row's pipeline.
        pipeline: the pipeline(s) concerned, for the table (default: that of the row's group in :data:`ROWS`).
    """

    id: str
    problem: str
    expected: str
    cause: str
    make: Maker | None = None
    same: bool = False
    test: str = ""
    pipeline: str = ""


def amos_rows() -> list[Row]:
    """Rows of the AMOS flat-folder run (one ``amos-task1`` invocation on all their inputs)."""

    def copy_as(name: str) -> Maker:
        return lambda folder, clean: Path(shutil.copy(clean.path, folder / name))

    def image(name: str, array: Callable[[np.ndarray], np.ndarray], **options) -> Maker:
        return lambda folder, clean: write(folder / name, array(clean.array), clean.geometry, **options)

    def header(name: str, spacing: Callable[[list[float]], None] = lambda s: None, **options) -> Maker:
        return lambda folder, clean: raw_mha(
            folder / name, clean.array, spacing_text(clean.geometry, spacing), **options
        )

    def truncated(name: str) -> Maker:
        def make(folder: Path, clean: Clean) -> Path:
            (folder / name).write_bytes(clean.path.read_bytes()[: clean.path.stat().st_size // 2])
            return folder / name

        return make

    def dangling(folder: Path, clean: Clean) -> Path:
        (folder / "dangling.nii.gz").symlink_to(folder.parent / "missing" / "dangling.nii.gz")
        return folder / "dangling.nii.gz"

    def symlink(name: str) -> Maker:
        def make(folder: Path, clean: Clean) -> Path:
            target = folder.parent / "elsewhere" / clean.path.name
            target.parent.mkdir(exist_ok=True)
            shutil.copy(clean.path, target)
            (folder / name).symlink_to(target)
            return folder / name

        return make

    def sheared(name: str) -> Maker:
        def make(folder: Path, clean: Clean) -> Path:
            g = clean.geometry
            return write(folder / name, clean.array, Geometry(g.size, g.spacing, g.origin, SHEAR))

        return make

    def corrupt(folder: Path, clean: Clean) -> Path:
        (folder / "corrupt.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n" + os.urandom(3000))
        return folder / "corrupt.mha"

    def mismatch(folder: Path, clean: Clean) -> Path:
        data = clean.array.tobytes()[: clean.array.nbytes // 2]
        return raw_mha(folder / "mismatch.mha", clean.array, spacing_text(clean.geometry), data=data)

    def one_slice(a: np.ndarray) -> np.ndarray:
        return a[a.shape[0] // 2 : a.shape[0] // 2 + 1]

    def nan(a: np.ndarray) -> np.ndarray:
        b = a.astype(np.float32)
        b[0, 0, :3] = np.nan
        return b

    def inf(a: np.ndarray) -> np.ndarray:
        b = a.astype(np.float32)
        b[-1, -1, -1] = np.inf
        return b

    def huge_z(spacing: list[float]) -> None:
        spacing[2] = 1e5

    def tiny(spacing: list[float]) -> None:
        spacing[:] = [1e-6, 1e-6, 1e-6]

    def small(spacing: list[float]) -> None:
        spacing[:] = [0.002, 0.002, 0.002]

    def halved(name: str, compress: bool) -> Maker:
        def make(folder: Path, clean: Clean) -> Path:
            full = write(folder.parent / "full" / "image.nii", clean.array, clean.geometry).read_bytes()
            cut = full[: len(full) // 2]
            (folder / name).write_bytes(gzip.compress(cut) if compress else cut)
            return folder / name

        return make

    def claiming(folder: Path, clean: Clean) -> Path:
        header = bytearray(352)
        struct.pack_into("<i", header, 0, 348)
        struct.pack_into("<8h", header, 40, 3, 4096, 4096, 4096, 1, 1, 1, 1)
        struct.pack_into("<2h", header, 70, 64, 64)
        struct.pack_into("<5f", header, 76, 1.0, 1.0, 1.0, 1.0, 0.0)
        struct.pack_into("<f", header, 108, 352.0)
        header[344:348] = b"n+1\0"
        (folder / "header-claims-4096.nii.gz").write_bytes(gzip.compress(bytes(header)))
        return folder / "header-claims-4096.nii.gz"

    def data_elsewhere(folder: Path, clean: Clean) -> Path:
        path = raw_mha(folder / "data-elsewhere.mha", clean.array, spacing_text(clean.geometry), data=b"")
        path.write_bytes(path.read_bytes().replace(b"ElementDataFile = LOCAL", b"ElementDataFile = /etc/passwd"))
        return path

    def overflowing(folder: Path, clean: Clean) -> Path:
        path = raw_mha(folder / "dimsize-overflow.mha", clean.array, spacing_text(clean.geometry))
        z, y, x = clean.array.shape
        huge = b"DimSize = 4294967296 4294967296 4294967296"
        path.write_bytes(path.read_bytes().replace(f"DimSize = {x} {y} {z}".encode(), huge))
        return path

    def beyond_float32(a: np.ndarray) -> np.ndarray:
        b = a.astype(np.float64)
        b[0, 0, :2] = 1e39
        return b

    def duplicate(folder: Path, clean: Clean) -> Path:
        write(folder / "duplicate.mha", clean.array, clean.geometry)
        return write(folder / "duplicate.nii.gz", clean.array, clean.geometry)

    def zero_y(spacing: list[float]) -> None:
        spacing[1] = 0.0

    def negative_y(spacing: list[float]) -> None:
        spacing[1] = -spacing[1]

    return [
        Row("clean", "a clean CT (the reference for the other rows)", "processed", "written", copy_as("clean.nii.gz")),
        Row(
            "truncated-nii-gz",
            "truncated `.nii.gz`",
            "refused",
            r"cannot read image \(corrupt or truncated gzip data",
            truncated("truncated-nii-gz.nii.gz"),
        ),
        Row(
            "corrupt-mha",
            "corrupt `.mha` (a header line, then random bytes)",
            "refused",
            r"cannot read image header \(",
            corrupt,
        ),
        Row(
            "nii-cut",
            "plain `.nii` cut in half (ITK reads the missing half as 0)",
            "refused",
            r"cannot read image \(truncated NIfTI data: the header announces",
            halved("nii-cut.nii", compress=False),
        ),
        Row(
            "nii-gz-of-cut",
            "complete `.nii.gz` of a `.nii` cut in half",
            "refused",
            r"cannot read image \(truncated NIfTI data: the header announces",
            halved("nii-gz-of-cut.nii.gz", compress=True),
        ),
        Row(
            "header-claims-4096",
            "a 60-byte `.nii.gz` whose header claims 4096^3 float64 voxels (nothing is read; the peak RSS of a "
            "1024^3 claim: `tests/test_io.py::test_huge_header_claim_is_refused_from_the_header_with_little_memory`)",
            "refused",
            TOO_LARGE,
            claiming,
        ),
        Row(
            "data-elsewhere",
            "`.mha` whose header reads its voxels from another file (`ElementDataFile = /etc/passwd`; `/dev/zero` and "
            "a FIFO: `tests/test_io.py::test_metaimage_voxels_only_from_the_file_itself`)",
            "refused",
            r"the header reads its voxels from another file \(ElementDataFile = /etc/passwd\); only "
            r"ElementDataFile = LOCAL",
            data_elsewhere,
        ),
        Row(
            "dimsize-overflow",
            "`.mha` whose `DimSize` product overflows 64 bits",
            "refused",
            r"cannot read image header \(DimSize 4294967296 4294967296 4294967296 overflows",
            overflowing,
        ),
        Row(
            "header-data-mismatch",
            "`.mha` whose header announces more voxels than its data holds",
            "refused",
            r"cannot read image \(",
            mismatch,
        ),
        Row(
            "int64",
            "int64 voxels",
            "processed",
            "same labels as the clean case",
            image("int64.nii.gz", lambda a: a.astype(np.int64)),
            same=True,
        ),
        Row(
            "float64",
            "float64 voxels",
            "processed",
            "same labels as the clean case",
            image("float64.nii.gz", lambda a: a.astype(np.float64)),
            same=True,
        ),
        Row(
            "beyond-float32",
            "float64 voxels beyond float32's range (1e39: inf once cast, then NaN in the network)",
            "refused",
            r"2 voxel\(s\) beyond the range of float32, in which the pipeline computes",
            image("beyond-float32.nii.gz", beyond_float32),
        ),
        Row(
            "rgb",
            "vector (RGB) voxels",
            "refused",
            r"expected a scalar image, got 3 components per voxel",
            image("rgb.mha", lambda a: np.stack([a, a, a], -1).astype(np.uint8), vector=True),
        ),
        Row("2d", "a 2D image", "refused", r"expected a 3D image, got 2D", image("2d.nii.gz", lambda a: a[0])),
        Row(
            "4d",
            "a 4D image",
            "refused",
            r"expected a 3D image, got 4D",
            image("4d.nii.gz", lambda a: a[None].repeat(2, 0)),
        ),
        Row(
            "one-slice",
            "one-slice 3D volume (smaller than the patch)",
            "processed",
            "written on the input's grid",
            image("one-slice.nii.gz", one_slice),
        ),
        Row(
            "tiny",
            "3 x 4 x 5 voxels (smaller than the patch everywhere)",
            "processed",
            "written on the input's grid",
            image("tiny.nii.gz", lambda a: a[20:23, 50:54, 60:65]),
        ),
        Row(
            "all-zero",
            "all-zero image",
            "refused",
            r"every voxel is 0",
            image("all-zero.nii.gz", lambda a: np.zeros_like(a)),
        ),
        Row("nan", "NaN voxels (`.mha`)", "refused", r"3 non-finite voxel\(s\) \(NaN or Inf\)", image("nan.mha", nan)),
        Row("inf", "Inf voxel (`.mha`)", "refused", r"1 non-finite voxel\(s\) \(NaN or Inf\)", image("inf.mha", inf)),
        Row(
            "nan-nifti",
            "NaN and Inf voxels in a `.nii.gz` (ITK's NIfTI reader reads them as 0)",
            "processed",
            "written on the input's grid",
            image("nan-nifti.nii.gz", lambda a: inf(nan(a))),
        ),
        Row(
            "extreme-values",
            "extreme values (+-3e38 in a few voxels)",
            "processed",
            "written on the input's grid",
            image("extreme-values.nii.gz", with_extremes),
        ),
        Row(
            "zero-spacing",
            "zero spacing",
            "refused",
            r"invalid voxel spacing \(1\.\d+, 0\.0, 4\.\d+\) \(must be finite and at least 0\.001 mm\)",
            header("zero-spacing.mha", zero_y),
        ),
        Row(
            "tiny-spacing",
            "tiny spacing (1e-6 mm)",
            "refused",
            r"invalid voxel spacing \(1e-06, 1e-06, 1e-06\) \(must be finite and at least 0\.001 mm\)",
            header("tiny-spacing.mha", tiny),
        ),
        Row(
            "sub-voxel-extent",
            "spacing of 0.002 mm: the whole image is smaller than half a voxel of the network's grid",
            "refused",
            r"resampled to the spacing .* leave an axis without a voxel",
            header("sub-voxel-extent.mha", small),
        ),
        Row(
            "negative-spacing",
            "negative spacing (ITK reads a flipped axis)",
            "processed",
            "same labels as the clean case, direction flipped",
            header("negative-spacing.mha", negative_y),
            same=True,
        ),
        Row(
            "huge-spacing",
            "huge spacing (1e5 mm: the network grid would have 10^9 voxels)",
            "refused",
            TOO_LARGE,
            header("huge-spacing.mha", huge_z),
        ),
        Row(
            "non-orthonormal",
            "non-orthonormal (sheared) direction in a `.mha` (a NIfTI qform cannot hold one)",
            "refused",
            r"direction matrix .* is not orthonormal",
            sheared("non-orthonormal.mha"),
        ),
        Row(
            "singular-direction",
            "singular direction matrix",
            "refused",
            r"direction matrix .* is not orthonormal",
            header("singular-direction.mha", direction=SINGULAR),
        ),
        Row(
            "nearly-singular-direction",
            "nearly singular direction matrix (`0 0 1e-9` as its third column)",
            "refused",
            r"direction matrix .* is not orthonormal",
            header("nearly-singular-direction.mha", direction=NEARLY_SINGULAR),
        ),
        Row(
            "duplicate",
            "two inputs with one case name (`duplicate.mha`, `duplicate.nii.gz`)",
            "refused",
            r"2 images share the case name 'duplicate'; keep one",
            duplicate,
        ),
        Row(
            "non-ascii-name",
            "spaces and non-ASCII characters in the file name",
            "processed",
            "same labels as the clean case, same file name",
            copy_as("amos 9001 é ü.nii.gz"),
            same=True,
        ),
        Row(
            "symlink",
            "input is a symlink",
            "processed",
            "same labels as the clean case, a regular file written",
            symlink("symlink.nii.gz"),
            same=True,
        ),
        Row("dangling-symlink", "input is a dangling symlink", "refused", r"file not found", dangling),
    ]


def autopet_rows() -> list[Row]:
    """Rows of the AutoPET Grand Challenge run: each writes ``images/pet/<id>.mha`` and ``images/ct/<id>.mha``."""

    def pair(pet: Callable | None = None, ct: Callable | None = None, blame: str = "pet") -> Maker:
        """A pair named ``name``: each image copied from the clean pair, or built, or absent (:func:`SKIP`);
        returns the image the ``blame`` socket holds."""

        def make(folder: Path, clean: Clean, name: str) -> Path:
            paths = {s: folder / "images" / s / f"{name}.mha" for s in ("pet", "ct")}
            for socket, build, source in (("pet", pet, clean.path), ("ct", ct, clean.companion)):
                paths[socket].parent.mkdir(parents=True, exist_ok=True)
                if build is None:
                    shutil.copy(source, paths[socket])
                elif build is not SKIP:
                    build(paths[socket], clean)
            return paths[blame]

        return make

    def pet_array(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, Clean], Path]:
        return lambda path, clean: write(path, change(clean.array), clean.geometry)

    def pet_grid(geometry: Callable[[Geometry], Geometry]) -> Callable[[Path, Clean], Path]:
        return lambda path, clean: write(path, clean.array, geometry(clean.geometry))

    def symlinked(path: Path, clean: Clean, source: Path) -> Path:
        target = path.parents[3] / "elsewhere" / path.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        path.symlink_to(target)
        return path

    def garbage(path: Path, clean: Clean) -> Path:
        path.write_bytes(os.urandom(2000))
        return path

    def ct_2d(path: Path, clean: Clean) -> Path:
        return write(path, read_image(clean.companion)[0][0])

    def ct_elsewhere(path: Path, clean: Clean) -> Path:
        ct, g = read_image(clean.companion)
        cropped = ct[2:-3, 5:, :-4]
        return write(path, cropped, Geometry(cropped.shape[::-1], (1.5, 1.5, 2.5), (-40.0, 10.0, 7.0), g.direction))

    def nan(a: np.ndarray) -> np.ndarray:
        b = a.copy()
        b[1, 2, 3] = np.nan
        return b

    def one_slice(a: np.ndarray) -> np.ndarray:
        return a[a.shape[0] // 2 : a.shape[0] // 2 + 1]

    def beyond_float32(a: np.ndarray) -> np.ndarray:
        b = a.astype(np.float64)
        b[1, 2, 3] = 1e39
        return b

    def sheared(g: Geometry) -> Geometry:
        return Geometry(g.size, g.spacing, g.origin, SHEAR)

    def zero(path: Path, clean: Clean) -> Path:
        return raw_mha(path, clean.array.astype(np.float32), "0 4 4")

    return [
        Row("clean", "a clean PET/CT pair (the reference for the other rows)", "processed", "written", pair()),
        Row(
            "float64-pet",
            "float64 PET",
            "processed",
            "same labels as the clean pair",
            pair(pet_array(lambda a: a.astype(np.float64))),
            same=True,
        ),
        Row(
            "nan-pet",
            "NaN voxel in the PET",
            "refused",
            r"1 non-finite voxel\(s\) \(NaN or Inf\)",
            pair(pet_array(nan)),
        ),
        Row(
            "extreme-pet",
            "extreme PET values (+-3e38 in a few voxels)",
            "processed",
            "written on the PET's grid",
            pair(pet_array(with_extremes)),
        ),
        Row("all-zero-pet", "all-zero PET", "processed", "written on the PET's grid", pair(pet_array(np.zeros_like))),
        Row("one-slice-pet", "one-slice PET", "processed", "written on the PET's grid", pair(pet_array(one_slice))),
        Row(
            "beyond-float32-pet",
            "float64 PET beyond float32's range (1e39)",
            "refused",
            r"1 voxel\(s\) beyond the range of float32, in which the pipeline computes",
            pair(pet_array(beyond_float32)),
        ),
        Row(
            "zero-spacing-pet",
            "PET with zero spacing",
            "refused",
            r"invalid voxel spacing \(0\.0, 4\.0, 4\.0\)",
            pair(zero),
        ),
        Row(
            "non-orthonormal-pet",
            "PET with a non-orthonormal (sheared) direction",
            "refused",
            r"direction matrix .* is not orthonormal",
            pair(pet_grid(sheared)),
        ),
        Row(
            "corrupt-ct", "corrupt CT, valid PET", "refused", r"cannot read image header", pair(ct=garbage, blame="ct")
        ),
        Row("2d-ct", "2D CT", "refused", r"expected a 3D image, got 2D", pair(ct=ct_2d, blame="ct")),
        Row(
            "mismatched-ct",
            "PET/CT pair on different grids (CT cropped, other spacing and origin)",
            "processed",
            "same labels as the clean pair (the CT is only checked)",
            pair(ct=ct_elsewhere),
            same=True,
        ),
        Row(
            "pet-without-ct",
            "PET without a CT of the same name",
            "refused",
            r"no matching image named 'pet-without-ct' in socket\(s\) ct",
            pair(ct=SKIP),
        ),
        Row(
            "ct-without-pet",
            "CT without a PET of the same name",
            "refused",
            r"no matching image named 'ct-without-pet' in socket\(s\) pet",
            pair(pet=SKIP, blame="ct"),
        ),
        Row(
            "non-ascii-name",
            "spaces and non-ASCII characters in the file names",
            "processed",
            "same labels as the clean pair, same file name",
            pair(),
            same=True,
        ),
        Row(
            "symlinks",
            "PET and CT are symlinks",
            "processed",
            "same labels as the clean pair",
            pair(pet=lambda p, c: symlinked(p, c, c.path), ct=lambda p, c: symlinked(p, c, c.companion)),
            same=True,
        ),
    ]


def SKIP(path: Path, clean: Clean) -> Path:
    return path


AUTOPET_NAMES = {"non-ascii-name": "pet 9001 é ü"}


def run_rows() -> list[Row]:
    """Rows about folders, models and outputs: each is a run of its own that must write nothing at all."""

    def here(test: str, row_id: str | None = None) -> str:
        return f"tests/test_robustness.py::{test}" + (f"[{row_id}]" if row_id else "")

    amos_model, autopet_model = "test_amos_model_problems", "test_autopet_model_problems"
    output = "test_unwritable_output"
    return [
        Row(
            "missing-socket",
            "a missing socket (no `images/ct/`)",
            "refused",
            r"images/ct: no image for input socket 'ct'",
            test="tests/test_autopet.py::test_missing_ct_socket_and_unreadable_ct",
            pipeline="AutoPET",
        ),
        Row(
            "two-images-one-socket",
            "two images in one Grand Challenge socket folder",
            "processed",
            "both written, each under its own name",
            test=here("test_two_images_in_one_socket_folder"),
            pipeline="AMOS",
        ),
        Row(
            "amos-missing-weights",
            "a fold's weights missing",
            "refused",
            r"fold_0/model_final_checkpoint.model: file missing",
            test=here(amos_model, "amos-missing-weights"),
            pipeline="AMOS",
        ),
        Row(
            "amos-corrupt-checkpoint",
            "corrupt (truncated) checkpoint",
            "refused",
            r"cannot load checkpoint",
            test=here(amos_model, "amos-corrupt-checkpoint"),
            pipeline="AMOS",
        ),
        Row(
            "amos-other-architecture",
            "checkpoint of another architecture (shape mismatch)",
            "refused",
            r"weights do not fit the network built from",
            test=here(amos_model, "amos-other-architecture"),
            pipeline="AMOS",
        ),
        Row(
            "amos-unknown-trainer",
            "plans naming an unknown trainer",
            "refused",
            r"unknown trainer 'nnUNetTrainerV2_DoesNotExist'",
            test=here(amos_model, "amos-unknown-trainer"),
            pipeline="AMOS",
        ),
        Row(
            "amos-pickle-runs-code",
            "`.model.pkl` whose unpickling would call `os.system` (nothing runs)",
            "refused",
            r"cannot read pickle \(UnpicklingError: refers to posix\.system, which nnU-Net v1 does not write there",
            test=here(amos_model, "amos-pickle-runs-code"),
            pipeline="AMOS",
        ),
        Row(
            "amos-corrupt-pickle",
            "corrupt `.model.pkl` (bytes overwritten)",
            "refused",
            r"model_final_checkpoint.model.pkl: (cannot read pickle|not an nnU-Net v1 .model.pkl)",
            test=here(amos_model, "amos-corrupt-pickle"),
            pipeline="AMOS",
        ),
        Row(
            "amos-checkpoint-runs-code",
            "checkpoint whose unpickling would call `os.system` (no full-pickle fallback, nothing runs)",
            "refused",
            r"cannot load checkpoint \(UnpicklingError: Trying to load unsupported GLOBAL posix\.system",
            test=here(amos_model, "amos-checkpoint-runs-code"),
            pipeline="AMOS",
        ),
        Row(
            "output-over-input",
            "flat layout with `--output` equal to `--input` (the outputs would replace the inputs)",
            "refused",
            r"the output would overwrite the input image .*; choose an output folder other than the input folder",
            test=here("test_output_over_input_is_refused"),
            pipeline="AMOS",
        ),
        Row(
            "autopet-missing-weights",
            "no weights",
            "refused",
            r"no \*\.pt checkpoint",
            test=here(autopet_model, "autopet-missing-weights"),
            pipeline="AutoPET",
        ),
        Row(
            "autopet-corrupt-checkpoint",
            "corrupt checkpoint",
            "refused",
            r"cannot read checkpoint",
            test=here(autopet_model, "autopet-corrupt-checkpoint"),
            pipeline="AutoPET",
        ),
        Row(
            "autopet-other-architecture",
            "checkpoint of another architecture (shape mismatch)",
            "refused",
            r"wrongly shaped tensor\(s\)",
            test=here(autopet_model, "autopet-other-architecture"),
            pipeline="AutoPET",
        ),
        Row(
            "autopet-out-channels",
            "`model.json` with 3 output channels (the vote and the lesion mask need 2)",
            "refused",
            r"network out_channels must be 2, got 3",
            test=here(autopet_model, "autopet-out-channels"),
            pipeline="AutoPET",
        ),
        Row(
            "autopet-window",
            "`model.json` with a window edge of 0 voxels",
            "refused",
            r"window \(0, 64, 64\) must have edges of 1 to 512 voxels",
            test=here(autopet_model, "autopet-window"),
            pipeline="AutoPET",
        ),
        Row(
            "autopet-unknown-argument",
            "`model.json` with an argument DynUNet does not take",
            "refused",
            r"unknown DynUNet argument\(s\) 'dropout_rate' in 'network'",
            test=here(autopet_model, "autopet-unknown-argument"),
            pipeline="AutoPET",
        ),
        Row(
            "autopet-hidden-and-single",
            "AutoPET model folder with `._0.pt` (macOS) and `checkpoint.pt` beside the folds",
            "processed",
            "the numbered folds only (logged), same labels as the clean pair",
            test=here("test_autopet_model_folder_uses_folds_only"),
            pipeline="AutoPET",
        ),
        Row(
            "read-only-output",
            "read-only output folder (found before the first case)",
            "refused",
            r"cannot write output \((Read-only file system|Permission denied)\)",
            test=here(output, "read-only-output"),
            pipeline="AutoPET",
        ),
        Row(
            "full-output",
            "full output folder (file size limit reached)",
            "refused",
            r"cannot write output",
            test=here(output, "full-output"),
            pipeline="AutoPET",
        ),
    ]


ROWS = {"amos-task1": amos_rows(), "autopet2": autopet_rows(), "runs": run_rows()}


# --- running the CLI --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One ``gcinfer`` invocation: exit code, ERROR messages logged, files under the output folder."""

    code: int
    errors: list[str]
    output: Path

    def files(self) -> list[Path]:
        found = self.output.rglob("*") if self.output.exists() else ()
        return sorted(p for p in found if p.is_file() or p.is_symlink())

    def error_for(self, path: Path) -> str:
        """The first error message naming ``path``."""
        return next((e for e in self.errors if str(path) in e), f"no error names {path}; errors: {self.errors}")


class _Errors(logging.Handler):
    def __init__(self, level: int = logging.ERROR) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_cli(*argv: object, output: Path) -> Run:
    """``gcinfer --no-progress ARGV --output OUTPUT`` in this process, collecting the errors it logs."""
    handler, logger = _Errors(), logging.getLogger("gcinfer")
    logger.addHandler(handler)
    try:
        code = cli.main(["--no-progress", *[str(a) for a in argv], "--output", str(output)])
    finally:
        logger.removeHandler(handler)
    return Run(code, handler.messages, output)


def assert_no_temporary_files(folder: Path) -> None:
    leftovers = [p for p in folder.rglob(".*") if p.is_file()] if folder.exists() else []
    assert leftovers == [], f"temporary files left: {leftovers}"


# --- AMOS -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amos_clean(fixtures_dir: Path, tmp_path_factory) -> Clean:
    """A crop of the first task 1 phantom (body and organs cut, still a CT), for speed."""
    source = sorted((fixtures_dir / "amos_task1" / "input").glob("*.nii.gz"))[0]
    array, geometry = read_image(source)
    crop = array[:, 16:96, 20:100]
    g = Geometry(crop.shape[::-1], geometry.spacing, geometry.origin, geometry.direction)
    return Clean(crop, g, write(tmp_path_factory.mktemp("amos_clean") / "clean.nii.gz", crop, g))


@pytest.fixture(scope="module")
def amos_run(fixtures_dir: Path, amos_clean: Clean, tmp_path_factory) -> tuple[Run, dict[str, Path]]:
    """One ``amos-task1`` run (no mirroring) on a flat folder holding every AMOS row's input."""
    root = tmp_path_factory.mktemp("amos_rows")
    folder = root / "in"
    folder.mkdir()
    inputs = {row.id: row.make(folder, amos_clean) for row in ROWS["amos-task1"]}
    run = run_cli(
        *AMOS_ARGS, "--no-tta", "--input", folder, "--model", fixtures_dir / "amos_task1" / "model", output=root / "out"
    )
    return run, inputs


def output_of(run: Run, source: Path) -> Path:
    """The flat-layout output of ``source`` (same file name)."""
    return run.output / source.name


@pytest.mark.parametrize("row", ROWS["amos-task1"], ids=lambda r: r.id)
def test_amos_inputs(row: Row, amos_run) -> None:
    run, inputs = amos_run
    assert run.code == 1  # some rows are refused
    source = inputs[row.id]
    assert_case_outcome(row, run, source, output_of(run, source), output_of(run, inputs["clean"]), clean_labels=4)
    assert_no_temporary_files(run.output)


def assert_case_outcome(row: Row, run: Run, source: Path, output: Path, clean_output: Path, clean_labels: int) -> None:
    """The row's expected outcome for its case ``source`` (whose output would be ``output``); the clean case's
    labels must show at least ``clean_labels`` distinct values (background included)."""
    if row.expected == "refused":
        assert re.search(f"{re.escape(str(source))}: .*{row.cause}", run.error_for(source)), run.error_for(source)
        assert not output.exists()
        return
    assert output.is_file() and not output.is_symlink(), f"{output} not written; errors: {run.errors}"
    labels, geometry = read_image(output)
    _, expected_geometry = read_image(source)
    assert labels.dtype == np.uint8 and geometry == expected_geometry
    if row.same:
        np.testing.assert_array_equal(labels, read_image(clean_output)[0])
    if row.id == "clean":
        assert len(np.unique(labels)) >= clean_labels, "the clean case should show what the model segments"


# --- AutoPET ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def autopet_clean(fixtures_dir: Path) -> Clean:
    """The fixture pair with the identity direction."""
    images = fixtures_dir / "autopet2" / "input" / "images"
    for pet in sorted((images / "pet").glob("*.mha")):
        array, geometry = read_image(pet)
        if np.allclose(geometry.direction, np.eye(3).ravel()):
            return Clean(array, geometry, pet, images / "ct" / pet.name)
    raise AssertionError("no fixture PET with the identity direction")


@pytest.fixture(scope="module")
def autopet_run(fixtures_dir: Path, autopet_clean: Clean, tmp_path_factory) -> tuple[Run, dict[str, Path]]:
    """One ``autopet2`` run on a Grand Challenge folder holding every AutoPET row's pair."""
    root = tmp_path_factory.mktemp("autopet_rows")
    inputs = {r.id: r.make(root / "in", autopet_clean, AUTOPET_NAMES.get(r.id, r.id)) for r in ROWS["autopet2"]}
    model = fixtures_dir / "autopet2" / "model"
    run = run_cli(*AUTOPET_ARGS, "--input", root / "in", "--model", model, output=root / "out")
    return run, inputs


@pytest.mark.parametrize("row", ROWS["autopet2"], ids=lambda r: r.id)
def test_autopet_inputs(row: Row, autopet_run) -> None:
    run, inputs = autopet_run
    assert run.code == 1
    source = inputs[row.id]
    outputs = run.output / "images" / AUTOPET_OUTPUT
    name = AUTOPET_NAMES.get(row.id, row.id)
    pet = source.parents[1] / "pet" / f"{name}.mha"
    assert_case_outcome(
        row,
        run,
        source if row.expected == "refused" else pet,
        outputs / f"{name}.mha",
        outputs / "clean.mha",
        clean_labels=2,
    )
    assert_no_temporary_files(run.output)


# --- runs that must write nothing, and layouts ------------------------------------------------------------------------


def run_row(row_id: str) -> Row:
    return next(r for r in ROWS["runs"] if r.id == row_id)


def assert_refused_run(run: Run, row: Row) -> None:
    assert run.code == 1
    assert any(re.search(row.cause, e) for e in run.errors), run.errors
    assert run.files() == []


def test_two_images_in_one_socket_folder(fixtures_dir: Path, amos_clean: Clean, tmp_path: Path) -> None:
    socket = tmp_path / "in" / "images" / AMOS_SOCKET
    socket.mkdir(parents=True)
    shutil.copy(amos_clean.path, socket / "a.nii.gz")
    write(socket / "b.mha", amos_clean.array.astype(np.float32), amos_clean.geometry)
    run = run_cli(
        *AMOS_ARGS,
        "--no-tta",
        "--input",
        tmp_path / "in",
        "--model",
        fixtures_dir / "amos_task1" / "model",
        output=tmp_path / "out",
    )
    assert run.code == 0, run.errors
    outputs = tmp_path / "out" / "images" / AMOS_OUTPUT
    assert run.files() == [outputs / "a.mha", outputs / "b.mha"]
    np.testing.assert_array_equal(read_image(outputs / "a.mha")[0], read_image(outputs / "b.mha")[0])


def one_checkpoint(model: Path) -> tuple[Path, Path]:
    """(.model, .model.pkl) of fold 0 of the model folder's first configuration (fold 0's .pkl builds the trainer)."""
    fold = sorted(p for p in model.iterdir() if p.is_dir())[0] / "fold_0"
    return fold / "model_final_checkpoint.model", fold / "model_final_checkpoint.model.pkl"


def _missing(weights: Path, info: Path) -> None:
    weights.unlink()


def _corrupt(weights: Path, info: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:1000])


def _other_architecture(weights: Path, info: Path) -> None:
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.ndim == 5)
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:, :, :1]
    torch.save(checkpoint, weights)


def _unknown_trainer(weights: Path, info: Path) -> None:
    with open(info, "rb") as stream:
        content = pickle.load(stream)
    content["name"] = "nnUNetTrainerV2_DoesNotExist"
    with open(info, "wb") as stream:
        pickle.dump(content, stream)


class RunsCode:
    """Pickled as a call of ``os.system``: unpickling it would create :data:`MARKER`."""

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {MARKER}",)


MARKER = Path(f"/tmp/gcinfer-test-code-ran-{os.getpid()}")


def _pickle_runs_code(weights: Path, info: Path) -> None:
    with open(info, "rb") as stream:
        content = pickle.load(stream)
    content["plans"]["code"] = RunsCode()
    with open(info, "wb") as stream:
        pickle.dump(content, stream)


def _corrupt_pickle(weights: Path, info: Path) -> None:
    data = bytearray(info.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = np.random.default_rng(3).integers(0, 256, 64, np.uint8).tobytes()
    info.write_bytes(bytes(data))


def _checkpoint_runs_code(weights: Path, info: Path) -> None:
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    checkpoint["plot_stuff"] = RunsCode()
    torch.save(checkpoint, weights)


AMOS_MODEL_PROBLEMS = {
    "amos-missing-weights": _missing,
    "amos-corrupt-checkpoint": _corrupt,
    "amos-other-architecture": _other_architecture,
    "amos-unknown-trainer": _unknown_trainer,
    "amos-pickle-runs-code": _pickle_runs_code,
    "amos-corrupt-pickle": _corrupt_pickle,
    "amos-checkpoint-runs-code": _checkpoint_runs_code,
}


@pytest.mark.parametrize("row_id", AMOS_MODEL_PROBLEMS)
def test_amos_model_problems(row_id: str, fixtures_dir: Path, amos_clean: Clean, tmp_path: Path) -> None:
    model = Path(shutil.copytree(fixtures_dir / "amos_task1" / "model", tmp_path / "model"))
    weights, info = one_checkpoint(model)
    AMOS_MODEL_PROBLEMS[row_id](weights, info)
    (tmp_path / "in").mkdir()
    shutil.copy(amos_clean.path, tmp_path / "in")
    run = run_cli(*AMOS_ARGS, "--no-tta", "--input", tmp_path / "in", "--model", model, output=tmp_path / "out")
    row = run_row(row_id)
    assert_refused_run(run, row)
    named = (
        weights if row_id in ("amos-missing-weights", "amos-corrupt-checkpoint", "amos-other-architecture") else info
    )
    named = weights if row_id == "amos-checkpoint-runs-code" else named
    assert any(str(named) in e for e in run.errors), run.errors
    assert not MARKER.exists(), "the model folder ran code"


def _autopet_other_architecture(model: Path) -> None:
    from monai.networks.nets import DynUNet

    other = DynUNet(3, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 8, 16, 32], norm_name="batch")
    torch.save({"net": other.state_dict()}, model / "0.pt")


def _model_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        content = json.loads((model / "model.json").read_text())
        change(content)
        (model / "model.json").write_text(json.dumps(content))

    return edit


AUTOPET_MODEL_PROBLEMS = {
    "autopet-missing-weights": lambda model: [p.unlink() for p in model.glob("*.pt")],
    "autopet-corrupt-checkpoint": lambda model: (model / "0.pt").write_bytes(b"PK\x03\x04 not a checkpoint"),
    "autopet-other-architecture": _autopet_other_architecture,
    "autopet-out-channels": _model_json(lambda c: c["network"].update(out_channels=3)),
    "autopet-window": _model_json(lambda c: c.update(window=[0, 64, 64])),
    "autopet-unknown-argument": _model_json(lambda c: c["network"].update(dropout_rate=0.5)),
}


def test_autopet_model_folder_uses_folds_only(fixtures_dir: Path, autopet_run, autopet_clean: Clean, tmp_path) -> None:
    """``._0.pt`` (macOS metadata) and a ``checkpoint.pt`` beside the numbered folds are left out, and the log says
    so: both are garbage here, which would refuse the run if they were read."""
    run, _ = autopet_run
    model = Path(shutil.copytree(fixtures_dir / "autopet2" / "model", tmp_path / "model"))
    (model / "._0.pt").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (model / "checkpoint.pt").write_bytes(b"not a checkpoint")
    next(r for r in ROWS["autopet2"] if r.id == "clean").make(tmp_path / "in", autopet_clean, "clean")
    logger = logging.getLogger("gcinfer")
    infos, level = _Errors(logging.INFO), logger.level
    logger.addHandler(infos)
    logger.setLevel(logging.INFO)
    try:
        again = run_cli(*AUTOPET_ARGS, "--input", tmp_path / "in", "--model", model, output=tmp_path / "out")
    finally:
        logger.removeHandler(infos)
        logger.setLevel(level)
    assert again.code == 0, again.errors
    assert f"{model}: using numbered folds 0.pt, 1.pt (ignored: checkpoint.pt)" in infos.messages
    name = Path("images") / AUTOPET_OUTPUT / "clean.mha"
    assert (again.output / name).read_bytes() == (run.output / name).read_bytes()


def test_output_over_input_is_refused(amos_clean: Clean, fixtures_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    source = Path(shutil.copy(amos_clean.path, folder / "case.nii.gz"))
    before = source.read_bytes()
    run = run_cli(
        *AMOS_ARGS, "--no-tta", "--input", folder, "--model", fixtures_dir / "amos_task1" / "model", output=folder
    )
    assert run.code == 1
    assert any(re.search(f"{re.escape(str(source))}: {run_row('output-over-input').cause}", e) for e in run.errors)
    assert sorted(folder.iterdir()) == [source] and source.read_bytes() == before


def test_file_names_with_control_characters_are_quoted_in_the_log(amos_clean: Clean, fixtures_dir, tmp_path) -> None:
    """A refused input named ``a\nERROR forged.nii.gz``: every log line names it quoted, none starts with the forged
    text."""
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "a\nERROR forged.nii.gz", np.zeros_like(amos_clean.array), amos_clean.geometry)
    run = run_cli(
        *AMOS_ARGS,
        "--no-tta",
        "--input",
        folder,
        "--model",
        fixtures_dir / "amos_task1" / "model",
        output=tmp_path / "o",
    )
    assert run.code == 1
    quoted = repr(str(folder / "a\nERROR forged.nii.gz"))
    assert any(e.startswith(f"{'a' + chr(10) + 'ERROR forged'!r}: {quoted}: every voxel is 0") for e in run.errors)
    assert all("\n" not in e for e in run.errors), run.errors


@pytest.mark.parametrize("row_id", AUTOPET_MODEL_PROBLEMS)
def test_autopet_model_problems(row_id: str, fixtures_dir: Path, autopet_clean: Clean, tmp_path: Path) -> None:
    model = Path(shutil.copytree(fixtures_dir / "autopet2" / "model", tmp_path / "model"))
    AUTOPET_MODEL_PROBLEMS[row_id](model)
    make = next(r for r in ROWS["autopet2"] if r.id == "clean").make
    make(tmp_path / "in", autopet_clean, "clean")
    run = run_cli(*AUTOPET_ARGS, "--input", tmp_path / "in", "--model", model, output=tmp_path / "out")
    assert_refused_run(run, run_row(row_id))
    assert any(str(model) in e for e in run.errors), run.errors


# --- outputs that cannot be written, interruption (subprocesses) ------------------------------------------------------


def default_interruption_signals(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: SIGINT and SIGTERM back to their default disposition in the child, then ``then()``.

    A non-interactive shell starts background jobs with SIGINT ignored (POSIX), and an ignored signal stays ignored
    across exec: Python then installs no KeyboardInterrupt handler, which is right for the program (``nohup``
    relies on it) but would make the interruption tests depend on how the test session was started.
    """

    def preexec() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        if then is not None:
            then()

    return preexec


def cli_process(
    *argv: object,
    prefix: Sequence[str] = (),
    preexec: Callable[[], None] | None = None,
    python: Sequence[str] = ("-m", "gcinfer.cli"),
) -> subprocess.Popen:
    """``[PREFIX] python PYTHON --no-progress ARGV`` in a subprocess (stdout and stderr piped, line-buffered text),
    with SIGINT and SIGTERM at their default disposition whatever the test session's."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    command = [*prefix, sys.executable, *python, "--no-progress", *[str(a) for a in argv]]
    return subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_interruption_signals(preexec),
    )


def limit_file_size() -> None:
    """In the child: no file may grow beyond 64 bytes (a full disk for the label map, whose header alone is
    larger), and exceeding it is an error (EFBIG) rather than the default SIGXFSZ kill."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))


def read_only(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` is read-only: permissions for an unprivileged user; for root (whom
    permissions do not stop) a read-only bind mount in a private mount namespace, which ends with the process."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    remount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    if subprocess.run(["unshare", "--mount", "sh", "-c", remount, str(folder), "true"], capture_output=True).returncode:
        pytest.skip("cannot make a read-only mount here (unshare --mount needs CAP_SYS_ADMIN)")
    return ["unshare", "--mount", "sh", "-c", remount, str(folder)]


@pytest.mark.parametrize("row_id", ["read-only-output", "full-output"])
def test_unwritable_output(row_id: str, fixtures_dir: Path, autopet_clean: Clean, tmp_path: Path) -> None:
    """The AutoPET pipeline on its clean pair with an output folder it cannot write: read-only, or full (a file
    size limit)."""
    next(r for r in ROWS["autopet2"] if r.id == "clean").make(tmp_path / "in", autopet_clean, "clean")
    output = tmp_path / "out"
    output.mkdir()
    try:
        full = row_id == "full-output"
        process = cli_process(
            *AUTOPET_ARGS,
            "--input",
            tmp_path / "in",
            "--output",
            output,
            "--model",
            fixtures_dir / "autopet2" / "model",
            prefix=[] if full else read_only(output),
            preexec=limit_file_size if full else None,
        )
        _, stderr = process.communicate(timeout=300)
    finally:
        output.chmod(0o755)
    assert process.returncode == 1, stderr
    expected = output / "images" / AUTOPET_OUTPUT  # read-only: the folder, before the first case; full: the file
    expected = expected / "clean.mha" if full else expected
    assert re.search(f"{re.escape(str(expected))}: {run_row(row_id).cause}", stderr), stderr
    assert [p for p in output.rglob("*") if p.is_file()] == []


@pytest.fixture(scope="module")
def many_amos_cases(fixtures_dir: Path, tmp_path_factory) -> Path:
    """Ten copies of a full task 1 phantom: a run long enough to be interrupted in the middle."""
    folder = tmp_path_factory.mktemp("amos_many")
    source = sorted((fixtures_dir / "amos_task1" / "input").glob("*.nii.gz"))[0]
    for k in range(10):
        shutil.copy(source, folder / f"case_{k}.nii.gz")
    return folder


INTERRUPTIONS = pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])


def interrupt(process: subprocess.Popen, signum: int) -> str:
    """Send ``signum`` to the running ``process``; its stderr once it has ended, promptly, with exit code 130."""
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signum)
    sent = time.monotonic()
    try:
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()  # no-op once it has ended; never leaves a run behind a failed assertion
    assert process.returncode == 130, stderr
    assert time.monotonic() - sent < 15, "the run did not stop promptly"
    assert "interrupted" in stderr
    return stderr


@INTERRUPTIONS
def test_interruption_while_predicting_leaves_no_partial_output(
    signum: int, fixtures_dir: Path, many_amos_cases: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    process = cli_process(
        *AMOS_ARGS, "--input", many_amos_cases, "--output", output, "--model", fixtures_dir / "amos_task1" / "model"
    )
    for line in process.stdout:  # the run has started predicting once it logs its settings (INFO: stdout)
        if "amos-task1: 10 case(s)" in line:
            break
    time.sleep(2.0)
    interrupt(process, signum)
    written = sorted(output.iterdir()) if output.exists() else []
    assert len(written) < 10
    for path in written:  # only complete label maps, no temporary file
        assert not path.name.startswith(".") and read_image(path)[0].dtype == np.uint8


SLOW_WRITE = """
import runpy, sys, time
import SimpleITK
write = SimpleITK.WriteImage
def write_then_wait(image, path, *args, **kwargs):
    write(image, path, *args, **kwargs)
    print(f"written, not yet renamed: {path}", file=sys.stderr, flush=True)
    time.sleep(120)
SimpleITK.WriteImage = write_then_wait
runpy.run_module("gcinfer.cli", run_name="__main__", alter_sys=True)
"""
"""``python -c SLOW_WRITE ARGV``: the CLI, whose every image write pauses after the file is written (so while it
still has its temporary name) and says so on stderr."""


@INTERRUPTIONS
def test_interruption_while_writing_removes_the_temporary_file(signum: int, fixtures_dir: Path, tmp_path: Path) -> None:
    autopet = fixtures_dir / "autopet2"
    output = tmp_path / "out"
    argv = (*AUTOPET_ARGS, "--input", autopet / "input", "--output", output, "--model", autopet / "model")
    process = cli_process(*argv, python=("-c", SLOW_WRITE))
    marker = "written, not yet renamed: "
    line = next((line for line in process.stderr if marker in line), "")
    assert line, "the run ended without writing"
    temporary = Path(line.split(marker, 1)[1].strip())
    assert temporary.is_file() and temporary.name.startswith(".") and temporary.parent.parent.parent == output
    interrupt(process, signum)
    assert not temporary.exists()
    assert [p for p in output.rglob("*") if p.is_file()] == []


# --- determinism ------------------------------------------------------------------------------------------------------


def test_amos_output_is_byte_identical_across_runs(
    fixtures_dir: Path, amos_run, amos_clean: Clean, tmp_path: Path
) -> None:
    """The clean case again, in a run of its own: the very same bytes as in the module's run."""
    run, inputs = amos_run
    (tmp_path / "in").mkdir()
    shutil.copy(amos_clean.path, tmp_path / "in" / "clean.nii.gz")
    model = fixtures_dir / "amos_task1" / "model"
    again = run_cli(*AMOS_ARGS, "--no-tta", "--input", tmp_path / "in", "--model", model, output=tmp_path / "out")
    assert again.code == 0, again.errors
    assert (again.output / "clean.nii.gz").read_bytes() == output_of(run, inputs["clean"]).read_bytes()


def test_autopet_output_is_byte_identical_across_runs(
    fixtures_dir: Path, autopet_run, autopet_clean: Clean, tmp_path: Path
) -> None:
    run, _ = autopet_run
    next(r for r in ROWS["autopet2"] if r.id == "clean").make(tmp_path / "in", autopet_clean, "clean")
    again = run_cli(
        *AUTOPET_ARGS,
        "--input",
        tmp_path / "in",
        "--model",
        fixtures_dir / "autopet2" / "model",
        output=tmp_path / "out",
    )
    assert again.code == 0, again.errors
    name = Path("images") / AUTOPET_OUTPUT / "clean.mha"
    assert (again.output / name).read_bytes() == (run.output / name).read_bytes()


def test_cuda_runs_use_deterministic_algorithms(monkeypatch) -> None:
    """On CUDA the runner switches cuDNN's autotuner off (nnU-Net's trainer switches it on) and deterministic
    kernels on; the switches need no GPU. On the CPU nothing is changed."""
    from gcinfer.runner import run_cases

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.backends.cudnn.benchmark = True
        run_cases([], lambda case, stages, upcoming: None, torch.device("cpu"), progress=False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        run_cases([], lambda case, stages, upcoming: None, torch.device("cuda"), progress=False)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


# --- the generated table ----------------------------------------------------------------------------------------------


def test_bad_inputs_table_is_current() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bad_inputs_table import TABLE, render

    assert TABLE.read_text() == render(), "docs/bad_inputs.md is stale: run python tests/bad_inputs_table.py"
    for rows in ROWS.values():
        for row in rows:
            if row.test:
                path, _, name = row.test.partition("::")
                assert f"def {name.partition('[')[0]}(" in (REPOSITORY / path).read_text(), f"{row.id}: no {row.test}"
