"""``python -m gcinfer_dev.archives``: an image archive checked as ``docker load`` checks it, without loading."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gcinfer_dev.archives import problems_of


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def archive(layers: list[bytes], listed: list[bytes] | None = None) -> tuple[bytes, str]:
    """A ``docker save`` archive of ``layers`` whose config lists the digests of ``listed`` (default: the layers),
    and the image ID (the config's digest)."""
    names = [f"{sha(layer)[7:]}.tar" for layer in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(x) for x in (listed or layers)]}}).encode()
    config_name = f"{sha(config)[7:]}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["gc-x:latest"], "Layers": names}]).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [*zip(names, layers), (config_name, config), ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), sha(config)


def test_an_intact_archive_of_the_built_image_passes() -> None:
    data, image_id = archive([b"layer one" * 1000, b"layer two"])
    assert problems_of(io.BytesIO(data), image_id) == []


def test_a_layer_that_is_not_the_configs_is_named() -> None:
    data, image_id = archive([b"layer one", b"tampered"], listed=[b"layer one", b"layer two"])
    (problem,) = problems_of(io.BytesIO(data), image_id)
    assert problem == f"layer {sha(b'tampered')[7:]}.tar is {sha(b'tampered')}, the config says {sha(b'layer two')}"


@pytest.mark.parametrize(
    ("data", "image_id", "expected"),
    [
        (archive([b"a"])[0], "sha256:" + "0" * 64, "not the built sha256:" + "0" * 64),
        (b"not a tar at all" * 100, "sha256:x", "not a readable tar stream"),
        (archive([b"a"])[0][:1024], "sha256:x", "no manifest.json"),
    ],
    ids=["another image", "not a tar", "truncated"],
)
def test_what_docker_load_would_refuse_is_named(data: bytes, image_id: str, expected: str) -> None:
    problems = problems_of(io.BytesIO(data), image_id)
    assert len(problems) == 1 and expected in problems[0]


def test_the_command_names_the_archive_and_fails(tmp_path: Path) -> None:
    data, _ = archive([b"a"])
    path = tmp_path / "image.tar"
    path.write_bytes(data)
    command = [sys.executable, "-m", "gcinfer_dev.archives", str(path), "--image-id", "sha256:x", "--name", "dist/x"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("dist/x: its image is sha256:")
