"""Organ-wise post-processing of the AMOS 2022 winning nnU-Net submission, on numpy (CPU) or cupy (GPU) label maps.

It runs on the final ensembled (z, y, x) label map at the original image resolution. Every organ of the
table has one rule; components are 26-connected and volumes are ``voxels x prod(spacing)`` in mm^3:

- ``none``: unchanged;
- ``largest_component_only``: keep only the organ's largest component;
- ``drop_small_components``: remove every component with volume ``<= min_volume_mm3[organ] x rate``, even the largest;
- ``drop_small_components_keep_largest``: the same, but the largest component is always kept.

Before the rules, when any kidney or adrenal label (2, 3, 11, 12) has a rule other than ``none``, left/right
confusion is fixed ONCE on the whole map (:func:`fix_left_right`); every voxel then follows the rule of its
fixed label. Upstream (nnU-Net v1 ``documentation/amos2022``) instead fixes the map per rule group and sums the
group results, which yields label 23 (11 + 12) or drops voxels when a relabelled component changes group; the
results are equal wherever upstream's are valid. Ties between equally large components keep the one the
labeller numbers first: the first in C (raster) order with cc3d (as upstream) and scipy.ndimage.

The code is written once against ``scipy.ndimage``'s API: :func:`backend_for` picks numpy + cc3d (same
components and numbering as ``scipy.ndimage.label``, about 4x faster) for numpy arrays and cupy +
``cupyx.scipy.ndimage`` for cupy arrays. Each organ is labelled once, inside its bounding box; component sizes
and centroids come from ``bincount``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import cc3d
import numpy as np

LEFT_RIGHT_PAIRS = ((2, 3), (11, 12))
"""(right, left) labels of the kidneys and of the adrenal glands."""
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

Array = Any
"""numpy.ndarray or cupy.ndarray."""


@dataclass(frozen=True)
class Backend:
    """Array module and 26-connected labelling of one device.

    Attributes:
        xp: ``numpy`` or ``cupy``.
        label: ``label(mask) -> (components, count)``: ``mask`` a 3D bool array of ``xp``; ``components`` an
            integer array of the same shape, 0 = background, 1..count the components (cc3d and scipy.ndimage
            number them in C order of their first voxel, which decides ties between largest components).
        to_numpy: copies an ``xp`` array to a numpy array.
    """

    xp: ModuleType
    label: Callable[[Array], tuple[Array, int]]
    to_numpy: Callable[[Array], np.ndarray]


def ndimage_backend(xp: ModuleType, ndimage: ModuleType) -> Backend:
    """Backend labelling with ``ndimage.label`` (``scipy.ndimage`` or ``cupyx.scipy.ndimage``), 3x3x3 structure."""

    def label(mask: Array) -> tuple[Array, int]:
        components, count = ndimage.label(xp.ascontiguousarray(mask), structure=STRUCTURE_26)
        return components, int(count)

    return Backend(xp, label, getattr(xp, "asnumpy", np.asarray))


def _label_cc3d(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected labelling with cc3d: identical components and numbering to scipy.ndimage.label, faster."""
    components, count = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
    return components, int(count)


def backend_for(array: Array) -> Backend:
    """cupy + ``cupyx.scipy.ndimage`` for a cupy array (imported only then), else numpy + cc3d."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy
        import cupyx.scipy.ndimage

        return ndimage_backend(cupy, cupyx.scipy.ndimage)
    return Backend(np, _label_cc3d, np.asarray)


def _keep_largest(volumes: np.ndarray, threshold_mm3: float | None) -> np.ndarray:
    keep = np.zeros(volumes.shape, dtype=bool)
    keep[np.argmax(volumes)] = True
    return keep


def _keep_above(volumes: np.ndarray, threshold_mm3: float | None) -> np.ndarray:
    return volumes > threshold_mm3


def _keep_above_or_largest(volumes: np.ndarray, threshold_mm3: float | None) -> np.ndarray:
    return _keep_above(volumes, threshold_mm3) | _keep_largest(volumes, threshold_mm3)


RULES: dict[str, Callable[[np.ndarray, float | None], np.ndarray] | None] = {
    "none": None,
    "largest_component_only": _keep_largest,
    "drop_small_components": _keep_above,
    "drop_small_components_keep_largest": _keep_above_or_largest,
}
"""Rule name -> ``keep(volumes_mm3 (count,) float64, threshold_mm3) -> (count,) bool`` (None: leave the organ)."""
THRESHOLD_RULES = frozenset({"drop_small_components", "drop_small_components_keep_largest"})


@dataclass(frozen=True)
class OrganRule:
    """One organ's rule; ``threshold_mm3 = min_volume_mm3[organ] x rate`` for the threshold rules, else None."""

    rule: str
    threshold_mm3: float | None = None


