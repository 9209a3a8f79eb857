"""Benchmark: the tiling engine against nnU-Net v1 ``predict_3D`` and MONAI ``sliding_window_inference``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_tiling.py [--repeats 3]

One fixed network (a seeded nnU-Net v1 Generic_UNet, instance norm) and one fixed volume, the same settings for all
variants: sliding window with Gaussian weighting, no mirroring, one tile per forward pass, fp32, on the CPU. The
volume is chosen so that nnU-Net's step 0.5 and MONAI's overlap 0.5 place the very same tiles, so every variant runs
the same forward passes. The floor is those forward passes on tiles cut before the clock starts, with no aggregation.

Each (variant, repeat) runs in a fresh subprocess, variants interleaved so that load from other processes spreads
evenly; all subprocesses import the same modules, build the same network and run one warm-up forward pass before
timing. Reported: the median wall time and CPU time (user + system, which other processes' load disturbs less),
the ratio of wall (and CPU) time to each reference, the overhead over the floor, and the largest peak RSS (VmHWM)
of the variant's subprocesses.

A second table isolates the aggregation cost (padding, tiling, softmax, weighting, accumulation): the same variants
with a 1x1x1 convolution as the network, whose forward pass costs almost nothing, CPU time in one subprocess. Its
last column relates that cost to the main floor's CPU time, i.e. the overhead the aggregation adds to the real
network. Prints markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # nnU-Net v1 prints a banner
    warnings.simplefilter("ignore", DeprecationWarning)  # and imports scipy.ndimage.filters
    from nnunet.network_architecture.generic_UNet import Generic_UNet
    from nnunet.network_architecture.neural_network import SegmentationNetwork
    from nnunet.utilities.nd_softmax import softmax_helper
from monai.inferers import sliding_window_inference

from gcinfer.engine.tiling import MonaiTiling, NnunetTiling, predict_tiled
from gcinfer.engine.windows import tile_starts_nnunet

PATCH = (64, 64, 64)
SHAPE = (1, 96, 96, 128)  # (C, X, Y, Z): 2 x 2 x 3 tiles in both placements
CLASSES, BASE_FEATURES, POOLINGS = 4, 16, 3
AGGREGATION_REPEATS = 5
VARIANTS = {
    "floor": "floor: forward passes on pre-cut tiles",
    "engine_nnunet": "gcinfer predict_tiled, mode nnunet",
    "nnunet": "nnU-Net v1 predict_3D",
    "engine_monai": "gcinfer predict_tiled, mode monai",
    "monai": "MONAI sliding_window_inference",
}


def build_network() -> Generic_UNet:
    """The benchmark's Generic_UNet (seed 0), eval mode, deep supervision off, softmax for predict_3D."""
    torch.manual_seed(0)
    network = Generic_UNet(
        SHAPE[0],
        BASE_FEATURES,
        CLASSES,
        POOLINGS,
        conv_op=nn.Conv3d,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=nn.Dropout3d,
        dropout_op_kwargs={"p": 0, "inplace": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        deep_supervision=False,
        final_nonlin=lambda x: x,
        pool_op_kernel_sizes=[[2, 2, 2]] * POOLINGS,
        conv_kernel_sizes=[[3, 3, 3]] * (POOLINGS + 1),
    )
    network.do_ds = False
    network.inference_apply_nonlin = softmax_helper
    return network.eval()


class PointwiseNetwork(SegmentationNetwork):
    """A 1x1x1 convolution to CLASSES logits: a near-free forward pass, to time the aggregation alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(SHAPE[0], CLASSES, 1)
        self.conv_op, self.num_classes, self.inference_apply_nonlin = nn.Conv3d, CLASSES, softmax_helper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def build_image() -> torch.Tensor:
    """The benchmark volume (C, X, Y, Z), float32, seed 0."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def prepare(variant: str, network: nn.Module, image: torch.Tensor) -> Callable[[], object]:
    """The untimed set-up of ``variant``; returns the call to time."""
    if variant == "floor":
        starts = tile_starts_nnunet(SHAPE[1:], PATCH, 0.5)
        tiles = [
            image[None, :, x : x + PATCH[0], y : y + PATCH[1], z : z + PATCH[2]].contiguous()
            for x in starts[0]
            for y in starts[1]
            for z in starts[2]
        ]

        def floor() -> None:
            with torch.inference_mode():
                for tile in tiles:
                    network(tile)

        return floor
    if variant == "engine_nnunet":
        return lambda: predict_tiled(image, network, PATCH, NnunetTiling(step_size=0.5), progress=False)
    if variant == "engine_monai":
        return lambda: predict_tiled(image, network, PATCH, MonaiTiling(overlap=0.5), progress=False)
    if variant == "nnunet":
        array = image.numpy()
        return lambda: network.predict_3D(
            array,
            do_mirroring=False,
            use_sliding_window=True,
            step_size=0.5,
            patch_size=PATCH,
            use_gaussian=True,
            all_in_gpu=False,
            verbose=False,
            mixed_precision=False,
        )

    def monai() -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(
                image[None],
                PATCH,
                1,
                lambda tiles: torch.softmax(network(tiles), 1),
                0.5,
                mode="gaussian",
                sigma_scale=0.125,
                padding_mode="constant",
            )

    return monai


def peak_rss_kib() -> int:
    """This process's peak resident set size (VmHWM), KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def run_child(variant: str) -> None:
    """Set up, warm up, time one run of ``variant``; print {"wall", "cpu", "peak_rss_kib"} as JSON."""
    network, image = build_network(), build_image()
    run = prepare(variant, network, image)
    with torch.inference_mode():
        network(torch.zeros((1, SHAPE[0], *PATCH)))
    wall, cpu = timed(run)
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_rss_kib": peak_rss_kib()}))


def run_aggregation_child() -> None:
    """CPU seconds of AGGREGATION_REPEATS interleaved runs of every variant with the pointwise network, as JSON."""
    network, image = PointwiseNetwork().eval(), build_image()
    runs = {variant: prepare(variant, network, image) for variant in VARIANTS}
    for run in runs.values():  # warm-up
        run()
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(AGGREGATION_REPEATS):
        for variant, run in runs.items():
            cpu[variant].append(timed(run)[1])
    print(json.dumps(cpu))


def child(*arguments: str) -> dict:
    """Run this script with ``arguments`` in a fresh subprocess; the JSON on its last stdout line."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, __file__, *arguments], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(repeats: int) -> dict[str, list[dict]]:
    """Run every variant ``repeats`` times, each in a fresh subprocess, interleaved."""
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(repeats):
        for variant in VARIANTS:
            results[variant].append(child("--variant", variant))
            wall, cpu = results[variant][-1]["wall"], results[variant][-1]["cpu"]
            print(f"repeat {repeat + 1}/{repeats} {variant}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr)
    return results


def main_table(results: dict[str, list[dict]]) -> str:
    """Markdown: median wall and CPU time, wall (CPU) ratios to the references and over the floor, peak RSS."""
    wall = {v: statistics.median(r["wall"] for r in runs) for v, runs in results.items()}
    cpu = {v: statistics.median(r["cpu"] for r in runs) for v, runs in results.items()}

    def ratio(variant: str, reference: str) -> str:
        return f"{wall[variant] / wall[reference]:.3f}x ({cpu[variant] / cpu[reference]:.3f}x)"

    def over_floor(variant: str) -> str:
        return f"{100 * (wall[variant] / wall['floor'] - 1):+.1f} % ({100 * (cpu[variant] / cpu['floor'] - 1):+.1f} %)"

    lines = [
        "| variant | wall time (s, median) | CPU time (s, median) | vs nnU-Net v1, wall (CPU) | vs MONAI, wall (CPU) "
        "| over floor, wall (CPU) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, runs in results.items():
        rss = max(r["peak_rss_kib"] for r in runs) / 1024
        lines.append(
            f"| {VARIANTS[variant]} | {wall[variant]:.2f} | {cpu[variant]:.2f} | {ratio(variant, 'nnunet')} | "
            f"{ratio(variant, 'monai')} | {over_floor(variant)} | {rss:.0f} |"
        )
    return "\n".join(lines)


def aggregation_table(cpu: dict[str, list[float]], floor_cpu: float) -> str:
    """Markdown: the pointwise network's median CPU time, minus its floor, and as a share of ``floor_cpu``."""
    median = {variant: statistics.median(seconds) for variant, seconds in cpu.items()}
    lines = [
        f"| variant, 1x1x1 conv network | CPU time (ms, median of {AGGREGATION_REPEATS}) | aggregation (ms) "
        "| aggregation / main floor CPU |",
        "|---|---:|---:|---:|",
    ]
    for variant, seconds in median.items():
        aggregation = seconds - median["floor"]
        lines.append(
            f"| {VARIANTS[variant]} | {1e3 * seconds:.1f} | {1e3 * aggregation:.1f} | "
            f"{100 * aggregation / floor_cpu:.2f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported), default 3")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one timed run
    parser.add_argument("--aggregation", action="store_true", help=argparse.SUPPRESS)  # internal: pointwise runs
    args = parser.parse_args()
    if args.variant:
        run_child(args.variant)
        return
    if args.aggregation:
        run_aggregation_child()
        return
    tiles = 1
    for starts in tile_starts_nnunet(SHAPE[1:], PATCH, 0.5):
        tiles *= len(starts)
    print(
        f"Generic_UNet ({BASE_FEATURES} base features, {POOLINGS} poolings, {CLASSES} classes), volume {SHAPE}, "
        f"patch {PATCH}, {tiles} tiles (nnU-Net step 0.5 = MONAI overlap 0.5), Gaussian, no mirroring, fp32, "
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}; "
        f"load average at start {os.getloadavg()[0]:.1f}\n"
    )
    results = measure(args.repeats)
    aggregation = child("--aggregation")
    print(main_table(results))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}\n")
    print(aggregation_table(aggregation, statistics.median(r["cpu"] for r in results["floor"])))


if __name__ == "__main__":
    main()
