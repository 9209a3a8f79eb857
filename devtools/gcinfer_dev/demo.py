"""``make demo``: run every pipeline on the fixture sample cases through the containers' entry point.

For each case it prints what was written, the time, and the Dice against the phantom's ground truth, and
writes a PNG preview next to the output. Exit code 1 when a pipeline fails or misses its Dice target.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gcinfer import cli
from gcinfer.io import case_name, image_suffix, read_image
from gcinfer.pipelines import PipelineSpec, spec_of
from gcinfer_dev import container_config
from gcinfer_dev.metrics import case_dice, dice_per_label, format_dice, mean_dice
from gcinfer_dev.preview import write_preview


@dataclass(frozen=True)
class DemoTask:
    """A pipeline's demo: its fixture folder is its container folder's name."""

    pipeline: PipelineSpec
    extra_args: tuple[str, ...]
    target: float
    metric: str

    @property
    def command(self) -> str:
        return self.pipeline.command

    @property
    def folder(self) -> str:
        return self.pipeline.container


TASKS = (
    DemoTask(spec_of("amos-task1"), ("--folds", "0", "1"), 0.8, "mean organ Dice"),
    DemoTask(spec_of("amos-task2"), ("--folds", "0", "1"), 0.8, "mean organ Dice"),
    DemoTask(spec_of("autopet2"), (), 0.7, "lesion Dice"),
)


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and image_suffix(p) and not p.name.startswith("."))


def _input_image(inputs: Path, name: str) -> Path:
    """The image a prediction was made from (the first socket in the Grand Challenge layout)."""
    candidates = sorted(p for p in inputs.rglob("*") if p.is_file() and case_name(p) == name)
    return next(p for p in candidates if "/ct/" not in p.as_posix())


def run_task(task: DemoTask, fixtures: Path, output: Path, device: str) -> bool:
    """Run one pipeline on its sample cases and report; True when it ran and met its Dice target."""
    root, out = fixtures / task.folder, output / task.folder
    argv = [task.command, "--input", str(root / "input"), "--output", str(out), "--model", str(root / "model")]
    argv += ["--config", str(container_config(task.folder))]
    start = time.perf_counter()
    code = cli.main([*argv, "--device", device, *task.extra_args])
    seconds = time.perf_counter() - start
    print(f"\n== {task.command}: exit {code}, {seconds:.1f} s, outputs in {out}")
    scores = []
    for path in _outputs(out):
        name = case_name(path)
        prediction, _ = read_image(path)
        truth, _ = read_image(next(p for p in _outputs(root / "labels") if case_name(p) == name))
        score = case_dice(prediction, truth)
        scores.append(score)
        png = write_preview(_input_image(root / "input", name), path, path.parent / f"{name}.png")
        labels = " ".join(f"{k}:{v:.2f}" for k, v in dice_per_label(prediction, truth).items())
        print(f"  {path}  {task.metric} {format_dice(score)}  [{labels}]  preview {png.name}")
    mean = mean_dice(scores)
    ok = code == 0 and mean is not None and mean >= task.target
    scored = sum(s is not None for s in scores)
    mean_text = "n/a" if mean is None else f"{mean:.3f}"
    print(
        f"  {task.metric} over {scored} case(s) with foreground (of {len(scores)}): {mean_text} "
        f"(target >= {task.target}) {'OK' if ok else 'FAILED'}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=Path(".cache/fixtures"))
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    results = [run_task(task, args.fixtures, args.output, args.device) for task in TASKS]
    print(f"\n{sum(results)}/{len(results)} pipelines met their targets")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
