"""The contract every pipeline keeps, and the registry of pipelines.

A pipeline package (``gcinfer.pipelines.<name>``) exports two functions (:class:`PipelineModule`):

- ``add_arguments(parser)``: its own command-line flags (the CLI adds ``--input``, ``--output``, ``--model``,
  ``--device`` and ``--config``);
- ``load(args, config, source)``: parse the settings once, restore the networks once (on ``args.device``) and
  measure what the memory plan needs of them; returns a :class:`Pipeline`.

A :class:`Pipeline` then segments any number of input folders (exec mode: one; a server: one per request):
:func:`gcinfer.runner.run_folder` finds the cases (its ``sockets``), runs ``predict_case`` on each (which reads,
plans the memory before any work, predicts and writes atomically) and calls ``finish`` once.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from gcinfer.config import Sockets

if TYPE_CHECKING:
    from gcinfer.cases import Case
    from gcinfer.runner import StageLog


class Pipeline(Protocol):
    """A restored pipeline: settings parsed and networks on the device."""

    sockets: Sockets
    device: torch.device

    def describe(self) -> str:
        """One line of the settings that matter to a reader of the log (models, folds, ensembling, device)."""

    def predict_case(self, case: Case, stages: StageLog, upcoming: Case | None = None) -> None:
        """Segment one case and write ``case.output`` atomically (uint8, the input's geometry); nothing else.
        ``upcoming`` is the case that runs next, which the pipeline may start reading while this one predicts.

        Raises:
            InputError: a bad input (names the file); MemoryPlanError: the case fits no memory plan.
        """

    def finish(self, output_dir: Path, succeeded: bool) -> None:
        """Write what a run writes once beside the cases' outputs (may do nothing)."""


class PipelineModule(Protocol):
    """What a pipeline package exports."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def load(self, args: argparse.Namespace, config: dict, source: str) -> Pipeline: ...


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline's names: the command (``amos-task1``), its container folder (``amos_task1``, where its
    ``config.json`` lives) and its package, imported only when used (nnU-Net and MONAI load slowly)."""

    command: str
    container: str
    package: str

    def module(self) -> PipelineModule:
        return importlib.import_module(self.package)


PIPELINES = (
    PipelineSpec("amos-task1", "amos_task1", "gcinfer.pipelines.amos"),
    PipelineSpec("amos-task2", "amos_task2", "gcinfer.pipelines.amos"),
    PipelineSpec("autopet2", "autopet2", "gcinfer.pipelines.autopet"),
)


def spec_of(name: str) -> PipelineSpec:
    """The pipeline whose command (``amos-task1``) or container folder (``amos_task1``) is ``name``.

    Raises:
        KeyError: no such pipeline (the message lists them).
    """
    for spec in PIPELINES:
        if name in (spec.command, spec.container):
            return spec
    raise KeyError(f"unknown pipeline '{name}' (one of: {', '.join(s.command for s in PIPELINES)})")
