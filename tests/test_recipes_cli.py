"""Every recipe, run as a command: bad input (flags, folders, model files) ends in one line and exit status 2."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, assert_cli_error

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_recipe(name: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "RECIPES_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", f"recipes.{name}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("name", RECIPES)
def test_unknown_dataset_is_one_line_and_exit_status_2(name, tmp_path):
    result = run_recipe(name, "--dataset", "no_such_data", "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: unknown dataset 'no_such_data'; choose one of" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_error_is_the_only_line_on_stderr(tmp_path):
    """TensorFlow's start-up notes (printed whatever TF_CPP_MIN_LOG_LEVEL says) do not come before it."""
    env = {k: v for k, v in ENV.items() if k not in ("RECIPES_DEBUG", "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run(
        [sys.executable, "-m", "recipes.weight_transfer", "--dataset", "no_such_data", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: "), result.stderr


def test_debug_keeps_the_traceback(tmp_path):
    result = run_recipe("weight_transfer", "--dataset", "no_such_data", "--debug", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr and "InputError" in result.stderr


# --- Real folders and files, in every recipe (in-process: each fails before any training) ---------


def image_folder(root, classes: dict[str, int], side: int = 12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for n in range(count):
            pixels = np.clip(rng.normal(40 * index, 20, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{n}.png")
    return root


def recipe_main(name: str):
    return importlib.import_module(f"recipes.{name}").main


@pytest.mark.parametrize("name", RECIPES)
def test_a_class_folder_without_images_stops_every_recipe(name, tmp_path, capsys):
    root = image_folder(tmp_path / "images", {"a": 6, "b": 6, "c": 6, "d": 6})
    (root / "scans").mkdir()
    (root / "scans" / "0.tif").write_bytes(b"II*\0")
    (root / "scans" / ".DS_Store").write_bytes(b"\0")
    err = assert_cli_error(capsys, recipe_main(name), ["--dataset", f"folder:{root}", "--out", str(tmp_path / "run")],
                           "has no image that can be read")  # fmt: skip
    assert str(root / "scans") in err and "supported formats" in err
    assert not (tmp_path / "run").exists()


BUDGET_ERRORS = {
    "weight_transfer": [
        (
            ["--labels-per-class", "10"],
            r"--labels-per-class 10 needs 10 images per class, but class 0 \('c'\) has only 5",
        ),
        (["--budgets", "2,20"], r"--budgets 2,20 needs 20 images per class"),
        (
            ["--labels-per-class", "2", "--source-images", "20"],
            r"--source-images 20 needs 10 images per class, but class 0 \('a'\) has only 5",
        ),
    ],
    "feature_extraction": [(["--labels-per-class", "10"], r"--labels-per-class 10 needs 10 images per class")],
    "fine_tune": [
        (
            ["--labels-per-class", "3", "--val-per-class", "3"],
            r"--labels-per-class 3 \+ --val-per-class 3 needs 6 images per class, but class 0 \('c'\) has only 5",
        ),
    ],  # fmt: skip
    "self_training": [
        (
            ["--labels-per-class", "10"],
            r"--labels-per-class 10 needs 10 images per class, but class 0 \('c'\) has only 5",
        )
    ],
    "maml": [
        (
            ["--ways", "2", "--shots", "5", "--query", "5"],
            r"--shots 5 \+ --query 5 need 10 images per class, but meta-train class 0 \('a'\) has only 6",
        ),
    ],  # fmt: skip
}
CLASS_FLAGS = {"maml": ["--train-classes", "0,1", "--test-classes", "2,3"]}


@pytest.mark.parametrize("name, flags, message", [(n, f, m) for n, cases in BUDGET_ERRORS.items() for f, m in cases])
def test_a_label_budget_too_large_names_its_flag(name, flags, message, tmp_path, capsys):
    root = image_folder(tmp_path / "images", {"a": 6, "b": 30, "c": 6, "d": 6})
    classes = CLASS_FLAGS.get(name, ["--source-classes", "0,1", "--target-classes", "2,3"])
    argv = ["--dataset", f"folder:{root}", "--image-size", "12", *classes, *flags, "--out", str(tmp_path / "run")]
    assert_cli_error(capsys, recipe_main(name), argv, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", RECIPES)
def test_a_number_out_of_range_names_its_flag(name, tmp_path, capsys):
    assert_cli_error(
        capsys, recipe_main(name), ["--seed", "-1", "--out", str(tmp_path)], r"--seed -1: must be at least 0"
    )


@pytest.mark.parametrize("name", ["feature_extraction", "fine_tune", "self_training"])
def test_a_model_file_that_cannot_be_used_is_named(name, tmp_path, capsys):
    import keras
    from keras import layers

    junk = tmp_path / "downloaded.keras"
    junk.write_bytes(b"<html>Sign in to continue</html>")
    main = recipe_main(name)
    assert_cli_error(capsys, main, ["--dataset", "digits", "--base", str(junk), "--out", str(tmp_path / "run")],
                     rf"--base '{junk}' is not a Keras model")  # fmt: skip
    inputs = keras.Input((16, 16, 1))
    keras.Model(inputs, layers.Dense(3, name="predictions")(layers.Flatten(name="flat")(inputs))).save(
        tmp_path / "model.keras"
    )
    argv = ["--dataset", "digits", "--base", str(tmp_path / "model.keras"), "--base-layer", "conv5"]
    assert_cli_error(capsys, main, [*argv, "--out", str(tmp_path / "run")], r"--base-layer 'conv5' is not a layer of")
    assert_cli_error(capsys, main, ["--dataset", "digits", "--base-layer", "flat"], "applies to keras.applications")
    assert not (tmp_path / "run").exists()


def test_images_too_small_for_the_network_are_an_input_error(tmp_path, capsys):
    argv = ["--dataset", "digits", "--out", str(tmp_path / "run")]
    assert_cli_error(capsys, recipe_main("weight_transfer"), argv, "needs images of at least 18x18 pixels, got 8x8")
    root = image_folder(tmp_path / "images", {"a": 6, "b": 6, "c": 6, "d": 6})
    argv = ["--dataset", f"folder:{root}", "--image-size", "6", "--source-classes", "0,1", "--target-classes", "2,3"]
    argv += ["--labels-per-class", "2", "--out", str(tmp_path / "run")]
    for name in ("feature_extraction", "fine_tune"):
        assert_cli_error(capsys, recipe_main(name), [*argv, "--val-per-class", "1"] if name == "fine_tune" else argv,
                         "the BatchNorm CNN .* needs images of at least 8x8 pixels, got 6x6")  # fmt: skip


def test_a_misspelt_fresh_layer_is_named(tmp_path, capsys):
    argv = ["--fresh-layers", "dense,clasifier", "--out", str(tmp_path / "run")]
    assert_cli_error(
        capsys, recipe_main("weight_transfer"), argv, r"\['clasifier'\] are not layers of the CNN.*classifier"
    )


# Small settings; each recipe pretrains its own source-cnn base (500 images) into an empty cache, then loads it.
COLD_AND_WARM = {
    "feature_extraction": ["--source-images", "500", "--epochs", "2", "--test-images", "200"],
    "fine_tune": ["--source-images", "500", "--head-epochs", "2", "--epochs", "1", "--test-images", "200"],
    "self_training": ["--source-images", "500", "--unlabeled", "300", "--test-images", "200", "--method",
                      "noisy_student", "--scratch-epochs", "1"],
}  # fmt: skip


@pytest.mark.parametrize("name", COLD_AND_WARM)
def test_the_same_seed_gives_the_same_result_whether_the_base_was_pretrained_now_or_loaded(name, tmp_path, monkeypatch):
    """Pretraining the base draws random numbers that loading it from the cache does not: the first run of a
    command must still end as the second (each recipe seeds again once it holds its base)."""
    recipe = importlib.import_module(f"recipes.{name}")
    monkeypatch.setenv("RECIPES_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--quick", *COLD_AND_WARM[name]]
    cold = recipe.main([*argv, "--out", str(tmp_path / "cold")])
    assert len(list((tmp_path / "cache").glob("*.keras"))) == 1  # pretrained and cached by the first run
    warm = recipe.main([*argv, "--out", str(tmp_path / "warm")])
    for variant, figures in cold["variants"].items():
        assert figures["confusion_matrix"] == warm["variants"][variant]["confusion_matrix"], variant
