"""Invoke mode (``gcinfer serve``) as Grand Challenge's runtime drives it: health until ready, POST /invoke per task
with the inputs refilled in between, SIGTERM at the end."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcinfer import cli

AUTOPET_OPTIONS = ["--device", "cpu", "--checkpoints", "0.pt"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port: int, method: str, path: str, timeout: float = 300.0) -> tuple[int, str]:
    """Status and body of one HTTP request to the server on the loopback."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def fill_input(fixtures_dir: Path, folder: Path, broken: bool = False) -> None:
    """What the runtime does before each task: an emptied folder with one fixture PET/CT pair (the CT not an image
    when ``broken``)."""
    shutil.rmtree(folder, ignore_errors=True)
    images = fixtures_dir / "autopet2" / "input" / "images"
    name = sorted((images / "pet").glob("*.mha"))[0].name
    for socket_name in ("pet", "ct"):
        (folder / "images" / socket_name).mkdir(parents=True)
        shutil.copy(images / socket_name / name, folder / "images" / socket_name / name)
    if broken:
        (folder / "images" / "ct" / name).write_bytes(b"not an image")


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    input: Path
    output: Path
    health: list[int]
    log: Path

    def invoke(self) -> tuple[int, str]:
        shutil.rmtree(self.output, ignore_errors=True)
        self.output.mkdir()
        return request(self.port, "POST", "/invoke")


def wait_until_healthy(port: int, process: subprocess.Popen, seconds: float = 300.0) -> list[int]:
    """The statuses of ``GET /health`` polled every 0.1 s until it answers 200."""
    statuses, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            statuses.append(request(port, "GET", "/health", timeout=10)[0])
        except OSError:
            statuses.append(0)  # not listening yet
        if statuses[-1] == 200:
            return statuses
        time.sleep(0.1)
    raise AssertionError(f"not healthy within {seconds} s: {statuses[-5:]}")


@pytest.fixture(scope="module")
def server(fixtures_dir: Path, tmp_path_factory) -> Iterator[Server]:
    """``gcinfer serve autopet2`` on a free port of the loopback, healthy."""
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    argv = ["serve", "autopet2", *AUTOPET_OPTIONS, "--model", str(fixtures_dir / "autopet2" / "model")]
    argv += ["--input", str(root / "input"), "--output", str(root / "output"), "--port", str(port)]
    log = root / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "gcinfer.cli", "--no-progress", *argv],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    try:
        health = wait_until_healthy(port, process)
        yield Server(process, port, root / "input", root / "output", health, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_health_is_503_until_the_networks_are_restored(server: Server) -> None:
    assert 503 in server.health and server.health[-1] == 200, server.health
    assert request(server.port, "GET", "/nothing")[0] == 404


def test_invoke_writes_the_same_bytes_as_exec_mode(server: Server, fixtures_dir: Path, tmp_path: Path) -> None:
    fill_input(fixtures_dir, server.input)
    assert server.invoke() == (
        201,
        f"{server.output}/images/automated-petct-lesion-segmentation/"
        f"{next((server.input / 'images' / 'pet').iterdir()).name}\n",
    )
    argv = ["--no-progress", "autopet2", *AUTOPET_OPTIONS, "--model", str(fixtures_dir / "autopet2" / "model")]
    assert cli.main([*argv, "--input", str(server.input), "--output", str(tmp_path / "exec")]) == 0
    served = outputs(server.output)
    assert served and served == outputs(tmp_path / "exec")


def test_a_failing_case_answers_500_naming_the_file_and_the_server_stays_up(server: Server, fixtures_dir: Path) -> None:
    fill_input(fixtures_dir, server.input, broken=True)
    status, body = server.invoke()
    ct = next((server.input / "images" / "ct").iterdir())
    assert status == 500 and f"FAILED {ct.stem}: {ct}: cannot read image header" in body, body
    assert outputs(server.output) == {}
    assert f"{ct}: cannot read image header" in server.log.read_text()
    fill_input(fixtures_dir, server.input)
    assert server.invoke()[0] == 201


def test_a_concurrent_invoke_is_refused(server: Server, fixtures_dir: Path) -> None:
    fill_input(fixtures_dir, server.input)
    started = server.log.read_text().count("autopet2: 1 case(s)")
    answers: list[tuple[int, str]] = []
    first = threading.Thread(target=lambda: answers.append(server.invoke()))
    first.start()
    deadline = time.monotonic() + 60
    while server.log.read_text().count("autopet2: 1 case(s)") == started:  # until the first run has started its case
        assert time.monotonic() < deadline and first.is_alive(), "the first invoke did not start a run"
        time.sleep(0.01)
    second = request(server.port, "POST", "/invoke")
    first.join()
    assert second == (409, "another invoke is running\n")
    assert answers[0][0] == 201


def test_memory_does_not_grow_across_invocations(server: Server, fixtures_dir: Path) -> None:
    fill_input(fixtures_dir, server.input)
    after = []
    for _ in range(10):
        assert server.invoke()[0] == 201
        after.append(rss_bytes(server.process.pid))
    assert after[-1] <= after[0] * 1.05, [f"{a / 2**20:.0f} MiB" for a in after]


def test_sigterm_ends_the_server_within_the_grace_period(server: Server) -> None:
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=10) == 0
    assert time.monotonic() - sent < 5
    assert "serve autopet2: stopped (received signal SIGTERM)" in server.log.read_text()
