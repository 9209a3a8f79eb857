"""Session fixtures: the synthetic phantoms and fixture models, made once and cached under .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``.cache/fixtures``: made by ``gcinfer make-fixtures`` (seed 0), remade when the fixture code changes."""
    from gcinfer_dev.fixtures import make_fixtures

    root = Path(os.environ.get("GCINFER_FIXTURES", REPOSITORY / ".cache" / "fixtures"))
    make_fixtures(root, seed=0)
    return root
