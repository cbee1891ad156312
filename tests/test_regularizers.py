"""Tests of common/regularizers.py: L2-SP, batch spectral shrinkage, layer-wise learning rates."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import bases, models, regularizers
from common.cli import set_seed


def small_model(num_classes: int = 3) -> keras.Model:
    set_seed(0)
    base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="block1_conv"),
                             keras.layers.Conv2D(4, 3, name="block2_conv")], name="base")  # fmt: skip
    return models.add_head(base, num_classes, dropout=0.0)


def test_l2sp_is_zero_at_the_start_and_its_gradient_points_back():
    start = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    variable = tf.Variable(start)
    penalty = regularizers.L2SP(start, alpha=0.5)
    assert float(penalty(variable)) == 0.0
    moved = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    variable.assign(moved)
    with tf.GradientTape() as tape:
        value = penalty(variable)
    gradient = tape.gradient(value, variable).numpy()
    assert float(value) == pytest.approx(0.5 * np.sum((moved - start) ** 2), rel=1e-6)
    np.testing.assert_allclose(gradient, 2 * 0.5 * (moved - start), rtol=1e-6)  # along w - w0: a step goes back
    after = moved - 0.1 * gradient
    assert np.linalg.norm(after - start) < np.linalg.norm(moved - start)


def test_attach_l2sp_regularises_the_unfrozen_layers_only_and_fit_sees_it():
    model = small_model()
    models.freeze(models.inner_base(model))
    unfrozen = models.unfreeze_top(models.inner_base(model), 1)
    assert unfrozen == ["block2_conv"]
    count = regularizers.attach_l2sp([models.inner_base(model).get_layer(n) for n in unfrozen], alpha=1.0)
    assert count == 2  # kernel and bias of block2_conv
    assert float(sum(model.losses)) == 0.0  # at the starting weights
    kernel = models.inner_base(model).get_layer("block2_conv").kernel
    kernel.assign(kernel + 1.0)
    assert float(sum(model.losses)) == pytest.approx(np.prod(kernel.shape), rel=1e-5)


def test_bss_shrinks_exactly_the_k_smallest_singular_values():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    v, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    singular = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    features = tf.Variable((u * singular) @ v[:6], dtype=tf.float32)  # (6, 10) with known singular values
    bss = regularizers.BatchSpectralShrinkage(k=2, eta=0.1)
    with tf.GradientTape() as tape:
        value = bss(features)
    assert float(value) == pytest.approx(0.1 * (1.0**2 + 0.5**2), rel=1e-4)
    stepped = features.numpy() - 0.5 * tape.gradient(value, features).numpy()
    after = np.linalg.svd(stepped, compute_uv=False)
    np.testing.assert_allclose(after[:4], singular[:4], rtol=1e-4)  # the four largest untouched
    np.testing.assert_allclose(after[4:], singular[4:] * (1 - 0.5 * 0.1 * 2), rtol=1e-4)  # s -> s (1 - lr eta 2)


def test_attach_bss_adds_the_penalty_of_the_head_features():
    model = small_model()
    regularizers.attach_bss(model, k=1, eta=1.0)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype("float32")
    model(x, training=True)
    features = keras.Model(model.inputs, model.get_layer("head_pool").output)(x).numpy()
    smallest = np.linalg.svd(features, compute_uv=False)[-1]
    assert float(sum(model.losses)) == pytest.approx(smallest**2, rel=1e-4)  # the batch's total, not / batch size
    regularizers.detach_bss(model)
    model(x, training=True)
    assert not model.losses


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_layerwise_rates_give_each_block_its_multiple(strategy):
    """One SGD-like Adam step (first step: |update| = lr for every weight) read back per block."""
    model = small_model()
    base = models.inner_base(model)
    blocks = bases.weight_blocks(base)
    multipliers = regularizers.layer_decay_multipliers(base, blocks, decay=0.5)
    assert sorted(set(multipliers.values())) == [0.25, 0.5]
    scope = tf.distribute.MirroredStrategy(["/cpu:0"]) if strategy == "mirrored" else tf.distribute.get_strategy()
    with scope.scope():
        model = small_model()
        base = models.inner_base(model)
        multipliers = regularizers.layer_decay_multipliers(base, bases.weight_blocks(base), decay=0.5)
        optimizer = regularizers.LayerwiseAdam(multipliers, learning_rate=0.01)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    model.fit(x, np.arange(8) % 3, batch_size=8, epochs=1, verbose=0, shuffle=False)
    expected = {"block1_conv": 0.0025, "block2_conv": 0.005, "classifier": 0.01}
    for variable in model.trainable_variables:
        step = np.abs(variable.numpy() - before[variable.path])
        layer = variable.path.split("/")[-2]
        moved = step[step > 0]
        assert np.median(moved) == pytest.approx(expected[layer], rel=1e-3), variable.path  # Adam's epsilon
        assert moved.max() <= expected[layer] * 1.0001, variable.path  # epsilon only ever shortens a step


def test_layer_decay_and_strengths_are_checked():
    with pytest.raises(ValueError, match="layer decay"):
        regularizers.layer_decay_multipliers(keras.Sequential(), [], decay=1.5)
    with pytest.raises(ValueError, match="alpha"):
        regularizers.L2SP(np.zeros(2), alpha=-1)
    with pytest.raises(ValueError, match="BSS"):
        regularizers.BatchSpectralShrinkage(k=0)
