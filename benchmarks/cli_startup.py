"""Time `python -m pipeline --help` and the light imports, in fresh processes (the figure tests no longer assert).

Run as: PYTHONPATH=. .venv/bin/python benchmarks/cli_startup.py [--repeat 5]
Prints the median wall time of each case; record the figures in benchmarks/cli.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -m pipeline --help": [sys.executable, "-m", "pipeline", "--help"],
    "import pipeline.cli": [sys.executable, "-c", "import pipeline.cli"],
    "import pipeline.plan": [sys.executable, "-c", "import pipeline.plan"],
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
}


def main() -> None:
    """Run each case --repeat times and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, command in CASES.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{name}: median {statistics.median(times):.3f} s over {args.repeat} runs")


if __name__ == "__main__":
    main()
