"""Image I/O for Grand Challenge containers: read volumes with their geometry, write label maps atomically.

Arrays are numpy in SimpleITK's (z, y, x) order. :class:`Geometry` holds the physical frame in ITK's
(x, y, z) order, exactly as SimpleITK reports it, so that a written label map lands on its input.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcinfer.errors import InputError

IMAGE_SUFFIXES = (".mha", ".nii.gz", ".nii")


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


def _check_gzip_complete(path: Path) -> None:
    """Decompress a ``.gz`` file fully: ITK reads a truncated gzip stream without complaint."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: cannot read image (corrupt or truncated gzip data: {error})") from None


def read_header(path: Path | str) -> sitk.ImageFileReader:
    """The reader of ``path`` after it has read the image header only (size, spacing, dimension, pixel type).

    Raises:
        InputError: the header cannot be read; the message names the file.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot read image header ({str(error).strip().splitlines()[-1]})") from None
    return reader


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Read a 3D scalar image and validate it.

    Returns:
        ``(array, geometry)``: the voxels as numpy (z, y, x) in the file's own pixel type (float64 and
        int64 are kept; callers cast), and the image's :class:`Geometry`.

    Raises:
        InputError: unreadable or corrupt file, not 3D, vector pixels, non-finite voxels, or zero,
            negative or non-finite spacing; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        target = f" (dangling symlink to {os.readlink(path)})" if path.is_symlink() else ""
        raise InputError(f"{path}: file not found{target}")
    if path.name.lower().endswith(".gz"):
        _check_gzip_complete(path)
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as error:
        raise InputError(f"{path}: cannot read image ({_reader_cause(error)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{path}: invalid voxel spacing {tuple(spacing.tolist())} (must be finite and > 0)")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{path}: {bad} non-finite voxel(s) (NaN or Inf)")
    return array, Geometry.of(image)


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
        raise InputError(f"{path}: cannot write output ({error.strerror or error})") from None
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
        raise ValueError(f"{path}: label map shape {labels.shape} != image shape {geometry.shape_zyx} (z, y, x)")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{path}: labels outside 0..255 cannot be stored as uint8")
    labels = labels.astype(np.uint8, copy=False)
    image = geometry.apply_to(sitk.GetImageFromArray(labels))
    with atomic_path(path, image_suffix(path) or ".mha") as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
            written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp)))
        except RuntimeError as error:
            raise InputError(f"{path}: cannot write output ({_reader_cause(error)})") from None
        # SimpleITK reports no error when a small write fails (full disk, file size limit): read the file back
        if not np.array_equal(written, labels):
            raise InputError(f"{path}: cannot write output (the written file does not read back: disk full?)")
    return path
