"""Unit tests of common.domains: loading two domains, drawing their training images, one input shape."""

from __future__ import annotations

import numpy as np
import pytest

from common import data, domains


def grey_and_rgb(n_train: int = 40, n_test: int = 30) -> tuple[data.Dataset, data.Dataset]:
    """A grey 8x8 source and an RGB 6x6 target, the same two classes; pixel values encode the image index."""
    rng = np.random.default_rng(0)

    def images(n: int, side: int, channels: int) -> np.ndarray:
        return (np.arange(n)[:, None, None, None] / n + np.zeros((1, side, side, channels))).astype(np.float32)

    labels = lambda n: rng.integers(0, 2, n)  # noqa: E731
    source = data.Dataset(
        "src", images(n_train, 8, 1), labels(n_train), images(n_test, 8, 1), labels(n_test), ["a", "b"]
    )
    target = data.Dataset(
        "tgt", images(n_train, 6, 3), labels(n_train), images(n_test, 6, 3), labels(n_test), ["a", "b"]
    )
    return source, target


def test_draw_training_images_disjoint_for_a_rendering_and_independent_otherwise():
    source, target = grey_and_rgb()
    drawn = domains.draw_training_images(source, target, 10, 15, seed=3, disjoint=True)
    assert len(drawn["source"]) == 10 and len(drawn["target"]) == 15
    assert not set(drawn["source"]) & set(drawn["target"])
    assert all(np.array_equal(np.sort(v), v) for v in drawn.values())
    # Both cannot fit in 40: the source gets half, the target what is left of the permutation.
    crowded = domains.draw_training_images(source, target, 30, 30, seed=3, disjoint=True)
    assert len(crowded["source"]) == 20 and len(crowded["target"]) == 20
    assert not set(crowded["source"]) & set(crowded["target"])
    # Independent draws: 0 means all, the same seed the same draw, another seed another one.
    every = domains.draw_training_images(source, target, 0, 0, seed=3)
    np.testing.assert_array_equal(every["source"], np.arange(40))
    np.testing.assert_array_equal(every["target"], np.arange(40))
    again = domains.draw_training_images(source, target, 10, 15, seed=3)
    np.testing.assert_array_equal(again["target"], domains.draw_training_images(source, target, 10, 15, 3)["target"])
    assert not np.array_equal(again["target"], domains.draw_training_images(source, target, 10, 15, 4)["target"])


def test_prepare_domains_puts_both_domains_into_the_target_shape_with_their_labels():
    source, target = grey_and_rgb()
    prepared = domains.prepare_domains(source, target, 10, 12, test_images=7, seed=1)
    assert prepared.shape == (6, 6, 3) and prepared.num_classes == 2 and prepared.class_names == ["a", "b"]
    assert prepared.x_source.shape == (10, 6, 6, 3) and prepared.x_target.shape == (12, 6, 6, 3)
    assert prepared.x_test.shape == (7, 6, 6, 3) and prepared.x_source_test.shape == (7, 6, 6, 3)
    # The grey source gets three equal channels; every image keeps its own label.
    np.testing.assert_array_equal(prepared.x_source[..., 0], prepared.x_source[..., 2])
    np.testing.assert_array_equal(prepared.y_source, source.y_train[prepared.indices["source"]])
    np.testing.assert_array_equal(prepared.y_target_hidden, target.y_train[prepared.indices["target"]])
    np.testing.assert_allclose(prepared.x_target[:, 0, 0, 0], prepared.indices["target"] / 40, rtol=1e-6)
    # test_images 0: every target test image, and up to 2,000 source test images (here all 30).
    full = domains.prepare_domains(source, target, seed=1)
    assert len(full.x_test) == 30 and len(full.x_source_test) == 30 and len(full.x_source) == 40


def test_load_domain_pair_checks_the_domains_and_draws_a_rendering_disjointly(monkeypatch):
    source, target = grey_and_rgb()
    loaded = {"fashion_mnist": source, "fashion_mnist_m": target, "other": target}
    monkeypatch.setattr(data, "load_dataset", lambda name, image_size=None, seed=0: loaded[name])
    pair = domains.load_domain_pair("fashion_mnist", "fashion_mnist_m", 10, 15, seed=2)
    assert not set(pair.indices["source"]) & set(pair.indices["target"])  # in RENDERINGS
    np.testing.assert_array_equal(pair.indices["target"], domains.draw_training_images(
        source, target, 10, 15, 2, disjoint=True)["target"])  # fmt: skip
    other = domains.load_domain_pair("fashion_mnist", "other", 10, 15, seed=2)
    np.testing.assert_array_equal(other.indices["target"], domains.draw_training_images(
        source, target, 10, 15, 2)["target"])  # fmt: skip
    loaded["other"] = data.Dataset(
        "tgt", target.x_train, target.y_train, target.x_test[:0], target.y_test[:0], ["a", "b"]
    )
    with pytest.raises(data.InputError, match="target dataset 'tgt' has 40 training and 0 test images; it needs both"):
        domains.load_domain_pair("fashion_mnist", "other")
    loaded["other"] = data.Dataset("tgt", target.x_train, target.y_train, target.x_test, target.y_test, ["a", "c"])
    with pytest.raises(data.InputError, match="must have the same classes"):
        domains.load_domain_pair("fashion_mnist", "other")
