"""AMOS 2022 pipelines vs the reference pipeline on the fixture sample cases (CPU, folds 0 1, TTA, post-processing).

The reference is upstream's flow built from nnU-Net v1's own pieces (``tests/amos_reference.py``: per
configuration ``preprocess_patient``, per-fold prediction, npz export, ``merge``, post-processing). Each pipeline
runs in a fresh process; measured per task: wall time of the whole process (imports, model restore, all cases),
its peak RSS (children included), and the bytes of every file written besides the final label maps (the
reference's per-configuration segmentations, npz, pkl and merged maps; for gcinfer, anything else in the output
folder, in its TMPDIR or in the model folder). Targets: time <= 0.5x, extra bytes 0, peak RSS <= 1x.

Usage: ``python benchmarks/bench_amos.py`` (fixtures from ``$GCINFER_FIXTURES``, default ``.cache/fixtures``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gcinfer.io import read_image

REPOSITORY = Path(__file__).resolve().parents[1]
FOLDS = (0, 1)
TASKS = {"amos-task1": "amos_task1", "amos-task2": "amos_task2"}
REFERENCE_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from gcinfer_dev.references.amos import run_reference
config = json.loads(Path({config!r}).read_text())
inputs = [Path(p) for p in {inputs!r}]
run_reference(Path({models!r}), config["models"], {folds!r}, inputs, Path({work!r}), {task!r})
"""


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_bytes: int


def measure(argv: list[str], env: dict[str, str]) -> Measurement:
    """Run ``argv`` to completion; wall time and peak RSS (the largest of the process and its children)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{stderr.decode(errors='replace')[-3000:]}")
    return Measurement(seconds, usage.ru_maxrss * 1024)


def files_under(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()}


def run_gcinfer(command: str, inputs: Path, model_dir: Path, scratch: Path) -> tuple[Measurement, int, Path]:
    """gcinfer in a fresh process; returns the measurement, the extra bytes written and the output folder."""
    output, tmpdir = scratch / "gcinfer_out", scratch / "gcinfer_tmp"
    tmpdir.mkdir()
    before = files_under(model_dir)
    argv = [
        sys.executable,
        "-m",
        "gcinfer.cli",
        "-q",
        command,
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--folds",
        *map(str, FOLDS),
    ]
    measurement = measure(argv, {**os.environ, "TMPDIR": str(tmpdir)})
    expected = {output / p.name for p in inputs.glob("*.nii.gz")}
    extra = sum(size for path, size in files_under(output).items() if path not in expected)
    extra += sum(files_under(tmpdir).values())
    changed = files_under(model_dir)
    extra += sum(size for path, size in changed.items() if before.get(path) != size)
    return measurement, extra, output


def run_reference(folder: str, inputs: Path, model_dir: Path, scratch: Path) -> tuple[Measurement, int, Path]:
    """The reference in a fresh process (on a private copy of the models, made before timing)."""
    config_path = REPOSITORY / "docker" / folder / "config.json"
    models = scratch / "reference_models"
    for name in json.loads(config_path.read_text())["models"]:
        shutil.copytree(model_dir / name, models / name)
    work = scratch / "reference_work"
    script = REFERENCE_SCRIPT.format(
        tests=str(REPOSITORY / "tests"),
        config=str(config_path),
        models=str(models),
        folds=list(FOLDS),
        inputs=[str(p) for p in sorted(inputs.glob("*.nii.gz"))],
        work=str(work),
        task=folder.removeprefix("amos_"),
    )
    measurement = measure([sys.executable, "-c", script], {**os.environ, "TMPDIR": str(scratch)})
    final = work / "final"
    extra = sum(size for path, size in files_under(work).items() if path.parent != final)
    return measurement, extra, final


def identical_fraction(ours: Path, reference: Path) -> float:
    """Fraction of identical voxels over all cases."""
    same = total = 0
    for path in sorted(reference.glob("*.nii.gz")):
        a, b = read_image(path)[0], read_image(ours / path.name)[0]
        same, total = same + int(np.sum(a == b)), total + a.size
    return same / total


def main() -> int:
    fixtures = Path(os.environ.get("GCINFER_FIXTURES", REPOSITORY / ".cache" / "fixtures"))
    rows = []
    for command, folder in TASKS.items():
        inputs, model_dir = fixtures / folder / "input", fixtures / folder / "model"
        cases = len(list(inputs.glob("*.nii.gz")))
        with tempfile.TemporaryDirectory(prefix="bench_amos_") as scratch:
            scratch = Path(scratch)
            reference, reference_extra, reference_out = run_reference(folder, inputs, model_dir, scratch)
            ours, ours_extra, ours_out = run_gcinfer(command, inputs, model_dir, scratch)
            agreement = identical_fraction(ours_out, reference_out)
        rows.append((command, cases, reference, reference_extra, ours, ours_extra, agreement))

    print(
        "| task | cases | pipeline | wall time (s) | peak RSS (MiB) | bytes written besides outputs "
        "| identical voxels |"
    )
    print("|---|---|---|---|---|---|---|")
    for command, cases, reference, reference_extra, ours, ours_extra, agreement in rows:
        mib = lambda m: m.peak_rss_bytes / 2**20  # noqa: E731
        print(
            f"| {command} | {cases} | reference (nnU-Net v1 pieces, CPU) | {reference.seconds:.1f} | "
            f"{mib(reference):.0f} | {reference_extra:,} | |"
        )
        print(
            f"| {command} | {cases} | gcinfer | {ours.seconds:.1f} | {mib(ours):.0f} | {ours_extra:,} | "
            f"{100 * agreement:.3f} % |"
        )
        print(
            f"| {command} | | **gcinfer / reference** (target) | **{ours.seconds / reference.seconds:.2f}x** "
            f"(<= 0.5x) | **{ours.peak_rss_bytes / reference.peak_rss_bytes:.2f}x** (<= 1x) | "
            f"**{ours_extra:,}** (0) | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
