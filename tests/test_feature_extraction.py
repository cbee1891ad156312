"""Smoke, equivalence and accuracy tests of recipes/feature_extraction.py (all offline)."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from common import bases
from common.cli import make_strategy, set_seed
from recipes import feature_extraction as fe
from tests.conftest import ROOT, execute_notebook

# Measured with the default run, `python -m recipes.feature_extraction --seed S`, S = 0..4:
# feature extraction minus scratch = +2.7, +2.5, +0.2, +2.1, +2.2 pts (mean +1.9; make results, with
# every layer of the scratch network trainable). The test runs seed 0 (deterministic ops, +2.7)
# and asserts a margin a recipe that stopped learning would miss.
MARGIN = 0.015


def quick(tmp_path: Path, **overrides) -> fe.Config:
    return fe.Config(quick=True, out=str(tmp_path / "run"), **overrides)


def test_quick_run_writes_the_run_folder(tmp_path):
    record = fe.main(["--quick", "--budgets", "1,3", "--out", str(tmp_path / "run")])
    assert record["recipe"] == "feature_extraction" and record["baseline"] == "scratch"
    assert record["budgets"] == [1, 3] and record["variants"]["scratch"]["labels_per_class"] == 1  # the headline
    assert [len(v) for v in record["test_accuracy_by_budget"].values()] == [2, 2]
    assert (tmp_path / "run" / "accuracy_vs_budget.png").is_file()
    assert set(record["variants"]) == {"scratch", "feature_extraction"}
    assert record["variants"]["feature_extraction"]["path"] == "cached features"
    assert record["variants"]["feature_extraction"]["extract_seconds"] >= 0
    for name in ("config.json", "metrics.json", "history.csv", "learning_curves.png", "confusion_matrix.png",
                 "model.keras"):  # fmt: skip
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == json.loads(json.dumps(record))


def test_imagenet_lite0_base_offline(tmp_path):
    record = fe.run(quick(tmp_path, base="efficientnet_lite0", image_size=32, test_images=100))
    assert record["base"]["kind"] == "lite0" and record["base"]["feature_layer"] == "top_relu"
    assert 0.0 <= record["variants"]["feature_extraction"]["test_accuracy"] <= 1.0


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        fe.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--epochs", "--batch-size", "--seed", "--out", "--quick", "--strategy", "--base",
                 "--weights", "--augment", "--source-cut", "--labels-per-class"):  # fmt: skip
        assert flag in text


def test_cached_features_and_image_path_agree(tmp_path):
    """Same head, same init, same batches: the two paths differ only by float rounding."""
    config = quick(tmp_path, epochs=30, dropout=0.0).resolved()
    strategy = make_strategy("default")
    source, target = fe.load_tasks(config)
    x, y, x_test, y_test = fe.pick_budget(target, config)
    base = fe.load_pretrained_base(config, source)

    set_seed(0)
    features, _ = bases.extract_features(base, x)
    head, _, _ = fe.train_head_on_features(features, y, target.num_classes, config, strategy)
    cached = fe.assemble(base, head, target.num_classes, config, strategy)
    set_seed(0)
    image, _, _ = fe.train_head_on_images(base, x, y, target.num_classes, config, strategy, augment=False)

    cached_accuracy = fe.evaluate(cached, base, x_test, y_test, target.num_classes)["test_accuracy"]
    image_accuracy = fe.evaluate(image, base, x_test, y_test, target.num_classes)["test_accuracy"]
    print(f"cached features {cached_accuracy:.4f}, image path {image_accuracy:.4f}")
    assert cached_accuracy > 0.3  # well above chance (0.2) with the quick base
    assert abs(cached_accuracy - image_accuracy) <= 0.02  # the stated tolerance


def test_augment_runs_images_through_the_frozen_base(tmp_path):
    record = fe.run(quick(tmp_path, augment=True))
    variant = record["variants"]["feature_extraction"]
    assert variant["path"].startswith("augmented") and variant["extract_seconds"] == 0


def test_mobilenet_v2_without_weights_at_a_small_size(tmp_path):
    record = fe.run(quick(tmp_path, base="mobilenet_v2", weights="none", image_size=32, test_images=100))
    assert record["base"]["kind"] == "backbone"
    assert 0.0 <= record["variants"]["feature_extraction"]["test_accuracy"] <= 1.0


def test_tfds_source_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=120):
        record = fe.run(quick(tmp_path, dataset="tfds:cifar10", labels_per_class=2, test_images=0))
    assert record["dataset"] == "tfds:cifar10"


def test_folder_of_generated_images(tmp_path, capsys):
    """train/ + val/ split folders with junk in them: val/ is the test split, junk is skipped and listed."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 3)):
        for c in range(4):
            (tmp_path / "images" / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 * c, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / f"class{c}" / f"{i}.png")
    (tmp_path / "images" / "train" / "class2" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "images" / "train" / "class3" / "broken.jpg").write_bytes(b"")
    record = fe.run(
        quick(tmp_path, dataset=f"folder:{tmp_path / 'images'}", image_size=16, source_classes="0,1",
              target_classes="2,3", labels_per_class=4)
    )  # fmt: skip
    assert 0.0 <= record["variants"]["feature_extraction"]["test_accuracy"] <= 1.0
    assert record["test_images"] == 6  # val/ of classes 2 and 3
    out = capsys.readouterr().out
    assert "test split from val/" in out and f"skipped {tmp_path / 'images' / 'train' / 'class3' / 'broken.jpg'}" in out


def test_a_softmax_model_file_is_cut_below_its_classifier(tmp_path):
    """A user's .keras classifier (softmax output, no layer named 'classifier'): the head trains on 'fc' features."""
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(inputs)
    x = keras.layers.Dense(16, activation="relu", name="fc")(keras.layers.Flatten(name="flat")(x))
    outputs = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    keras.Model(inputs, outputs).save(tmp_path / "user.keras")
    record = fe.run(quick(tmp_path, base=str(tmp_path / "user.keras"), test_images=100))
    assert record["base"]["feature_layer"] == "fc"
    record = fe.run(quick(tmp_path, base=str(tmp_path / "user.keras"), base_layer="flat", test_images=100))
    assert record["base"]["feature_layer"] == "flat"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(base="resnet5"), "unknown base 'resnet5'"),
        (dict(base="mobilenet_v2", weights="none", image_size=8), "at least 32x32"),
        (dict(source_cut="block9"), "block9"),
        (dict(target_classes="4-9"), "two class lists"),
        (dict(budgets="1,x"), r"cannot read --budgets '1,x'"),
        (dict(budgets="0,5"), "every budget must be at least 1"),
        (dict(budgets="1,9000"), r"--budgets 1,9000"),
        (dict(base="efficientnet_lite0", image_size=16), "at least 32x32"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        fe.run(quick(tmp_path, **overrides))


def test_beats_scratch_on_real_data(tmp_path):
    """The default run (seed 0): Fashion-MNIST 0-4 -> 5-9 at 10 labels per class."""
    record = fe.run(fe.Config(out=str(tmp_path / "run")))
    variants = record["variants"]
    gain = variants["feature_extraction"]["test_accuracy"] - variants["scratch"]["test_accuracy"]
    assert gain >= MARGIN, f"gain {gain:+.3f} < {MARGIN}"


def test_notebook_executes_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "02_feature_extraction.ipynb")
