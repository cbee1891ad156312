"""Unit tests of common/saving.py: a model file that does not load names the classes it misses and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from common import saving
from common.errors import InputError
from tests.conftest import ROOT, assert_cli_error

MODULE = "recipes_test_custom_layers"  # defined in a temporary folder, never imported by this test process


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A temporary module defining a registered custom layer, and two models saved in another process:
    one with that layer, one with a Lambda layer. Returns (folder of the module, custom path, lambda path)."""
    folder = tmp_path_factory.mktemp("custom")
    (folder / f"{MODULE}.py").write_text(
        textwrap.dedent("""
            import keras

            @keras.saving.register_keras_serializable(package="test_pkg")
            class Doubling(keras.layers.Layer):
                def call(self, x):
                    return 2.0 * x
        """)
    )
    script = textwrap.dedent(f"""
        import keras
        from {MODULE} import Doubling
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Flatten(name="flat")(Doubling(name="doubling")(inputs))
        keras.Model(inputs, keras.layers.Dense(3, name="classifier")(x)).save({str(folder / "custom.keras")!r})
        x = keras.layers.Flatten(name="flat")(keras.layers.Lambda(lambda t: 2.0 * t, name="twice")(inputs))
        keras.Model(inputs, keras.layers.Dense(3, name="classifier")(x)).save({str(folder / "lambda.keras")!r})
    """)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)
    assert MODULE not in sys.modules
    return folder, folder / "custom.keras", folder / "lambda.keras"


@pytest.fixture
def clean_registration():
    """Forget the temporary module and its registered class after a test that imported it."""
    yield
    sys.modules.pop(MODULE, None)
    keras.saving.get_custom_objects().pop("test_pkg>Doubling", None)


def test_a_custom_class_that_is_not_registered_is_named_with_its_module_and_the_fix(model_files, monkeypatch):
    _, custom, _ = model_files
    monkeypatch.delenv(saving.IMPORT_ENV, raising=False)
    with pytest.raises(InputError) as error:
        saving.load_model(custom, "--base")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--base '{custom}' does not load: its config uses classes that are not registered")
    assert f"Doubling (module '{MODULE}', registered_name 'test_pkg>Doubling')" in message
    assert f"RECIPES_IMPORT={MODULE}" in message and "Flatten" not in message and "Dense" not in message


def test_the_module_named_in_recipes_import_makes_it_load(model_files, monkeypatch, clean_registration):
    folder, custom, _ = model_files
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(saving.IMPORT_ENV, f" {MODULE} ,")
    model = saving.load_model(custom)
    assert model.get_layer("doubling").__class__.__name__ == "Doubling"


def test_a_lambda_layer_needs_the_documented_opt_out_of_safe_mode(model_files, monkeypatch):
    _, _, with_lambda = model_files
    monkeypatch.delenv(saving.SAFE_MODE_ENV, raising=False)
    with pytest.raises(InputError, match=r"holds Lambda layers \(twice\) .* set RECIPES_SAFE_MODE=0 \(.*runs the code"):
        saving.load_model(with_lambda, "--base")
    monkeypatch.setenv(saving.SAFE_MODE_ENV, "0")
    assert saving.load_model(with_lambda).get_layer("twice").__class__.__name__ == "Lambda"


def test_bad_values_of_the_variables_are_named(model_files, monkeypatch):
    _, custom, _ = model_files
    monkeypatch.setenv(saving.IMPORT_ENV, "no_such_module_here")
    with pytest.raises(InputError, match=r"RECIPES_IMPORT: module 'no_such_module_here' does not import"):
        saving.load_model(custom)
    monkeypatch.delenv(saving.IMPORT_ENV)
    monkeypatch.setenv(saving.SAFE_MODE_ENV, "no")
    with pytest.raises(InputError, match=r"RECIPES_SAFE_MODE='no': choose 1 .* or 0"):
        saving.load_model(custom)


def test_a_file_keras_cannot_read_keeps_keras_reason(tmp_path):
    junk = tmp_path / "page.keras"
    junk.write_bytes(b"<html>Sign in</html>")
    with pytest.raises(InputError, match=r"--base '.*page.keras' is not a Keras model that loads here \("):
        saving.load_model(junk)
    assert saving.diagnose(junk) == []


def test_recipes_stop_with_one_line_naming_the_class(model_files, monkeypatch, capsys):
    from recipes import choose_source, feature_extraction

    _, custom, with_lambda = model_files
    monkeypatch.delenv(saving.IMPORT_ENV, raising=False)
    argv = ["--dataset", "digits", "--base", str(custom), "--out", "/nonexistent/never-written"]
    assert_cli_error(
        capsys, feature_extraction.main, argv, rf"--base '{custom}' does not load: .*Doubling .*RECIPES_IMPORT="
    )
    argv = ["--quick", "--candidates", str(with_lambda), "--out", "/nonexistent/never-written"]
    err = assert_cli_error(
        capsys, choose_source.main, argv, r"candidate 'lambda': --candidates '.*' does not load: .*Lambda"
    )
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", ["feature_extraction", "fine_tune", "self_training", "choose_source"])
def test_help_of_the_model_file_options_names_the_variables(name, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"recipes.{name}").main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "RECIPES_IMPORT=module1,module2" in shown and "RECIPES_SAFE_MODE=0" in shown
