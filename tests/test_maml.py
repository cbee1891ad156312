"""MAML recipe: meta-gradients, the episode sampler, bad input, short end-to-end runs, the notebook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from recipes import maml
from tests.conftest import ROOT, execute_notebook

# --- Meta-gradients -----------------------------------------------------------------


def sine_batch(tasks: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y, _ = maml.sample_sinusoid_tasks(tasks, 20, rng)
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def learner(algorithm: str, alpha: float = 0.1, steps: int = 2):
    import keras

    keras.utils.set_random_seed(3)
    model = maml.build_sinusoid_model()
    return maml.MetaLearner(model, maml.mse, maml.mse, algorithm, alpha=alpha, inner_steps=steps)


def test_second_order_meta_gradients_exist_and_differ_from_first_order():
    batch = sine_batch()
    second = learner("maml")
    first = learner("fomaml")  # same seed: same initial weights
    for a, b in zip(second.model.trainable_variables, first.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loss2, grads2 = second.meta_gradients(batch)
    loss1, grads1 = first.meta_gradients(batch)
    assert all(g is not None for g in grads2)
    np.testing.assert_allclose(loss1.numpy(), loss2.numpy(), rtol=1e-5)  # same forward pass
    differences = [float(tf.reduce_max(tf.abs(g2 - g1))) for g2, g1 in zip(grads2, grads1)]
    assert max(differences) > 1e-3, differences


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights():
    batch = sine_batch()
    first = learner("fomaml")
    _, grads = first.meta_gradients(batch)
    params = [v.value for v in first.model.trainable_variables]
    expected = [np.zeros(p.shape, np.float32) for p in params]
    for xs, ys, xq, yq in zip(*batch):
        adapted = first.adapt(params, tf.constant(xs), tf.constant(ys), first.inner_steps, first_order=True)
        adapted = [tf.constant(a.numpy()) for a in adapted]  # a fresh point: no path back to params
        with tf.GradientTape() as tape:
            tape.watch(adapted)
            loss = first.task_loss(adapted, tf.constant(xq), tf.constant(yq))
        for total, g in zip(expected, tape.gradient(loss, adapted)):
            total += g.numpy() / len(batch[0])
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


def test_reptile_moves_towards_the_adapted_weights():
    batch = sine_batch(tasks=3)
    reptile = learner("reptile", alpha=0.05, steps=3)
    _, grads = reptile.meta_gradients(batch)
    params = [v.value for v in reptile.model.trainable_variables]
    expected = [np.zeros(p.shape, np.float32) for p in params]
    for xs, ys, xq, yq in zip(*batch):
        x, y = np.concatenate([xs, xq]), np.concatenate([ys, yq])
        adapted = reptile.adapt(params, tf.constant(x), tf.constant(y), 3, first_order=True)
        for total, p, a in zip(expected, params, adapted):
            total += (p.numpy() - a.numpy()) / 0.05 / len(batch[0])
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-5)


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
    train = maml.EpisodeSampler(images, labels, [0, 1, 2, 3, 4])
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
    sampler = maml.EpisodeSampler(images, labels, [0, 1], rotations=True)
    assert len(sampler.classes) == 8
    sampler.check(ways=8, shots=1, query=1, side="meta-train")


# --- Bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(ways=4, train_classes="0-6", test_classes="7-9"),
            r"4-way episodes need 4 meta-test classes, but .* only 3",
        ),
        (dict(ways=6), r"6-way episodes need 6 meta-train classes, but there are only 5"),
        (
            dict(shots="1,200", query=5),
            r"--shots 200 \+ --query 5 need 205 images per class, but meta-train class 0 \('0'\) has only \d+",
        ),
        (dict(train_classes="0-5", test_classes="5-9"), r"class 5 .* two class lists"),
        (dict(image_alpha=0.0), r"--image-alpha must be positive, got 0.0"),
        (dict(inner_steps=0), r"--inner-steps must be positive, got 0"),
        (dict(algorithm="sgd"), r"unknown algorithm 'sgd'; choose one of maml, fomaml, reptile"),
        (dict(shots="0"), r"every K must be at least 1"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, changes, message):
    config = maml.Config(dataset="digits", out=str(tmp_path / "run"), **changes)
    with pytest.raises(ValueError, match=message):
        maml.run(config)
    assert not (tmp_path / "run").exists()


def test_bad_sinusoid_input(tmp_path):
    with pytest.raises(ValueError, match="--alpha must be positive, got -0.01"):
        maml.run(maml.Config(alpha=-0.01, out=str(tmp_path)))
    with pytest.raises(ValueError, match="cannot read eval steps 'one'"):
        maml.run(maml.Config(eval_steps="one", out=str(tmp_path)))


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        maml.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--algorithm", "--iterations", "--batch-size", "--alpha", "--shots", "--ways", "--quick"):
        assert flag in text


# --- Short runs ------------------------------------------------------------------------


def test_short_sinusoid_run_adapts_and_beats_pretrained(tmp_path):
    config = maml.Config(iterations=2000, pretrain_iterations=500, eval_tasks=200, out=str(tmp_path))
    record = maml.run(config)
    ours, baseline = record["variants"]["maml"], record["variants"]["pretrained"]
    assert record["metric"] == "mse_after_1_step" and record["baseline"] == "pretrained"
    assert ours["mse_after_1_step"] < 0.6 * ours["mse_after_0_steps"]
    assert ours["mse_after_1_step"] < 0.8 * baseline["mse_after_1_step"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["variants"]["maml"]["mse_after_10_steps"] == pytest.approx(ours["mse_after_10_steps"])
    for name in ("config.json", "history.csv", "learning_curves.png", "test_tasks.png", "model.keras"):
        assert (tmp_path / name).is_file(), name


def test_short_fashion_mnist_run_is_well_above_chance(tmp_path):
    record = maml.run(maml.Config(dataset="fashion_mnist", quick=True, out=str(tmp_path)))
    ours = record["variants"]["maml"]
    assert record["metric"] == "accuracy_1_shot" and record["chance"] == pytest.approx(0.2)
    assert ours["accuracy_1_shot"] > 0.3, ours
    assert 0 < ours["ci95"]["accuracy_1_shot"] < 0.1
    assert 0.0 <= record["variants"]["pretrained"]["accuracy_1_shot"] <= 1.0
    assert (tmp_path / "metrics.json").is_file()


def test_omniglot_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    def as_dataset(*args, **kwargs):
        # 10 characters, 8 drawings each, in every split; pixel intensity depends on the character.
        labels = np.repeat(np.arange(10), 8)
        images = np.broadcast_to((labels * 20 + 30).astype(np.uint8)[:, None, None, None], (80, 105, 105, 3))
        return tf.data.Dataset.from_tensor_slices({"image": np.ascontiguousarray(images), "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        config = maml.Config(
            dataset="tfds:omniglot", quick=True, train_classes="0-4", test_classes="5-9", ways=3, query=3,
            rotations=True, eval_tasks=12, out=str(tmp_path),
        )  # fmt: skip
        record = maml.run(config)
    assert record["dataset"] == "tfds:omniglot" and record["ways"] == 3
    assert 0.0 <= record["variants"]["maml"]["accuracy_1_shot"] <= 1.0


# --- The notebook ----------------------------------------------------------------------


def test_notebook_runs_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "04_maml.ipynb")
