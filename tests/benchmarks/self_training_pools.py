"""Self-training on skewed and contaminated pools: the table in docs/self_training_pools.md.

Fashion-MNIST classes 5-7 (sandal, shirt, sneaker), 10 labels per class, the default
source-cnn base (cached); the pool is drawn from the other training images of 5-7 as
``clean`` (equal thirds), ``skewed`` (70 / 25 / 5) or ``contaminated`` (the skewed pool plus
20% bags, class 8, which the labels never show), scaled by ``--scale`` (1: 1,200 images in
5-7, as the tests use). Per pool and labeler, over the seeds: transfer, the curriculum's last
round (what the run would give without the guard), the model the run keeps (after the guard),
the minority class's (sneaker) test recall, and the pool class mix's estimate error. Any
recipe option goes through ``--set name=value`` (e.g. ``--set balance=uniform --set guard=False``).

    python -m tests.benchmarks.self_training_pools [--seeds 0 1 2] [--scale 2] [--set foreign=1.0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from recipes import self_training as st
from tests.test_self_training_pools import MIXES, fashion_features, self_train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", type=int, default=1, help="Pool size multiple (1: 1,200 images of classes 5-7).")
    parser.add_argument("--pools", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--labelers", nargs="+", default=list(st.LABELERS), choices=list(st.LABELERS))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="A recipe option.")
    args = parser.parse_args(argv)
    defaults = st.Config()
    options = {}
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(defaults, name))
        options[name] = value == "True" if kind is bool else kind(value)
    features = fashion_features.__wrapped__()
    print(f"options {options or 'defaults'}, seeds {args.seeds}, pool scale {args.scale}")
    for pool in args.pools:
        mix = tuple((c, n * args.scale) for c, n in MIXES[pool])
        for labeler in args.labelers:
            start = time.perf_counter()
            runs = [self_train(features, mix, seed, labeler=labeler, **options) for seed in args.seeds]
            gain = np.array([[r["rounds"][-1]["test_accuracy"] - r["transfer"], r["self_training"] - r["transfer"]]
                             for r in runs]) * 100  # fmt: skip
            kept = sum(r["self_training"] == r["transfer"] for r in runs)
            error = [r["rounds"][0]["prior_error"] for r in runs]
            print(f"{pool:12s} {labeler:11s} transfer {np.mean([r['transfer'] for r in runs]):.1%} | last round "
                  f"{gain[:, 0].mean():+.1f} ({gain[:, 0].min():+.1f} to {gain[:, 0].max():+.1f}) | kept "
                  f"{gain[:, 1].mean():+.1f} ({gain[:, 1].min():+.1f} to {gain[:, 1].max():+.1f}), transfer's on {kept}/"
                  f"{len(runs)} | minority recall {np.mean([r['minority_transfer'] for r in runs]):.2f} -> "
                  f"{np.mean([r['minority'] for r in runs]):.2f} | mix error {np.mean(error):.3f} | "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
