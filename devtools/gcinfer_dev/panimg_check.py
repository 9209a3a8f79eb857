"""Outputs imported as Grand Challenge imports them: panimg's image builders (MetaImage and TIFF, no recursion) on
the files of one output socket, which must yield exactly one image.

Grand Challenge runs this on every image output after a job; an output it cannot import fails the job although the
container exited 0. Used by :mod:`gcinfer_dev.checks` (``outputs``: each label map, so by ``test.sh``) and by
``containers/shim-test.sh`` (each task's output socket).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk

from gcinfer.io import Geometry
from gcinfer_dev.checks import geometry_differences


def import_socket(folder: Path) -> tuple[list[sitk.Image], list[str]]:
    """The images panimg imports from the files directly in ``folder`` (Grand Challenge's builders for outputs), and
    the problems: files it could not import (named, with panimg's reasons)."""
    from panimg import convert
    from panimg.image_builders.metaio_mhd_mha import image_builder_mhd
    from panimg.image_builders.tiff import image_builder_tiff

    with tempfile.TemporaryDirectory(prefix="panimg-") as work:
        logging.getLogger("panimg").setLevel(logging.WARNING)
        result = convert(
            input_directory=folder,
            output_directory=Path(work),
            builders=[image_builder_mhd, image_builder_tiff],
            recurse_subdirectories=False,
        )
        images = [sitk.ReadImage(str(f.file)) for f in result.new_image_files if f.file is not None]
    problems = [f"{path}: panimg cannot import it: {'; '.join(errors)}" for path, errors in result.file_errors.items()]
    return images, problems


def imported_problems(image: sitk.Image, expected: Geometry) -> list[str]:
    """What differs from a uint8 label map on ``expected``'s grid in an image panimg imported."""
    problems = [] if image.GetPixelID() == sitk.sitkUInt8 else [f"pixel type {image.GetPixelIDTypeAsString()}"]
    geometry = Geometry(
        tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
    )
    return problems + geometry_differences(geometry, expected)


def check_socket(folder: Path, expected: Geometry) -> list[str]:
    """Problems of an output socket folder as Grand Challenge imports it: exactly one image, a uint8 label map on
    ``expected``'s grid (size, spacing, origin, direction); empty when it passes."""
    images, problems = import_socket(folder)
    if len(images) != 1:
        return [f"{folder}: panimg imports {len(images)} image(s), Grand Challenge needs exactly 1", *problems]
    return problems + [f"{folder}: panimg's import: {p}" for p in imported_problems(images[0], expected)]


def check_file(path: Path, expected: Geometry) -> list[str]:
    """:func:`check_socket` for one output file alone in its socket (a job of one case, as on Grand Challenge)."""
    with tempfile.TemporaryDirectory(prefix="panimg-socket-") as socket:
        shutil.copy(path, Path(socket) / path.name)
        problems = check_socket(Path(socket), expected)
    return [p.replace(socket, str(path.parent)) for p in problems]
