"""Session fixtures: the synthetic phantoms and fixture models, made once and cached under .cache/."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPOSITORY = Path(__file__).resolve().parents[1]
FIXTURE_SOURCES = REPOSITORY / "shared" / "gcinfer" / "fixtures"


def _fixture_code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(FIXTURE_SOURCES.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``.cache/fixtures``: made by ``gcinfer make-fixtures`` (seed 0), remade when the fixture code changes."""
    from gcinfer.fixtures import make_fixtures

    root = Path(os.environ.get("GCINFER_FIXTURES", REPOSITORY / ".cache" / "fixtures"))
    stamp = root / ".stamp"
    wanted = f"seed=0 code={_fixture_code_hash()}"
    if not stamp.is_file() or stamp.read_text() != wanted:
        make_fixtures(root, seed=0)
        stamp.write_text(wanted)
    return root
