"""Benchmark: nnU-Net v1's image resampling of a CT to AMOS task 1's target spacings, three ways, in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_resize.py [--planes 300]

A 512 x 512 x ``planes`` CT (float64, random HU-like values; the full-size AMOS case has 600 planes) at
1.25 x 0.78 x 0.78 mm resampled as nnU-Net v1 calls scikit-image's ``resize`` (order 3, ``mode="edge"``, no
anti-aliasing) to the two distinct target spacings of task 1 (2.0 x 0.688 x 0.688 and 1.5 x 1 x 1 mm):

- reference: scikit-image's ``resize``, nnU-Net's own call (scipy's zoom, one thread);
- threaded, scipy's interpolation: ``resize_threaded(..., vectorised=False)`` (padding, prefilter and scipy's
  ``zoom_shift`` split over the CPUs);
- threaded, vectorised: ``resize_threaded`` as the pipeline runs it (the interpolation by ``SplineZoom``).

Prints markdown: seconds per way and spacing, the ratio to the reference, and whether every byte is the
reference's; exits 1 if any is not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from skimage.transform import resize

from gcinfer.pipelines.amos.threaded_resize import default_threads, resize_threaded

SPACING = np.array([1.25, 0.78, 0.78])
TARGETS = ((2.0, 0.68825001, 0.68825001), (1.5, 1.0, 1.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=300, help="CT planes (600: the full-size AMOS case)")
    args = parser.parse_args()
    image = np.random.default_rng(0).normal(0.0, 400.0, (args.planes, 512, 512))
    threads = default_threads()
    ways = {
        "scikit-image resize (reference)": lambda shape: resize(
            image, shape, order=3, mode="edge", anti_aliasing=False
        ),
        f"threaded, scipy's interpolation ({threads} threads)": lambda shape: resize_threaded(
            image, shape, 3, threads, vectorised=False
        ),
        f"threaded, vectorised ({threads} threads)": lambda shape: resize_threaded(image, shape, 3, threads),
    }
    print(f"CT 512 x 512 x {args.planes}, load average {os.getloadavg()[0]:.1f}\n")
    print("| target spacing (mm) | output | way | seconds | vs reference | same bytes |\n|---|---|---|---:|---:|---|")
    failed = False
    for target in TARGETS:
        shape = tuple(int(round(n * s / t)) for n, s, t in zip(image.shape, SPACING, target))
        reference, reference_seconds = None, None
        for name, way in ways.items():
            start = time.perf_counter()
            output = way(shape)
            seconds = time.perf_counter() - start
            if reference is None:
                reference, reference_seconds = output, seconds
            same = output.tobytes() == reference.tobytes()
            failed |= not same
            print(
                f"| {' x '.join(f'{t:g}' for t in target)} | {' x '.join(map(str, shape))} | {name} "
                f"| {seconds:.1f} | {reference_seconds / seconds:.2f}x | {'yes' if same else 'NO'} |",
                flush=True,
            )
            del output
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
