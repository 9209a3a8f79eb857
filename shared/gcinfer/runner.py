"""Running a pipeline over many cases: per-stage timing and peak memory, failure isolation, summary.

A bad case is reported and skipped; the others still run; the exit code is non-zero when any case failed.
SIGTERM is turned into an interruption so that a case's atomic output write is abandoned cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from gcinfer.cases import Case, discover_cases
from gcinfer.devices import (
    peak_device_bytes,
    peak_rss_bytes,
    reset_peak_device_bytes,
    use_deterministic_algorithms,
)
from gcinfer.errors import InputError, shown
from gcinfer.io import check_writable

if TYPE_CHECKING:
    from gcinfer.pipelines.base import Pipeline

log = logging.getLogger(__name__)
SUMMARY_LOGGER = "gcinfer.summary"
"""The logger of a run's summary (written at INFO even when the CLI is ``--quiet``)."""
summary_log = logging.getLogger(SUMMARY_LOGGER)

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class StageLog:
    """Wall time per named stage of one case, and the case's peak memory."""

    case: str
    device: torch.device
    stages: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (repeated names add up)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        """``case: read 0.2s | predict 12.0s | ... | total 13.1s | peak RSS 2.10 GiB[, peak cuda 5.00 GiB]``."""
        parts = [f"{k} {v:.1f}s" for k, v in self.stages.items()]
        parts.append(f"total {sum(self.stages.values()):.1f}s")
        memory = f"peak RSS {_gib(peak_rss_bytes())}"
        device_peak = peak_device_bytes(self.device)
        if device_peak is not None:
            memory += f", peak {self.device} {_gib(device_peak)}"
        return f"{shown(self.case)}: " + " | ".join(parts) + f" | {memory}"


@dataclass
class CaseResult:
    name: str
    ok: bool
    seconds: float
    message: str


class Interrupted(BaseException):
    """Raised from the SIGTERM handler; like KeyboardInterrupt it is not caught as a case failure."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interruption() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cases(
    cases: Sequence[Case],
    predict_case: Callable[[Case, StageLog, Case | None], None],
    device: torch.device,
    progress: bool | None = None,
) -> list[CaseResult]:
    """Run ``predict_case`` on every case, with deterministic algorithms on ``device``; a failing case is logged and
    skipped.

    Args:
        cases: the cases; those with ``error`` set are reported as failed without running.
        predict_case: predicts one case and writes ``case.output`` (atomically); may raise any Exception. Its third
            argument is the case that runs next (None for the last), which it may start reading.
        device: the device the pipeline runs on (for timing and peak-memory reporting).
        progress: tqdm bar over cases; None = only when stderr is a terminal.

    Returns:
        One :class:`CaseResult` per case, in order.
    """
    use_deterministic_algorithms(device)
    results = []
    disable = not sys.stderr.isatty() if progress is None else not progress
    for index, case in enumerate(tqdm(cases, desc="cases", unit="case", disable=disable)):
        start = time.perf_counter()
        if case.error:
            log.error("%s: %s", shown(case.name), case.error)
            results.append(CaseResult(case.name, False, 0.0, case.error))
            continue
        stages = StageLog(case.name, device)
        reset_peak_device_bytes(device)
        try:
            predict_case(case, stages, next((c for c in cases[index + 1 :] if not c.error), None))
        except InputError as error:
            log.error("%s: %s", shown(case.name), error)
            results.append(CaseResult(case.name, False, time.perf_counter() - start, str(error)))
            continue
        except Exception as error:  # a bug, not a bad input: its traceback is logged, the other cases still run
            log.exception("%s: failed", shown(case.name))
            message = f"{type(error).__name__}: {error}"
            results.append(CaseResult(case.name, False, time.perf_counter() - start, message))
            continue
        log.info(stages.line())
        results.append(CaseResult(case.name, True, time.perf_counter() - start, str(case.output)))
    return results


def summarize(results: Sequence[CaseResult]) -> int:
    """Log a summary (INFO: stdout of the CLI) and one line per failed case (ERROR: stderr); return the exit code."""
    failed = [r for r in results if not r.ok]
    summary_log.info("%d case(s) written, %d failed", len(results) - len(failed), len(failed))
    for r in failed:
        summary_log.error("FAILED %s: %s", shown(r.name), r.message)
    return EXIT_FAILED if failed or not results else EXIT_OK


def segment_folder(name: str, pipeline: Pipeline, input_dir: Path, output_dir: Path) -> tuple[int, list[CaseResult]]:
    """Segment every case of ``input_dir`` into ``output_dir`` with a restored ``pipeline``, log the summary, and
    let the pipeline finish the folder; the exit code and the result of each case.

    Raises:
        InputError: the folders themselves are unusable (no case is run): see :func:`discover_cases`, or an output
            folder where no file can be created.
    """
    cases = discover_cases(input_dir, output_dir, pipeline.sockets)
    for folder in sorted({case.output.parent for case in cases}):
        check_writable(folder)
    log.info("%s: %d case(s), %s", name, len(cases), pipeline.describe())
    results = run_cases(cases, pipeline.predict_case, pipeline.device)
    code = summarize(results)
    pipeline.finish(output_dir, code == EXIT_OK)
    return code, results


def run_folder(name: str, pipeline: Pipeline, input_dir: Path, output_dir: Path) -> int:
    """:func:`segment_folder`'s exit code (exec mode: one folder per process).

    Raises:
        InputError: the folders themselves are unusable (no case is run).
    """
    return segment_folder(name, pipeline, input_dir, output_dir)[0]
