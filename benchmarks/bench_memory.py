"""Benchmark: full-size cases within Grand Challenge's memory, and the memory planner's estimates.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_memory.py [--cases amos autopet] [--work DIR]

One synthetic full-size case per pipeline runs through the pipeline's own ``predict_case`` on the CPU, with cheap
stand-in networks of the real input/output channels (1x1x1 convolutions), each case in a fresh subprocess whose peak
RSS (``VmHWM``) is measured and asserted under 15 GiB (Grand Challenge's 16 GiB minus 1 GiB for the system):

- amos: a 512 x 512 x 600 int16 CT at 0.78 x 0.78 x 1.25 mm through AMOS task 1 configurations (their
  preprocessor classes and target spacings; patch sizes as nnU-Net v1's residual planner gives them for AMOS's
  median case, 80 x 192 x 192 and 160^3), 16 classes, one fold each, with the organ-wise post-processing. All three
  configurations run by default (~5 min), the one with the largest network grid (``spnnU``, 375 x 580 x 580)
  first: they run one after the other around the same ensemble accumulator, so that one sets the case's peak
  (``--amos-configurations 1`` runs it alone, ~3 min);
- autopet: a 400 x 400 x 700 float32 PET at the target spacing (2.04 x 2.04 x 3 mm) and a 512 x 512 x 700 int16
  CT, two folds, the container's window (128^3), tile batch 8 and majority vote.

Memory does not depend on the number of tiles, so the step (AMOS 1.0, no mirroring) and overlap (AutoPET 0.5) are
coarser than the containers' to keep the run within minutes; everything else is the containers' configuration.

The table also prints the planner's device estimate for a T4 (:data:`gcinfer.memory.T4_FREE_BYTES`) with the real
architectures (AMOS: FabiansUNet of those plans, 5 folds per configuration; AutoPET: the container's DynUNet), in
fp16 (autocast and accumulators) and fp32, all on the device with the configured tile batch, the plan the planner
picks for a T4 with 15 GiB of RAM, and the planner's host estimate for the CPU run next to the measured peak.
Prints markdown, with the plan each pipeline logged for its run, then each stage's seconds and share of its case
(``StageLog``; with stand-in networks nearly all of it is the work around the networks; read the shares: the machine
may be shared, the load average is printed); exits 1 when a case's peak RSS reaches 15 GiB or a case fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from gcinfer import memory
from gcinfer.cases import Case
from gcinfer.io import Geometry, read_image
from gcinfer.pipelines.amos import memory as amos_memory
from gcinfer.pipelines.autopet import memory as autopet_memory

REPOSITORY = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 15 * memory.GIB
AMOS_SHAPE, AMOS_SPACING = (600, 512, 512), (1.25, 0.78, 0.78)  # (z, y, x)
AMOS_CONFIGURATIONS = (  # (preprocessor class, target spacing, patch size, pool kernels after the first), largest first
    ("Preprocessor3DBetterResampling", (2.0, 0.68825001, 0.68825001), (80, 192, 192), ((1, 2, 2),) + ((2, 2, 2),) * 4),
    ("Preprocessor3DBetterResampling", (1.5, 1.0, 1.0), (160, 160, 160), ((2, 2, 2),) * 5),
    ("GenericPreprocessor", (1.5, 1.0, 1.0), (160, 160, 160), ((2, 2, 2),) * 5),
)
AMOS_FOLDS, AMOS_CLASSES = 5, 16
GC_BASELINE_BYTES = 3 * 2**29
"""Host memory a Grand Challenge container holds before its first case, besides the AMOS fold weights: Python,
PyTorch with CUDA and the pipeline's imports (0.5 GiB measured here with the CPU build; CUDA adds about 1 GiB)."""
AUTOPET_PET, AUTOPET_CT = (400, 400, 700), (512, 512, 700)  # (x, y, z)
CASES = ("amos", "autopet")
STAGE_SHARE_LIMIT = 0.25
"""Largest share of a case's wall time for a stage other than predict and resample (issue 14's target)."""


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def write_image(path: Path, array: np.ndarray, spacing_xyz: tuple[float, ...]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def make_inputs(work: Path) -> None:
    """The synthetic inputs (written once): an abdomen-like CT, a PET with hot spots and its CT."""
    amos = work / "amos" / "in" / "amos_full.mha"
    if not amos.is_file():
        amos.parent.mkdir(parents=True, exist_ok=True)
        z, y, x = np.ogrid[: AMOS_SHAPE[0], : AMOS_SHAPE[1], : AMOS_SHAPE[2]]
        body = ((y - 256) / 200.0) ** 2 + ((x - 256) / 230.0) ** 2 < 1
        ct = np.where(body, np.int16(40) + (z % 50).astype(np.int16), np.int16(-1000)).astype(np.int16)
        write_image(amos, ct, AMOS_SPACING[::-1])
    pet_dir, ct_dir = work / "autopet" / "in" / "images" / "pet", work / "autopet" / "in" / "images" / "ct"
    if not (pet_dir / "case.mha").is_file():
        pet_dir.mkdir(parents=True, exist_ok=True)
        ct_dir.mkdir(parents=True, exist_ok=True)
        z, y, x = np.ogrid[: AUTOPET_PET[2], : AUTOPET_PET[1], : AUTOPET_PET[0]]
        pet = (((y - 200) / 150.0) ** 2 + ((x - 200) / 170.0) ** 2 < 1).astype(np.float32) * (1.0 + (z % 64) / 16.0)
        write_image(pet_dir / "case.mha", pet.astype(np.float32), (2.03642011, 2.03642011, 3.0))
        ct = np.full(AUTOPET_CT[::-1], -1000, np.int16)
        write_image(ct_dir / "case.mha", ct, (1.5234375, 1.5234375, 3.0))


# --- networks: stand-ins for the CPU run, real architectures for the T4 estimates -------------------------------------


class Pointwise(nn.Module):
    """A 1x1x1 convolution ``(B, C, *patch) -> (B, K, *patch)`` computed with ``einsum`` and the bias added in place:
    PyTorch's CPU ``conv3d`` with a 1x1x1 kernel took 3.4 s per batch of eight 128^3 tiles here, ten times as long,
    and an out-of-place bias doubled the stand-in's cost (a fresh output's pages are faulted in anew each time)."""

    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, in_channels, generator=generator))
        self.bias = nn.Parameter(torch.randn(classes, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bc...,kc->bk...", x, self.weight).add_(self.bias.view(1, -1, 1, 1, 1))


def stand_in(in_channels: int, classes: int) -> nn.Module:
    return Pointwise(in_channels, classes).eval()


def amos_architecture(pools: tuple) -> nn.Module:
    """nnU-Net v1's FabiansUNet as the AMOS residual plans build it (32 base features, 16 classes)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from nnunet.network_architecture.generic_modular_residual_UNet import FabiansUNet, get_default_network_config
    props = get_default_network_config(3, None, norm_type="in")
    return FabiansUNet(
        1,
        32,
        (1, 2, 3, 4, 4, 4),
        2,
        [(1, 1, 1), *pools],
        [(3, 3, 3)] * 6,
        props,
        AMOS_CLASSES,
        (1, 1, 1, 1, 1),
        deep_supervision=False,
        max_features=320,
    )


def amos_config() -> dict:
    return json.loads((REPOSITORY / "docker" / "amos_task1" / "config.json").read_text())


def autopet_settings(overlap: float | None = None):
    from gcinfer.pipelines.autopet.settings import load_settings

    config = json.loads((REPOSITORY / "docker" / "autopet2" / "config.json").read_text())
    if overlap is not None:
        config["overlap"] = overlap
    with tempfile.TemporaryDirectory() as empty:
        return load_settings(config, Path(empty))


# --- AMOS -------------------------------------------------------------------------------------------------------------


def amos_configurations(networks: list[nn.Module]) -> list:
    """nnunet_v1.Configuration objects of the three task 1 plans around the given networks (one per configuration)."""
    from nnunet.preprocessing import preprocessing

    from gcinfer.pipelines.amos import nnunet_v1

    intensities = {0: {"mean": 80.0, "sd": 120.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0}}
    configurations = []
    for network, (name, target, patch, _) in zip(networks, AMOS_CONFIGURATIONS):
        preprocessor = getattr(preprocessing, name)({0: "CT"}, {0: False}, [0, 1, 2], intensities)
        configurations.append(
            nnunet_v1.Configuration(
                name,
                REPOSITORY,
                (0,),
                [network],
                1,
                patch,
                AMOS_CLASSES,
                (0, 1, 2),
                (0, 1, 2),
                (0, 1, 2),
                preprocessor,
                np.array(target),
            )
        )
    return configurations


def amos_t4(variant: torch.dtype | None) -> amos_memory.AmosCase:
    """The full-size AMOS case with the real architectures, computing in ``variant`` (None: fp32)."""
    networks = [amos_architecture(pools) for *_, pools in AMOS_CONFIGURATIONS]
    configurations = amos_configurations(networks)
    costs = [memory.network_cost(n, (1, *c.patch_size), variant) for n, c in zip(networks, configurations)]
    case = amos_memory.AmosCase.of(AMOS_SHAPE, 2, AMOS_SPACING, configurations, costs, True, torch.device("cuda"))
    folds = tuple(dataclasses.replace(c, folds=AMOS_FOLDS) for c in case.configurations)
    return dataclasses.replace(case, configurations=folds)


def run_amos(work: Path, configuration_count: int, overlap: str) -> dict:
    from gcinfer.config import Sockets
    from gcinfer.pipelines.amos import pipeline as amos
    from gcinfer.runner import StageLog

    config = amos_config()
    configurations = amos_configurations([stand_in(1, AMOS_CLASSES) for _ in AMOS_CONFIGURATIONS])[:configuration_count]
    settings = amos.Settings(
        Sockets(("ct-image",), "seg"),
        tuple(c.name for c in configurations),
        (0,),
        "model_final_checkpoint",
        1.0,
        (),
        int(config["tile_batch_size"]),
        config["postprocessing"],
        overlap,
    )
    cpu = torch.device("cpu")
    costs = amos_memory.amos_network_costs(configurations, cpu)
    pipeline = amos.AmosPipeline(configurations, settings, cpu, tuple(costs))
    source = work / "amos" / "in" / "amos_full.mha"
    case = Case("amos_full", {"ct-image": source}, work / "amos" / "out" / "amos_full.mha")
    estimate = amos_memory.AmosCase.of(
        AMOS_SHAPE, 2, AMOS_SPACING, configurations, costs, bool(settings.mirror_axes), cpu
    )
    plan = cpu_estimate(
        lambda budget: amos_memory.plan_amos(
            case.name, estimate, settings.tile_batch_size, budget, cpu, settings.overlaps_on(cpu)
        )
    )
    stages, start = StageLog(case.name, cpu), time.perf_counter()
    amos.predict_case(case, pipeline, stages)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "stages": stages.stages, **plan, **check_output(case.output, source)}


# --- AutoPET ----------------------------------------------------------------------------------------------------------


def autopet_case(
    geometry: Geometry, settings, variant: torch.dtype | None, network: nn.Module
) -> autopet_memory.AutopetCase:
    cost = memory.network_cost(network, (1, *settings.window), variant)
    classes = int(settings.network["out_channels"])
    return autopet_memory.AutopetCase.of(geometry, 4, settings.target_spacing, settings.window, classes, 2, True, cost)


def autopet_geometry() -> Geometry:
    return Geometry(AUTOPET_PET, (2.03642011, 2.03642011, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def autopet_t4(variant: torch.dtype | None) -> autopet_memory.AutopetCase:
    from gcinfer.pipelines.autopet.networks import build_network

    settings = autopet_settings()
    return autopet_case(autopet_geometry(), settings, variant, build_network(settings))


def run_autopet(work: Path) -> dict:
    from gcinfer.config import Sockets
    from gcinfer.pipelines.autopet import pipeline as autopet
    from gcinfer.runner import StageLog

    settings = autopet_settings(overlap=0.5)
    classes = int(settings.network["out_channels"])
    networks = [stand_in(1, classes), stand_in(1, classes)]
    inputs = {s: work / "autopet" / "in" / "images" / s / "case.mha" for s in ("pet", "ct")}
    case = Case("case", inputs, work / "autopet" / "out" / "case.mha")
    cpu = torch.device("cpu")
    estimate = autopet_case(autopet_geometry(), settings, None, networks[0])
    plan = cpu_estimate(
        lambda budget: autopet_memory.plan_autopet(case.name, estimate, settings.tile_batch_size, budget, cpu)
    )
    start = time.perf_counter()
    sockets = Sockets(("pet", "ct"), "seg")
    pipeline = autopet.AutopetPipeline(settings, sockets, (), tuple(networks), cpu, estimate.network)
    stages = StageLog(case.name, cpu)
    pipeline.predict_case(case, stages)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "stages": stages.stages, **plan, **check_output(case.output, inputs["pet"])}


# --- measuring --------------------------------------------------------------------------------------------------------


def cpu_estimate(plan_for) -> dict:
    """The planner's host estimate for this CPU run (under the address-space limit that stands for the container's),
    with what the process holds already; None when the planner refuses the case (the pipeline then fails too)."""
    try:
        plan = plan_for(memory.Budget.detect(torch.device("cpu")))
    except memory.MemoryPlanError:
        return {"cpu_estimate": None}
    return {"cpu_estimate": plan.estimate.host + status_bytes("VmRSS")}


def check_output(output: Path, source: Path) -> dict:
    """The label map exists, is uint8 and has the input's grid."""
    labels, geometry = read_image(output)
    _, expected = read_image(source)
    return {"output_ok": labels.dtype == np.uint8 and geometry == expected}


def limit_address_space(limit: int) -> None:
    """Let this process map at most ``limit`` bytes more than it holds now: an allocation beyond fails with an
    out-of-memory error (as the container is killed beyond its limit) instead of starving the rest of the machine."""
    extra = limit - status_bytes("VmRSS") + status_bytes("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (extra, extra))


class PeakSampler(threading.Thread):
    """The peak of a ``/proc/self/status`` field that the kernel keeps no peak of (``VmData``: the private writable
    memory ``RLIMIT_DATA`` caps), sampled every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, field: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.field, self.interval, self.peak = field, interval, status_bytes(field)
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.peak = max(self.peak, status_bytes(self.field))

    def stop(self) -> int:
        self._stopped.set()
        self.join()
        self.peak = max(self.peak, status_bytes(self.field))
        return self.peak


def child(name: str, work: Path, amos_configurations: int, amos_overlap: str) -> None:
    """Run one case in this (fresh) process under the limit; print a JSON line with the measurements: peak RSS
    (``VmHWM``), and the growth during the case of RSS and of the virtual private data (``VmData``, sampled)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    limit_address_space(LIMIT_BYTES)
    data_before, rss_before = status_bytes("VmData"), status_bytes("VmRSS")
    sampler = PeakSampler("VmData")
    sampler.start()
    result = run_amos(work, amos_configurations, amos_overlap) if name == "amos" else run_autopet(work)
    result["peak_data"] = sampler.stop()
    result["peak_rss"] = status_bytes("VmHWM")
    result["data_growth"] = result["peak_data"] - data_before
    result["rss_growth"] = result["peak_rss"] - rss_before
    print(json.dumps(result, default=str))


def measure(name: str, work: Path, amos_configurations: int, amos_overlap: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--work",
        str(work),
        "--amos-configurations",
        str(amos_configurations),
        "--amos-overlap",
        amos_overlap,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    plan_lines = [line for line in completed.stderr.splitlines() if "memory plan" in line]
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"}
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["pipeline_plan"] = plan_lines[-1].split("memory plan: ")[-1].split(" |")[0] if plan_lines else None
    result["load"] = os.getloadavg()[0]
    return result


def t4_estimates(name: str) -> dict:
    """The planner's device estimates on a T4 with the real architectures, all on the device with the configured
    tile batch: ``fp16`` (autocast, bfloat16 tiling, AMOS: float16 ensemble) and ``fp32`` (all float32, the AMOS
    ensemble exact); and the plan it picks for a T4 whose host
    has 15 GiB minus :data:`GC_BASELINE_BYTES` and (AMOS) the fold weights kept there."""
    cuda = torch.device("cuda")
    row = {}
    variants = (
        ("fp16", torch.float16, memory.REDUCED_DTYPE, torch.float16 if name == "amos" else torch.float32),
        ("fp32", None, torch.float32, torch.float32),
    )
    for label, compute, tiling_dtype, ensemble_dtype in variants:
        if name == "amos":
            case, phases_of, planner = amos_t4(compute), amos_memory.amos_phases, amos_memory.plan_amos
            batch = int(amos_config()["tile_batch_size"])
            on_host = sum(c.network.weights * c.folds for c in case.configurations)
        else:
            batch = autopet_settings().tile_batch_size
            case, phases_of, planner, on_host = (
                autopet_t4(compute),
                autopet_memory.autopet_phases,
                autopet_memory.plan_autopet,
                0,
            )
        choice = memory.Choice(tiling_dtype, ensemble_dtype, True, True, batch)
        row[label] = memory.estimate(phases_of(case, choice), False).device
        if compute is not None:
            budget = memory.Budget.detect(
                cuda, device_bytes=memory.T4_FREE_BYTES, host_bytes=LIMIT_BYTES - GC_BASELINE_BYTES - on_host
            )
            try:
                plan = planner(name, case, batch, budget, cuda)
                row["plan"] = f"{plan.choice.describe('cuda')} ({gib(plan.estimate.device)})"
            except memory.MemoryPlanError as error:
                row["plan"], row["refusal"] = "refused (below)", str(error)
    return row


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / memory.GIB:.1f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--work", type=Path, default=REPOSITORY / ".cache" / "bench_memory")
    parser.add_argument(
        "--amos-configurations",
        type=int,
        choices=(1, 2, 3),
        default=3,
        help="AMOS configurations run on the CPU, largest network grid first (default 3)",
    )
    parser.add_argument(
        "--amos-overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="AMOS: preprocess the next configuration while one predicts (default auto: off on the CPU)",
    )
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.amos_configurations, args.amos_overlap)
        return 0
    make_inputs(args.work)
    shapes = {"amos": "CT 512x512x600 (x,y,z)", "autopet": "PET 400x400x700, CT 512x512x700"}
    classes = {"amos": AMOS_CLASSES, "autopet": 2}
    print(
        "| case | shape | classes | planner's plan on a T4 (device estimate) | T4 estimate fp16 | T4 estimate fp32 "
        "| CPU run: plan | CPU estimate | peak RSS (measured) | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed, notes, runs = False, [], {}
    for name in args.cases:
        t4, run = t4_estimates(name), measure(name, args.work, args.amos_configurations, args.amos_overlap)
        runs[name] = run
        if "refusal" in t4:
            notes.append(f"T4 plan for {name}: {t4['refusal']}")
        if "error" in run:
            failed = True
            print(
                f"| {name} | {shapes[name]} | {classes[name]} | {t4['plan']} | {gib(t4['fp16'])} | {gib(t4['fp32'])} "
                f"| FAILED: {run['error']} | | | |"
            )
            continue
        ok = run["peak_rss"] < LIMIT_BYTES and run["output_ok"]
        failed |= not ok
        notes.append(
            f"{name}: during the case VmData grew {gib(run['data_growth'])} (peak {gib(run['peak_data'])}), RSS "
            f"{gib(run['rss_growth'])} (VmHWM {gib(run['peak_rss'])}): virtual data beyond RSS "
            f"{gib(run['data_growth'] - run['rss_growth'])}, kept free under RLIMIT_DATA: "
            f"{gib(memory.VIRTUAL_MARGIN_BYTES)}"
        )
        print(
            f"| {name} | {shapes[name]} | {classes[name]} | {t4['plan']} | {gib(t4['fp16'])} | {gib(t4['fp32'])} "
            f"| {run['pipeline_plan']} | {gib(run['cpu_estimate'])} | {gib(run['peak_rss'])}"
            f"{'' if ok else ' **OVER 15 GiB**'} "
            f"| {run['seconds']:.0f} s |"
        )
    print(
        f"\nT4 budget: {gib(memory.T4_FREE_BYTES)} free minus {memory.DEVICE_MARGIN:.0%} margin; host: 15 GiB "
        f"minus {gib(GC_BASELINE_BYTES)} and the AMOS fold weights. Peak RSS limit {gib(LIMIT_BYTES)}. AMOS CPU run: "
        f"{args.amos_configurations} of {len(AMOS_CONFIGURATIONS)} configurations (largest grid first)."
    )
    for note in notes:
        print(f"\n{note}")
    print(stage_table(runs))
    return 1 if failed else 0


def stage_table(runs: dict[str, dict]) -> str:
    """Markdown: each stage's wall seconds and share of the case, per case that ran, with the load average (other
    processes on the machine) at the end of the case; shares above :data:`STAGE_SHARE_LIMIT` (other than
    predict and resample) are flagged."""
    rows = ["\n| case | stage | seconds | share |", "|---|---|---|---|"]
    for name, run in runs.items():
        stages = run.get("stages")
        if not stages:
            continue
        total = sum(stages.values())
        for stage, seconds in stages.items():
            share = seconds / total
            flag = " **over 25 %**" if share > STAGE_SHARE_LIMIT and stage not in ("predict", "resample") else ""
            rows.append(f"| {name} | {stage} | {seconds:.1f} | {100 * share:.0f} %{flag} |")
        rows.append(f"| {name} | total (load average {run['load']:.1f}) | {total:.1f} | 100 % |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
