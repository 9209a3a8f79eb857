"""AutoPET II: ``gcinfer autopet2`` vs the MONAI reference chain on the same PET/CT pair, same weights, CPU.

Each side runs in its own process (so that peak RSS is its own), one after the other, ``--repeat`` times; the
table reports the best wall and CPU (user + system) times and the largest peak RSS of each, and the ratios
gcinfer / MONAI (target <= 1.0x). On a shared machine the wall time follows the other load; the CPU time less so.
Both use the fixture's two-fold model (vote) and the same configuration. Cases:

- ``fixture``: the oblique sample pair of the fixtures (40 x 40 x 48 PET voxels at 4 mm), the container config;
- ``fine``: a generated oblique phantom on a fine PET grid (200^3 voxels at 1.5 mm, 8 M voxels) that the network
  sees at 2.04 x 2.04 x 3 mm (2.2 M voxels): the resampling back to the PET grid dominates memory. Overlap 0.5
  instead of 0.75 keeps the CPU time of the network reasonable.

    python benchmarks/bench_autopet.py --fixtures .cache/fixtures [--cases fixture fine] [--repeat 2]
    python benchmarks/run_all.py --fixtures .cache/fixtures autopet      (``make bench`` runs it with the others)
"""

from __future__ import annotations

import argparse
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
from gcinfer_dev import container_config
from gcinfer_dev.fixtures.petct import make_pair, write_pair

FINE_GRID = {"size": (200, 200, 200), "spacing": (1.5, 1.5, 1.5)}
CASE_OVERRIDES = {"fixture": {}, "fine": {"overlap": 0.5}}


@dataclass(frozen=True)
class Measurement:
    seconds: float  # wall time
    cpu_seconds: float  # user + system: less sensitive than wall time to other load on the machine
    peak_rss_bytes: int


def measure(argv: list[str]) -> Measurement:
    """Run ``argv`` to completion; its wall and CPU time and its own peak RSS (``wait4``). Raises on failure."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}:\n{errors.read().decode()[-2000:]}")
    return Measurement(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def _oblique_pair(fixtures: Path, workdir: Path) -> Path:
    """An input folder holding the fixture PET/CT pair with a non-identity direction matrix."""
    pets = sorted((fixtures / "autopet2" / "input" / "images" / "pet").glob("*.mha"))
    pet = next(p for p in pets if not np.allclose(read_image(p)[1].direction, np.eye(3).ravel()))
    for socket in ("pet", "ct"):
        (workdir / "images" / socket).mkdir(parents=True)
        shutil.copy(pet.parents[1] / socket / pet.name, workdir / "images" / socket / pet.name)
    return workdir


def _fine_pair(workdir: Path) -> Path:
    """A generated oblique PET/CT pair on :data:`FINE_GRID`."""
    write_pair(workdir, "fine", make_pair(7, "oblique", **FINE_GRID))
    return workdir / "input"


def _config(case: str, workdir: Path) -> Path:
    """The container config with the case's overrides, as a file both sides read."""
    config = json.loads(container_config("autopet2").read_text())
    path = workdir / "config.json"
    path.write_text(json.dumps({**config, **CASE_OVERRIDES[case]}))
    return path


def bench_case(inputs: Path, model: Path, config: Path, workdir: Path, repeat: int) -> dict[str, Measurement]:
    """Best times and largest peak RSS of each side on the single pair of ``inputs``."""
    pet = next((inputs / "images" / "pet").glob("*.mha"))
    commands = {
        "gcinfer": [
            sys.executable,
            "-m",
            "gcinfer.cli",
            "--quiet",
            "--no-progress",
            "autopet2",
            "--device",
            "cpu",
            "--input",
            str(inputs),
            "--output",
            str(workdir / "ours"),
            "--model",
            str(model),
            "--config",
            str(config),
        ],
        "MONAI": [
            sys.executable,
            "-m",
            "gcinfer_dev.references.autopet",
            str(pet),
            str(model),
            str(workdir / "monai.mha"),
            "--config",
            str(config),
        ],
    }
    runs: dict[str, list[Measurement]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, argv in commands.items():
            runs[name].append(measure(argv))
    return {
        name: Measurement(min(m.seconds for m in ms), min(m.cpu_seconds for m in ms), max(m.peak_rss_bytes for m in ms))
        for name, ms in runs.items()
    }


def _agreement(workdir: Path) -> float:
    """Fraction of identical voxels between the two outputs (a benchmark of different results would be void)."""
    ours, _ = read_image(next((workdir / "ours").rglob("*.mha")))
    reference, _ = read_image(workdir / "monai.mha")
    return float(np.mean(ours == reference))


def run(fixtures: Path, cases: list[str], repeat: int = 1) -> str:
    """The markdown table for ``cases`` (``fixture``, ``fine``)."""
    model = fixtures / "autopet2" / "model"
    rows = [
        "| case | PET voxels | overlap | gcinfer wall | MONAI wall | wall ratio | gcinfer CPU | MONAI CPU | CPU ratio "
        "| gcinfer peak RSS | MONAI peak RSS | RSS ratio | identical voxels |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        with tempfile.TemporaryDirectory(prefix=f"bench_autopet_{case}_") as tmp:
            workdir = Path(tmp)
            inputs = _oblique_pair(fixtures, workdir / "in") if case == "fixture" else _fine_pair(workdir / "fine")
            config = _config(case, workdir)
            size = read_image(next((inputs / "images" / "pet").glob("*.mha")))[1].size
            result = bench_case(inputs, model, config, workdir, repeat)
            ours, monai = result["gcinfer"], result["MONAI"]
            overlap = json.loads(config.read_text())["overlap"]
            rows.append(
                f"| {case} | {'x'.join(map(str, size))} | {overlap} | {ours.seconds:.1f} s | {monai.seconds:.1f} s "
                f"| {ours.seconds / monai.seconds:.2f}x | {ours.cpu_seconds:.1f} s | {monai.cpu_seconds:.1f} s "
                f"| {ours.cpu_seconds / monai.cpu_seconds:.2f}x | {ours.peak_rss_bytes / 2**20:.0f} MiB "
                f"| {monai.peak_rss_bytes / 2**20:.0f} MiB | {ours.peak_rss_bytes / monai.peak_rss_bytes:.2f}x "
                f"| {100 * _agreement(workdir):.3f} % |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=Path(os.environ.get("GCINFER_FIXTURES", ".cache/fixtures")))
    parser.add_argument("--cases", nargs="+", choices=tuple(CASE_OVERRIDES), default=list(CASE_OVERRIDES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; best time, largest peak RSS")
    args = parser.parse_args(argv)
    print("AutoPET II (CPU, fp32, 2-fold vote): gcinfer autopet2 vs MONAI transforms + inferer, same weights\n")
    print(run(args.fixtures, args.cases, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
