"""How far could self-training go? The recipe's models trained on all true labels of the pool.

Self-training can hardly do better than the hidden labels of its unlabeled pool would have
taught. On the recipe's split (by default Fashion-MNIST classes 5-9: 10 labels per class, the
other 29,950 training images as the pool, the 5,000 test images), this trains, per seed:

- ``features``: the logistic-regression head on the base's cached features of every labeled
  and pool image with its true label (the ceiling of ``--method curriculum``);
- ``student``: one student as ``--method noisy_student`` trains it (the base and that head,
  every layer trainable, the student's view, epochs and batch) on the same true labels (the
  ceiling of the image-space student); ``--views`` trains one per view instead, which measures
  what each augmentation costs when every label is right.

It reads every label, so it is a diagnostic, never part of the recipe. Any other flag is the
recipe's (``--base``, ``--student-epochs``, ``--quick``, ...).

    python -m tests.benchmarks.full_supervision [--seeds 0 1 2] [--views weak erasing randaugment]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from common import evaluation, semi
from common.cli import parse_config, set_seed
from recipes import self_training as st


def ceiling(config: st.Config, views: list[str]) -> dict[str, float]:
    """Test accuracy of the feature-space head and of one student per view, on every true label."""
    set_seed(config.seed)
    source, target = st.load_tasks(config)
    split = st.split_target(target, config)
    base = st.load_pretrained_base(config, source, target)
    x, y = np.concatenate([split.x_labeled, split.x_pool]), np.concatenate([split.y_labeled, split.hidden_labels])
    head = st.fit_head(st.extract_features(base, x), y, config)
    results = {"features": head.score(st.extract_features(base, split.x_test), split.y_test)}
    x_test = base.prepare(split.x_test)
    for view in views:
        student = semi.build_student(base, head, target.num_classes, config.dropout)
        semi.train_on_view(student, base, x, y, view, config.student_epochs, config.batch_size, config.learning_rate,
                           config.seed + 1)  # fmt: skip
        predicted = semi.predict_probabilities(student, x_test).argmax(axis=1)
        results[f"student, {view}"] = evaluation.accuracy(split.y_test, predicted)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="One run per seed.")
    parser.add_argument("--views", nargs="+", default=None, help="Student views (default: the recipe's).")
    args, recipe_flags = parser.parse_known_args(argv)
    config = parse_config(st.Config, recipe_flags).resolved()
    views = args.views or [config.student_view]
    print(f"every true label of the pool, base {config.base}, {config.student_epochs} student epochs, views {views}")
    table: dict[str, list[float]] = {}
    for seed in args.seeds:
        start = time.perf_counter()
        results = ceiling(replace(config, seed=seed), views)
        shown = ", ".join(f"{name} {100 * value:.1f}%" for name, value in results.items())
        print(f"seed {seed}: {shown}  {time.perf_counter() - start:.0f} s", flush=True)
        for name, value in results.items():
            table.setdefault(name, []).append(100 * value)
    for name, values in table.items():
        label = "student" if name == f"student, {views[0]}" and len(views) == 1 else name
        print(f"full supervision, {label}: {np.mean(values):.1f}% ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
