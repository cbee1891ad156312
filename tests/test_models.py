"""Unit tests of common.models: builders, backbones, weight copy, freezing."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common import models


def test_build_cnn_is_the_seed_architecture_emitting_logits():
    model = models.build_cnn((28, 28, 1), 5)
    names = [layer.name for layer in model.layers]
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "dense", "classifier"]
    assert model.output_shape == (None, 5)
    assert model.get_layer("classifier").activation is keras.activations.linear  # logits, no softmax
    assert model.count_params() == 92_997


def test_build_bn_cnn_has_a_base_with_batchnorm():
    model = models.build_bn_cnn((28, 28, 1), 10, width=8)
    base = model.get_layer("base")
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers)
    assert base.output_shape == (None, 32)
    assert model.output_shape == (None, 10)


def test_add_head_pools_feature_maps():
    base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)], name="b")
    model = models.add_head(base, 3, dropout=0.1)
    assert model.output_shape == (None, 3)
    assert "head_pool" in [layer.name for layer in model.layers]


def test_compile_classifier_uses_logits_loss():
    model = models.compile_classifier(models.build_cnn((28, 28, 1), 2), 0.01)
    assert model.loss.get_config()["from_logits"] is True
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


def test_steps_per_execution_makes_the_same_updates():
    x = np.random.default_rng(0).random((50, 6)).astype("float32")
    y = np.arange(50) % 3
    trained = []
    for steps in (1, 8):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        models.compile_classifier(model, 0.01, steps_per_execution=steps)
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)  # 7 steps per epoch: a partial execution
        trained.append(model.get_weights())
    for one, batched in zip(*trained):
        np.testing.assert_allclose(one, batched, rtol=1e-5, atol=1e-6)


# --- Backbones ----------------------------------------------------------------------


def test_backbone_with_random_weights_and_preprocessing():
    base = models.build_backbone("mobilenet_v2", (32, 32, 3), weights=None)
    assert base.output_shape == (None, 1, 1, 1280)
    preprocess = models.backbone_preprocess("mobilenet_v2")
    np.testing.assert_allclose(preprocess(np.array([0.0, 1.0])), [-1.0, 1.0])  # [0, 1] -> [-1, 1]


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'; choose one of mobilenet_v2"):
        models.build_backbone("alexnet", (32, 32, 3))
    with pytest.raises(ValueError, match="needs RGB inputs of at least 32x32, got \\(28, 28, 1\\)"):
        models.build_backbone("resnet50", (28, 28, 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.build_backbone("mobilenet_v2", (32, 32, 3), weights="/no/such.weights.h5")


def test_backbone_local_weights_file(tmp_path):
    trained = models.build_backbone("mobilenet_v2", (32, 32, 3), weights=None)
    path = tmp_path / "mnv2.weights.h5"
    trained.save_weights(path)
    loaded = models.build_backbone("mobilenet_v2", (32, 32, 3), weights=str(path))
    for a, b in zip(trained.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="does not fit backbone efficientnet_b0"):
        models.build_backbone("efficientnet_b0", (32, 32, 3), weights=str(path))


# --- Weight copy --------------------------------------------------------------------


def test_copy_weights_copies_all_but_excluded():
    source, target = models.build_cnn((28, 28, 1), 5), models.build_cnn((28, 28, 1), 5)
    report = models.copy_weights(source, target, exclude=("classifier",))
    assert report.copied == ["conv1", "conv2", "conv3", "dense"]
    assert report.skipped == [("classifier", "excluded")]
    for name in report.copied:
        for a, b in zip(source.get_layer(name).weights, target.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(source.get_layer("classifier").kernel.numpy(), target.get_layer("classifier").kernel)
    assert "copied 4 layers" in str(report)


def test_copy_weights_skips_shapes_that_do_not_fit():
    report = models.copy_weights(models.build_cnn((28, 28, 1), 5), models.build_cnn((28, 28, 1), 3))
    assert report.copied == ["conv1", "conv2", "conv3", "dense"]
    assert report.skipped[0][0] == "classifier" and "shape" in report.skipped[0][1]


def test_copy_weights_errors_when_nothing_fits():
    source = models.build_cnn((28, 28, 1), 5)
    target = models.build_cnn((28, 28, 3), 7)  # conv1 sees 3 channels, the classifier has 7 outputs
    target_small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="tiny")
    with pytest.raises(ValueError, match="no layer of 'cnn' fits 'tiny'; nothing copied"):
        models.copy_weights(source, target_small)
    report = models.copy_weights(source, target)  # the layers after conv1 still fit
    assert report.copied == ["conv2", "conv3", "dense"]
    assert [name for name, _ in report.skipped] == ["conv1", "classifier"]


# --- Freezing -------------------------------------------------------------------------


def test_freeze_leaves_nothing_trainable():
    model = models.freeze(models.build_cnn((28, 28, 1), 2))
    assert model.trainable_weights == [] and len(model.non_trainable_weights) == 10


def test_unfreeze_top_keeps_batchnorm_frozen():
    base = models.build_bn_cnn((16, 16, 1), 2, width=4).get_layer("base")
    models.freeze(base)
    unfrozen = models.unfreeze_top(base, 4)
    assert unfrozen == ["block3_conv1", "block3_conv2"]  # the top 4 weighted layers: conv, BN, conv, BN
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable
    assert all(not base.get_layer(n).trainable for n in ("block1_conv1", "block2_conv2"))
    assert models.unfreeze_top(base, 0) == []
    with pytest.raises(ValueError, match="cannot unfreeze 99 layers: base has 12 layers with weights"):
        models.unfreeze_top(base, 99)


def test_batchnorm_uses_batch_statistics_only_when_trainable():
    """Keras 3 passes fit's training=True through add_head's training=False; freezing is what
    keeps BatchNorm in inference mode, so a fine-tuning step must leave its statistics alone."""
    images = np.random.default_rng(0).uniform(2.0, 5.0, (8, 16, 16, 1)).astype("float32")
    model = models.build_bn_cnn((16, 16, 1), 2, width=4, dropout=0.0)
    batchnorm = model.get_layer("base").get_layer("block1_bn1")

    before = batchnorm.moving_mean.numpy().copy()
    model(images, training=True)
    assert not np.allclose(batchnorm.moving_mean.numpy(), before)  # trainable: batch statistics

    models.freeze(model.get_layer("base"))
    models.unfreeze_top(model.get_layer("base"), 4)
    before = batchnorm.moving_mean.numpy().copy()
    np.testing.assert_allclose(model(images, training=True), model(images, training=False), atol=1e-5)
    np.testing.assert_array_equal(batchnorm.moving_mean.numpy(), before)


def test_logistic_regression_head_as_one_dense_layer():
    """The scaler + logistic regression, as a Dense kernel and bias, gives the same probabilities;
    two classes (scikit-learn keeps one row) and a class absent from the labels work too."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 8)) * rng.uniform(0.1, 10, size=8) + 3
    for labels, num_classes in ((rng.integers(0, 3, 60), 3), (rng.integers(0, 2, 60), 2), (rng.integers(0, 2, 60) * 2, 3)):  # fmt: skip
        head = models.logistic_regression_head(features, labels, c=0.5)
        kernel, bias = models.linear_head_weights(head, num_classes)
        logits = features @ kernel + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(probabilities[:, head[1].classes_], head.predict_proba(features), atol=1e-5)
        assert np.all(np.isin(probabilities.argmax(axis=1), head[1].classes_))  # an absent class is never predicted


