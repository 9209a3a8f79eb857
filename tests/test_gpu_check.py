"""``make gpu-check`` (benchmarks/gpu_check.py) where it can run here: the skip without a CUDA device, and its CPU
code paths (the fixture tiling it compares, the comparisons) so that it runs unattended where a GPU is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import gpu_check  # noqa: E402


def test_without_cuda_the_check_is_skipped_with_a_clear_message() -> None:
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == gpu_check.SKIP_MESSAGE


def test_compare_reports_difference_and_argmax_agreement() -> None:
    reference = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    other = torch.tensor([[0.4, 0.2], [0.6, 0.8]])
    assert gpu_check.compare(reference, other) == "max |diff| 5.00e-01, identical argmax 50.000 %"


def test_tiling_path_runs_on_the_cpu(fixtures_dir: Path) -> None:
    """The fixture input and the tiled prediction the GPU check compares, on the CPU (same call as on CUDA)."""
    image, configuration = gpu_check.amos_input(fixtures_dir)
    probabilities = gpu_check.tiled(image, configuration, torch.device("cpu"), None, mirror_axes=())
    assert probabilities.shape == (configuration.num_classes, *image.shape[1:])
    assert probabilities.sum(0) == pytest.approx(1.0, abs=1e-4)


def test_pipeline_outputs_are_compared_voxel_by_voxel(tmp_path: Path) -> None:
    import numpy as np

    from gcinfer.io import Geometry, write_label_map

    geometry = Geometry((4, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros((2, 3, 4), np.uint8)
    for side, value in (("a", 1), ("b", 2)):
        (tmp_path / side).mkdir()
        changed = labels.copy()
        changed[0, 0, :value] = 1
        write_label_map(tmp_path / side / "case.mha", changed, geometry)
    assert gpu_check.identical_share(tmp_path / "a", tmp_path / "b") == pytest.approx(23 / 24)


def test_the_overlap_check_runs_amos_with_the_overlap_off_and_on(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from gcinfer.io import Geometry, write_label_map

    geometry = Geometry((4, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    runs = []

    def run_pipeline(name, fixtures, device, output, options):
        runs.append((name, device, options))
        output.mkdir(parents=True)
        labels = np.zeros((2, 3, 4), np.uint8)
        labels[0, 0, 0] = options == ("--overlap", "on")
        write_label_map(output / "case.mha", labels, geometry)
        return {"off": 12.0, "on": 8.0}[options[1]]

    monkeypatch.setattr(gpu_check, "run_pipeline", run_pipeline)
    rows = gpu_check.check_overlap(tmp_path / "fixtures", torch.device("cpu"), tmp_path)
    assert [run[2] for run in runs] == [("--overlap", "off"), ("--overlap", "on")] * 2
    assert rows[0] == (
        "overlap",
        "amos-task1 on cpu, --overlap on vs off",
        "identical voxels 95.833 %, 1.50x (off 12.0 s, on 8.0 s)",
    )
