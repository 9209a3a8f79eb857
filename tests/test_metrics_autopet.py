"""AutoPET II challenge scores: hand-made masks with known answers, the official per-component loop, the tool."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from gcinfer import cli
from gcinfer.io import Geometry, write_label_map
from gcinfer_dev.metrics import lesion_scores, missed_component_voxels, summarize_scores

SPACING = (2.0, 2.0, 3.0)  # 12 mm^3 = 0.012 ml per voxel
VOXEL_ML = 0.012


def _mask(shape=(12, 14, 16)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def _official_missed_voxels(mask: np.ndarray, other: np.ndarray) -> int:
    """The organisers' loop (val_script.py false_pos_pix / false_neg_pix): one np.isin per component."""
    import cc3d

    components = cc3d.connected_components(mask, connectivity=18)
    missed = 0
    for index in range(1, components.max() + 1):
        component = np.isin(components, index)
        if (component * other).sum() == 0:
            missed += component.sum()
    return int(missed)


def test_known_answer_hit_miss_and_false_positive():
    truth, prediction = _mask(), _mask()
    truth[2:5, 2:5, 2:5] = 1  # lesion A: 27 voxels, found
    truth[8:10, 8:10, 8:10] = 1  # lesion B: 8 voxels, missed
    prediction[3:6, 2:5, 2:5] = 1  # 27 voxels, 18 of them on lesion A
    prediction[9:11, 1:3, 12:15] = 1  # 12 voxels touching nothing
    scores = lesion_scores(prediction, truth, SPACING)
    assert scores.dice == pytest.approx(2 * 18 / (35 + 39))
    assert scores.false_positive_ml == pytest.approx(12 * VOXEL_ML)
    assert scores.false_negative_ml == pytest.approx(8 * VOXEL_ML)
    assert scores.truth_ml == pytest.approx(35 * VOXEL_ML)
    assert scores.predicted_ml == pytest.approx(39 * VOXEL_ML)


def test_a_component_touching_the_truth_is_not_false_positive_even_where_it_leaves_it():
    truth, prediction = _mask(), _mask()
    truth[5, 5, 5] = 1
    prediction[5, 5, 5:12] = 1  # one component, 1 voxel on the lesion, 6 beside it
    assert lesion_scores(prediction, truth, SPACING).false_positive_ml == 0.0
    assert lesion_scores(prediction, truth, SPACING).false_negative_ml == 0.0


@pytest.mark.parametrize(
    "offset, connected",
    [((0, 0, 1), True), ((0, 1, 1), True), ((1, 1, 0), True), ((1, 1, 1), False)],
    ids=["face", "edge-yz", "edge-zy", "corner"],
)
def test_18_connectivity_joins_faces_and_edges_not_corners(offset, connected):
    truth, prediction = _mask(), _mask()
    truth[4, 4, 4] = 1
    prediction[4, 4, 4] = 1
    prediction[4 + offset[0], 4 + offset[1], 4 + offset[2]] = 1
    expected = 0 if connected else 1
    assert missed_component_voxels(prediction, truth) == expected
    assert lesion_scores(prediction, truth, SPACING).false_positive_ml == pytest.approx(expected * VOXEL_ML)


def test_empty_cases():
    empty, blob = _mask(), _mask()
    blob[1:3, 1:3, 1:3] = 1
    both_empty = lesion_scores(empty, empty, SPACING)
    assert math.isnan(both_empty.dice) and both_empty.false_positive_ml == 0 and both_empty.false_negative_ml == 0
    negative_study = lesion_scores(blob, empty, SPACING)
    assert negative_study.dice == 0.0 and negative_study.false_positive_ml == pytest.approx(8 * VOXEL_ML)
    all_missed = lesion_scores(empty, blob, SPACING)
    assert all_missed.dice == 0.0 and all_missed.false_negative_ml == pytest.approx(8 * VOXEL_ML)


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_official_per_component_loop(seed):
    rng = np.random.default_rng(seed)
    truth = (rng.random((20, 22, 24)) > 0.93).astype(np.uint8)
    prediction = (rng.random((20, 22, 24)) > 0.93).astype(np.uint8)
    scores = lesion_scores(prediction, truth, SPACING)
    assert scores.false_positive_ml == pytest.approx(_official_missed_voxels(prediction, truth) * VOXEL_ML)
    assert scores.false_negative_ml == pytest.approx(_official_missed_voxels(truth, prediction) * VOXEL_ML)
    assert 0 < scores.false_positive_ml < scores.predicted_ml


def test_summary_averages_dice_and_false_negatives_over_studies_with_lesions_only():
    truth, prediction, empty = _mask(), _mask(), _mask()
    truth[2:4, 2:4, 2:4] = 1
    prediction[2:4, 2:4, 2:3] = 1
    fp_only = empty.copy()
    fp_only[8, 8, 8] = 1
    summary = summarize_scores(
        {"positive": lesion_scores(prediction, truth, SPACING), "negative": lesion_scores(fp_only, empty, SPACING)}
    )
    assert summary["studies"] == 2 and summary["studies_with_lesions"] == 1
    assert summary["dice"] == pytest.approx(2 * 4 / 12)
    assert summary["false_positive_volume_ml"] == pytest.approx(VOXEL_ML / 2)
    assert summary["false_negative_volume_ml"] == 0.0


def _write(folder, name, mask, spacing=SPACING):
    geometry = Geometry(tuple(mask.shape[::-1]), spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return write_label_map(folder / f"{name}.mha", mask, geometry)


def test_score_tool_writes_per_study_csv_and_prints_summary(tmp_path, capsys):
    truth, prediction = _mask(), _mask()
    truth[2:5, 2:5, 2:5] = 1
    prediction[2:5, 2:5, 2:4] = 1
    prediction[9, 9, 9] = 1
    _write(tmp_path / "labels", "case_a", truth)
    _write(tmp_path / "pred", "case_a", prediction)
    _write(tmp_path / "labels", "case_b", _mask())
    _write(tmp_path / "pred", "case_b", _mask())
    table = tmp_path / "scores.csv"
    argv = ["score-autopet", "--predictions", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels")]
    assert cli.main([*argv, "--csv", str(table)]) == 0
    rows = {row["case"]: row for row in csv.DictReader(table.open())}
    assert set(rows) == {"case_a", "case_b"}
    assert float(rows["case_a"]["dice"]) == pytest.approx(2 * 18 / (27 + 19))
    assert float(rows["case_a"]["false_positive_volume_ml"]) == pytest.approx(VOXEL_ML)
    assert math.isnan(float(rows["case_b"]["dice"]))
    assert "over 2 studies (1 with lesions)" in capsys.readouterr().out


def test_score_tool_names_missing_predictions_and_grid_mismatch(tmp_path, caplog):
    _write(tmp_path / "labels", "case_a", _mask())
    _write(tmp_path / "labels", "case_b", _mask())
    _write(tmp_path / "pred", "case_a", _mask((12, 14, 15)))
    argv = ["score-autopet", "--predictions", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels")]
    assert cli.main([*argv, "--csv", str(tmp_path / "s.csv")]) == 1
    assert f"{tmp_path / 'pred'}: no prediction for case(s) case_b" in caplog.text
    _write(tmp_path / "pred", "case_b", _mask())
    caplog.clear()
    assert cli.main([*argv, "--csv", str(tmp_path / "s.csv")]) == 1
    assert f"{tmp_path / 'pred' / 'case_a.mha'}: size (15, 14, 12) != (16, 14, 12)" in caplog.text
    assert not (tmp_path / "s.csv").exists()
