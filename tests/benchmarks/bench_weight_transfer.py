"""Benchmark of the default weight-transfer run: wall time against its 2-minute target,
and the time per epoch of each training phase (from the run's own history)."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from recipes import weight_transfer

TARGET_SECONDS = 120


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        record = weight_transfer.run(weight_transfer.Config(out=out))
        wall = time.perf_counter() - start
        history = np.genfromtxt(f"{out}/history.csv", delimiter=",", names=True, dtype=None, encoding=None)
    print(f"\ndefault run: {wall:.1f} s wall ({wall / TARGET_SECONDS:.2f}x of the {TARGET_SECONDS} s target)")
    print(f"{'phase':<10} {'epochs':>6} {'s/epoch':>8} {'total s':>8}")
    for phase in dict.fromkeys(history["phase"]):
        seconds = history["epoch_seconds"][history["phase"] == phase]
        print(f"{phase:<10} {len(seconds):>6} {seconds.mean():>8.3f} {seconds.sum():>8.1f}")
    gain = record["variants"]["transfer"]["test_accuracy"] - record["variants"]["scratch"]["test_accuracy"]
    print(f"transfer gain over scratch: {100 * gain:+.1f} points")


if __name__ == "__main__":
    main()
