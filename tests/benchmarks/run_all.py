"""Run every speed benchmark (``make bench``): each ``bench_*.py`` module's ``main()``, in turn.

Benchmarks print measurements taken side by side in one run (ratios, not absolute
timings that depend on the machine); they are not part of the test suite.
``python -m tests.benchmarks.run_all [name ...]`` runs only the named ones.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    wanted = set(argv if argv is not None else sys.argv[1:])
    modules = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    for name in modules:
        if wanted and name.removeprefix("bench_") not in wanted and name not in wanted:
            continue
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"tests.benchmarks.{name}").main()
        print(f"=== {name}: {time.perf_counter() - start:.0f} s ===", flush=True)


if __name__ == "__main__":
    main()
