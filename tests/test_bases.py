"""Unit tests of common/bases.py: the source-cnn cache, backbones, .keras models and bad input."""

from __future__ import annotations

import numpy as np
import pytest

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
