"""The ``gcinfer`` command: one sub-command per pipeline, plus tools.

Pipelines (``amos-task1``, ``amos-task2``, ``autopet2``) share ``--input``, ``--output``, ``--model``,
``--device`` and ``--config``; their defaults come from ``GC_INPUT``, ``GC_OUTPUT``, ``GC_MODEL`` or the
Grand Challenge paths ``/input``, ``/output``, ``/opt/ml/model``. A pipeline's configuration (models, folds,
sockets, post-processing) is the JSON file next to its container, ``docker/<name>/config.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from gcinfer.devices import resolve_device
from gcinfer.io import InputError
from gcinfer.runner import EXIT_FAILED, EXIT_INTERRUPTED, Interrupted, sigterm_as_interruption

log = logging.getLogger("gcinfer")

# sub-command -> (module with add_arguments(parser) and run(args, config) -> int, container folder name)
PIPELINES = {
    "amos-task1": ("gcinfer.amos", "amos_task1"),
    "amos-task2": ("gcinfer.amos", "amos_task2"),
    "autopet2": ("gcinfer.autopet", "autopet2"),
}
# sub-command -> module with add_arguments(parser) and run(args) -> int
TOOLS = {
    "make-fixtures": "gcinfer.fixtures",
    "preview": "gcinfer.preview",
    "score-autopet": "gcinfer.metrics",
}

REPOSITORY = Path(__file__).resolve().parents[2]


def default_config(container: str) -> Path | None:
    """``docker/<container>/config.json`` of the source checkout this package was installed from, if any."""
    path = REPOSITORY / "docker" / container / "config.json"
    return path if path.is_file() else None


def load_config(path: Path | None, container: str) -> dict:
    if path is None:
        raise InputError(f"no configuration for {container}: pass --config docker/{container}/config.json")
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read configuration ({error})") from None


def _add_pipeline_arguments(parser: argparse.ArgumentParser, container: str) -> None:
    env = os.environ.get
    parser.add_argument("--input", type=Path, default=Path(env("GC_INPUT", "/input")), help="input folder")
    parser.add_argument("--output", type=Path, default=Path(env("GC_OUTPUT", "/output")), help="output folder")
    parser.add_argument("--model", type=Path, default=Path(env("GC_MODEL", "/opt/ml/model")), help="weights folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--config", type=Path, default=default_config(container), help="pipeline configuration")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported (nnU-Net and MONAI load slowly)."""
    parser = argparse.ArgumentParser(prog="gcinfer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, container) in PIPELINES.items():
        sub = commands.add_parser(name, help=f"run the {container} pipeline")
        if name == command:
            _add_pipeline_arguments(sub, container)
            importlib.import_module(module).add_arguments(sub)
    for name, module in TOOLS.items():
        sub = commands.add_parser(name, help=f"tool: {name}")
        if name == command:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gcinfer`` console script and of the container scripts; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in PIPELINES or a in TOOLS), None)
    args = build_parser(command).parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with sigterm_as_interruption():
            if args.command in PIPELINES:
                module, container = PIPELINES[args.command]
                args.device = resolve_device(args.device)
                config = load_config(args.config, container)
                return importlib.import_module(module).run(args, config)
            return importlib.import_module(TOOLS[args.command]).run(args)
    except (InputError, ValueError) as error:
        log.error("%s", error)
        return EXIT_FAILED
    except (KeyboardInterrupt, Interrupted) as error:
        log.error("interrupted (%s): no partial output was left", error or "SIGINT")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
