"""Which input side for EfficientNet-Lite0 on 28x28 Fashion-MNIST? Accuracy and cost, side by side.

The recipes upscale grey 28x28 images to ``--image-size`` and make them RGB for the ImageNet
base. A larger side costs extraction time roughly with the pixel count; this measures what it
buys. Per side and seed: the feature_extraction recipe's label budget (Fashion-MNIST 5-9,
``--labels-per-class`` images per class) and test images, Lite0's pooled ``top_relu`` features,
a multinomial logistic regression (scikit-learn, C = 1) on them, its test accuracy, and the
extraction throughput (images/s, this machine, in the same run).

    python -m tests.benchmarks.lite0_image_size [--sides 32 64 96 128 160] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression

from common import bases
from common.cli import set_seed
from recipes import feature_extraction as fe


def measure(side: int, seed: int, labels_per_class: int, test_images: int) -> dict:
    config = fe.Config(base="efficientnet_lite0", image_size=side, seed=seed,
                       labels_per_class=labels_per_class, test_images=test_images).resolved()  # fmt: skip
    set_seed(seed)
    _, target = fe.load_tasks(config)
    x, y, x_test, y_test = fe.pick_budget(target, config)
    base = bases.load_base("efficientnet_lite0", image_size=side, verbose=0)
    features, _ = bases.extract_features(base, x)
    start = time.perf_counter()
    test_features, _ = bases.extract_features(base, x_test)
    rate = len(x_test) / (time.perf_counter() - start)
    head = LogisticRegression(C=1.0, max_iter=2000).fit(features.reshape(len(x), -1), y)
    accuracy = float(head.score(test_features.reshape(len(x_test), -1), y_test))
    return {"side": side, "seed": seed, "accuracy": accuracy, "images_per_second": rate}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 96, 128, 160])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=2000)
    args = parser.parse_args(argv)
    print(f"{'side':>5} {'accuracy (mean, range over seeds)':>36} {'images/s':>9}")
    for side in args.sides:
        runs = [measure(side, s, args.labels_per_class, args.test_images) for s in args.seeds]
        acc = [r["accuracy"] for r in runs]
        rate = np.median([r["images_per_second"] for r in runs])
        print(f"{side:>5} {np.mean(acc):>18.1%} ({min(acc):.1%}-{max(acc):.1%}) {rate:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
