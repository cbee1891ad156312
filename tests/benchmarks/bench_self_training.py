"""Benchmark of the self-training recipe (``make bench``), on its default split (seed 0):

- pseudo-labelling throughput on the unlabeled pool, in images per second, for ``confidence``
  (the logistic-regression head's probabilities) and ``propagation`` (the k-NN graph built,
  labels spread along it, scikit-learn), both balanced by Sinkhorn-Knopp, the top 20% of each
  class kept, after the base's features are extracted once (also timed), with the precision
  each reaches;
- one refit of the head on labels plus the kept pseudo-labels (a curriculum round);
- one student round of ``--method noisy_student`` (the base and the head, every layer
  trainable, the default view and epochs, on labels plus pseudo-labels for the whole pool).

Side by side in one run; absolute times depend on the machine and what else runs on it.
"""

from __future__ import annotations

import time

import numpy as np

from common import semi
from common.cli import set_seed
from recipes import self_training as st


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    config = st.Config()
    set_seed(config.seed)
    source, target = st.load_tasks(config)
    split = st.split_target(target, config)
    base = st.load_pretrained_base(config, source, target)
    n = len(split.x_pool)
    labeled = st.extract_features(base, split.x_labeled)
    pool, extract_seconds = timed(st.extract_features, base, split.x_pool)
    head = st.fit_head(labeled, split.y_labeled, config)
    print(f"pool of {n} images, {pool.shape[1]} features each; feature extraction {n / extract_seconds:,.0f} images/s")

    def confidence():
        return semi.select_top_fraction(semi.balance_classes(head.predict_proba(pool)), 0.2)

    def propagation():  # the k-NN graph is built once per run; every curriculum round spreads along it
        seeds = np.concatenate([split.y_labeled, np.full(n, -1)])
        graph = semi.knn_graph(np.concatenate([labeled, pool]))
        spread = semi.label_spreading(graph, seeds, target.num_classes)[len(labeled) :]
        return semi.select_top_fraction(semi.balance_classes(spread), 0.2)

    print(f"{'pseudo-labelling':<18} {'images/s':>10} {'seconds':>8}  precision of the top 20%")
    for name, labeler in (("confidence", confidence), ("propagation", propagation)):
        (kept, labels), seconds = timed(labeler)
        precision = np.mean(labels == split.hidden_labels[kept])
        print(f"{name:<18} {n / seconds:>10,.0f} {seconds:>8.2f}  {precision:.3f}")

    kept, labels = confidence()
    x, y = np.concatenate([labeled, pool[kept]]), np.concatenate([split.y_labeled, labels])
    _, seconds = timed(st.fit_head, x, y, config)
    print(f"\none curriculum round (head refit on {len(x)} feature vectors): {seconds:.1f} s")

    student = semi.build_student(base, head, target.num_classes, config.dropout)
    pseudo = semi.balance_classes(head.predict_proba(pool)).argmax(axis=1)
    images = np.concatenate([np.repeat(split.x_labeled, config.labeled_repeat, axis=0), split.x_pool])
    targets = np.concatenate([np.repeat(split.y_labeled, config.labeled_repeat), pseudo])
    _, seconds = timed(semi.train_on_view, student, base, images, targets, config.student_view, config.student_epochs,
                       config.batch_size, config.learning_rate, config.seed)  # fmt: skip
    seen = config.student_epochs * len(images)
    print(f"one student round ({config.student_epochs} epochs of {len(images)} images, view {config.student_view}): "
          f"{seconds:.1f} s, {seen / seconds:,.0f} images/s")  # fmt: skip


if __name__ == "__main__":
    main()
