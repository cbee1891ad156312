"""How much does each augmentation cost the self-training network when every label is known?

A student learns its pseudo-labels on strongly augmented views; if training on a view
costs accuracy on clean test images even with all 60,000 true labels, that view teaches
the wrong thing. This trains the recipe's network (its Trainer: Adam, cosine decay, EMA)
on the whole labeled training split, once per view, and prints the test accuracy of
each view against the weak view's. It reads every label, so it is a diagnostic for
choosing the strong view, never part of the recipe.

    python -m tests.benchmarks.augmentation_cost [--steps 1500] [--batch-size 128] [--seed 0]

About 3 minutes per view on 2 CPU cores shared with another job (35 minutes for the nine).
"""

from __future__ import annotations

import argparse
import itertools
import time

import keras
import numpy as np
import tensorflow as tf

from common import data
from recipes import self_training as st

# Each view: the strengths given to st.make_view (translate 0.1 unless said otherwise).
VIEWS = {
    "weak (flip, shift 0.1)": {},
    "+ contrast 0.5": {"contrast": 0.5},
    "+ cutout 0.25": {"cutout": 0.25},
    "+ brightness 0.3": {"brightness": 0.3},
    "+ zoom 0.2": {"zoom": 0.2},
    "+ cutout 0.5": {"cutout": 0.5},
    "+ rotation 0.08": {"rotate": 0.08},
    "strong (contrast 0.5, cutout 0.25)": {"contrast": 0.5, "cutout": 0.25},
    "old strong (all above, shift 0.15)": dict(
        translate=0.15, rotate=0.08, zoom=0.2, contrast=0.5, brightness=0.3, cutout=0.5
    ),
}


def train_on_view(dataset: data.Dataset, strengths: dict, steps: int, batch_size: int, seed: int,
                  **config_overrides) -> float:  # fmt: skip
    """Test accuracy (EMA weights) after ``steps`` supervised steps on views of all training images.

    ``config_overrides`` are recipe options for the network (e.g. ``width=24``, ``precision="mixed_bfloat16"``).
    """
    config = st.Config(seed=seed, batch_size=batch_size, **config_overrides)
    keras.utils.set_random_seed(seed)  # no op determinism: XLA would refuse the MaxPool gradient
    model = st.build_model(dataset, config)
    trainer = st.Trainer(model, st.copy_model(model, "ema"), steps, config, dataset.input_shape[0])
    view = st.make_view(dataset.input_shape[0], seed, **strengths)
    augment = tf.function(lambda x: view(x, training=True))
    batches = st.index_batches(len(dataset.x_train), batch_size, np.random.default_rng(seed))
    for idx in itertools.islice(batches, steps):
        trainer.labels_step(augment(dataset.x_train[idx]), dataset.y_train[idx])
    return st.test_accuracy(trainer.ema_model, dataset)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="Training steps per view.")
    parser.add_argument("--batch-size", type=int, default=128, help="Images per step.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset = data.load_dataset("fashion_mnist")
    print(f"all {len(dataset.x_train)} labels, {args.steps} steps of {args.batch_size} images, seed {args.seed}")
    reference = None  # the first view's accuracy
    for name, strengths in VIEWS.items():
        start = time.perf_counter()
        accuracy = train_on_view(dataset, strengths, args.steps, args.batch_size, args.seed)
        if reference is None:
            reference, change = accuracy, "(reference)"
        else:
            change = f"{100 * (accuracy - reference):+.1f} pts"
        print(f"{name:<38} {100 * accuracy:5.1f}%  {change:<12} {time.perf_counter() - start:4.0f} s", flush=True)


if __name__ == "__main__":
    main()
