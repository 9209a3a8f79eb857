"""The output check as Grand Challenge imports outputs (panimg's builders): it passes a correct label map and fails
on each way an output can be broken."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gcinfer.io import Geometry, write_label_map
from gcinfer_dev.panimg_check import check_file, check_socket

GEOMETRY = Geometry((10, 8, 6), (1.0, 1.0, 2.0), (5.0, -3.0, 1.5), (0, 1, 0, 1, 0, 0, 0, 0, 1))


@pytest.fixture
def label_map(tmp_path: Path) -> Path:
    labels = np.zeros((6, 8, 10), np.uint8)
    labels[1:5, 2:6, 2:8] = 1
    path = tmp_path / "socket" / "case.mha"
    write_label_map(path, labels, GEOMETRY)
    return path


def test_a_correct_label_map_passes(label_map: Path) -> None:
    assert check_file(label_map, GEOMETRY) == []
    assert check_socket(label_map.parent, GEOMETRY) == []


def test_a_truncated_file_is_not_imported(label_map: Path) -> None:
    data = label_map.read_bytes()
    label_map.write_bytes(data[: len(data) - 20])
    problems = check_file(label_map, GEOMETRY)
    assert problems[0] == f"{label_map.parent}: panimg imports 0 image(s), Grand Challenge needs exactly 1", problems
    assert any(p.startswith(f"{label_map}: panimg cannot import it: ") for p in problems), problems


def test_wrong_pixel_type_and_geometry_are_named(label_map: Path) -> None:
    image = sitk.Cast(sitk.ReadImage(str(label_map)), sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(image, str(label_map))
    problems = check_file(label_map, GEOMETRY)
    assert f"{label_map.parent}: panimg's import: pixel type 32-bit float" in problems, problems
    assert f"{label_map.parent}: panimg's import: spacing (1.0, 1.0, 2.5) != (1.0, 1.0, 2.0)" in problems, problems


def test_two_images_in_one_socket_fail(label_map: Path) -> None:
    shutil.copy(label_map, label_map.parent / "leftover.mha")
    assert check_socket(label_map.parent, GEOMETRY) == [
        f"{label_map.parent}: panimg imports 2 image(s), Grand Challenge needs exactly 1"
    ]
