"""End-to-end tests of recipes.weight_transfer: smoke, CLI, bad input, seeds, strategy, accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recipes import weight_transfer
from tests.conftest import ROOT, assert_cli_error, execute_notebook

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_quick(tmp_path: Path, *flags: str) -> dict:
    return weight_transfer.main(["--quick", "--out", str(tmp_path), *flags])


def without_timings(variants: dict) -> dict:
    """Wall-clock times differ from run to run; everything else must not."""
    return {name: {k: v for k, v in figures.items() if not k.endswith("seconds")} for name, figures in variants.items()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    """One quick run shared by the tests that only read its output (each run costs ~30 s)."""
    out = tmp_path_factory.mktemp("quick")
    return run_quick(out, "--seed", "4"), out


def test_quick_run_writes_the_run_folder(quick_run):
    record, tmp_path = quick_run
    assert set(record["variants"]) == {"scratch", "transfer", "frozen"}
    assert record["recipe"] == "weight_transfer" and record["baseline"] == "scratch"
    assert record["metric"] == "test_accuracy" and record["dataset"] == "fashion_mnist"
    for figures in record["variants"].values():
        assert 0.0 <= figures["test_accuracy"] <= 1.0 and len(figures["per_class_accuracy"]) == 5
        assert np.sum(figures["confusion_matrix"]) == 5000  # the 5 target classes of the test split
    written = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.json", "history.csv", "model.keras"} <= written
    assert {"learning_curves.png", "confusion_matrix.png", "accuracy_vs_budget.png"} <= written
    assert "per_class_accuracy.png" in written
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(record))
    assert json.loads((tmp_path / "config.json").read_text())["quick"] is True


def test_budget_sweep(tmp_path):
    record = run_quick(tmp_path, "--budgets", "3,1", "--target-classes", "5,6,7")
    assert record["budgets"] == [1, 3]
    assert all(len(values) == 2 for values in record["test_accuracy_by_budget"].values())
    assert record["variants"]["transfer"]["labels_per_class"] == 1  # the headline is the smallest budget


def test_same_seed_same_split_and_metrics(quick_run, tmp_path):
    first, _ = quick_run
    second = run_quick(tmp_path / "b", "--seed", "4")
    other = run_quick(tmp_path / "c", "--seed", "5")
    assert first["labeled_indices"] == second["labeled_indices"] != other["labeled_indices"]
    assert len(first["labeled_indices"]) == 5 * 10  # --quick keeps the default budget of 10 per class
    assert without_timings(first["variants"]) == without_timings(second["variants"])
    assert without_timings(first["variants"]) != without_timings(other["variants"])


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "recipes.weight_transfer", "--help"], env=ENV, capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--dataset", "--source-classes", "--target-classes", "--labels-per-class", "--budgets", "--epochs",
                 "--batch-size", "--seed", "--out", "--quick", "--strategy"):  # fmt: skip
        assert flag in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "imagenette"], "unknown dataset 'imagenette'; choose one of fashion_mnist"),
        (["--source-classes", "0-5", "--target-classes", "5-9"], r"class 5 \(Sandal\) is in two class lists"),
        (["--target-classes", ""], "--target-classes is empty"),
        (
            ["--target-classes", "8-12"],
            r"--target-classes: classes \[10, 11, 12\] are not in fashion_mnist.*set --source-classes and --target-classes",
        ),
        (
            ["--labels-per-class", "7000"],
            r"--labels-per-class 7000 needs 7000 images per class, but class 0 \('Sandal'\) has only 6000",
        ),
        (["--source-images", "3"], "--source-images 3 gives 0 images per class"),
        (["--budgets", "10,lots"], "cannot read --budgets '10,lots'"),
        (["--strategy", "tpu"], "unknown strategy 'tpu'"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, flags, message, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(weight_transfer, "train_source_model", no_training)
    assert_cli_error(capsys, weight_transfer.main, ["--quick", "--out", str(tmp_path), *flags], message)


def test_mirrored_strategy_on_two_cpu_devices(tmp_path):
    script = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from recipes import weight_transfer
from common.cli import make_strategy
assert make_strategy("mirrored").num_replicas_in_sync == 2
record = weight_transfer.main(["--quick", "--strategy", "mirrored", "--out", {str(tmp_path)!r}])
print("transfer accuracy", record["variants"]["transfer"]["test_accuracy"])
"""
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transfer accuracy" in result.stdout
    assert (tmp_path / "metrics.json").exists()


def test_notebook_runs_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "01_weight_transfer.ipynb")


def test_transfer_beats_scratch_on_fashion_mnist(tmp_path):
    """The accuracy check: at 10 labels per class on classes 5-9, transfer must beat scratch
    by at least 2 points of test accuracy, averaged over 3 seeds (default settings)."""
    gains = []
    for seed in range(3):
        record = weight_transfer.main(["--seed", str(seed), "--out", str(tmp_path / str(seed))])
        variants = record["variants"]
        gains.append(variants["transfer"]["test_accuracy"] - variants["scratch"]["test_accuracy"])
        assert variants["scratch"]["test_accuracy"] > 0.6  # the baseline itself learns
    print("transfer gain per seed (points):", [round(100 * g, 1) for g in gains])
    assert np.mean(gains) >= 0.02


def test_quick_run_on_a_small_folder(tmp_path):
    """A few dozen images per class: --quick's 1,000 source images are a cap, not a demand."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for i in range(30):
            pixels = np.clip(rng.normal(60 * c, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    record = run_quick(tmp_path / "run", "--dataset", f"folder:{tmp_path / 'images'}", "--image-size", "20",
                       "--source-classes", "0,1", "--target-classes", "2,3", "--labels-per-class", "5")  # fmt: skip
    assert record["variants"]["transfer"]["labels_per_class"] == 5
