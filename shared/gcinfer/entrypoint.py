"""Entry point of the container images: ``python run_inference.py [serve] [gcinfer options]`` in the image's work
dir.

It runs ``gcinfer <command>`` (exec mode), or with ``serve`` first ``gcinfer serve <command>`` (invoke mode: an
HTTP server on 127.0.0.1:4743, :mod:`gcinfer.serve`), and fills in what a container run leaves unsaid (given
options win, as do the ``GC_INPUT``, ``GC_OUTPUT`` and ``GC_MODEL`` variables):

- ``--config``: the ``config.json`` next to ``run_inference.py``;
- ``--model``: ``/opt/ml/model`` (Grand Challenge's model tarball) when it holds anything, else the ``model/``
  folder next to ``run_inference.py`` (baked in at build time) when that holds anything, else ``/opt/ml/model``;
- with ``workspace=True`` (the AMOS images) and ``/workspace/input`` present: ``--input /workspace/input
  --output /workspace/output``, flat ``*.nii.gz`` in and same-named files out, as the AMOS 2022 organisers ran
  the containers (``python run_inference.py`` without arguments). Otherwise the CLI's Grand Challenge defaults
  ``/input`` -> ``/output`` hold.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gcinfer import cli

GRAND_CHALLENGE_MODEL = Path("/opt/ml/model")
WORKSPACE_INPUT, WORKSPACE_OUTPUT = Path("/workspace/input"), Path("/workspace/output")
GLOBAL_OPTIONS = frozenset({"-v", "--verbose", "-q", "--quiet", "--no-progress"})


def _holds_anything(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def model_folder(container_dir: Path) -> Path:
    """``/opt/ml/model`` unless it is empty or missing and ``container_dir/model`` holds the weights."""
    baked = container_dir / "model"
    if _holds_anything(GRAND_CHALLENGE_MODEL) or not _holds_anything(baked):
        return GRAND_CHALLENGE_MODEL
    return baked


def _given(argv: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(f"{option}=") for a in argv)


def container_argv(command: str, container_dir: Path, argv: Sequence[str], workspace: bool) -> list[str]:
    """The ``gcinfer`` argument list: global options, [``serve``,] ``command``, the container defaults, then
    ``argv``."""
    front = [a for a in argv if a in GLOBAL_OPTIONS]
    rest = [a for a in argv if a not in GLOBAL_OPTIONS]
    if rest[:1] == ["serve"]:
        front, rest = [*front, "serve"], rest[1:]
    defaults = ["--config", str(container_dir / "config.json")]
    if "GC_MODEL" not in os.environ:
        defaults += ["--model", str(model_folder(container_dir))]
    organisers_style = workspace and WORKSPACE_INPUT.is_dir()
    if organisers_style and not ({"GC_INPUT", "GC_OUTPUT"} & os.environ.keys() or _given(rest, "--input")):
        defaults += ["--input", str(WORKSPACE_INPUT), "--output", str(WORKSPACE_OUTPUT)]
    return [*front, command, *defaults, *rest]


def main(command: str, script: str | Path, workspace: bool = False) -> int:
    """Run ``gcinfer command`` for the container whose ``run_inference.py`` is ``script``; the exit code."""
    return cli.main(container_argv(command, Path(script).resolve().parent, sys.argv[1:], workspace))
