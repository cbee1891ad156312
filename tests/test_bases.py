"""Unit tests of common/bases.py: the source-cnn cache, backbones, .keras models and bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import bases, data, models
from common.errors import InputError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(bases.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_source():
    dataset = data.load_dataset("fashion_mnist")
    source = data.select_classes(dataset, [0, 1, 2, 3, 4])
    keep = data.sample_per_class(source.y_train, 40, 0)
    test = data.sample_per_class(source.y_test, 20, 0)
    return data.Dataset(
        source.name, source.x_train[keep], source.y_train[keep], source.x_test[test], source.y_test[test],
        source.class_names,
    )  # fmt: skip


def test_source_cnn_is_pretrained_once_then_reused(cache, tiny_source):
    settings = bases.SourceSettings(width=8, epochs=1)
    first = bases.load_base("source-cnn", source=tiny_source, settings=settings, verbose=0)
    assert first.info["cached"] is False
    assert len(list(cache.glob("source-cnn-*.keras"))) == 1
    second = bases.load_base("source-cnn", source=tiny_source, settings=settings, verbose=0)
    assert second.info["cached"] is True
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Another setting, another cache entry.
    bases.load_base("source-cnn", source=tiny_source, settings=bases.SourceSettings(width=8, epochs=2), verbose=0)
    assert len(list(cache.glob("source-cnn-*.keras"))) == 2


def test_source_cnn_cuts_and_features(cache, tiny_source):
    settings = bases.SourceSettings(width=8, epochs=1)
    for cut, features in (("block1", 14 * 14 * 8), ("block2", 7 * 7 * 16), ("block3", 3 * 3 * 32)):
        base = bases.load_base("source-cnn", source=tiny_source, settings=settings, cut=cut, verbose=0)
        assert base.model.output_shape == (None, features)
        assert base.input_shape == (28, 28, 1)
    with pytest.raises(ValueError, match="block4"):
        bases.load_base("source-cnn", source=tiny_source, settings=settings, cut="block4")


def test_source_cnn_without_source_task():
    with pytest.raises(ValueError, match="source task"):
        bases.load_base("source-cnn")


def test_backbone_weights_none_resizes_and_preprocesses():
    base = bases.load_base("mobilenet_v2", weights="none", image_size=32)
    assert base.input_shape == (32, 32, 3)
    prepared = base.prepare(np.ones((3, 28, 28, 1), np.float32))
    assert prepared.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(prepared, 1.0)  # MobileNetV2 maps [0, 255] to [-1, 1]
    assert len(bases.weight_blocks(base.model)) > 10


def test_keras_file_base_cuts_below_the_classifier(tmp_path):
    model = models.build_cnn((28, 28, 1), 5)
    path = tmp_path / "weight_transfer.keras"
    model.save(path)
    base = bases.load_base(str(path))
    assert base.model.output_shape == (None, 64)  # the "dense" layer under "classifier"
    assert base.input_shape == (28, 28, 1)
    np.testing.assert_array_equal(
        base.model.get_layer("conv1").get_weights()[0], model.get_layer("conv1").get_weights()[0]
    )


def test_keras_file_base_uses_a_base_sub_model(tmp_path):
    path = tmp_path / "bn.keras"
    models.build_bn_cnn((16, 16, 1), 3, width=4).save(path)
    assert bases.load_base(str(path)).model.name == "base"


def test_weight_blocks_group_by_name():
    base = models.build_bn_cnn((16, 16, 1), 3, width=4).get_layer("base")
    blocks = bases.weight_blocks(base)
    assert [block[0] for block in blocks] == ["block1_conv1", "block2_conv1", "block3_conv1"]
    assert all(len(block) == 4 for block in blocks)


@pytest.mark.parametrize(
    "spec, kwargs, error, message",
    [
        ("mobilenet_v3", {}, ValueError, "unknown base 'mobilenet_v3'.*mobilenet_v2"),
        ("mobilenet_v2", {"image_size": 16}, ValueError, "at least 32x32"),
        ("mobilenet_v2", {"weights": "/no/such/file.weights.h5"}, FileNotFoundError, "does not exist"),
        ("source-cnn", {"weights": "none"}, ValueError, "keras.applications bases only"),
        ("/no/such/model.keras", {}, FileNotFoundError, "no such .keras file"),
    ],
)
def test_bad_input_is_a_clear_error(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        bases.load_base(spec, **kwargs)


def test_weights_file_of_another_architecture(tmp_path):
    path = tmp_path / "other.weights.h5"
    models.build_cnn((28, 28, 1), 5).save_weights(path)
    with pytest.raises(ValueError, match="does not fit backbone mobilenet_v2"):
        bases.load_base("mobilenet_v2", weights=str(path), image_size=32)


def test_keras_path_that_is_not_a_model(tmp_path):
    path = tmp_path / "junk.keras"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="is not a Keras model"):
        bases.load_base(str(path))


def test_imagenet_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached imagenet weights
    with pytest.raises(InputError, match="--weights none"):
        bases.load_base("mobilenet_v2", weights="imagenet", image_size=96)


def test_scratch_twin_has_fresh_weights_and_learning_batchnorm(cache, tiny_source):
    base = bases.load_base(
        "source-cnn", source=tiny_source, settings=bases.SourceSettings(width=8, epochs=1), verbose=0
    )
    twin = bases.scratch_twin(base, 3, 0.1)
    inner = twin.get_layer("base")
    assert inner is not base.model and inner.trainable
    pretrained = base.model.get_layer("block1_conv1").get_weights()[0]
    assert not np.array_equal(inner.get_layer("block1_conv1").get_weights()[0], pretrained)
    assert inner.get_layer("block1_bn1").momentum == pytest.approx(0.9)


def test_scratch_twin_trains_every_layer_even_after_the_base_was_partly_unfrozen(cache, tiny_source):
    """fine_tune builds its scratch baseline after phase 2 has left all but the top layers frozen, layer by layer."""
    from common import models

    base = bases.load_base(
        "source-cnn", source=tiny_source, settings=bases.SourceSettings(width=8, epochs=1), verbose=0
    )
    models.unfreeze_top(base.model, 2)  # block2_conv2 and block2_bn2, whose BatchNorm stays frozen
    assert [w.path for w in base.model.trainable_weights] == ["block2_conv2/kernel"]
    twin = bases.scratch_twin(base, 3, 0.1)
    frozen = [w.path for w in twin.non_trainable_weights]
    assert frozen and all(path.endswith(("moving_mean", "moving_variance")) for path in frozen), frozen
    assert len(twin.trainable_weights) == len(twin.weights) - len(frozen)


# --- .keras models that are not ours ------------------------------------------------------


def softmax_model(path, final_activation: str = "softmax", separate_softmax: bool = False):
    """A user's classifier: conv, pooling, a Dense 'fc' layer, a Dense 'predictions' (no 'classifier' layer)."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 1))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(8, activation="relu", name="fc")(x)
    x = layers.Dense(3, activation=None if separate_softmax else final_activation, name="predictions")(x)
    if separate_softmax:
        x = layers.Softmax(name="probabilities")(x)
    keras.Model(inputs, x).save(path)
    return str(path)