def parse_table(table: Mapping) -> dict[int, OrganRule]:
    """Validate a container config's ``"postprocessing"`` entry and return ``{organ label: OrganRule}``.

    ``table = {"min_volume_mm3": {"1": 14514.5, ...}, "organs": {"1": {"rule": ..., "rate": ...}, ...}}``;
    ``rate`` (in (0, 1]) and ``min_volume_mm3`` are required by, and only allowed for, the threshold rules.
    Raises ValueError naming the organ and the problem.
    """
    if not isinstance(table, Mapping) or not isinstance(table.get("organs"), Mapping):
        raise ValueError("post-processing table: expected a mapping with an 'organs' mapping")
    min_volumes = table.get("min_volume_mm3", {})
    if not isinstance(min_volumes, Mapping):
        raise ValueError("post-processing table: 'min_volume_mm3' must map organ labels to volumes in mm^3")
    return {_organ_label(key): _organ_rule(key, entry, min_volumes) for key, entry in table["organs"].items()}


def _organ_label(key: Any) -> int:
    try:
        organ = int(key)
    except (TypeError, ValueError):
        organ = 0
    if organ < 1 or str(organ) != str(key):
        raise ValueError(f"post-processing organ {key!r}: not a foreground label (an integer >= 1)")
    return organ


