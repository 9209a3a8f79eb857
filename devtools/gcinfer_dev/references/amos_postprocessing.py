"""The AMOS 2022 winning submission's organ-wise post-processing, transcribed for the reference (shares no code with
:mod:`gcinfer.pipelines.amos.postprocessing`).

Upstream (nnU-Net v1 ``documentation/amos2022/run_inference_task{1,2}.py``) groups the organs by post-processing
(same rule and rate = one group), runs each group on the whole merged label map and takes, for every organ, its
voxels from its own group's result. Rules, on 26-connected components (cc3d, as upstream) with volumes in
``voxels x prod(spacing)`` mm^3:

- ``none`` (upstream's ``raw_metric.json``): unchanged;
- ``largest_component_only`` (``3_final_pipeline.json``): keep the largest component (the first one in cc3d's
  numbering on a tie, as upstream's ``np.argmax``);
- ``drop_small_components`` (``1_final_pipeline_rateR``): keep the components of volume ``> min_volume_mm3 x R``;
- ``drop_small_components_keep_largest`` (``2_final_pipeline_rateR``): the same, and the largest component always.

A group with a rule other than ``none`` that holds a kidney or adrenal label first fixes left/right confusion:
for the kidneys (2 right, 3 left) and the adrenals (11 right, 12 left) separately, each component of the pair's
union becomes "right" when the mean index of its voxels along the last axis (x) is below half that axis's size.

Left out on purpose, as documented with the facts this table comes from: upstream fixes left/right only in the
groups that hold 2, 3, 11 or 12 and then *sums* the groups' maps, so a component relabelled into another group
(task 1: 11 is ``none``, 12 is not) is counted twice (11 + 12 = label 23) or by no group (0). Here the fix is made
once on the whole map and each voxel takes its result from the group of its fixed label; the results equal
upstream's wherever upstream's are valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np

MIN_VOLUME_MM3 = {
    1: 14514.522334710227,
    2: 32323.283026438632,
    3: 10084.375,
    4: 1242.140625,
    5: 418.857421875,
    6: 653406.1819358291,
    7: 30.576200410175325,
    8: 26481.439208984375,
    9: 31401.75782125006,
    10: 15213.30078125,
    11: 1076.1044686954742,
    12: 663.6894633476112,
    13: 19243.98566040845,
    14: 14665.392605173933,
    15: 7937.479259275528,
}
"""Upstream's ``min_gt_volume``: the smallest ground-truth volume (mm^3) of each organ in the training set."""

_NONE, _LARGEST = ("none", None), ("largest_component_only", None)
_DROP, _DROP_KEEP = "drop_small_components", "drop_small_components_keep_largest"
ORGAN_RULES: dict[str, dict[int, tuple[str, float | None]]] = {
    "task1": {
        1: (_DROP, 0.75),
        2: (_DROP, 0.1),
        3: _LARGEST,
        4: (_DROP, 0.25),
        5: (_DROP, 0.25),
        6: _LARGEST,
        7: (_DROP, 0.75),
        8: (_DROP, 0.75),
        9: (_DROP, 0.1),
        10: _NONE,
        11: _NONE,
        12: _LARGEST,
        13: _NONE,
        14: (_DROP, 0.1),
        15: _NONE,
    },
    "task2": {
        1: (_DROP, 0.1),
        2: _NONE,
        3: _NONE,
        4: (_DROP, 0.5),
        5: (_DROP, 0.9),
        6: _LARGEST,
        7: (_DROP, 0.25),
        8: (_DROP_KEEP, 0.9),
        9: (_DROP, 0.1),
        10: _NONE,
        11: _NONE,
        12: _NONE,
        13: (_DROP, 0.1),
        14: (_DROP, 0.5),
        15: (_DROP, 0.25),
    },
}
"""Organ label -> (rule, rate) of each task's submission (upstream's ``final_pp_for_organs``)."""

LEFT_RIGHT_PAIRS = ((2, 3), (11, 12))


def fix_left_right(labels: np.ndarray) -> np.ndarray:
    """Upstream's ``kidney_adrenal_left_right_confusion`` on a (z, y, x) map: a relabelled copy."""
    fixed = labels.copy()
    middle_x = labels.shape[2] / 2
    for right, left in LEFT_RIGHT_PAIRS:
        components = cc3d.connected_components((labels == right) | (labels == left), connectivity=26)
        for component in range(1, int(components.max()) + 1):
            voxels = components == component
            fixed[voxels] = right if np.argwhere(voxels)[:, 2].mean() < middle_x else left
    return fixed


def kept_components(mask: np.ndarray, organ: int, rule: str, rate: float | None, voxel_mm3: float) -> np.ndarray:
    """The voxels of ``mask`` (one organ, 3D bool) that ``rule`` keeps (3D bool)."""
    if rule == "none":
        return mask
    components = cc3d.connected_components(mask, connectivity=26)
    sizes = np.bincount(components.ravel())[1:]
    if sizes.size == 0:
        return mask
    largest = np.arange(sizes.size) == int(np.argmax(sizes))
    big = sizes * voxel_mm3 > MIN_VOLUME_MM3[organ] * rate if rate is not None else np.zeros(sizes.size, bool)
    keep = {"largest_component_only": largest, _DROP: big, _DROP_KEEP: big | largest}[rule]
    return np.isin(components, np.flatnonzero(keep) + 1)


def postprocess(labels: np.ndarray, spacing_zyx: Sequence[float], task: str) -> np.ndarray:
    """The submission's post-processing of ``task`` (``"task1"`` or ``"task2"``) on a (z, y, x) label map.

    Returns a new map of the same shape and dtype; labels outside 1..15 become 0.
    """
    rules = ORGAN_RULES[task]
    left_right = {label for pair in LEFT_RIGHT_PAIRS for label in pair}
    if any(rule != "none" and organ in left_right for organ, (rule, _) in rules.items()):
        labels = fix_left_right(labels)
    voxel_mm3 = float(np.prod(spacing_zyx))
    result = np.zeros_like(labels)
    for organ, (rule, rate) in rules.items():  # a group's result restricted to one of its organs = the organ's rule
        result[kept_components(labels == organ, organ, rule, rate, voxel_mm3)] = organ
    return result