@pytest.mark.parametrize("final_activation, separate", [("softmax", False), ("sigmoid", False), ("linear", True)])
def test_keras_file_base_cuts_below_a_softmax_classifier(tmp_path, capsys, final_activation, separate):
    path = softmax_model(tmp_path / "user.keras", final_activation, separate)
    base = bases.load_base(path)
    assert base.model.output_shape == (None, 8)  # the features of 'fc', not the class probabilities
    assert base.info["feature_layer"] == "fc"
    out = capsys.readouterr().out
    assert "feature output 'fc'" in out and "classification layer 'predictions'" in out and "--base-layer" in out


def test_keras_file_base_keeps_a_model_that_ends_in_features(tmp_path):
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 1))
    x = layers.Flatten()(layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, layers.Dense(8, activation="relu", name="embedding")(x)).save(tmp_path / "encoder.keras")
    base = bases.load_base(str(tmp_path / "encoder.keras"))
    assert base.model.output_shape == (None, 8) and base.info["uses"].startswith("the whole model")


def test_base_layer_picks_the_feature_output(tmp_path):
    path = softmax_model(tmp_path / "user.keras")
    assert bases.load_base(path, layer="conv").model.output_shape == (None, 14, 14, 4)
    with pytest.raises(InputError, match=r"--base-layer 'conv9' is not a layer of .*its layers: .*conv, gap, fc"):
        bases.load_base(path, layer="conv9")
    backbone = bases.load_base("mobilenet_v2", weights="none", image_size=32, layer="block_3_expand_relu")
    assert backbone.model.output_shape == (None, 8, 8, 144)
    with pytest.raises(InputError, match="--base-layer 'conv' applies to keras.applications and .keras bases"):
        bases.load_base("source-cnn", layer="conv")


