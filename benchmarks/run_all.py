"""Run every ``benchmarks/bench_*.py`` in its own process and print their tables (``make bench``).

The fixture folder reaches the benchmarks as the environment variable ``GCINFER_FIXTURES``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", type=Path, default=Path(".cache/fixtures"))
    parser.add_argument("names", nargs="*", help="only these benchmarks (e.g. tiling amos autopet)")
    args = parser.parse_args()
    scripts = sorted(Path(__file__).parent.glob("bench_*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.names]
    failed = []
    for script in scripts:
        print(f"\n## {script.stem}\n", flush=True)
        env = {**os.environ, "GCINFER_FIXTURES": str(args.fixtures.resolve())}
        if subprocess.call([sys.executable, str(script)], env=env) != 0:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