def test_fit_steps_runs_the_number_of_steps_in_chunks():
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pipeline = tf.data.Dataset.from_tensor_slices((np.zeros((5, 2), np.float32), np.zeros(5, np.int64))).batch(2)
    history = models.fit_steps(model, pipeline, steps=12, chunks=4)
    assert len(history["loss"]) == 4 and len(history["epoch_seconds"]) == 4
    assert int(model.optimizer.iterations.numpy()) == 12


# --- Heads on cached features, and unfreezing a base inside a model --------------------


def separable_features(n_per_class: int = 30, dim: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    centres = 3.0 * rng.standard_normal((classes, dim))
    return (centres[y] + rng.standard_normal((len(y), dim))).astype("float32"), y


def test_train_head_on_features_learns_and_head_on_base_gives_the_same_logits():
    x, y = separable_features()
    keras.utils.set_random_seed(0)
    head, history, seconds = models.train_head_on_features(x, y, 3, dropout=0.1, learning_rate=0.05, epochs=20,
                                                           batch_size=16, seed=0)  # fmt: skip
    assert len(history["loss"]) == 20 and history["loss"][-1] < history["loss"][0] and seconds > 0
    assert np.mean(np.argmax(head(x, training=False), axis=1) == y) > 0.9  # a head that learned, not chance (1/3)
    assert [layer.name for layer in head.layers][1:] == ["head_dropout", "classifier"]
    base = keras.Sequential([keras.Input((8,)), keras.layers.Identity()], name="base")  # features = inputs
    model = models.head_on_base(base, head, 3, 0.1, 1e-3, name="assembled")
    assert model.name == "assembled" and model.optimizer is not None and not base.trainable
    np.testing.assert_allclose(model(x, training=False), head(x, training=False), rtol=1e-5, atol=1e-5)


def test_fit_timed_fits_through_a_seeded_pipeline():
    x, y = separable_features()
    model = models.compile_classifier(models.feature_head(8, 3, 0.0), 0.05)
    history, seconds = models.fit_timed(model, x, y, epochs=3, batch_size=16, seed=0)
    assert sorted(history) == ["accuracy", "epoch_seconds", "loss"] and len(history["loss"]) == 3 and seconds > 0


def test_unfreeze_base_top_unfreezes_inside_the_model_and_recompiles():
    base = models.build_bn_cnn((16, 16, 1), 2, width=4).get_layer("base")
    model = models.compile_classifier(models.add_head(models.freeze(base), 2), 1e-3)
    assert models.inner_base(model) is base and models.count_weighted_layers(base) == 12
    assert model.trainable_weights[0].path.startswith("classifier")  # only the head trains
    assert models.unfreeze_base_top(model, 2, 1e-4) == ["block3_conv2"]  # conv and BN: BN stays frozen
    assert base.get_layer("block3_conv2").trainable and not base.get_layer("block3_conv1").trainable
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)


def test_features_and_logits_match_the_base_and_the_whole_model_in_inference_mode():
    keras.utils.set_random_seed(0)
    model = models.build_dann_cnn((12, 12, 3), 4)
    x = np.random.default_rng(0).uniform(size=(7, 12, 12, 3)).astype("float32")
    features, logits = models.features_and_logits(model, x, batch_size=3)  # three batches: 3 + 3 + 1
    assert features.shape == (7, 100) and logits.shape == (7, 4)
    np.testing.assert_allclose(features, model.get_layer("base")(x, training=False).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, model(x, training=False).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="base"):
        models.features_and_logits(models.build_cnn((28, 28, 1), 2), x)
