"""Tests of recipes.self_training and common/semi.py: every method end to end, hidden labels,
pseudo-labelling on a toy two-cluster set, the student's start, the split, bad input, the
notebook, and the gain over transfer on real data at small scale."""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from common import models, semi
from recipes import self_training as st
from tests.conftest import ROOT, assert_cli_error, execute_notebook


def run_quick(out: Path, *flags: str) -> dict:
    return st.main(["--quick", "--out", str(out), *flags])


def check_record_and_run_folder(record: dict, out: Path, rounds: int) -> None:
    assert record["recipe"] == "self_training" and record["baseline"] == "transfer"
    assert set(record["variants"]) == {"scratch", "transfer", "self_training"}
    student = record["variants"]["self_training"]
    assert len(student["rounds"]) == rounds
    for round_record in student["rounds"]:
        assert 0.0 <= round_record["test_accuracy"] <= 1.0
        assert sum(round_record["class_histogram"]) == round_record["pseudo_labels_kept"]
        assert 0.0 <= round_record["pseudo_label_precision"] <= 1.0  # NaN (nothing kept) fails too
    assert np.sum(student["confusion_matrix"]) == record["test_images"] == 500
    gain = student["test_accuracy"] - record["variants"]["transfer"]["test_accuracy"]
    assert record["gain_over_transfer"] == pytest.approx(gain)
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "history.csv", "model.keras", "rounds.png", "confusion_matrix.png",
            "per_class_accuracy.png"} <= written  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(record))


@pytest.mark.parametrize("method, rounds", [("curriculum", 2), ("noisy_student", 3), ("consistency", 4)])
def test_method_runs_and_hidden_labels_change_nothing_but_the_precision(tmp_path, monkeypatch, capsys, method, rounds):
    """A quick run; then the same seed with the pool's hidden labels shuffled: every accuracy and
    histogram stays (so the same seed gives the same run), only the reported precision moves."""
    # consistency: a low threshold, so that the quick teacher's labels are used (the others refuse the flag)
    flags = ("--method", method, *(("--threshold", "0.5") if method == "consistency" else ()))
    first = run_quick(tmp_path / "a", *flags)
    check_record_and_run_folder(first, tmp_path / "a", rounds)
    assert re.search(r"self-training (beat|did not beat|ended BELOW) its baseline transfer", capsys.readouterr().out)

    split_target = st.split_target

    def shuffled_hidden_labels(target, config):
        split = split_target(target, config)
        split.hidden_labels = np.random.default_rng(7).permutation(split.hidden_labels)
        return split

    monkeypatch.setattr(st, "split_target", shuffled_hidden_labels)
    second = run_quick(tmp_path / "b", *flags)
    for name in ("scratch", "transfer", "self_training"):
        assert first["variants"][name]["test_accuracy"] == second["variants"][name]["test_accuracy"]
    rounds_a, rounds_b = first["variants"]["self_training"]["rounds"], second["variants"]["self_training"]["rounds"]
    assert [r["class_histogram"] for r in rounds_a] == [r["class_histogram"] for r in rounds_b]
    assert [r["pseudo_label_precision"] for r in rounds_a] != [r["pseudo_label_precision"] for r in rounds_b]


def test_curriculum_method_and_the_from_scratch_setting(tmp_path):
    record = run_quick(tmp_path / "curriculum", "--method", "curriculum", "--labeler", "confidence")
    check_record_and_run_folder(record, tmp_path / "curriculum", rounds=2)
    assert record["variants"]["self_training"]["rounds"][-1]["kept_share"] == 1.0
    scratch = run_quick(tmp_path / "none", "--base", "none", "--method", "consistency", "--target-classes", "0-9",
                        "--flexmatch")  # fmt: skip
    assert scratch["baseline"] == "scratch" and set(scratch["variants"]) == {"scratch", "self_training"}


# --- Pseudo-labelling on a toy set of two clusters ---------------------------------------------