def test_keras_file_base_input_shapes(tmp_path):
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 3))
    keras.Model(inputs, layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inputs))).save(tmp_path / "any.keras")
    assert bases.load_base(str(tmp_path / "any.keras"), image_size=40).input_shape == (40, 40, 3)
    inputs = keras.Input((16, 16, 4))
    keras.Model(inputs, layers.Flatten()(inputs)).save(tmp_path / "rgba.keras")
    with pytest.raises(InputError, match=r"rgba.keras' takes inputs of shape \(16, 16, 4\)"):
        bases.load_base(str(tmp_path / "rgba.keras"))
    inputs = keras.Input((16, 16, 1))
    keras.Model(inputs, layers.Reshape((16, 16))(inputs)).save(tmp_path / "seq.keras")
    with pytest.raises(InputError, match=r"feature output .* has shape \(None, 16, 16\), neither a vector nor"):
        bases.load_base(str(tmp_path / "seq.keras"))


# --- The cached source CNN: BatchNorm statistics, chance, cache key ------------------------


def test_recalibration_sets_batchnorm_statistics_to_the_data_average():
    import keras
    from keras import layers

    inputs = keras.Input((3,))
    norm = layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, norm(inputs))
    x = np.random.default_rng(0).normal([1.0, -2.0, 5.0], [1.0, 2.0, 0.5], (1024, 3)).astype(np.float32)
    assert bases.recalibrate_batchnorm(model, x, batch_size=256) == 1
    np.testing.assert_allclose(norm.moving_mean.numpy(), x.mean(0), atol=1e-4)
    batch_variances = np.mean([x[i : i + 256].var(0) for i in range(0, 1024, 256)], axis=0)
    np.testing.assert_allclose(norm.moving_variance.numpy(), batch_variances, rtol=1e-3)
    assert norm.momentum == pytest.approx(0.99)  # restored


def test_a_briefly_pretrained_base_beats_chance_in_inference_mode(cache, tiny_source):
    """Four steps at momentum 0.99 leave BatchNorm's moving statistics near their initial values
    (before recalibration the same base scored 20%, chance, on the 100 source test images)."""
    base = bases.load_base(
        "source-cnn", source=tiny_source, settings=bases.SourceSettings(width=8, epochs=1), verbose=0
    )
    assert base.info["source_test_accuracy"] >= 0.3 and base.info["beats_chance"]


