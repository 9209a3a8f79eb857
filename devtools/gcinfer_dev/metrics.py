"""Segmentation metrics: Dice per label (demo, tests) and the AutoPET II challenge scores."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np

from gcinfer.errors import InputError
from gcinfer.io import atomic_path, case_name, image_suffix, read_image


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; 1.0 when both are empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def dice_per_label(prediction: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice of every non-zero label present in ``truth`` or ``prediction``."""
    labels = sorted(set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist()) - {0})
    return {int(k): dice(prediction == k, truth == k) for k in labels if k != 0}


EMPTY_CASE = "no lesion, none predicted"
"""How a case with no foreground in either the truth or the prediction is reported: it has no Dice."""


def case_dice(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean Dice over the labels present in either map; None when both are all background (:data:`EMPTY_CASE`),
    which callers keep out of their mean rather than count as a perfect 1.0."""
    per_label = dice_per_label(prediction, truth)
    return float(np.mean(list(per_label.values()))) if per_label else None


def mean_dice(scores: Sequence[float | None]) -> float | None:
    """Mean of the cases that have a Dice (:func:`case_dice`); None when none has."""
    scored = [s for s in scores if s is not None]
    return float(np.mean(scored)) if scored else None


def format_dice(score: float | None) -> str:
    return EMPTY_CASE if score is None else f"{score:.3f}"


# --- AutoPET II challenge scores ------------------------------------------------------------------------------------
# As the organisers' evaluation (autoPET val_script.py): foreground Dice, and the false-positive / false-negative
# volumes of whole 18-connected components, in ml.

AUTOPET_CONNECTIVITY = 18
SCORE_COLUMNS = (
    "case",
    "dice",
    "false_positive_volume_ml",
    "false_negative_volume_ml",
    "truth_volume_ml",
    "predicted_volume_ml",
)


@dataclass(frozen=True)
class LesionScores:
    """AutoPET II scores of one study.

    Attributes:
        dice: ``2 |P & T| / (|P| + |T|)``; NaN when both masks are empty (the challenge averages Dice over studies
            with lesions only), 0.0 when only one is.
        false_positive_ml: volume of the predicted components that share no voxel with the ground truth.
        false_negative_ml: volume of the ground-truth components that share no voxel with the prediction.
        truth_ml, predicted_ml: total volumes of the two masks.
    """

    dice: float
    false_positive_ml: float
    false_negative_ml: float
    truth_ml: float
    predicted_ml: float


def missed_component_voxels(mask: np.ndarray, other: np.ndarray) -> int:
    """Voxels of the 18-connected components of ``mask`` that share no voxel with ``other`` (same shape, 3D)."""
    mask, other = mask.astype(bool), other.astype(bool)
    components = cc3d.connected_components(mask.astype(np.uint8), connectivity=AUTOPET_CONNECTIVITY)
    sizes = np.bincount(components.ravel())
    missed = np.ones(len(sizes), dtype=bool)
    missed[0] = False
    missed[np.unique(components[mask & other])] = False
    return int(sizes[missed].sum())


def lesion_scores(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> LesionScores:
    """The AutoPET II scores of a binary prediction against the ground truth, voxels of ``spacing`` mm (any order)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != ground truth shape {truth.shape}")
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    total = int(prediction.sum()) + int(truth.sum())
    overlap = int(np.logical_and(prediction, truth).sum())
    return LesionScores(
        dice=float("nan") if total == 0 else 2.0 * overlap / total,
        false_positive_ml=missed_component_voxels(prediction, truth) * voxel_ml,
        false_negative_ml=missed_component_voxels(truth, prediction) * voxel_ml,
        truth_ml=int(truth.sum()) * voxel_ml,
        predicted_ml=int(prediction.sum()) * voxel_ml,
    )


def summarize_scores(scores: dict[str, LesionScores]) -> dict[str, float]:
    """Challenge aggregates: mean Dice and false-negative volume over studies with lesions, mean false-positive
    volume over all studies (NaN where no study counts)."""
    positive = [s for s in scores.values() if s.truth_ml > 0]
    return {
        "studies": float(len(scores)),
        "studies_with_lesions": float(len(positive)),
        "dice": _mean([s.dice for s in positive]),
        "false_positive_volume_ml": _mean([s.false_positive_ml for s in scores.values()]),
        "false_negative_volume_ml": _mean([s.false_negative_ml for s in positive]),
    }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _paired_images(predictions: Path, labels: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, label) for every label image; the prediction of the same case name must exist."""
    found = {}
    for folder in (predictions, labels):
        if not folder.is_dir():
            raise InputError(f"{folder}: folder not found")
        found[folder] = {case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and image_suffix(p)}
    if not found[labels]:
        raise InputError(f"{labels}: no ground-truth image")
    missing = sorted(set(found[labels]) - set(found[predictions]))
    if missing:
        raise InputError(f"{predictions}: no prediction for case(s) {', '.join(missing)}")
    return [(name, found[predictions][name], path) for name, path in found[labels].items()]


def score_study(prediction_path: Path, label_path: Path) -> LesionScores:
    """Read one prediction and its ground truth (same grid) and score them with the label's spacing."""
    prediction, prediction_geometry = read_image(prediction_path)
    truth, geometry = read_image(label_path)
    if prediction.shape != truth.shape:
        raise InputError(f"{prediction_path}: size {prediction_geometry.size} != {geometry.size} of {label_path}")
    if not np.allclose(prediction_geometry.spacing, geometry.spacing, rtol=1e-4):
        spacing = prediction_geometry.spacing
        raise InputError(f"{prediction_path}: spacing {spacing} != {geometry.spacing} of {label_path}")
    return lesion_scores(prediction, truth, geometry.spacing)


def write_scores_csv(path: Path, scores: dict[str, LesionScores]) -> Path:
    """One row per study (columns :data:`SCORE_COLUMNS`), written atomically."""
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(SCORE_COLUMNS)
        for name, s in scores.items():
            writer.writerow([name, s.dice, s.false_positive_ml, s.false_negative_ml, s.truth_ml, s.predicted_ml])
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gcinfer score-autopet``: AutoPET II scores of a prediction folder against a ground-truth folder."""
    parser.add_argument("--predictions", type=Path, required=True, help="folder of predicted masks (<case>.mha ...)")
    parser.add_argument("--labels", type=Path, required=True, help="folder of ground-truth masks, same case names")
    parser.add_argument("--csv", type=Path, default=Path("metrics.csv"), help="per-study scores (default: metrics.csv)")


def run(args: argparse.Namespace) -> int:
    """Score every study, write the CSV, print the summary; 0 on success."""
    pairs = _paired_images(args.predictions, args.labels)
    scores = {name: score_study(prediction, label) for name, prediction, label in pairs}
    write_scores_csv(args.csv, scores)
    for name, s in scores.items():
        print(
            f"{name}: Dice {s.dice:.4f}  FP volume {s.false_positive_ml:.3f} ml  FN volume {s.false_negative_ml:.3f} ml"
        )
    summary = summarize_scores(scores)
    print(
        f"AutoPET II over {int(summary['studies'])} studies ({int(summary['studies_with_lesions'])} with lesions): "
        f"Dice {summary['dice']:.4f}  FP volume {summary['false_positive_volume_ml']:.3f} ml  "
        f"FN volume {summary['false_negative_volume_ml']:.3f} ml  (per study: {args.csv})"
    )
    return 0