def _organ_rule(key: Any, entry: Any, min_volumes: Mapping) -> OrganRule:
    if not isinstance(entry, Mapping) or "rule" not in entry:
        raise ValueError(f"post-processing organ {key}: missing 'rule'")
    rule = entry["rule"]
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"post-processing organ {key}: unknown rule {rule!r} (expected one of {', '.join(RULES)})")
    allowed = {"rule", "rate"} if rule in THRESHOLD_RULES else {"rule"}
    if set(entry) - allowed:
        raise ValueError(f"post-processing organ {key}: rule {rule!r} takes no {sorted(set(entry) - allowed)}")
    if rule not in THRESHOLD_RULES:
        return OrganRule(rule)
    if "rate" not in entry:
        raise ValueError(f"post-processing organ {key}: rule {rule!r} needs a 'rate'")
    rate = entry["rate"]
    if not _is_number(rate) or not 0.0 < rate <= 1.0:
        raise ValueError(f"post-processing organ {key}: rate {rate!r} is not a number in (0, 1]")
    min_volume = min_volumes.get(str(key))
    if min_volume is None:
        raise ValueError(f"post-processing organ {key}: rule {rule!r} needs min_volume_mm3[{str(key)!r}]")
    if not _is_number(min_volume) or not min_volume > 0.0 or not math.isfinite(min_volume):
        raise ValueError(f"post-processing organ {key}: min_volume_mm3 {min_volume!r} is not a positive number")
    return OrganRule(rule, min_volume * rate)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounding_box(mask: Array, xp: ModuleType) -> tuple[slice, ...] | None:
    """Smallest box (one slice per axis) holding every True voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(mask.ndim):
        hits = xp.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


@dataclass(frozen=True)
class _Components:
    """26-connected components of a mask, inside the mask's bounding box ``box``.

    ``inside`` is ``mask[box]``; ``ids`` (n,) the component (1..count) of each True voxel of ``inside`` in C order;
    ``voxels`` (count + 1,) int64 numpy voxel counts (index 0 unused).
    """

    box: tuple[slice, ...]
    inside: Array
    ids: Array
    voxels: np.ndarray


def _components(mask: Array, backend: Backend) -> _Components | None:
    """Label ``mask`` (3D bool) within its bounding box; None when it is empty. Touches only foreground voxels
    after labelling (a full-size ``bincount`` of the component map costs seconds on a 512x512x600 map)."""
    xp = backend.xp
    box = _bounding_box(mask, xp)
    if box is None:
        return None
    inside = mask[box]
    components, count = backend.label(inside)
    ids = components[inside]
    return _Components(box, inside, ids, backend.to_numpy(xp.bincount(ids, minlength=count + 1)))


def fix_left_right(labels: Array, backend: Backend) -> None:
    """Fix kidney (2 right, 3 left) and adrenal (11 right, 12 left) left/right confusion in place.

    For each pair separately, every 26-connected component of the pair's union becomes the right label when the
    mean index of its voxels along the last axis (x of a (z, y, x) map) is below ``labels.shape[-1] / 2``, else
    the left label. The comparison ``2 * sum(x) < shape[-1] * voxels`` is exact (integer sums below 2**53).
    """
    xp = backend.xp
    for right, left in LEFT_RIGHT_PAIRS:
        found = _components((labels == right) | (labels == left), backend)
        if found is None:
            continue
        x_range = found.box[-1]
        x = xp.broadcast_to(xp.arange(x_range.start, x_range.stop), found.inside.shape)[found.inside]
        x_sums = backend.to_numpy(xp.bincount(found.ids, weights=x, minlength=found.voxels.size))
        on_right = 2 * x_sums < labels.shape[-1] * found.voxels
        new_labels = xp.asarray(np.where(on_right, right, left).astype(labels.dtype))
        labels[found.box][found.inside] = new_labels[found.ids]


def _apply_rule(labels: Array, organ: int, rule: OrganRule, voxel_volume: float, backend: Backend) -> None:
    """Set to 0, in place, the components of ``organ`` that ``rule`` does not keep."""
    found = _components(labels == organ, backend)
    if found is None:
        return
    keep = RULES[rule.rule](found.voxels[1:] * voxel_volume, rule.threshold_mm3)
    if keep.all():
        return
    kept_label = np.concatenate(([0], np.where(keep, organ, 0))).astype(labels.dtype)
    labels[found.box][found.inside] = backend.xp.asarray(kept_label)[found.ids]


def postprocess_organs(labels: Array, spacing_zyx: Sequence[float], table: Mapping) -> Array:
    """Apply the AMOS 2022 organ-wise post-processing (module docstring) to a label map.

    Args:
        labels: (z, y, x) integer label map, numpy or cupy, any integer dtype.
        spacing_zyx: voxel spacing in mm, (z, y, x) order.
        table: the container config's ``"postprocessing"`` entry (:func:`parse_table`); organs missing from its
            ``"organs"`` keep their (left/right fixed) label.

    Returns:
        A new label map of the same array type, shape and dtype.

    Raises:
        ValueError: invalid table, label map or spacing.
    """
    rules = parse_table(table)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a 3D (z, y, x) integer label map, got shape {labels.shape} {labels.dtype}")
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_zyx: expected 3 positive finite values in mm, got {tuple(spacing_zyx)}")
    backend = backend_for(labels)
    result = labels.copy()
    left_right = {label for pair in LEFT_RIGHT_PAIRS for label in pair}
    if any(organ in left_right and rule.rule != "none" for organ, rule in rules.items()):
        fix_left_right(result, backend)
    voxel_volume = float(np.prod(spacing))
    for organ, rule in rules.items():
        if RULES[rule.rule] is not None:
            _apply_rule(result, organ, rule, voxel_volume, backend)
    return result