def two_clusters(n: int = 300, seed: int = 0):
    """Two Gaussian clusters in 2-D (classes 0 and 1), three labeled points each, the rest a pool."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-3, 1, (n, 2)), rng.normal(3, 1, (n, 2))]).astype(np.float32)
    y = np.repeat([0, 1], n)
    labeled = np.concatenate([np.arange(3), n + np.arange(3)])
    pool = np.setdiff1d(np.arange(2 * n), labeled)
    return x, y, labeled, pool


def test_each_pseudo_labelling_method_finds_the_two_clusters():
    x, y, labeled, pool = two_clusters()
    head = models.logistic_regression_head(x[labeled], y[labeled])
    probabilities = head.predict_proba(x[pool])
    kept, labels = semi.select_top_fraction(probabilities, 0.5)
    assert np.array_equal(labels, y[pool][kept]) and np.bincount(labels).tolist() == [148, 148]
    kept, labels, _ = semi.select_confident(probabilities, 0.7)  # six labels: a cautious head
    assert len(kept) > 0.5 * len(pool) and np.mean(labels == y[pool][kept]) >= 0.99
    thresholds = semi.flexmatch_thresholds(probabilities, 0.9)  # lower in the warm-up: most are below 0.9
    kept, labels, _ = semi.select_confident(probabilities, thresholds)
    assert np.all(thresholds < 0.9) and len(kept) > 0.5 * len(pool) and np.mean(labels == y[pool][kept]) >= 0.99
    assert np.mean(semi.balance_classes(probabilities).argmax(axis=1) == y[pool]) >= 0.99
    seeds = np.full(len(x), -1)
    seeds[labeled] = y[labeled]
    spread = semi.label_spreading(semi.knn_graph(x), seeds, num_classes=2)
    assert spread.shape == (len(x), 2) and np.mean(spread.argmax(axis=1) == y) >= 0.99

    # The recipe's curriculum on these "features": its last head labels the whole pool right.
    images = np.zeros((len(x), 1, 1, 1), np.float32)
    split = semi.Split(images[labeled], y[labeled], images[pool], y[pool], images[:10], y[:10], labeled, pool)
    features = {"labeled": x[labeled], "pool": x[pool], "test": x[:10]}
    for labeler in st.LABELERS:
        head, rounds, probabilities = st.curriculum(
            features["labeled"], split.y_labeled, features["pool"], 2, st.Config(fractions="0.2,0.6,1.0", labeler=labeler),
            (features["test"], split.y_test), split.hidden_labels,
        )  # fmt: skip
        assert [r["pseudo_labels_kept"] for r in rounds] == [118, 356, 594]
        assert rounds[-1]["pseudo_label_precision"] >= 0.99 and np.mean(head.predict(x[pool]) == y[pool]) >= 0.99
        assert probabilities.shape == (len(pool), 2) and np.mean(probabilities.argmax(axis=1) == y[pool]) >= 0.99


def test_balancing_pulls_back_a_teacher_that_favours_one_class():
    x, y, _, pool = two_clusters()
    logits = np.stack([np.zeros(len(pool)), x[pool, 0] + 4.0], axis=1)  # boundary at -4: most of class 0 called 1
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.mean(probabilities.argmax(axis=1) == y[pool]) < 0.7
    balanced = semi.balance_classes(probabilities)
    np.testing.assert_allclose(balanced.sum(axis=1), 1.0)
    np.testing.assert_allclose(balanced.mean(axis=0), [0.5, 0.5], atol=1e-3)
    assert np.mean(balanced.argmax(axis=1) == y[pool]) >= 0.99


def test_kept_pseudo_labels_pass_the_threshold_and_the_class_cap():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 5)) * 3
    logits[:1200, 0] += 6  # class 0 is "easy": it would flood the set without the cap
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    kept, labels, cap = semi.select_confident(probabilities, 0.9, class_cap=1.5)
    confidence, passed = probabilities.max(axis=1), probabilities.max(axis=1) >= 0.9
    assert np.all(confidence[kept] >= 0.9) and np.array_equal(labels, probabilities[kept].argmax(axis=1))
    assert cap == int(np.ceil(1.5 * passed.sum() / 5))
    counts = np.bincount(labels, minlength=5)
    assert counts.max() <= cap and counts[0] == cap  # the easy class was capped ...
    class0 = np.flatnonzero(passed & (probabilities.argmax(axis=1) == 0))
    assert confidence[kept[labels == 0]].min() >= np.sort(confidence[class0])[-cap]  # ... keeping its most confident
    # FlexMatch: a class with fewer confident predictions gets a lower threshold, the easy one the highest.
    thresholds = semi.flexmatch_thresholds(probabilities, 0.9)
    confident_counts = np.bincount(probabilities.argmax(axis=1)[passed], minlength=5)
    assert thresholds.argmax() == 0 and np.all(np.diff(thresholds[np.argsort(confident_counts)]) >= 0)
    assert np.all(thresholds <= 0.9)


def test_flexmatch_trainer_remembers_confident_predictions():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    ema = keras.models.clone_model(model)
    ema.set_weights(model.get_weights())
    view = semi.make_view("weak", 0)
    trainer = semi.EMATrainer(model, ema, 10, 1e-3, weak=view, strong=view, threshold=0.0, pool_size=8, flexmatch=True)
    rng = np.random.default_rng(0)
    x, u = rng.uniform(size=(2, 4, 4, 1)).astype("float32"), rng.uniform(size=(4, 4, 4, 1)).astype("float32")
    *_, labels, mask = trainer.consistency_step(x, np.array([0, 1]), u, np.array([1, 3, 5, 7]))
    memory = trainer.memory.numpy()
    assert np.array_equal(memory[[1, 3, 5, 7]], labels.numpy()) and np.all(memory[[0, 2, 4, 6]] == -1)
    assert mask.numpy().sum() > 0  # with nothing confident yet, the warm-up thresholds are low


def test_views_keep_images_in_range_and_the_strong_ones_use_keras_layers():
    names = {kind: [type(layer).__name__ for layer in semi.make_view(kind, 0).layers] for kind in semi.VIEWS}
    assert names["weak"] == ["RandomFlip", "RandomTranslation"]
    assert names["erasing"][-2:] == ["RandomContrast", "RandomErasing"]
    assert names["randaugment"][-2:] == ["RandAugment", "RandomErasing"]
    images = np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype("float32")
    for kind in semi.VIEWS:
        out = np.asarray(semi.make_view(kind, 0)(images, training=True))
        assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0 and not np.allclose(out, images)


# --- The split and the student --------------------------------------------------------------


def test_labeled_examples_are_not_in_the_unlabeled_pool_and_the_seed_fixes_the_split():
    config = st.Config(seed=3)
    _, target = st.load_tasks(config)
    split = st.split_target(target, config)
    assert len(np.intersect1d(split.labeled_index, split.pool_index)) == 0
    assert len(split.labeled_index) + len(split.pool_index) == len(target.y_train) == 30000
    assert np.bincount(split.y_labeled).tolist() == [10] * 5 and len(split.y_test) == 5000
    assert np.array_equal(split.hidden_labels, target.y_train[split.pool_index])
    assert np.array_equal(st.split_target(target, config).labeled_index, split.labeled_index)
    assert not np.array_equal(st.split_target(target, st.Config(seed=4)).labeled_index, split.labeled_index)
    small = st.split_target(target, st.Config(seed=3, unlabeled=500))
    assert len(small.pool_index) == 500 and not set(small.pool_index) & set(small.labeled_index)


def test_student_starts_from_the_base_weights_and_the_transfer_head():
    config = st.Config(quick=True).resolved()
    source, target = st.load_tasks(config)
    split = st.split_target(target, config)
    base = st.load_pretrained_base(config, source, target)
    features = st.extract_features(base, split.x_labeled)
    head = st.fit_head(features, split.y_labeled, config)
    student = semi.build_student(base, head, target.num_classes, config.dropout)
    encoder = next(layer for layer in student.layers if isinstance(layer, keras.Model))
    for copied, original in zip(encoder.get_weights(), base.model.get_weights()):
        np.testing.assert_array_equal(copied, original)
    assert encoder.trainable and all(w.trainable for w in encoder.weights if "moving" not in w.path)
    x = base.prepare(split.x_test[:64])
    expected = head.predict_proba(st.extract_features(base, split.x_test[:64]))
    np.testing.assert_allclose(semi.predict_probabilities(student, x), expected, atol=1e-4)
    streamed = semi.predict_probabilities(student, split.x_test[:64], base=base)  # raw images, prepared on the fly
    np.testing.assert_allclose(streamed, expected, atol=1e-4)
    np.testing.assert_allclose(semi.predict_probabilities(st.transfer_model(base, head, 5), x), expected, atol=1e-4)
    encoder.get_layer(encoder.layers[1].name).kernel.assign(np.zeros(encoder.layers[1].kernel.shape))
    assert np.abs(base.model.layers[1].kernel.numpy()).sum() > 0  # the student trains a copy, not the base


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        st.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--labeler", "--fractions", "--balance", "--student-rounds", "--student-view", "--pool",
                 "--base", "--threshold", "--flexmatch", "--labels-per-class", "--seed", "--quick"):  # fmt: skip
        assert flag in text


# --- Bad input ----------------------------------------------------------------------------------


def save_images(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        keras.utils.save_img(folder / f"{i}.png", np.round(image * 255).astype("uint8"), scale=False)


@pytest.fixture
def bad_inputs(tmp_path):
    """A pool folder holding two labeled images of the quick run, and a base taking 2-channel images."""
    config = st.Config(quick=True).resolved()
    _, target = st.load_tasks(config)
    split = st.split_target(target, config)
    save_images(tmp_path / "pool", np.concatenate([split.x_labeled[:2], split.x_pool[:3]]))
    inputs = keras.Input((28, 28, 2))
    outputs = keras.layers.Dense(5, name="classifier")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "two_channels.keras")
    return tmp_path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "mixmatch"], "unknown --method 'mixmatch'; choose one of curriculum, noisy_student, consistency"),
        (["--labeler", "knn"], "unknown --labeler 'knn'; choose one of propagation, confidence"),
        (["--student-view", "cutout"], "unknown --student-view 'cutout'; choose one of weak, erasing, randaugment"),
        (["--fractions", "0.5,0.2"], "must not decrease"),
        (["--fractions", "0,1"], r"shares in \(0, 1\]"),
        (["--threshold", "1.5"], r"--threshold 1.5: must be at most 1"),
        (
            ["--labels-per-class", "7000"],
            r"--labels-per-class 7000 needs 7000 images per class, but class 0 \('Sandal'\)",
        ),
        (["--labels-per-class", "6000"], "the unlabeled pool is empty"),
        (["--student-rounds", "0"], "--student-rounds 0: must be at least 1"),
        (["--base", "none"], "only --method consistency applies"),
        (["--base", "no/such/model.keras"], "no such .keras file"),
        (["--source-classes", "0-5"], "two class lists"),
        (["--strategy", "mirrored", "--method", "consistency"], "--method consistency trains on one device"),
        (["--backup-dir", "{tmp}/backup", "--method", "consistency"], "keeps no checkpoints for --backup-dir"),
        (["--balance", "sometimes"], "unknown --balance 'sometimes'; choose one of auto, estimated, uniform, none"),
        (["--method", "consistency", "--labeler", "confidence"], "--method consistency does not read --labeler"),
        (["--steps", "50", "--threshold", "0.9"], "--method curriculum does not read --steps, --threshold"),
        (
            ["--method", "consistency", "--student-rounds", "3"],
            r"does not read --student-rounds; drop it \(--method noisy_student does\)",
        ),
        (["--pool", "my_images"], "give folder:<path>"),
        (["--pool", "folder:no/such/folder"], "does not exist"),
        (["--pool", "folder:{tmp}/pool"], r"contains 2 of the labeled images"),
        (
            ["--base", "{tmp}/two_channels.keras"],
            r"takes inputs of shape \(28, 28, 2\); an image model of \(height, width, 1 or 3 channels\) is needed",
        ),
    ],
)
def test_bad_input_fails_before_training(bad_inputs, flags, message, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    for step in ("train_scratch", "curriculum", "consistency", "noisy_students"):
        monkeypatch.setattr(st, step, no_training)
    flags = [flag.replace("{tmp}", str(bad_inputs)) for flag in flags]
    assert_cli_error(capsys, st.main, ["--quick", "--out", str(bad_inputs / "run"), *flags], message)


def test_notebook_runs_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "05_self_training.ipynb")


# --- Real data, small scale ----------------------------------------------------------------------

# A smaller run than the default: 6,000 unlabeled images, 2,000 test images (about 30 s of CPU
# once the base is cached). Measured with it: self-training above transfer by +1.4 / +2.9 / +2.3
# points (seeds 0 / 1 / 2; `python -m recipes.self_training --unlabeled 6000 --test-images 2000
# --seed S`); the test runs seed 0, the smallest gain. A broken pseudo-labelling (wrong classes,
# pseudo-labels misaligned with the pool, a head fit on the labels alone) fails it.
# The curriculum itself must learn: without the guard (tested on its own in test_self_training_pools.py),
# which on this 6,000-image pool keeps transfer on seed 0 (held-out 0.78 vs 0.82 on 2 folds).
SMALL_RUN = ["--unlabeled", "6000", "--test-images", "2000", "--no-guard"]
MARGIN = 0.01


def test_self_training_beats_transfer_on_fashion_mnist(tmp_path):
    record = st.main([*SMALL_RUN, "--out", str(tmp_path)])
    variants = record["variants"]
    transfer, student = variants["transfer"]["test_accuracy"], variants["self_training"]["test_accuracy"]
    print(f"scratch {variants['scratch']['test_accuracy']:.3f}, transfer {transfer:.3f}, self-training {student:.3f}")
    assert variants["self_training"]["rounds"][0]["pseudo_label_precision"] >= 0.95
    assert student >= transfer + MARGIN


def test_full_supervision_diagnostic_reports_each_seed_and_the_mean(capsys):
    from tests.benchmarks import full_supervision

    full_supervision.main(["--seeds", "0", "1", "--quick"])
    printed = capsys.readouterr().out
    assert "seed 0:" in printed and "seed 1:" in printed
    assert re.search(r"full supervision, student: \d+\.\d% \(\d+\.\d-\d+\.\d\)", printed)
