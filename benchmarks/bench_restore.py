"""Benchmark: restoring AMOS task 1's 15 fold networks from full vs slim nnU-Net v1 checkpoints.

    python benchmarks/bench_restore.py [--work DIR] [--folds 5]

One checkpoint per task 1 configuration at the real architecture's size (FabiansUNet of the AMOS plans, see
``bench_memory.amos_architecture``; random weights), written twice: ``full`` as nnU-Net v1 saves it at the end of
training (weights, SGD momentum of every parameter, 1000 epochs of training curves as numpy floats, amp grad scaler)
and ``slim`` as ``gcinfer_dev.slim`` writes it for the model tarball. Each variant is restored in a fresh process as
the AMOS pipeline restores it (per fold: the architecture, :func:`gcinfer.pipelines.amos.nnunet_v1.load_checkpoint`,
``load_state_dict``; all fold networks kept), ``--folds`` folds per configuration from the same file (warm page
cache), and the table gives the bytes per fold, the wall time of the 15 restores and the process's peak RSS, with
slim / full ratios. The machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_memory import AMOS_CONFIGURATIONS, amos_architecture, status_bytes

from gcinfer_dev.slim import slim_checkpoint

REPOSITORY = Path(__file__).resolve().parents[1]
EPOCHS = 1000
VARIANTS = ("full", "slim")


def full_checkpoint(network: torch.nn.Module) -> dict:
    """What nnU-Net v1's ``save_checkpoint`` writes at the end of training (SGD with momentum, amp, 1000 epochs)."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for parameter in network.parameters():
        optimizer.state[parameter]["momentum_buffer"] = torch.randn(parameter.shape, generator=generator)
    curves = [[np.float64(i / EPOCHS) for i in range(EPOCHS)] for _ in range(4)]
    return {
        "epoch": EPOCHS,
        "state_dict": network.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "lr_scheduler_state_dict": None,
        "plot_stuff": tuple(curves),
        "best_stuff": (EPOCHS - 1, np.float64(0.1), np.float64(0.9)),
        "amp_grad_scaler": torch.amp.GradScaler("cpu").state_dict(),
    }


def write_checkpoints(work: Path) -> None:
    """``<work>/<variant>/<configuration>.model`` for both variants (written once)."""
    for index, (*_, pools) in enumerate(AMOS_CONFIGURATIONS):
        paths = {variant: work / variant / f"configuration_{index}.model" for variant in VARIANTS}
        if all(p.is_file() for p in paths.values()):
            continue
        torch.manual_seed(index)
        checkpoint = full_checkpoint(amos_architecture(pools))
        for variant, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint if variant == "full" else slim_checkpoint(checkpoint), path)


def child(work: Path, variant: str, folds: int) -> None:
    """Restore every fold network of the variant in this (fresh) process; print a JSON line."""
    from gcinfer.pipelines.amos import nnunet_v1

    networks = []
    start = time.perf_counter()
    for index, (*_, pools) in enumerate(AMOS_CONFIGURATIONS):
        for _ in range(folds):
            network = amos_architecture(pools)
            network.load_state_dict(
                nnunet_v1.load_checkpoint(work / variant / f"configuration_{index}.model")["state_dict"]
            )
            networks.append(network.eval())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": status_bytes("VmHWM"), "networks": len(networks)}))


def measure(work: Path, variant: str, folds: int) -> dict:
    command = [sys.executable, __file__, "--work", str(work), "--folds", str(folds), "--child", variant]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPOSITORY / ".cache" / "bench_restore")
    parser.add_argument("--folds", type=int, default=5, help="folds per configuration (task 1: 5)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.work, args.child, args.folds)
        return 0
    write_checkpoints(args.work)
    for variant in VARIANTS:  # warm the page cache for both
        measure(args.work, variant, 1)
    results = {variant: measure(args.work, variant, args.folds) for variant in VARIANTS}
    sizes = {
        v: sum(p.stat().st_size for p in (args.work / v).glob("*.model")) / len(AMOS_CONFIGURATIONS) for v in VARIANTS
    }
    count = results["full"]["networks"]
    print(f"| checkpoint | MiB per fold (mean of the 3 configurations) | restore {count} folds | peak RSS |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        r = results[variant]
        print(f"| {variant} | {sizes[variant] / 2**20:.0f} | {r['seconds']:.1f} s | {r['peak_rss'] / 2**30:.2f} GiB |")
    full, slim = results["full"], results["slim"]
    print(
        f"| slim / full | {sizes['slim'] / sizes['full']:.2f}x | {slim['seconds'] / full['seconds']:.2f}x "
        f"| {slim['peak_rss'] / full['peak_rss']:.2f}x |"
    )
    print(f"\nLoad average {os.getloadavg()[0]:.1f} (2-core machine, shared); warm page cache.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
