"""MAML meta-training throughput: the recipe's compiled meta-step against a plain eager loop over tasks.

Both do the same work on the same meta-batch: for every task, the inner SGD step(s) on
the support set through ``model.stateless_call``, the query loss of the adapted
weights, the second-order meta-gradient, one Adam update. The eager version walks the
tasks in a Python loop, one op at a time; the recipe's version is one ``tf.function``
in which the tasks run side by side (``tf.vectorized_map`` for the sinusoid MLP,
``tf.map_fn`` for the CNN). Printed: tasks per second of each and their ratio.

Run: ``PYTHONPATH=. python tests/benchmarks/bench_maml.py`` (or ``make bench``).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from recipes import maml  # noqa: E402


def eager_meta_step(learner: maml.MetaLearner, tasks) -> tf.Tensor:
    """The textbook MAML loop, run eagerly: one task after the other in Python."""
    model = learner.model
    params = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses = []
        for xs, ys, xq, yq in zip(*(tf.constant(t) for t in tasks)):
            adapted = learner.adapt(params, xs, ys, learner.inner_steps)
            losses.append(learner.task_loss(adapted, xq, yq))
        loss = tf.reduce_mean(tf.stack(losses))
    grads = tape.gradient(loss, params)
    learner.optimizer.apply(grads, model.trainable_variables)
    return loss


def tasks_per_second(step, tasks, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # tracing / first-call costs are not throughput
        step(tasks)
    start = time.perf_counter()
    for _ in range(repeats):
        float(step(tasks))
    return repeats * len(tasks[0]) / (time.perf_counter() - start)


def sinusoid_case(meta_batch: int = 25):
    keras.utils.set_random_seed(0)
    x, y, _ = maml.sample_sinusoid_tasks(meta_batch, 20, np.random.default_rng(0))
    learner = maml.MetaLearner(maml.build_sinusoid_model(), maml.mse, maml.mse, "maml", alpha=0.01)
    return learner, (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])


def classification_case(meta_batch: int = 8, filters: int = 64, ways: int = 5, shots: int = 1, query: int = 5):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.random((meta_batch, ways * (shots + query), 28, 28, 1), dtype=np.float32)
    support = ways * shots
    tasks = (
        images[:, :support],
        np.tile(np.repeat(np.arange(ways), shots), (meta_batch, 1)),
        images[:, support:],
        np.tile(np.repeat(np.arange(ways), query), (meta_batch, 1)),
    )
    model = maml.build_conv4((28, 28, 1), ways, filters)
    learner = maml.MetaLearner(model, maml.cross_entropy, maml.accuracy, "maml", alpha=0.4, task_map="map")
    return learner, tasks


def measure(name: str, make_case, compiled_repeats: int, eager_repeats: int) -> tuple[str, float, float]:
    learner, tasks = make_case()
    compiled = tasks_per_second(learner.meta_step, tasks, compiled_repeats)
    learner, tasks = make_case()
    eager = tasks_per_second(lambda t: eager_meta_step(learner, t), tasks, eager_repeats)
    return name, compiled, eager


def main() -> list[tuple[str, float, float]]:
    rows = [
        measure("sinusoid, MLP 40-40, meta-batch 25, 1 inner step", sinusoid_case, 200, 5),
        measure(
            "5-way 1-shot, Conv4 x16 filters, meta-batch 32, 1 inner step",
            lambda: classification_case(meta_batch=32, filters=16),
            10,
            2,
        ),
        measure(
            "5-way 1-shot, Conv4 x64 filters (paper), meta-batch 8, 1 inner step",
            lambda: classification_case(meta_batch=8, filters=64),
            5,
            2,
        ),
    ]
    print("\nMAML second-order meta-training throughput (tasks per second, higher is better)")
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'compiled':>10}  {'eager loop':>10}  {'speed-up':>8}")
    for name, compiled, eager in rows:
        print(f"{name:<{width}}  {compiled:>10.1f}  {eager:>10.1f}  {compiled / eager:>7.1f}x")
    return rows


if __name__ == "__main__":
    main()
