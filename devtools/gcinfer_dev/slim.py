"""Slim nnU-Net v1 results folders for a model tarball: checkpoints without what inference never reads.

    python -m gcinfer_dev.slim SOURCE DESTINATION      (``export.sh`` runs it on an AMOS model folder)

A checkpoint of the AMOS architecture is 550 MiB, half of it the SGD momentum; Grand Challenge downloads and
extracts the model tarball for every job. The slim folder is the source folder file for file, except that every
checkpoint (a ``*.model`` next to its ``*.model.pkl``) keeps only :data:`INFERENCE_KEYS`. It stays a results folder
that nnU-Net 1.7.1 restores (``load_model_and_checkpoint_files``, then ``load_checkpoint_ram(train=False)``) and
gives byte-identical outputs (the same ``state_dict`` tensors). Format decision: the weights stay a ``torch.save``
checkpoint, the only format nnU-Net 1.7.1 restores (safetensors would be a second copy of the weights);
``benchmarks/bench_restore.py`` measures the restore time and memory of full against slim checkpoints.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

INFERENCE_KEYS = ("state_dict", "epoch", "plot_stuff", "best_stuff")
"""What nnU-Net 1.7.1's ``load_checkpoint_ram(train=False)`` reads: the weights, the epoch, the training curves
(``plot_stuff``: four lists of one float per epoch, unpacked unconditionally; a length other than the epoch makes it
write a warning into the model folder) and ``best_stuff`` (three numbers, read when present). Dropped:
``optimizer_state_dict`` (the SGD momentum, as large as the weights), ``lr_scheduler_state_dict``,
``amp_grad_scaler`` and anything else."""


def slim_checkpoint(checkpoint: dict) -> dict:
    """The :data:`INFERENCE_KEYS` of an nnU-Net v1 checkpoint, numpy scalars (of the curves) as Python numbers, so
    that ``torch.load(weights_only=True)`` reads the result without allow-listing numpy."""
    return {key: _plain(checkpoint[key]) for key in INFERENCE_KEYS if key in checkpoint}


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def is_checkpoint(path: Path) -> bool:
    """An nnU-Net v1 checkpoint: ``<name>.model`` next to ``<name>.model.pkl``."""
    return path.suffix == ".model" and path.with_name(path.name + ".pkl").is_file()


def slim_results_folder(source: Path, destination: Path) -> tuple[int, int]:
    """Write the slim copy of the results folder ``source`` to ``destination`` (which must not exist).

    Returns:
        The bytes of the files of ``source`` and of ``destination``.
    """
    destination.mkdir(parents=True)
    before = after = 0
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        before += path.stat().st_size
        if is_checkpoint(path):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # the developer's own folder
            torch.save(slim_checkpoint(checkpoint), target)
        else:
            shutil.copy2(path, target)
        after += target.stat().st_size
    return before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="nnU-Net v1 results folder (configuration folders inside)")
    parser.add_argument("destination", type=Path, help="where to write the slim copy (must not exist)")
    args = parser.parse_args(argv)
    if args.destination.exists():
        print(f"{args.destination}: already exists", file=sys.stderr)
        return 1
    before, after = slim_results_folder(args.source, args.destination)
    print(f"{args.source}: {before} bytes -> {after} bytes slim ({after / max(before, 1):.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
