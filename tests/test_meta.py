"""common.meta: the meta-training machinery (MetaTrainer), step lists, the meta-batch split, episodes, timing."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import meta
from common.errors import InputError

# --- MetaTrainer, around the smallest algorithm ------------------------------------------


class QueryGradient(meta.MetaTrainer):
    """A toy algorithm on a linear model y = w x + b: the meta-gradient is the mean query-loss gradient
    (no inner loop at meta-training time); ``adapt`` is plain SGD, used by ``evaluate``."""

    alpha = 0.1

    def forward(self, params, x):
        return tf.matmul(x, params[0]) + params[1]

    def adapt(self, params, x, y, steps, first_order=False):
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = meta.mse(y, self.forward(params, x))
            params = [p - self.alpha * g for p, g in zip(params, tape.gradient(loss, params))]
        return params

    def meta_gradients(self, tasks):
        params = [v.value for v in self.model.trainable_variables]

        def one_task(task):
            _, _, xq, yq = task
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = meta.mse(yq, self.forward(params, xq))
            return loss, tape.gradient(loss, params)

        signature = (tf.TensorSpec([], tf.float32), [tf.TensorSpec(p.shape, p.dtype) for p in params])
        losses, grads = self.map_tasks(one_task, tasks, signature)
        return tf.reduce_mean(losses), [tf.reduce_mean(g, axis=0) for g in grads]

    def meta_update(self, grads):
        self.optimizer.apply(grads, self.model.trainable_variables)


def trainer(task_map: str = "vectorized") -> QueryGradient:
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    return QueryGradient(model, meta.mse, meta_lr=0.05, task_map=task_map)


def sine_tasks(tasks: int = 5, seed: int = 0):
    x, y, _ = meta.sample_sinusoid_tasks(tasks, 20, np.random.default_rng(seed))
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def weights(learner) -> list[np.ndarray]:
    return [v.numpy() for v in learner.model.trainable_variables]


def test_vectorized_and_map_give_the_same_meta_gradients():
    tasks = sine_tasks()
    loss_v, grads_v = trainer("vectorized").meta_gradients(tasks)
    loss_m, grads_m = trainer("map").meta_gradients(tasks)
    np.testing.assert_allclose(loss_v.numpy(), loss_m.numpy(), rtol=1e-6)
    for v, m in zip(grads_v, grads_m):
        np.testing.assert_allclose(v.numpy(), m.numpy(), rtol=1e-5, atol=1e-7)


def test_meta_train_loop_in_the_graph_and_from_python_take_the_same_steps():
    tasks = sine_tasks()
    in_graph, from_python, by_hand = trainer(), trainer(), trainer()
    before = weights(by_hand)
    constants = tuple(tf.constant(t) for t in tasks)
    loss_graph = in_graph.meta_train_loop(lambda: constants)(3)
    loss_python = from_python.meta_train_loop(lambda: tasks, in_graph=False)(3)
    losses = [float(by_hand.meta_step(tasks)) for _ in range(3)]
    assert float(loss_graph) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(loss_python) == pytest.approx(np.mean(losses), rel=1e-6)
    assert losses[2] < losses[0]  # Adam on the query loss lowers it
    for g, p, h, b in zip(weights(in_graph), weights(from_python), weights(by_hand), before):
        np.testing.assert_allclose(g, h, rtol=1e-5)
        np.testing.assert_allclose(p, h, rtol=1e-6)
        assert np.abs(h - b).max() > 0.01  # three steps of 0.05 moved every weight


def test_evaluate_scores_each_task_after_each_number_of_steps_whatever_the_chunk():
    tasks = sine_tasks(tasks=5, seed=1)
    learner = trainer()
    scores = learner.evaluate(tasks, [0, 2], chunk=2)
    assert scores.shape == (5, 2) and scores.dtype == np.float32
    np.testing.assert_allclose(learner.evaluate(tasks, [0, 2], chunk=5), scores, rtol=1e-6)
    params = [v.value for v in learner.model.trainable_variables]
    for i, (xs, ys, xq, yq) in enumerate(zip(*tasks)):
        adapted = learner.adapt(params, tf.constant(xs), tf.constant(ys), 2)
        assert scores[i, 0] == pytest.approx(float(meta.mse(yq, learner.forward(params, xq))), rel=1e-5)
        assert scores[i, 1] == pytest.approx(float(meta.mse(yq, learner.forward(adapted, xq))), rel=1e-5)


def test_a_one_replica_strategy_takes_the_plain_step():
    """--strategy mirrored on a machine with one device: the model's variables are mirrored, the step is the plain
    (XLA) one, and the weights end where they end without a strategy (the optimizer lives in the strategy's scope;
    built outside it, Adam failed on the mirrored variables with a TypeError)."""
    tasks = sine_tasks()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    keras.utils.set_random_seed(5)
    with strategy.scope():
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    mirrored = QueryGradient(model, meta.mse, meta_lr=0.05, jit_compile=True, strategy=strategy)
    plain = trainer()
    assert mirrored.strategy is None and mirrored.jit_compile
    for learner in (mirrored, plain):
        learner.meta_train_loop(lambda: tuple(tf.constant(t) for t in tasks))(2)
    for m, p in zip(weights(mirrored), weights(plain)):
        np.testing.assert_allclose(m, p, rtol=1e-6)


def test_unknown_task_map_is_an_input_error():
    with pytest.raises(InputError, match="unknown task_map 'loop'; choose vectorized or map"):
        trainer("loop")


def test_meta_batch_must_split_evenly_across_the_replicas():
    class Replicas:
        num_replicas_in_sync = 4

    meta.check_meta_batch_split(8, Replicas(), "--batch-size", "mirrored")
    with pytest.raises(InputError, match=r"--image-batch-size 6: under --strategy mirrored .* across 4 replicas"):
        meta.check_meta_batch_split(6, Replicas(), "--image-batch-size", "mirrored")


def test_parse_steps():
    assert meta.parse_steps("10, 0,5,5,", "eval steps") == [0, 5, 10]
    with pytest.raises(InputError, match="cannot read shots '1,a'"):
        meta.parse_steps("1,a", "shots")
    for bad in ("", "-1,2"):
        with pytest.raises(InputError, match="must list non-negative integers"):
            meta.parse_steps(bad, "eval steps")


# --- The episode sampler --------------------------------------------------------------


def coded_images(classes: int = 10, per_class: int = 12):
    """Images whose pixels all equal (class * 100 + index) / 10_000: every image names its class."""
    labels = np.repeat(np.arange(classes), per_class)
    codes = labels * 100 + np.tile(np.arange(per_class), classes)
    images = np.broadcast_to((codes / 10_000.0).astype(np.float32)[:, None, None, None], (len(codes), 4, 4, 1))
    return np.ascontiguousarray(images), labels


def decode(images: np.ndarray) -> np.ndarray:
    return np.rint(images[..., 0, 0, 0] * 10_000).astype(int) // 100


def test_episode_sampler_draws_disjoint_classes_and_the_asked_for_counts():
    images, labels = coded_images()
    train = meta.EpisodeSampler(images, labels, [0, 1, 2, 3, 4])
    xs, ys, xq, yq, drawn = train.sample(50, ways=3, shots=2, query=4, rng=np.random.default_rng(0))
    assert xs.shape == (50, 6, 4, 4, 1) and xq.shape == (50, 12, 4, 4, 1)
    assert ys.shape == (50, 6) and yq.shape == (50, 12)
    for e in range(50):
        classes = [c for c, _ in drawn[e]]
        assert len(set(classes)) == 3
        assert set(classes) <= {0, 1, 2, 3, 4}  # never a meta-test class
        support, query = decode(xs[e]), decode(xq[e])
        for label, c in enumerate(classes):
            assert (support[ys[e] == label] == c).all() and (ys[e] == label).sum() == 2
            assert (query[yq[e] == label] == c).all() and (yq[e] == label).sum() == 4
        # support and query images of an episode are distinct examples
        codes = np.rint(np.concatenate([xs[e], xq[e]])[..., 0, 0, 0] * 10_000).astype(int)
        assert len(set(codes)) == len(codes)
    assert {c for episode in drawn for c, _ in episode} == {0, 1, 2, 3, 4}


def test_episode_sampler_rotations_are_extra_classes():
    images, labels = coded_images(classes=2)
    sampler = meta.EpisodeSampler(images, labels, [0, 1], rotations=True)
    assert len(sampler.classes) == 8
    sampler.check(ways=8, shots=1, query=1, side="meta-train")


# --- Reporting ------------------------------------------------------------------------


def test_phase_timer_keeps_each_phase(capsys):
    timer = meta.PhaseTimer()
    timer.lap("a")
    timer.lap("b")
    assert list(timer.seconds) == ["a", "b"] and all(s >= 0 for s in timer.seconds.values())
    assert "[a: " in capsys.readouterr().out
