"""Unit tests of common/tuning.py: tuner names, the multi_worker refusal, tuners built and summarised (offline)."""

from __future__ import annotations

import sys
import types

import keras
import keras_tuner as kt
import numpy as np
import pytest

from common import tuning
from common.errors import InputError

X = np.random.RandomState(0).rand(32, 4).astype("float32")
Y = (X.sum(axis=1) > 2).astype("int64")


class TinyModel(kt.HyperModel):
    def build(self, hp):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(hp.Int("units", 2, 8, step=2)),
                                  keras.layers.Dense(2)])  # fmt: skip
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return model


def test_check_tuner_names_the_choices():
    for name in tuning.TUNERS:
        tuning.check_tuner(name)
    with pytest.raises(InputError, match="unknown --tuner 'grid'; choose one of hyperband, random"):
        tuning.check_tuner("grid")


def test_check_strategy_refuses_multi_worker_only():
    for strategy in ("default", "mirrored"):
        assert tuning.check_strategy(strategy, "phase 1", "--dropout") is None
    with pytest.raises(InputError, match=r"only phase 1 and phase 2 are\..*KERASTUNER_ORACLE_IP.*\(--dropout\)"):
        tuning.check_strategy("multi_worker", "phase 1 and phase 2", "--dropout")


def test_without_tensorboard_patches_only_when_tensorboard_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    patched = tuning.without_tensorboard(kt.RandomSearch)
    assert patched is not kt.RandomSearch and issubclass(patched, kt.RandomSearch)
    assert patched._configure_tensorboard_dir(None, [], None) is None
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    assert tuning.without_tensorboard(kt.RandomSearch) is kt.RandomSearch


@pytest.mark.parametrize("kind", tuning.TUNERS)
def test_make_tuner_searches_at_most_max_trials_and_best_trial_summarises(tmp_path, kind):
    tuner = tuning.make_tuner(TinyModel(), kind, tmp_path, max_trials=2, max_epochs=1, seed=0)
    assert isinstance(tuner, kt.Hyperband if kind == "hyperband" else kt.RandomSearch)
    assert tuner.oracle.max_trials == 2
    if kind == "hyperband":
        assert tuner.oracle.max_epochs == 2  # Hyperband needs at least 2
    tuner.search(X, Y, validation_data=(X, Y), epochs=1, verbose=0)
    result = tuning.best_trial(tuner, kind)
    assert list(result) == ["best", "val_accuracy", "trials", "tuner"]
    assert set(result["best"]) == {"units"} and result["best"]["units"] in (2, 4, 6, 8)
    assert 1 <= result["trials"] <= 2 and result["tuner"] == kind
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert (tmp_path / "tuner").is_dir()


def test_make_tuner_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(InputError, match="unknown --tuner 'bayesian'"):
        tuning.make_tuner(TinyModel(), "bayesian", tmp_path, max_trials=2, max_epochs=2, seed=0)
