"""Reorientation to RAS and resampling to a target spacing, and their inverse, on the device.

The semantics are MONAI's ``Orientationd(axcodes="RAS")`` followed by ``Spacingd(pixdim)`` with its defaults
(bilinear, border padding, ``align_corners=False``) as they act on an image loaded by MONAI's ITKReader, and
``Invertd`` of both with ``nearest_interp=False``:

- index order is ITK's (x, y, z) and the 4x4 affine maps voxel indices to RAS millimetres (ITK's LPS frame
  with its first two rows negated);
- reorientation only flips and permutes axes, to the RAS axes nearest to the image's axes (nibabel's
  ``io_orientation``); an oblique direction's rotation is kept;
- resampling keeps that rotation, sets the column norms to the target spacing (an input spacing within
  ``AFFINE_TOL`` of the target is kept as is), sizes the grid ``round((n - 1) * s_in / s_out + 1)`` from the
  transformed corners and anchors it at the input's first corner; a transform that is the identity within
  ``AFFINE_TOL`` on an unchanged size is skipped, forward and inverse.

Affine arithmetic is float64 numpy (a few 4x4 matrices); voxels stay on their device and are sampled with
``torch.nn.functional.grid_sample`` in output slabs, so the sampling grid never holds more than
``max_grid_voxels`` points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gcinfer.io import Geometry

AFFINE_TOL = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_GRID_VOXELS = 1 << 24


@dataclass(frozen=True, eq=False)
class Frame:
    """A voxel grid: its shape in (x, y, z) index order and the 4x4 float64 index-to-RAS-mm affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass(frozen=True)
class Reorientation:
    """Axis flips then a permutation: ``flip`` lists source axes reversed, output axis k is source axis ``order[k]``."""

    flip: tuple[int, ...]
    order: tuple[int, ...]


