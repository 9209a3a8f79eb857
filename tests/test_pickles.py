"""nnU-Net v1's pickles read without running code (:mod:`gcinfer.pipelines.amos.pickles`)."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from gcinfer.errors import InputError
from gcinfer.pipelines.amos.pickles import load_pickle

NNUNET_LIKE = OrderedDict(
    name="nnUNetTrainerV2",
    init=("plans.pkl", 0, "/out", "/data", True, 1),
    plans={
        "plans_per_stage": {0: {"current_spacing": np.array([2.0, 0.8, 0.8]), "patch_size": np.array([64, 96, 96])}},
        "dataset_properties": {"intensityproperties": {0: {"mean": np.float64(101.5), "sd": np.float32(3.0)}}},
        "num_classes": np.int64(15),
        "modalities": {0: "CT"},
        "classes": [1, 2, 3],
        "flags": np.array([True, False]),
    },
)


def test_content_is_plain_pickle_content(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(NNUNET_LIKE))
    loaded = load_pickle(path)
    assert type(loaded) is OrderedDict and list(loaded) == ["name", "init", "plans"]
    stage = loaded["plans"]["plans_per_stage"][0]
    np.testing.assert_array_equal(stage["current_spacing"], [2.0, 0.8, 0.8])
    assert stage["patch_size"].dtype == np.int64 and stage["current_spacing"].flags.writeable
    sd = loaded["plans"]["dataset_properties"]["intensityproperties"][0]["sd"]
    assert type(sd) is np.float32 and sd == 3.0 and type(loaded["plans"]["num_classes"]) is np.int64
    assert loaded["init"] == NNUNET_LIKE["init"] and loaded["plans"]["flags"].dtype == bool


def test_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"plans": RunsCode()}))
    with pytest.raises(InputError, match=r"evil.pkl: cannot read pickle \(UnpicklingError: refers to posix.system"):
        load_pickle(path)
    assert not marker.exists()


def test_memo_index_is_no_memory_bomb(tmp_path: Path) -> None:
    """``LONG_BINPUT 2**31-1``: the C unpickler grows its memo array to 16 GiB (killed, or MemoryError)."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x04}r" + struct.pack("<I", 2**31 - 1) + b".")
    assert load_pickle(path) == {}


def test_corrupt_pickles_name_the_file_and_never_crash(tmp_path: Path) -> None:
    """2000 copies of an nnU-Net-like pickle with 1 to 8 random bytes changed, in a child process (a crash would kill
    it): each loads or raises the file's InputError. With ``pickle.load`` (the loader before) 914 of them escaped as
    tracebacks (UnicodeDecodeError, MemoryError, TypeError, ...)."""
    source = tmp_path / "model.pkl"
    source.write_bytes(pickle.dumps(NNUNET_LIKE))
    script = f"""
import random
from pathlib import Path
from gcinfer.errors import InputError
from gcinfer.pipelines.amos.pickles import load_pickle
source, path, rng = Path({str(source)!r}), Path({str(tmp_path / "mutated.pkl")!r}), random.Random(0)
outcomes = set()
for _ in range(2000):
    data = bytearray(source.read_bytes())
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    path.write_bytes(bytes(data))
    try:
        load_pickle(path)
        outcomes.add("loaded")
    except InputError as error:
        assert str(error).startswith(f"{{path}}: cannot read pickle ("), error
        outcomes.add("refused")
print(sorted(outcomes))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['loaded', 'refused']"
