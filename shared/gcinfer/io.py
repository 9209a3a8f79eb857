"""Image I/O for Grand Challenge containers: read volumes with their geometry, write label maps atomically.

Arrays are numpy in SimpleITK's (z, y, x) order. :class:`Geometry` holds the physical frame in ITK's
(x, y, z) order, exactly as SimpleITK reports it, so that a written label map lands on its input.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from gcinfer.errors import InputError, MemoryPlanError, shown
from gcinfer.headers import NIFTI_HEADER_BYTES, check_nifti_length, metaimage_header
from gcinfer.memory.budget import GIB, Budget

IMAGE_SUFFIXES = (".mha", ".nii.gz", ".nii")
MIN_SPACING_MM = 1e-3
"""Smallest voxel spacing accepted (1 um): below it no CT, MR or PET, and resampling to the networks' spacings (about
1 mm) leaves axes of zero voxels."""
DIRECTION_TOLERANCE = 1e-4
"""Largest deviation of ``D^T D`` from the identity accepted for a direction matrix ``D`` (float32 NIfTI headers give
1e-7)."""
_PIXEL_DTYPES = {
    sitk.sitkUInt8: np.uint8,
    sitk.sitkInt8: np.int8,
    sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16,
    sitk.sitkUInt32: np.uint32,
    sitk.sitkInt32: np.int32,
    sitk.sitkUInt64: np.uint64,
    sitk.sitkInt64: np.int64,
    sitk.sitkFloat32: np.float32,
    sitk.sitkFloat64: np.float64,
}


@dataclass(frozen=True)
class Geometry:
    """Physical frame of a 3D image, in ITK (x, y, z) order.

    Attributes:
        size: voxels along x, y, z.
        spacing: mm along x, y, z.
        origin: physical position (mm) of voxel (0, 0, 0).
        direction: row-major 3x3 direction cosine matrix (9 floats).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy (z, y, x) array order."""
        return self.spacing[::-1]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape in numpy (z, y, x) order."""
        return self.size[::-1]

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy spacing, origin and direction onto ``image`` (whose size must equal ``self.size``)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def image_suffix(path: Path) -> str | None:
    """The supported suffix of ``path`` (``.mha``, ``.nii.gz``, ``.nii``), or None."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def case_name(path: Path) -> str:
    """File name without its image suffix: ``amos_0001.nii.gz`` -> ``amos_0001``."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _reader_cause(error: RuntimeError) -> str:
    """The useful part of an ITK reader exception: its 'ITK ERROR' line without the object address."""
    text = str(error).strip()
    match = re.search(r"ITK ERROR: \w+\(0x[0-9a-f]+\): (.*)", text)
    if match:
        return match.group(1).strip()
    return text.splitlines()[-1] if text else "unknown reader error"


def _stream_gzip(path: Path) -> tuple[bytes, int]:
    """Decompress a ``.gz`` file fully (ITK reads a truncated gzip stream without complaint), holding one block at a
    time: the first :data:`~gcinfer.headers.NIFTI_HEADER_BYTES` decompressed bytes and the decompressed length."""
    head, length = b"", 0
    try:
        with gzip.open(path, "rb") as stream:
            while block := stream.read(1 << 24):
                head = head or block[:NIFTI_HEADER_BYTES]
                length += len(block)
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{shown(path)}: cannot read image (corrupt or truncated gzip data: {error})") from None
    return head, length


def _check_data_length(path: Path) -> None:
    """A NIfTI file's data must reach the last voxel its header announces (:func:`gcinfer.headers.check_nifti_length`);
    a ``.gz`` file must decompress completely."""
    name = path.name.lower()
    if name.endswith(".gz"):
        head, length = _stream_gzip(path)
    elif name.endswith(".nii"):
        with open(path, "rb") as stream:
            head, length = stream.read(NIFTI_HEADER_BYTES), path.stat().st_size
    else:
        return
    if name.endswith((".nii", ".nii.gz")):
        check_nifti_length(path, head, length)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, checked: a 3D scalar image with a sane geometry.

    Attributes:
        geometry: size, spacing, origin and direction.
        dtype: the voxels' numpy dtype as SimpleITK reads them.
    """

    geometry: Geometry
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the voxels as one array."""
        return math.prod(self.geometry.size) * self.dtype.itemsize


def _orthonormal(direction: Sequence[float]) -> bool:
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return bool(np.all(np.isfinite(matrix)) and np.allclose(matrix.T @ matrix, np.eye(3), atol=DIRECTION_TOLERANCE))