def test_a_base_at_chance_is_not_cached(cache, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((100, 12, 12, 1), dtype=np.float32)
    noise = data.Dataset("noise", x, rng.integers(0, 5, 100), x[:50], rng.integers(0, 5, 50), list("abcde"))
    base = bases.load_base("source-cnn", source=noise, settings=bases.SourceSettings(width=4, epochs=1), verbose=0)
    assert not base.info["beats_chance"] and not base.info["cached"]
    assert not list(cache.glob("source-cnn-*"))
    out = capsys.readouterr().out
    assert "warning: the source-cnn base is not clearly better than chance" in out and "chance 20.0%" in out


def test_cache_key_covers_the_images_and_the_procedure(tiny_source, monkeypatch):
    settings = bases.SourceSettings()
    key = bases.source_cache_key(tiny_source, settings)
    changed = data.Dataset(tiny_source.name, tiny_source.x_train[::-1].copy(), tiny_source.y_train,
                           tiny_source.x_test, tiny_source.y_test, tiny_source.class_names)  # fmt: skip
    assert bases.source_cache_key(changed, settings) != key  # same names, shapes and counts, other images
    monkeypatch.setattr(bases, "SOURCE_CNN_VERSION", bases.SOURCE_CNN_VERSION + 1)
    assert bases.source_cache_key(tiny_source, settings) != key


def test_a_damaged_cache_entry_is_pretrained_again(cache, tiny_source):
    settings = bases.SourceSettings(width=8, epochs=1)
    bases.load_base("source-cnn", source=tiny_source, settings=settings, verbose=0)
    (entry,) = cache.glob("source-cnn-*.keras")
    entry.write_bytes(b"truncated")
    again = bases.load_base("source-cnn", source=tiny_source, settings=settings, verbose=0)
    assert again.info["cached"] is False and again.model.output_shape == (None, 7 * 7 * 16)


def test_extract_features_matches_the_feature_extractor_and_batches():
    base = bases.untrained_source_cnn((28, 28, 1), 5, width=4, cut="block1")
    images = np.random.default_rng(0).random((7, 28, 28, 1)).astype("float32")
    features, seconds = bases.extract_features(base, images, batch_size=3)  # three batches, the last partial
    assert features.shape == (7, 14 * 14 * 4) and seconds > 0
    expected = bases.feature_extractor(base)(base.prepare(images), training=False)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_check_takes_images_names_the_candidate():
    base = bases.untrained_source_cnn((28, 28, 1), 5, width=4)
    bases.check_takes_images(base, np.zeros((3, 28, 28, 1), "float32"), "candidate 'x'")
    bases.check_takes_images(base, np.zeros((3, 32, 32, 3), "float32"), "candidate 'x'")  # prepare() resizes
    # A model that does not take what its declared input shape gives it (a .keras file saved that way):
    odd = bases.Base("odd.keras", models.build_cnn((20, 20, 1), 2), lambda x: x, (28, 28, 1))
    with pytest.raises(InputError, match=r"candidate 'x' \(input \(28, 28, 1\)\) cannot take .* \(32, 32, 3\)"):
        bases.check_takes_images(odd, np.zeros((3, 32, 32, 3), "float32"), "candidate 'x'")


def small_base() -> bases.Base:
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(inputs), name="base")
    return bases.Base("test", model, lambda x: x, (8, 8, 1))


@pytest.mark.parametrize("trainable", [False, True])
def test_load_for_strategy_loads_in_the_strategy_where_fit_works(trainable):
    strategy, loaded = tf.distribute.OneDeviceStrategy("/cpu:0"), []

    def load():
        assert tf.distribute.get_strategy() is strategy
        loaded.append(small_base())
        return loaded[-1]

    assert bases.load_for_strategy(load, strategy, trainable=trainable) is loaded[0]


def test_load_for_strategy_under_multi_worker_copies_a_trained_base_into_the_scope(monkeypatch):
    from common import distributed

    monkeypatch.setattr(distributed, "uses_fit", lambda strategy: False)  # the multi_worker path
    strategy, loaded = tf.distribute.OneDeviceStrategy("/cpu:0"), []

    def load():
        assert tf.distribute.get_strategy() is not strategy  # plain fit, outside the strategy
        loaded.append(small_base())
        return loaded[-1]

    assert bases.load_for_strategy(load, strategy) is loaded[0]  # frozen: used as loaded
    copy = bases.load_for_strategy(load, strategy, trainable=True)
    assert copy.model is not loaded[1].model and copy.spec == "test"
    for mine, theirs in zip(copy.model.weights, loaded[1].model.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
        assert strategy.extended.variable_created_in_scope(mine.value)
        assert not strategy.extended.variable_created_in_scope(theirs.value)
