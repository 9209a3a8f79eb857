"""The memory planner under ``RLIMIT_DATA``, the limit Grand Challenge's runtime sets from the job's memory: a cap on
virtual private writable memory (``VmData``), under which an allocation that does not fit fails (``MemoryError``)
instead of the process being killed. The planner must keep a case within it, or refuse the case before any work."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcinfer import memory
from gcinfer.memory import budget as memory_budget
from gcinfer_dev import container_config

GIB = memory.GIB
TILE_BATCH = 32
"""Tiles per forward pass in the test's configuration: the fixture case then needs ~0.9 GiB with 32 tiles per
batch, ~0.45 GiB with 16 and ~0.26 GiB at least (planner's estimates)."""
PLAN = re.compile(r": memory plan: (?P<choice>[^|]+) \| host (?P<estimate>[\d.]+)/(?P<budget>[\d.]+) GiB")


def test_data_limit_bounds_the_host_budget() -> None:
    """In process: the budget is what ``RLIMIT_DATA`` leaves above ``VmData``, less the virtual margin."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    data = memory_budget.status_bytes("VmData")
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (data + 3 * GIB, hard))
        budget = memory.Budget.detect(torch.device("cpu"), held_bytes=GIB)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    expected = 4 * GIB - memory.VIRTUAL_MARGIN_BYTES - memory.HOST_MARGIN_BYTES
    assert abs(budget.host - expected) < 64 * 2**20


@pytest.fixture(scope="module")
def autopet_case(fixtures_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """One fixture PET/CT pair as a Grand Challenge input, and a configuration with :data:`TILE_BATCH`."""
    root = tmp_path_factory.mktemp("rlimit")
    images = fixtures_dir / "autopet2" / "input" / "images"
    name = sorted((images / "pet").glob("*.mha"))[0].name
    for socket in ("pet", "ct"):
        (root / "in" / "images" / socket).mkdir(parents=True)
        shutil.copy(images / socket / name, root / "in" / "images" / socket / "case.mha")
    config = json.loads(container_config("autopet2").read_text())
    (root / "config.json").write_text(json.dumps({**config, "tile_batch_size": TILE_BATCH}))
    return root / "in", root / "config.json"


def run_under_data_limit(limit: int, case: tuple[Path, Path], model: Path, output: Path) -> subprocess.CompletedProcess:
    """``prlimit --data=LIMIT gcinfer autopet2`` on the case (one checkpoint, CPU)."""
    inputs, config = case
    command = ["prlimit", f"--data={limit}", sys.executable, "-m", "gcinfer.cli", "--no-progress", "autopet2"]
    command += ["--device", "cpu", "--checkpoints", "0.pt", "--config", str(config), "--model", str(model)]
    command += ["--input", str(inputs), "--output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def plan_of(run: subprocess.CompletedProcess) -> re.Match:
    found = PLAN.search(run.stdout)
    assert found, run.stdout + run.stderr
    return found


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_under_a_data_limit_a_case_gets_the_plan_that_fits_or_is_refused(
    autopet_case: tuple[Path, Path], fixtures_dir: Path, tmp_path: Path
) -> None:
    model = fixtures_dir / "autopet2" / "model"
    generous = 8 * GIB
    first = run_under_data_limit(generous, autopet_case, model, tmp_path / "generous")
    assert first.returncode == 0, first.stderr
    plan = plan_of(first)
    assert plan["choice"].startswith(f"tiling fp32 on cpu, ensemble fp32 on cpu, {TILE_BATCH} tile(s)/batch")
    # what the process holds at planning time plus the margins: the part of a limit the case cannot have
    held = generous - float(plan["budget"]) * GIB
    assert GIB < held < 4 * GIB, plan.group(0)

    between = run_under_data_limit(int(held + 0.66 * GIB), autopet_case, model, tmp_path / "between")
    assert between.returncode == 0, between.stderr
    assert plan_of(between)["choice"].startswith(
        f"tiling fp32 on cpu, ensemble fp32 on cpu, {TILE_BATCH // 2} tile(s)/batch"
    ), between.stdout
    assert [p.name for p in (tmp_path / "between").rglob("*.mha")] == ["case.mha"]

    small = run_under_data_limit(int(held + 0.1 * GIB), autopet_case, model, tmp_path / "small")
    assert small.returncode == 1, small.stderr
    assert re.search(
        r"FAILED case: .*case\.mha: too large for this machine's memory: even with tiling bf16", small.stderr
    )
    assert "Traceback" not in small.stderr and "MemoryError" not in small.stderr, small.stderr
    assert not list((tmp_path / "small").rglob("*.mha"))
