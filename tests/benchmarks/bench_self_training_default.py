"""The default self-training run, timed end to end (issue 32, part 3; the target is under 4 minutes).

Runs ``python -m recipes.self_training`` exactly as the README states it (default flags, seed 0)
in a process of its own and prints its wall time, the time the recipe measured itself, the load
average and the accuracies, so that ``make bench`` reports the figure the README promises.
Several minutes on two CPU cores. ``python -m tests.benchmarks.bench_self_training_default
--quick`` (any recipe flags) checks the plumbing in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_SECONDS = 240


def main(argv: list[str] | None = None) -> dict:
    flags = list(argv if argv is not None else [])
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "recipes.self_training", *flags, "--out", out]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        wall = time.perf_counter() - start
        record = json.loads((Path(out) / "metrics.json").read_text())
    load = max(load, os.getloadavg()[0])
    accuracies = {name: figures.get("test_accuracy") for name, figures in record["variants"].items()}
    shown = ", ".join(f"{name} {100 * value:.1f}%" for name, value in accuracies.items() if value is not None)
    verdict = "within" if record["seconds"] <= TARGET_SECONDS else "OVER"
    print(
        f"python -m recipes.self_training {' '.join(flags)}".rstrip()
        + f": {wall:.0f} s wall, {record['seconds']:.0f} s as the recipe measured it (load average {load:.1f}), "
        f"{verdict} the {TARGET_SECONDS} s target; {shown}"
    )
    return {"wall_seconds": wall, "seconds": record["seconds"], "load": load, "accuracies": accuracies}


if __name__ == "__main__":
    main(sys.argv[1:])