def _as_itk_reads(geometry: Geometry) -> Geometry:
    """The geometry of the header as ITK's image reader makes it: a negative spacing is the positive one along the
    flipped axis (the direction's column negated)."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    signs = np.where(np.asarray(geometry.spacing) < 0, -1.0, 1.0)
    return Geometry(
        geometry.size,
        tuple(float(abs(s)) for s in geometry.spacing),
        geometry.origin,
        tuple(float(d) for d in (direction * signs).ravel()),
    )


def read_header(path: Path | str) -> ImageHeader:
    """Read and check the header of ``path`` only, no voxel: a MetaImage header of its own
    (:func:`gcinfer.headers.metaimage_header`), then ITK's reading of the header.

    Raises:
        InputError: missing or unreadable file, voxels in another file, not a 3D scalar image, a spacing that is not
            finite or below :data:`MIN_SPACING_MM`, or a direction whose columns are not orthonormal within
            :data:`DIRECTION_TOLERANCE`; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        target = f" (dangling symlink to {shown(os.readlink(path))})" if path.is_symlink() else ""
        raise InputError(f"{shown(path)}: file not found{target}")
    if image_suffix(path) == ".mha":
        metaimage_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{shown(path)}: cannot read image header ({_reader_cause(error)})") from None
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{shown(path)}: expected a scalar image, got {reader.GetNumberOfComponents()} components per voxel"
        )
    if reader.GetDimension() != 3:
        raise InputError(f"{shown(path)}: expected a 3D image, got {reader.GetDimension()}D of size {reader.GetSize()}")
    dtype = _PIXEL_DTYPES.get(reader.GetPixelID())
    if dtype is None:
        raise InputError(f"{shown(path)}: unsupported pixel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())}")
    geometry = _as_itk_reads(
        Geometry(
            tuple(int(s) for s in reader.GetSize()),
            tuple(float(s) for s in reader.GetSpacing()),
            tuple(float(o) for o in reader.GetOrigin()),
            tuple(float(d) for d in reader.GetDirection()),
        )
    )
    spacing = np.asarray(geometry.spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM):
        raise InputError(
            f"{shown(path)}: invalid voxel spacing {geometry.spacing} (must be finite and at least {MIN_SPACING_MM} mm)"
        )
    if not _orthonormal(geometry.direction):
        raise InputError(
            f"{shown(path)}: direction matrix {geometry.direction} is not orthonormal (columns must be unit vectors at "
            f"right angles, within {DIRECTION_TOLERANCE}): a sheared or singular frame"
        )
    return ImageHeader(geometry, np.dtype(dtype))


def check_fits_in_memory(path: Path, header: ImageHeader) -> None:
    """Refuse an image whose reading (SimpleITK's image and its numpy copy) exceeds the planner's host budget.

    Raises:
        MemoryPlanError: the planner's "too large for this machine's memory", naming the file.
    """
    needed, budget = 2 * header.nbytes, Budget.detect(torch.device("cpu"))
    if needed > budget.host:
        size = " x ".join(map(str, header.geometry.size))
        raise MemoryPlanError(
            f"{shown(path)}: too large for this machine's memory: reading its {size} {header.dtype} voxels needs "
            f"{needed / GIB:.1f} GiB of host memory ({budget.host / GIB:.1f} GiB available)"
        )


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Read a 3D scalar image and validate it: its header first (:func:`read_header`), its voxel bytes against the
    host's memory budget and the length of its data, all before any voxel is read.

    Returns:
        ``(array, geometry)``: the voxels as numpy (z, y, x) in the file's own pixel type (float64 and
        int64 are kept; callers cast, see :func:`check_finite_as`), and the image's :class:`Geometry`.

    Raises:
        InputError: see :func:`read_header`; also too large for the host's memory, data shorter than the header
            says, unreadable voxels, or non-finite voxels; the message names the file.
    """
    path = Path(path)
    header = read_header(path)
    check_fits_in_memory(path, header)
    _check_data_length(path)
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as error:
        raise InputError(f"{shown(path)}: cannot read image ({_reader_cause(error)})") from None
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{shown(path)}: {bad} non-finite voxel(s) (NaN or Inf)")
    return array, Geometry.of(image)


def check_finite_as(array: np.ndarray, dtype: type | np.dtype, path: Path | str) -> None:
    """Refuse voxels that become infinite once cast to ``dtype``, the dtype the pipeline computes in (a float64 beyond
    float32's range passes :func:`read_image`'s check and becomes inf, then NaN in the network). Casts one slice of the
    first axis at a time.

    Raises:
        InputError: names the file and counts the voxels.
    """
    if array.dtype.kind != "f" or np.finfo(array.dtype).max <= np.finfo(dtype).max:
        return
    with np.errstate(over="ignore"):
        bad = sum(int(np.count_nonzero(~np.isfinite(part.astype(dtype)))) for part in array)
    if bad:
        largest = float(np.max(np.abs(array)))
        raise InputError(
            f"{shown(path)}: {bad} voxel(s) beyond the range of {np.dtype(dtype)}, in which the pipeline computes "
            f"(largest magnitude {largest:.3g})"
        )


def check_writable(folder: Path | str) -> None:
    """Create ``folder`` when missing and check that a file can be created in it (then removed), so that an unwritable
    output folder stops a run before its first case rather than after each case's prediction.

    Raises:
        InputError: names the folder and the system's reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputError(f"{shown(folder)}: cannot write output ({error.strerror or error})") from None


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str) -> Iterator[Path]:
    """Yield a temporary file name next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name ends with ``suffix`` so that writers choose the right format. On any exception
    (including KeyboardInterrupt) the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise InputError(f"{shown(path)}: cannot write output ({error.strerror or error})") from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_label_map(path: Path | str, labels: np.ndarray, geometry: Geometry) -> Path:
    """Write a (z, y, x) label map as compressed uint8 with exactly ``geometry``, atomically: the temporary file is
    read back and compared before it is renamed into place.

    Raises:
        ValueError: ``labels`` does not match ``geometry.shape_zyx`` or has values outside 0..255.
        InputError: the output cannot be written (message names the file).
    """
    path = Path(path)
    if tuple(labels.shape) != geometry.shape_zyx:
        raise ValueError(f"{shown(path)}: label map shape {labels.shape} != image shape {geometry.shape_zyx} (z, y, x)")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{shown(path)}: labels outside 0..255 cannot be stored as uint8")
    labels = labels.astype(np.uint8, copy=False)
    image = geometry.apply_to(sitk.GetImageFromArray(labels))
    with atomic_path(path, image_suffix(path) or ".mha") as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
            written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp)))
        except RuntimeError as error:
            raise InputError(f"{shown(path)}: cannot write output ({_reader_cause(error)})") from None
        # SimpleITK reports no error when a small write fails (full disk, file size limit): read the file back
        if not np.array_equal(written, labels):
            raise InputError(f"{shown(path)}: cannot write output (the written file does not read back: disk full?)")
    return path
