"""GPU check (``make gpu-check``): everything needed to decide the CUDA defaults, in one table, on one GPU.

    python benchmarks/gpu_check.py --fixtures .cache/fixtures [--work DIR]

Skipped (exit 0, one line saying so) where no CUDA device is present. Otherwise, unattended (a few minutes):

- tiling: the fixture AMOS task 1 configuration on the CUDA device with fp16 autocast vs the CPU in fp32, same
  input (max probability difference, identical argmax voxels);
- pipelines: ``gcinfer amos-task1|amos-task2|autopet2`` end to end on the fixtures, ``--device cuda`` vs
  ``--device cpu`` (identical label voxels, wall time of each);
- overlap: ``gcinfer amos-task1|amos-task2`` on the device with ``--overlap on`` vs ``off`` (the host's
  preprocessing of the next configuration and read of the next case hidden behind prediction: speed-up, identical
  label voxels);
- post-processing: the AMOS organ-wise post-processing with cupy on the device vs numpy (identical labels);
- out-of-memory fallback: a tiled prediction under a memory cap (``torch.cuda.set_per_process_memory_fraction``)
  that forces a real CUDA out-of-memory error; the fallback's warning and its result vs the uncapped one;
- cuDNN: deterministic vs autotuned (``cudnn.benchmark``) forward passes of the AMOS architecture (time, max
  difference);
- throughput: forward passes of the real AMOS (FabiansUNet, both patch sizes) and AutoPET (DynUNet, 128^3)
  architectures at the containers' tile batches, fp32 vs fp16 autocast, with and without ``channels_last_3d``
  (tiles per second).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from bench_memory import AMOS_CONFIGURATIONS, amos_architecture, autopet_settings

REPOSITORY = Path(__file__).resolve().parents[1]
SKIP_MESSAGE = "gpu-check skipped: no CUDA device here (torch.cuda.is_available() is False)"
PIPELINES = {  # CLI name -> (fixture folder, container config, extra options)
    "amos-task1": ("amos_task1", "amos_task1", ("--folds", "0", "1")),
    "amos-task2": ("amos_task2", "amos_task2", ("--folds", "0", "1")),
    "autopet2": ("autopet2", "autopet2", ()),
}
Row = tuple[str, str, str]
"""(check, setting, result)."""


def timed(function: Callable[[], object], device: torch.device, repeat: int = 1) -> tuple[object, float]:
    """The last result of ``function`` and its mean wall seconds over ``repeat`` calls after one warm-up call."""
    result = function()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        result = function()
    torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) / repeat


def amos_input(fixtures: Path) -> tuple[torch.Tensor, object]:
    """The first fixture AMOS task 1 configuration (folds 0 1) and its preprocessed first sample case."""
    from gcinfer.io import read_image
    from gcinfer.pipelines.amos import nnunet_v1

    models = json.loads((REPOSITORY / "docker" / "amos_task1" / "config.json").read_text())["models"]
    (configuration,) = nnunet_v1.restore(fixtures / "amos_task1" / "model", models[:1], [0, 1])
    image, geometry = read_image(sorted((fixtures / "amos_task1" / "input").glob("*.nii.gz"))[0])
    data = configuration.preprocess(nnunet_v1.crop(image[None], geometry)).data
    return torch.from_numpy(data), configuration


def tiled(
    image: torch.Tensor,
    configuration,
    device: torch.device,
    autocast: torch.dtype | None,
    mirror_axes: tuple[int, ...] = (0, 1, 2),
) -> torch.Tensor:
    """The configuration's tiled probabilities (nnU-Net mode, mirrored as the containers) on ``device``, returned on
    the CPU."""
    from gcinfer.engine.tiling import NnunetTiling, TileMemory, predict_tiled

    with configuration.networks_on(device) as networks:
        return predict_tiled(
            image.to(device),
            networks,
            configuration.patch_size,
            NnunetTiling(),
            mirror_axes=mirror_axes,
            autocast_dtype=autocast,
            memory=TileMemory(result_device=torch.device("cpu")),
            progress=False,
        )


def compare(reference: torch.Tensor, other: torch.Tensor) -> str:
    """Max absolute difference of probabilities and the share of identical argmax voxels."""
    same = (reference.argmax(0) == other.argmax(0)).float().mean().item()
    return f"max |diff| {(reference - other).abs().max().item():.2e}, identical argmax {100 * same:.3f} %"


def check_tiling(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    image, configuration = amos_input(fixtures)
    cpu = tiled(image, configuration, torch.device("cpu"), None)
    cuda = tiled(image, configuration, device, torch.float16)
    return [("tiling", "AMOS fixture, cuda fp16 autocast vs cpu fp32", compare(cpu, cuda))]


def run_pipeline(name: str, fixtures: Path, device: str, output: Path, options: tuple[str, ...] = ()) -> float:
    folder, config, extra = PIPELINES[name]
    command = [sys.executable, "-m", "gcinfer.cli", "--quiet", "--no-progress", name, "--device", device]
    command += ["--input", str(fixtures / folder / "input"), "--output", str(output)]
    command += ["--model", str(fixtures / folder / "model")]
    command += ["--config", str(REPOSITORY / "docker" / config / "config.json"), *extra, *options]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - start


def identical_share(first: Path, second: Path) -> float:
    """Share of identical voxels over every label map of ``first`` and its namesake in ``second``."""
    from gcinfer.io import read_image

    same = total = 0
    for path in sorted(p for p in first.rglob("*") if p.is_file()):
        a, b = read_image(path)[0], read_image(second / path.relative_to(first))[0]
        same, total = same + int((a == b).sum()), total + a.size
    return same / max(total, 1)


def check_pipelines(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    rows = []
    for name in PIPELINES:
        seconds = {d: run_pipeline(name, fixtures, d, work / name / d) for d in ("cpu", str(device))}
        share = identical_share(work / name / "cpu", work / name / str(device))
        times = ", ".join(f"{d} {s:.1f} s" for d, s in seconds.items())
        rows.append(("pipeline", f"{name}, {device} vs cpu", f"identical voxels {100 * share:.3f} % ({times})"))
    return rows


def check_overlap(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    """AMOS on the device with the host work (next configuration's preprocessing, next case's read) overlapped with
    prediction and without: the speed-up, and the same labels."""
    rows = []
    for name in ("amos-task1", "amos-task2"):
        seconds = {
            overlap: run_pipeline(
                name, fixtures, str(device), work / "overlap" / name / overlap, ("--overlap", overlap)
            )
            for overlap in ("off", "on")
        }
        share = identical_share(work / "overlap" / name / "off", work / "overlap" / name / "on")
        rows.append(
            (
                "overlap",
                f"{name} on {device}, --overlap on vs off",
                f"identical voxels {100 * share:.3f} %, {seconds['off'] / seconds['on']:.2f}x "
                f"(off {seconds['off']:.1f} s, on {seconds['on']:.1f} s)",
            )
        )
    return rows


def check_postprocessing(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    from gcinfer.io import read_image
    from gcinfer.pipelines.amos.pipeline import postprocess

    try:
        import cupy  # noqa: F401
    except ImportError:
        return [("post-processing", "cupy vs numpy", "cupy not installed: the CPU post-processing runs")]
    table = json.loads((REPOSITORY / "docker" / "amos_task1" / "config.json").read_text())["postprocessing"]
    labels, geometry = read_image(sorted((fixtures / "amos_task1" / "labels").glob("*"))[0])
    labels = torch.from_numpy(labels.astype(np.uint8))
    numpy_result = postprocess(labels, geometry.spacing_zyx, table)
    cupy_result = postprocess(labels.to(device), geometry.spacing_zyx, table)
    verdict = "identical" if np.array_equal(numpy_result, cupy_result) else "DIFFERENT"
    return [("post-processing", "AMOS task 1 table, cupy vs numpy", verdict)]


@contextlib.contextmanager
def memory_cap(device: torch.device, nbytes: int) -> Iterator[None]:
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(nbytes / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_oom_fallback(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    image, configuration = amos_input(fixtures)
    uncapped = tiled(image, configuration, device, torch.float16)
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    try:
        weights = sum(p.numel() * p.element_size() for n in configuration.networks for p in n.parameters())
        with memory_cap(device, weights + 4 * image.numel() + 2**20):
            capped = tiled(image, configuration, device, torch.float16)
    finally:
        logging.getLogger().removeHandler(handler)
    fallback = [m for m in handler.messages if "out of memory" in m]
    verdict = f"fallback: {fallback[0] if fallback else 'NOT TRIGGERED'}; vs uncapped: {compare(uncapped, capped)}"
    return [("out-of-memory", "tiling under a memory cap", verdict)]


def forward(network: torch.nn.Module, tiles: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=autocast):
        return network(tiles)


def check_cudnn(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    *_, patch, pools = AMOS_CONFIGURATIONS[1]
    network = amos_architecture(pools).eval().to(device)
    tiles = torch.randn((2, 1, *patch), device=device)
    results = {}
    for name, deterministic in (("deterministic", True), ("autotuned", False)):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
        results[name] = timed(lambda: forward(network, tiles, True), device, repeat=5)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    difference = (results["deterministic"][0] - results["autotuned"][0]).abs().max().item()
    times = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, (_, seconds) in results.items())
    return [("cuDNN", f"AMOS 160^3, batch 2, fp16: {times}", f"max |diff| {difference:.2e}")]


def check_throughput(fixtures: Path, device: torch.device, work: Path) -> list[Row]:
    from gcinfer.pipelines.autopet.networks import build_network

    amos_batch = int(json.loads((REPOSITORY / "docker" / "amos_task1" / "config.json").read_text())["tile_batch_size"])
    settings = autopet_settings()
    cases = [
        (f"AMOS {'x'.join(map(str, patch))}", amos_architecture(pools), patch, amos_batch)
        for *_, patch, pools in AMOS_CONFIGURATIONS[:2]
    ]
    cases.append(("AutoPET 128^3", build_network(settings), tuple(settings.window), settings.tile_batch_size))
    rows = []
    for name, network, patch, batch in cases:
        network = network.eval().to(device)
        for channels_last in (False, True):
            memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
            network = network.to(memory_format=memory_format)
            tiles = torch.randn((batch, 1, *patch), device=device).to(memory_format=memory_format)
            for autocast in (False, True):
                _, seconds = timed(functools.partial(forward, network, tiles, autocast), device, repeat=3)
                setting = f"{name}, batch {batch}, {'fp16' if autocast else 'fp32'}, channels_last_3d {channels_last}"
                rows.append(("throughput", setting, f"{batch / seconds:.1f} tiles/s"))
        network.cpu()
        torch.cuda.empty_cache()
    return rows


CHECKS = (
    check_tiling,
    check_pipelines,
    check_overlap,
    check_postprocessing,
    check_oom_fallback,
    check_cudnn,
    check_throughput,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=Path(os.environ.get("GCINFER_FIXTURES", ".cache/fixtures")))
    parser.add_argument("--work", type=Path, default=None, help="folder for the pipeline outputs (default: temporary)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    device = torch.device("cuda")
    print(f"GPU check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    print("| check | setting | result |\n|---|---|---|")
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        work = args.work or Path(temporary)
        for check in CHECKS:
            try:
                rows = check(args.fixtures, device, work)
            except Exception as error:  # one failing check must not hide the others' figures
                failed, rows = True, [(check.__name__, "FAILED", f"{type(error).__name__}: {error}")]
            for row in rows:
                print("| " + " | ".join(row) + " |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
