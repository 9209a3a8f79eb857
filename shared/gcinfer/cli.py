"""The ``gcinfer`` command: one sub-command per pipeline, plus the tools other packages register.

Pipelines (``amos-task1``, ``amos-task2``, ``autopet2``; :data:`gcinfer.pipelines.PIPELINES`) share ``--input``,
``--output``, ``--model``, ``--device`` and ``--config``; their defaults come from ``GC_INPUT``, ``GC_OUTPUT``,
``GC_MODEL`` or the Grand Challenge paths ``/input``, ``/output``, ``/opt/ml/model``. A pipeline's configuration
(models, folds, sockets, post-processing) is the JSON file next to its container, ``docker/<name>/config.json``:
the container entry points pass it; from a source checkout it is found from the working folder.

Tools (``make-fixtures``, ``preview``, ``score-autopet``) come from the development package, which registers them
as ``gcinfer.tools`` entry points: each names a module with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn, TextIO

from gcinfer import serve
from gcinfer.config import find_default_config, read_json
from gcinfer.devices import resolve_device
from gcinfer.errors import InputError, UsageError
from gcinfer.pipelines import PIPELINES, Pipeline, PipelineSpec, spec_of
from gcinfer.runner import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SUMMARY_LOGGER,
    Interrupted,
    run_folder,
    sigterm_as_interruption,
)

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

TOOLS_GROUP = "gcinfer.tools"


def tools() -> dict[str, str]:
    """Tool sub-command -> module, from the installed packages' ``gcinfer.tools`` entry points."""
    return {entry.name: entry.value for entry in entry_points(group=TOOLS_GROUP)}


def load_config(path: Path | None, container: str) -> dict:
    """The pipeline configuration at ``path``.

    Raises:
        InputError: no path (names the flag to pass), or an unreadable file (named).
    """
    if path is None:
        raise InputError(f"no configuration for {container}: pass --config docker/{container}/config.json")
    return read_json(path)


def add_pipeline_arguments(parser: argparse.ArgumentParser, spec: PipelineSpec) -> None:
    """The flags every pipeline shares, then the pipeline's own."""
    env = os.environ.get
    parser.add_argument("--input", type=Path, default=Path(env("GC_INPUT", "/input")), help="input folder")
    parser.add_argument("--output", type=Path, default=Path(env("GC_OUTPUT", "/output")), help="output folder")
    parser.add_argument("--model", type=Path, default=Path(env("GC_MODEL", "/opt/ml/model")), help="weights folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--config",
        type=Path,
        default=find_default_config(spec.container),
        help=f"pipeline configuration (default: docker/{spec.container}/config.json of the checkout around the "
        "working folder)",
    )
    spec.module().add_arguments(parser)


def build_parser(command: str | None = None, pipeline: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the module of ``command`` (of ``pipeline`` for ``serve``) is imported (nnU-Net and
    MONAI load slowly)."""
    parser = argparse.ArgumentParser(prog="gcinfer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)
    for spec in PIPELINES:
        sub = commands.add_parser(spec.command, help=f"run the {spec.container} pipeline")
        if spec.command == command:
            add_pipeline_arguments(sub, spec)
    server = commands.add_parser("serve", help="invoke mode: restore a pipeline once, segment on each POST /invoke")
    served = server.add_subparsers(dest="pipeline", required=True)
    for spec in PIPELINES:
        sub = served.add_parser(spec.command, help=f"serve the {spec.container} pipeline")
        if command == "serve" and spec.command == pipeline:
            add_pipeline_arguments(sub, spec)
            serve.add_arguments(sub)
    for name, module in tools().items():
        sub = commands.add_parser(name, help=f"tool: {name}")
        if name == command:
            importlib.import_module(module).add_arguments(sub)
    return parser


def restore(args: argparse.Namespace, command: str) -> Pipeline:
    """The pipeline of ``command`` with its settings and networks restored (on ``args.device``)."""
    spec = spec_of(command)
    args.device = resolve_device(args.device)
    config = load_config(args.config, spec.container)
    return spec.module().load(args, config, str(args.config))


def run_pipeline(args: argparse.Namespace) -> int:
    """Exec mode: restore the pipeline of ``args.command`` once and segment ``args.input`` into ``args.output``."""
    return run_folder(args.command, restore(args, args.command), args.input, args.output)


def run_server(args: argparse.Namespace) -> NoReturn:
    """Invoke mode: listen first (health 503), restore the pipeline of ``args.pipeline``, then segment ``args.input``
    into ``args.output`` on each ``POST /invoke`` until SIGTERM (:mod:`gcinfer.serve`); ends the process.

    Raises:
        InputError: the address cannot be bound or the pipeline cannot be restored.
        Interrupted, KeyboardInterrupt: the signal came during an invocation.
    """
    with serve.listening(args.host, args.port) as server:
        pipeline = restore(args, args.pipeline)
        serve.serve_invocations(server, args.pipeline, pipeline, args.input, args.output)
    # Stopped between invocations, nothing left to write: exit now. The runtime kills the process group 5 s after
    # SIGTERM, and the interpreter's teardown of PyTorch and the pipeline's modules alone can take longer.
    logging.shutdown()
    os._exit(EXIT_OK)


class _StreamOfTheMoment(logging.StreamHandler):
    """A handler writing to ``sys.stdout`` or ``sys.stderr`` as they are when a record is emitted (not when the
    handler was made), so that a redirected or captured stream still receives the log."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.stream_name = name

    @property
    def stream(self) -> TextIO:
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value: object) -> None:
        """Ignored: the stream is looked up at every record."""


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


def configure_logging(level: int) -> None:
    """INFO and DEBUG lines to stdout, warnings and errors to stderr, as Grand Challenge's runtime shows them (it logs
    the process's stdout at INFO and its stderr at WARNING); the run's summary at INFO even under ``--quiet``.

    Replaces the handlers of an earlier call (the CLI may run several times in one process, e.g. in tests).
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StreamOfTheMoment)]:
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    out, err = _StreamOfTheMoment("stdout"), _StreamOfTheMoment("stderr")
    out.addFilter(_below_warning)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(SUMMARY_LOGGER).setLevel(min(level, logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gcinfer`` console script and of the container scripts; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pipelines = {spec.command for spec in PIPELINES}
    command = next((a for a in argv if a in pipelines | {"serve"} | set(tools())), None)
    after = argv[argv.index(command) + 1 :] if command == "serve" else []
    pipeline = next((a for a in after if a in pipelines), None)
    args = build_parser(command, pipeline).parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    configure_logging(level)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with sigterm_as_interruption():
            if args.command in tools():
                return importlib.import_module(tools()[args.command]).run(args)
            return run_server(args) if args.command == "serve" else run_pipeline(args)
    except (InputError, UsageError) as error:
        log.error("%s", error)
        return EXIT_FAILED
    except (KeyboardInterrupt, Interrupted) as error:
        log.error("interrupted (%s): no partial output was left", error or "SIGINT")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
