"""Invoke mode: ``gcinfer serve PIPELINE [pipeline options] [--host 127.0.0.1] [--port 4743]``.

Grand Challenge's runtime (sagemaker-shim, ``GRAND_CHALLENGE_COMPONENT_API_METHOD=invoke``) starts the image's
process once, before any input exists, polls ``GET /health`` until it answers 200, then for each task fills
``/input``, sends ``POST /invoke`` (no body) and expects 201 within the task's time limit; at the end the process
gets SIGTERM and 5 s before SIGKILL. Here:

- ``GET /health``: 503 while the networks are being restored, 200 once they are ready;
- ``POST /invoke``: segments ``--input`` into ``--output`` exactly as the exec-mode command does
  (:func:`gcinfer.runner.run_folder`, the same code and so the same bytes); 201 when every case was written, 500
  with the failures (each naming its file) in the body and the log when any failed; the server stays up. An invoke
  while another runs is refused with 409 (never interleaved), one before the networks are ready with 503.

The cases run in the main thread, as in exec mode, so that SIGTERM interrupts a case the same way (its atomic
output write abandoned, nothing partial left) and stops the server at once; the HTTP server runs in a daemon thread
and hands each invoke to the main thread through a queue.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from gcinfer.errors import InputError
from gcinfer.runner import EXIT_OK, Interrupted, segment_folder

if TYPE_CHECKING:
    from gcinfer.pipelines.base import Pipeline

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 4743
"""Where sagemaker-shim calls the process (``GRAND_CHALLENGE_COMPONENT_USER_WEBSERVER_PORT``'s default)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (the pipeline's are added beside them)."""
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")


@dataclass
class Invocation:
    """One ``POST /invoke`` handed to the main thread; ``done`` is set once ``status`` and ``body`` are final."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    body: str = "interrupted"
    done: threading.Event = field(default_factory=threading.Event)


class InvokeServer(ThreadingHTTPServer):
    """The HTTP side: health and invoke requests; the work itself is done by :func:`serve_invocations`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, InvokeHandler)
        self.ready = threading.Event()
        self.busy = threading.Lock()
        self.invocations: queue.Queue[Invocation] = queue.Queue()


class InvokeHandler(BaseHTTPRequestHandler):
    server: InvokeServer

    def do_GET(self) -> None:
        if self.path != "/health":
            self._answer(HTTPStatus.NOT_FOUND, f"no such resource: {self.path}")
        elif self.server.ready.is_set():
            self._answer(HTTPStatus.OK, "ready")
        else:
            self._answer(HTTPStatus.SERVICE_UNAVAILABLE, "restoring the networks")

    def do_POST(self) -> None:
        if self.path != "/invoke":
            self._answer(HTTPStatus.NOT_FOUND, f"no such resource: {self.path}")
        elif not self.server.ready.is_set():
            self._answer(HTTPStatus.SERVICE_UNAVAILABLE, "restoring the networks")
        elif not self.server.busy.acquire(blocking=False):
            log.warning("invoke refused: another invoke is running")
            self._answer(HTTPStatus.CONFLICT, "another invoke is running")
        else:
            try:
                invocation = Invocation()
                self.server.invocations.put(invocation)
                invocation.done.wait()
                self._answer(invocation.status, invocation.body)
            finally:
                self.server.busy.release()

    def _answer(self, status: HTTPStatus, body: str) -> None:
        data = (body + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Requests in the log: invokes at INFO, health polls at DEBUG (every 10 s from the runtime)."""
        level = logging.DEBUG if self.path == "/health" else logging.INFO
        log.log(level, "%s %s", self.address_string(), format % args)


@contextlib.contextmanager
def listening(host: str, port: int) -> Iterator[InvokeServer]:
    """An :class:`InvokeServer` answering on ``host:port`` in a daemon thread (health: 503 until
    :func:`serve_invocations` marks it ready); shut down on exit.

    Raises:
        InputError: the address cannot be bound (e.g. the port is taken).
    """
    try:
        server = InvokeServer((host, port))
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    log.info("listening on http://%s:%d (GET /health: 503 until the networks are restored)", host, port)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def invoke(name: str, pipeline: Pipeline, input_dir: Path, output_dir: Path) -> tuple[HTTPStatus, str]:
    """Run the pipeline over ``input_dir`` once; the answer to ``POST /invoke``."""
    try:
        code, results = segment_folder(name, pipeline, input_dir, output_dir)
    except InputError as error:
        log.error("%s", error)
        return HTTPStatus.INTERNAL_SERVER_ERROR, str(error)
    except Exception as error:
        log.exception("invoke failed")
        return HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}"
    if code == EXIT_OK:
        return HTTPStatus.CREATED, "\n".join(r.message for r in results)
    failures = [f"FAILED {r.name}: {r.message}" for r in results if not r.ok] or [f"{input_dir}: no case"]
    return HTTPStatus.INTERNAL_SERVER_ERROR, "\n".join(failures)


def serve_invocations(server: InvokeServer, name: str, pipeline: Pipeline, input_dir: Path, output_dir: Path) -> None:
    """Answer invocations one at a time in this (the main) thread until SIGTERM or SIGINT.

    Raises:
        Interrupted, KeyboardInterrupt: the signal came during an invocation (its case left no partial output).
    """
    server.ready.set()
    log.info(
        "serve %s: ready on http://%s:%d (POST /invoke: %s -> %s)", name, *server.server_address, input_dir, output_dir
    )
    while True:
        try:
            invocation = server.invocations.get()
        except (Interrupted, KeyboardInterrupt) as error:
            log.info("serve %s: stopped (%s)", name, error or "SIGINT")
            return
        try:
            invocation.status, invocation.body = invoke(name, pipeline, input_dir, output_dir)
        finally:
            invocation.done.set()
