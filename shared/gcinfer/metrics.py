"""Segmentation metrics: Dice per label (demo, tests) and the AutoPET II challenge scores."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; 1.0 when both are empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def dice_per_label(prediction: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice of every non-zero label present in ``truth`` or ``prediction``."""
    labels = sorted(set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist()) - {0})
    return {int(k): dice(prediction == k, truth == k) for k in labels if k != 0}
