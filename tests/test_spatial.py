"""Reorientation and resampling on the device against MONAI's Orientation / Spacing and their inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from gcinfer.engine.spatial import plan_spatial, ras_affine, resample
from gcinfer.io import Geometry
from gcinfer_dev.fixtures.petct import rotation

AUTOPET_SPACING = (2.03642011, 2.03642011, 3.0)
DIRECTIONS = {
    "identity": np.eye(3),
    "flips": np.diag([-1.0, 1.0, -1.0]),
    "permutation": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": rotation(0, 5.0) @ rotation(2, 15.0) @ np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
    "strongly-oblique": rotation(0, 30.0) @ rotation(1, -20.0),
}


def _geometry(direction: np.ndarray, size=(23, 31, 19), spacing=(4.0, 3.5, 4.2)) -> Geometry:
    return Geometry(size, spacing, (-100.5, 50.25, -300.0), tuple(direction.ravel().tolist()))


def _monai(image: torch.Tensor, geometry: Geometry, spacing):
    orientation, resampling = Orientation(axcodes="RAS"), Spacing(pixdim=spacing)
    meta = MetaTensor(image.clone(), affine=torch.as_tensor(ras_affine(geometry)))
    return orientation, resampling, resampling(orientation(meta))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_forward_and_inverse_match_monai(name):
    geometry = _geometry(DIRECTIONS[name])
    image = torch.rand(2, *geometry.size, generator=torch.Generator().manual_seed(0))
    plan = plan_spatial(geometry, AUTOPET_SPACING)
    orientation, resampling, reference = _monai(image, geometry, AUTOPET_SPACING)
    ours = plan.to_target(image)
    assert tuple(ours.shape[1:]) == tuple(reference.shape[1:]) == plan.target.shape
    np.testing.assert_allclose(plan.target.affine, reference.affine.numpy(), atol=1e-9)
    torch.testing.assert_close(ours, reference.as_tensor(), rtol=0, atol=1e-5)
    inverted = orientation.inverse(resampling.inverse(reference))
    back = plan.to_source(ours)
    assert tuple(back.shape[1:]) == geometry.size
    torch.testing.assert_close(back, inverted.as_tensor(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(inverted.affine.numpy(), plan.source.affine, atol=1e-9)


def test_ras_affine_is_monai_itk_convention():
    geometry = _geometry(DIRECTIONS["oblique"])
    direction = np.asarray(geometry.direction).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = np.diag([-1, -1, 1]) @ direction @ np.diag(geometry.spacing)
    expected[:3, 3] = np.asarray(geometry.origin) * [-1, -1, 1]
    np.testing.assert_allclose(ras_affine(geometry), expected)


def test_resampled_size_rule_and_oblique_rotation_kept():
    geometry = _geometry(DIRECTIONS["oblique"], size=(40, 40, 48), spacing=(4.0, 4.0, 4.0))
    plan = plan_spatial(geometry, AUTOPET_SPACING)
    sizes = [round((n - 1) * s_in / s_out + 1) for n, s_in, s_out in zip((40, 40, 48), (4.0,) * 3, AUTOPET_SPACING)]
    assert plan.target.shape == tuple(sizes)
    oriented_rotation = plan.oriented.affine[:3, :3] / np.linalg.norm(plan.oriented.affine[:3, :3], axis=0)
    target_rotation = plan.target.affine[:3, :3] / np.asarray(AUTOPET_SPACING)
    np.testing.assert_allclose(target_rotation, oriented_rotation, atol=1e-12)
    assert not np.allclose(target_rotation, np.eye(3), atol=0.05)
    assert np.all(np.abs(np.diag(target_rotation)) > 0.9)  # nearest RAS axes: only flips/permutation applied


def test_spacing_within_tolerance_is_not_resampled():
    geometry = _geometry(np.eye(3), spacing=(2.0364201, 2.0364202, 3.0004))
    image = torch.rand(1, *geometry.size)
    plan = plan_spatial(geometry, AUTOPET_SPACING)
    assert plan.target is plan.oriented
    _, _, reference = _monai(image, geometry, AUTOPET_SPACING)
    torch.testing.assert_close(plan.to_target(image), reference.as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(plan.to_source(plan.to_target(image)), image, rtol=0, atol=0)


def test_slab_wise_resampling_equals_one_pass():
    plan = plan_spatial(_geometry(DIRECTIONS["oblique"]), AUTOPET_SPACING)
    image = torch.rand(3, *plan.oriented.shape)
    whole = resample(image, plan.oriented, plan.target)
    slabs = resample(image, plan.oriented, plan.target, max_grid_voxels=plan.target.shape[1] * plan.target.shape[2] * 3)
    torch.testing.assert_close(slabs, whole, rtol=0, atol=0)