@dataclass(frozen=True)
class SpatialPlan:
    """How one image goes from its own grid to the network's grid and back.

    ``source`` is the image as read, ``oriented`` after reorientation, ``target`` after resampling (equal to
    ``oriented`` when resampling is skipped).
    """

    source: Frame
    reorientation: Reorientation
    oriented: Frame
    target: Frame

    def to_target(self, image: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(C, *source.shape) -> (C, *target.shape) float32, on ``image``'s device."""
        oriented = reorient(image, self.reorientation)
        return resample(oriented, self.oriented, self.target, mode=mode)

    def to_source(self, data: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(C, *target.shape) -> (C, *source.shape) float32: the inverse of :meth:`to_target`."""
        oriented = resample(data, self.target, self.oriented, mode=mode)
        return unreorient(oriented, self.reorientation)


def ras_affine(geometry: Geometry) -> np.ndarray:
    """The (x, y, z)-index-to-RAS affine of an ITK image, as MONAI's ITKReader builds it (4x4 float64)."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(geometry.spacing)
    affine[:3, 3] = geometry.origin
    return LPS_TO_RAS @ affine


def source_frame(geometry: Geometry) -> Frame:
    """The frame of an image read by :func:`gcinfer.io.read_image`, in (x, y, z) index order."""
    return Frame(tuple(geometry.size), ras_affine(geometry))


def nearest_axes(affine: np.ndarray) -> np.ndarray:
    """For each voxel axis, the nearest RAS axis and its sign: (3, 2) float array, nibabel's ``io_orientation``.

    The affine's columns are normalised, its nearest orthonormal matrix is taken from an SVD, and axes are
    assigned greedily in input-axis order to the output axis of largest absolute cosine.
    """
    rzs = affine[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1.0
    left, singular, right = np.linalg.svd(rzs / zooms)
    keep = singular > singular.max() * 3 * np.finfo(np.float64).eps
    rotation = left[:, keep] @ right[keep]
    ornt = np.full((3, 2), np.nan)
    for in_axis in range(3):
        column = rotation[:, in_axis]
        if np.allclose(column, 0):
            raise ValueError(f"degenerate affine: voxel axis {in_axis} has no direction\n{affine}")
        out_axis = int(np.argmax(np.abs(column)))
        ornt[in_axis] = (out_axis, -1.0 if column[out_axis] < 0 else 1.0)
        rotation[out_axis, :] = 0
    return ornt


def plan_reorientation(frame: Frame) -> tuple[Reorientation, Frame]:
    """The flips/permutation to the nearest RAS axes, and the reoriented frame (``Orientationd(axcodes="RAS")``)."""
    ornt = nearest_axes(frame.affine)
    out_axes = ornt[:, 0].astype(int)
    flip = tuple(int(a) for a in np.flatnonzero(ornt[:, 1] < 0))
    order = tuple(int(a) for a in np.argsort(out_axes))
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1.0
    for axis in range(3):
        sign = ornt[axis, 1]
        new_to_old[axis, out_axes[axis]] = sign
        new_to_old[axis, 3] = frame.shape[axis] - 1 if sign < 0 else 0.0
    shape = tuple(frame.shape[a] for a in order)
    return Reorientation(flip, order), Frame(shape, frame.affine @ new_to_old)


def _zoomed_rotation(affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``affine``'s rotation with column norms ``spacing`` and no translation (MONAI ``zoom_affine``)."""
    rzs = affine[:3, :3]
    upper = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(upper)
    zoomed = np.eye(4)
    zoomed[:3, :3] = rotation @ np.diag(np.sign(np.diag(upper)) * np.abs(spacing))
    return zoomed


def _shape_and_offset(frame: Frame, out_affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """Output shape from the transformed corners, and the output origin (MONAI ``compute_shape_offset``)."""
    shape = np.asarray(frame.shape, dtype=np.float64)
    axes = [(0.0, n - 1.0) for n in shape]
    corners = np.asarray(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    corners = np.concatenate([corners, np.ones_like(corners[:1])])
    corners_out = np.linalg.solve(out_affine, frame.affine) @ corners
    distances = corners_out[:-1]
    out_shape = np.round(np.ptp(distances / corners_out[-1], axis=1) + 1.0)
    physical = frame.affine @ corners
    for i in range(corners.shape[1]):
        if np.allclose(np.min(distances - distances[:, i : i + 1], axis=1), 0.0, rtol=AFFINE_TOL):
            return tuple(int(n) for n in out_shape), physical[:-1, i]
    centre = frame.affine[:3, :3] @ (shape / 2.0) + frame.affine[:3, 3] - out_affine[:3, :3] @ (out_shape / 2.0)
    return tuple(int(n) for n in out_shape), centre


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (column norms) of a 4x4 affine."""
    return np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))


def plan_resampling(frame: Frame, spacing: tuple[float, float, float]) -> Frame:
    """The frame ``Spacingd(pixdim=spacing)`` resamples ``frame`` to; ``frame`` itself when that is a no-op."""
    current = spacing_of(frame.affine)
    wanted = np.asarray(spacing, dtype=np.float64)
    wanted = np.where(np.abs(current - wanted) <= AFFINE_TOL, current, wanted)
    affine = _zoomed_rotation(frame.affine, wanted)
    shape, offset = _shape_and_offset(frame, affine)
    affine[:3, 3] = offset
    target = Frame(shape, affine)
    return frame if _is_identity(frame, target) else target


def _is_identity(source: Frame, target: Frame) -> bool:
    """MONAI's skip rule: same size, and same affine or an identity voxel mapping, within ``AFFINE_TOL``."""
    if tuple(source.shape) != tuple(target.shape):
        return False
    xform = np.linalg.solve(source.affine, target.affine)
    return np.allclose(source.affine, target.affine, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)


def plan_spatial(geometry: Geometry, spacing: tuple[float, float, float]) -> SpatialPlan:
    """Reorientation to RAS then resampling to ``spacing`` (mm along the reoriented x, y, z) for one image."""
    source = source_frame(geometry)
    reorientation, oriented = plan_reorientation(source)
    return SpatialPlan(source, reorientation, oriented, plan_resampling(oriented, spacing))


def reorient(image: torch.Tensor, reorientation: Reorientation) -> torch.Tensor:
    """(C, *source) -> (C, *oriented): flip then permute the spatial axes (a view; no copy)."""
    flipped = image.flip([a + 1 for a in reorientation.flip]) if reorientation.flip else image
    return flipped.permute(0, *(a + 1 for a in reorientation.order))


def unreorient(image: torch.Tensor, reorientation: Reorientation) -> torch.Tensor:
    """(C, *oriented) -> (C, *source): the inverse of :func:`reorient`."""
    inverse = np.argsort(reorientation.order)
    permuted = image.permute(0, *(int(a) + 1 for a in inverse))
    return permuted.flip([a + 1 for a in reorientation.flip]) if reorientation.flip else permuted


def _normalized_mapping(source: Frame, target: Frame) -> np.ndarray:
    """3x4 map from target voxel indices to ``grid_sample`` coordinates of ``source`` (align_corners=False).

    Rows are in ``grid_sample``'s (W, H, D) = (z, y, x) order: index i of an axis of n voxels sits at
    ``(2 i + 1) / n - 1``.
    """
    xform = np.linalg.solve(source.affine, target.affine)
    n = np.asarray(source.shape, dtype=np.float64)
    normalize = np.eye(4)
    normalize[:3, :3] = np.diag(2.0 / n)
    normalize[:3, 3] = 1.0 / n - 1.0
    return np.ascontiguousarray((normalize @ xform)[2::-1])


def resample(
    image: torch.Tensor,
    source: Frame,
    target: Frame,
    mode: str = "bilinear",
    max_grid_voxels: int = MAX_GRID_VOXELS,
) -> torch.Tensor:
    """Resample (C, *source.shape) onto ``target``: (C, *target.shape) float32 on ``image``'s device.

    Trilinear (``mode="bilinear"``) or nearest, border padding, voxel centres as sample points; the output is
    filled in slabs along its first axis. When the mapping is the identity (``target is source`` or MONAI's
    skip rule), ``image`` itself is returned as contiguous float32 (possibly sharing its memory).
    """
    image = image.float()
    if source is target or _is_identity(source, target):
        return image.contiguous()
    mapping = torch.as_tensor(_normalized_mapping(source, target), dtype=torch.float32, device=image.device)
    shape = target.shape
    out = torch.empty((image.shape[0], *shape), dtype=torch.float32, device=image.device)
    slab = max(1, max_grid_voxels // (shape[1] * shape[2]))
    j = torch.arange(shape[1], dtype=torch.float32, device=image.device).view(1, -1, 1, 1)
    k = torch.arange(shape[2], dtype=torch.float32, device=image.device).view(1, 1, -1, 1)
    source_batch = image.unsqueeze(0).contiguous()
    for start in range(0, shape[0], slab):
        i = torch.arange(start, min(start + slab, shape[0]), dtype=torch.float32, device=image.device)
        grid = i.view(-1, 1, 1, 1) * mapping[:, 0] + j * mapping[:, 1] + k * mapping[:, 2] + mapping[:, 3]
        sampled = F.grid_sample(source_batch, grid.unsqueeze(0), mode=mode, padding_mode="border", align_corners=False)
        out[:, start : start + len(i)] = sampled[0]
    return out
