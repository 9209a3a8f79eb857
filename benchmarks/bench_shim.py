"""Benchmark: per-case wall time through Grand Challenge's runtime, exec mode vs invoke mode.

    python benchmarks/bench_shim.py [--name amos_task1] [--container]

Runs the AMOS task 1 fixture (its sample cases, one task each) through the real ``sagemaker-shim`` (pinned,
``containers/requirements/shim.txt``) twice, with ``containers/shim-test.sh``: in exec mode (a process per task:
interpreter start, imports, restoring every network, the case) and in invoke mode (one process restores the
networks once, then each task is a ``POST /invoke``). The model tarball is written by ``./export.sh --models-only``
and goes through a local S3 (moto) and the shim's own extraction, as on Grand Challenge. Every task's result is
checked as in the container cycle (return code, output keys, bytes equal to the library's host output).

By default the shim runs the entry points on the host (``shim-test.sh --host``: no container engine needed);
``--container`` runs the images ``gc-<name>`` and ``gc-<name>-invoke`` instead (``./build.sh --invoke`` first).
Prints one table: per mode the mean of the shim's ``exec_duration`` / ``invoke_duration`` over the cases and the
ratio to exec mode; exits 1 when a task fails its checks.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
MEAN = re.compile(r"^\s*(\S+) (exec|invoke): mean \2_duration ([0-9.]+)s over (\d+) case\(s\)$")
"""The summary line ``python -m gcinfer_dev.shim_tasks check`` prints per mode."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="amos_task1", choices=("amos_task1", "amos_task2", "autopet2"))
    parser.add_argument("--fixtures", type=Path, default=Path(os.environ.get("GCINFER_FIXTURES", ".cache/fixtures")))
    parser.add_argument("--container", action="store_true", help="run the built images (default: on the host)")
    args = parser.parse_args()
    dist = REPOSITORY / ".cache" / "bench_shim" / "dist"
    env = {**os.environ, "DIST": str(dist)}
    export = [str(REPOSITORY / "export.sh"), args.name, "--models-only", "--models", str(args.fixtures.resolve())]
    subprocess.run(export, env=env, check=True, stdout=subprocess.DEVNULL)
    shim = [str(REPOSITORY / "containers" / "shim-test.sh"), args.name, "--fixtures", str(args.fixtures.resolve())]
    shim += ["--dist", str(dist), *(["--no-build"] if args.container else ["--host"])]
    completed = subprocess.run(shim, env=env, capture_output=True, text=True)
    means = {m[2]: (float(m[3]), int(m[4])) for m in map(MEAN.match, completed.stdout.splitlines()) if m}
    print(
        f"| {args.name} through sagemaker-shim ({'container' if args.container else 'host'}) | per case | cases "
        "| vs exec |"
    )
    print("|---|---|---|---|")
    for mode in ("exec", "invoke"):
        if mode in means:
            seconds, cases = means[mode]
            ratio = seconds / means["exec"][0] if "exec" in means else float("nan")
            print(f"| {mode} mode | {seconds:.1f} s | {cases} | {ratio:.2f}x |")
    print(f"\nload average {os.getloadavg()[0]:.1f}; per-task lines:")
    print("\n".join(line for line in completed.stdout.splitlines() if line.startswith("  ")))
    if completed.returncode != 0 or len(means) != 2:
        print(completed.stderr[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
