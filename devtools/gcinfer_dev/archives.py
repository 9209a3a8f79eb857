"""Check an image archive (``docker save`` / ``podman save`` format, as ``./export.sh`` writes it) without loading it.

    pigz -dc dist/gc-autopet2.tar.gz | python -m gcinfer_dev.archives - --image-id sha256:...

Reads the tar stream once: the image's config must be the built image (its sha256 is the image ID), every layer
the manifest lists must be in the archive, and each layer's sha256 must be the config's ``rootfs.diff_ids`` entry,
which is what ``docker load`` verifies; nothing is written. Exits 1 naming the archive and the first problem.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def _digests(stream: BinaryIO) -> tuple[dict[str, str], dict[str, bytes]]:
    """sha256 of every regular member of the tar ``stream``, and the contents of its JSON members."""
    digests, documents = {}, {}
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            content, digest = archive.extractfile(member), hashlib.sha256()
            data = bytearray() if member.name.endswith(".json") else None
            while chunk := content.read(CHUNK):
                digest.update(chunk)
                if data is not None:
                    data += chunk
            digests[member.name] = digest.hexdigest()
            if data is not None:
                documents[member.name] = bytes(data)
    return digests, documents


def problems_of(stream: BinaryIO, image_id: str) -> list[str]:
    """What is wrong with the archive in ``stream`` (uncompressed tar) for the image ``image_id`` (``sha256:...``)."""
    try:
        digests, documents = _digests(stream)
    except (tarfile.TarError, OSError, EOFError) as error:
        return [f"not a readable tar stream ({error})"]
    if "manifest.json" not in documents:
        return ["no manifest.json"]
    try:
        (manifest,) = json.loads(documents["manifest.json"])
        config = json.loads(documents[manifest["Config"]])
        diff_ids, layers = config["rootfs"]["diff_ids"], manifest["Layers"]
    except (KeyError, TypeError, ValueError) as error:
        return [f"unreadable manifest or config ({error!r})"]
    problems = []
    if f"sha256:{digests[manifest['Config']]}" != image_id:
        problems.append(f"its image is sha256:{digests[manifest['Config']]}, not the built {image_id}")
    if len(diff_ids) != len(layers):
        problems.append(f"{len(layers)} layers listed, the config has {len(diff_ids)}")
    for layer, expected in zip(layers, diff_ids):
        if layer not in digests:
            problems.append(f"layer {layer} missing")
        elif f"sha256:{digests[layer]}" != expected:
            problems.append(f"layer {layer} is sha256:{digests[layer]}, the config says {expected}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcinfer_dev.archives", description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="uncompressed tar file, or - for standard input")
    parser.add_argument("--image-id", required=True, help="the built image's ID (sha256:...)")
    parser.add_argument("--name", help="the archive's name in messages (default: the archive argument)")
    args = parser.parse_args(argv)
    name = args.name or args.archive
    if args.archive == "-":
        problems = problems_of(sys.stdin.buffer, args.image_id)
    else:
        with Path(args.archive).open("rb") as stream:
            problems = problems_of(stream, args.image_id)
    if problems:
        print(f"{name}: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"{name}: image {args.image_id[:19]}, every layer as its config says")
    return 0


if __name__ == "__main__":
    sys.exit(main())
