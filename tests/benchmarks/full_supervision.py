"""How far could self-training go? The recipe's network trained on all 60,000 true labels.

Self-training can hardly do better than the hidden labels of the unlabeled pool would
have taught. This trains the self-training recipe's network (its Trainer: Adam, cosine
decay, EMA, the weak view) on every labeled training image for as many steps of as many
images as the default student takes (4,000 steps of 32 labeled + 96 unlabeled images),
from scratch, so it never has more training than the student: its test accuracy is the
full-supervision reference that the labels-only baseline and the student sit below. It
reads every label, so it is a diagnostic, never part of the recipe.

    python -m tests.benchmarks.full_supervision [--seeds 0 1 2] [--steps 4000] [--batch-size 128]
        [--width 16] [--precision float32]

About 7 minutes per seed at the default width on 2 CPU cores shared with another job.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import data
from recipes import self_training as st
from tests.benchmarks.augmentation_cost import train_on_view


def main(argv: list[str] | None = None) -> None:
    # The default student's budget, read from the recipe so that the reference follows its defaults.
    student = st.Config()
    student_steps = student.rounds * student.steps_per_round
    student_batch = student.batch_size * (1 + student.unlabeled_ratio)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="One run per seed.")
    parser.add_argument(
        "--steps", type=int, default=student_steps, help="Training steps (the default student's: %(default)s)."
    )
    parser.add_argument(
        "--batch-size", type=int, default=student_batch, help="Images per step (the student's: %(default)s)."
    )
    parser.add_argument("--width", type=int, default=student.width, help="As the recipe's --width.")
    parser.add_argument(
        "--precision", default=student.precision, choices=st.PRECISIONS, help="As the recipe's --precision."
    )
    args = parser.parse_args(argv)
    dataset = data.load_dataset("fashion_mnist")
    print(f"all {len(dataset.x_train)} labels, {args.steps} steps of {args.batch_size} images, width {args.width}")
    accuracies = []
    for seed in args.seeds:
        start = time.perf_counter()
        accuracy = train_on_view(
            dataset, {}, args.steps, args.batch_size, seed, width=args.width, precision=args.precision
        )
        accuracies.append(100 * accuracy)
        print(f"seed {seed}: {accuracies[-1]:.1f}%  {time.perf_counter() - start:.0f} s", flush=True)
    print(f"full supervision: {np.mean(accuracies):.1f}% ({min(accuracies):.1f}-{max(accuracies):.1f})")


if __name__ == "__main__":
    main()
