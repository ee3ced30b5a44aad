"""Wall time of `adakd demo` (target: under 5 minutes on 2 CPU cores), run as a user would run it.

    python benchmarks/demo_time.py [extra KEY=VALUE overrides for the demo]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    """Run the demo once in a fresh folder and report its wall time and its table."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "adakd", "demo", "--out", out, "log.progress=false", *sys.argv[1:]],
            capture_output=True, text=True, check=False,
        )
        elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"demo failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    table = result.stdout[result.stdout.index("adakd demo:"):]
    print(table)
    print(f"\nwall time of `adakd demo`: {elapsed:.1f} s on {os.cpu_count()} CPU cores "
          f"(torch threads {__import__('torch').get_num_threads()}); target < 300 s")


if __name__ == "__main__":
    main()
