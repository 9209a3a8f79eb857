"""Log streams as Grand Challenge shows them: its runtime logs the process's stdout at INFO and its stderr at
WARNING, so progress and stage lines belong on stdout and only warnings and errors on stderr."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gcinfer import cli


def _good_and_broken(autopet: Path, root: Path) -> Path:
    """A Grand Challenge input with the fixture pair ``good`` and a pair ``broken`` whose CT is not an image."""
    pet = sorted((autopet / "input" / "images" / "pet").glob("*.mha"))[0]
    for socket in ("pet", "ct"):
        (root / "images" / socket).mkdir(parents=True)
        shutil.copy(autopet / "input" / "images" / socket / pet.name, root / "images" / socket / "good.mha")
        shutil.copy(autopet / "input" / "images" / socket / pet.name, root / "images" / socket / "broken.mha")
    (root / "images" / "ct" / "broken.mha").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_info_goes_to_stdout_and_failures_to_stderr(
    quiet: bool, fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    autopet = fixtures_dir / "autopet2"
    inputs = _good_and_broken(autopet, tmp_path / "in")
    argv = ["--no-progress", *(["--quiet"] if quiet else []), "autopet2", "--device", "cpu", "--checkpoints", "0.pt"]
    argv += ["--input", str(inputs), "--output", str(tmp_path / "out"), "--model", str(autopet / "model")]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    broken_ct = inputs / "images" / "ct" / "broken.mha"
    assert "INFO 1 case(s) written, 1 failed" in out
    assert f"ERROR FAILED broken: {broken_ct}: cannot read image header" in err
    assert "FAILED" not in out and " INFO " not in err
    progress = ["autopet2: 2 case(s)", "memory plan:", "good: "]
    assert all((p in out) != quiet for p in progress), out
