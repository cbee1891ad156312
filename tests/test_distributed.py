"""Unit tests of common.distributed: TF_CONFIG checks, the shared custom step against fit, resumable phases.

Everything here runs in this process under the default strategy (MultiWorkerMirroredStrategy
can be created once per process only); tests/test_multi_worker.py starts worker processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import distributed, evaluation, models
from common.cli import InputError, RecipeConfig, make_strategy, set_seed

X = np.random.RandomState(0).rand(100, 20, 20, 1).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 100)


def two_workers(index=0) -> dict:
    return {"cluster": {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]}, "task": {"type": "worker", "index": index}}


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "TF_CONFIG is not set"),
        ("{cluster", "TF_CONFIG is not JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
        (json.dumps(dict(two_workers(), cluster={"ps": ["127.0.0.1:1"]})), "'ps' is not"),
        (json.dumps(dict(two_workers(), cluster={"worker": ["localhost"]})), "'localhost' of job 'worker' is not"),
        (json.dumps({"cluster": two_workers()["cluster"]}), 'no "task"'),
        (json.dumps(two_workers(index=2)), "task index 2 is out of range"),
        (json.dumps(dict(two_workers(), task={"type": "chief", "index": 0})), "task type 'chief' is not a job"),
    ],
)
def test_bad_tf_config_names_the_variable_and_shows_an_example(text, reason):
    with pytest.raises(InputError, match=reason) as error:
        distributed.read_tf_config(text)
    assert "TF_CONFIG" in str(error.value) and '"worker": ["host1:12345", "host2:12345"]' in str(error.value)


def test_good_tf_config_and_missing_one_from_make_strategy(monkeypatch):
    assert distributed.read_tf_config(json.dumps(two_workers(1)))["task"]["index"] == 1
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(InputError, match="TF_CONFIG is not set"):
        make_strategy("multi_worker")


def test_recipes_opt_in_to_multi_worker_and_backup():
    @dataclass
    class Plain(RecipeConfig):
        pass

    @dataclass
    class Opted(RecipeConfig):
        MULTI_WORKER = True
        BACKUP = True

    with pytest.raises(InputError, match="does not support --strategy multi_worker yet.*keras-team/keras#20585"):
        Plain(strategy="multi_worker").resolved()
    with pytest.raises(InputError, match="does not support --backup-dir"):
        Plain(backup_dir="b").resolved()
    assert Opted(strategy="multi_worker", backup_dir="b").resolved().strategy == "multi_worker"


def test_outside_a_cluster_this_process_is_the_chief(tmp_path):
    assert distributed.is_chief() and distributed.uses_fit(tf.distribute.get_strategy())
    assert evaluation.make_run_dir("demo", str(tmp_path / "run")) == tmp_path / "run"


def small_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return models.compile_classifier(models.build_cnn((20, 20, 1), 3), 1e-3)


def shuffled() -> tf.data.Dataset:
    """A new pipeline each call: a dataset object's reshuffles draw from its own seed generator."""
    return tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(100, seed=0).batch(32)  # last batch: 4 images


def max_difference(a: keras.Model, b: keras.Model) -> float:
    return max(float(np.abs(u - v).max()) for u, v in zip(a.get_weights(), b.get_weights()))


def test_shared_custom_step_trains_like_fit():
    """Same batches (reshuffled each epoch), same loss averaging, same Adam updates: same weights as fit.

    (Under ``mirrored`` the two differ by float noise from the first epoch on; not pinned here.)
    """
    set_seed(0)
    strategy = make_strategy("default")
    with strategy.scope():
        by_fit = small_model()
    history = by_fit.fit(shuffled(), epochs=2, verbose=0).history
    with strategy.scope():
        by_step = small_model()
    custom = distributed.distributed_fit(by_step, shuffled(), 2, strategy, validation_data=shuffled(), verbose=0)
    assert max_difference(by_fit, by_step) < 1e-5
    np.testing.assert_allclose(custom["loss"], history["loss"], rtol=1e-5)
    np.testing.assert_allclose(custom["accuracy"], history["accuracy"], rtol=1e-6)
    assert set(custom) == {"loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"}


@pytest.mark.parametrize("path", ["fit", "custom"])
def test_a_stopped_phase_resumes_where_it_stopped(tmp_path, path):
    """Train 1 epoch with a backup, start again asking for 3: same weights and history as 3 epochs at once."""
    set_seed(0)
    strategy = tf.distribute.get_strategy()
    train = distributed.train if path == "fit" else distributed.distributed_fit
    backup = distributed.Backup(str(tmp_path / "backup"))
    train(small_model(), shuffled(), 1, strategy, backup_dir=backup.phase("phase"), verbose=0)
    resumed_model = small_model()  # a new process would build it again from the seed
    resumed = train(resumed_model, shuffled(), 3, strategy, backup_dir=backup.phase("phase"), verbose=0)
    whole_model = small_model()
    whole = train(whole_model, shuffled(), 3, strategy, backup_dir=tmp_path / "other", verbose=0)
    assert max_difference(resumed_model, whole_model) == 0.0
    assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-6) and len(resumed["loss"]) == 3
    # A finished phase restores its end state without training.
    again = small_model()
    assert train(again, shuffled(), 3, strategy, backup_dir=backup.phase("phase"), verbose=0)["loss"] == resumed["loss"]
    assert max_difference(again, whole_model) == 0.0
    backup.finish()
    assert not (tmp_path / "backup").exists()


# --- Early stopping on both paths, and phases that resume across a kill ---------------------

X_VAL = np.random.RandomState(2).rand(60, 20, 20, 1).astype("float32")
Y_VAL = np.random.RandomState(3).randint(0, 3, 60)  # unrelated labels: the validation loss soon rises


def validation() -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((X_VAL, Y_VAL)).batch(32)


class Killed(Exception):
    pass


class KillAt(keras.callbacks.Callback):
    """Stand-in for SIGKILL in-process: raise at the start of epoch ``epoch`` (0-based), after the last backup."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Killed


@pytest.mark.parametrize("path", ["fit", "custom"])
def test_early_stopping_restores_the_best_epoch_on_both_paths(monkeypatch, path):
    monkeypatch.setattr(distributed, "uses_fit", lambda strategy: path == "fit")
    set_seed(0)
    model = small_model()
    history = distributed.train(model, shuffled(), 20, tf.distribute.get_strategy(), validation(), verbose=0,
                                patience=2)  # fmt: skip
    best = int(np.argmin(history["val_loss"]))
    assert len(history["val_loss"]) == best + 3 < 20  # stopped 2 epochs after the best one
    val_loss = model.evaluate(validation(), verbose=0)[0]
    assert val_loss == pytest.approx(history["val_loss"][best], rel=1e-5)  # the best epoch's weights restored


def two_phases(tmp_path, name: str, kill: tuple[str, int] | None = None, start_from_epoch: int = 0):
    """A fine_tune-like run: phase one (early stopping) then phase two on the same model and pipeline."""
    strategy = tf.distribute.get_strategy()
    backup = distributed.Backup(str(tmp_path / name))
    model, data = small_model(), shuffled()
    hooks = {phase: [KillAt(kill[1])] if kill and kill[0] == phase else [] for phase in ("one", "two")}
    one = distributed.train(model, data, 20, strategy, validation(), backup.phase("one"), hooks["one"], verbose=0,
                            patience=2, start_from_epoch=start_from_epoch)  # fmt: skip
    two = distributed.train(model, data, 3, strategy, validation(), backup.phase("two"), hooks["two"], verbose=0)
    backup.finish()
    return model, one, two


@pytest.mark.parametrize("path", ["fit", "custom"])
def test_a_run_killed_in_either_phase_resumes_to_the_same_weights(monkeypatch, tmp_path, path):
    """Killed mid-phase (early-stopping state and best weights resumed), then again after the first phase finished
    (restored, its passes over the shared pipeline replayed): the same weights and histories as an uninterrupted run."""
    monkeypatch.setattr(distributed, "uses_fit", lambda strategy: path == "fit")
    whole, one, two = two_phases(tmp_path, "whole")
    assert len(one["loss"]) > 3  # phase one outlived the kill point
    for kill in [("one", 2), ("two", 1)]:
        with pytest.raises(Killed):
            two_phases(tmp_path, "killed", kill)
    assert (tmp_path / "killed").exists()
    resumed, resumed_one, resumed_two = two_phases(tmp_path, "killed")
    assert max_difference(resumed, whole) == 0.0
    assert resumed_one["val_loss"] == one["val_loss"] and resumed_two["loss"] == two["loss"]
    assert not (tmp_path / "killed").exists()


@pytest.mark.parametrize("path", ["fit", "custom"])
def test_early_stopping_warm_up_epochs_are_not_watched_and_resume(monkeypatch, tmp_path, path):
    """``start_from_epoch`` (Keras's warm-up): the best epoch is sought from there on, stopping 2 epochs after it;
    a run killed inside the warm-up and one killed after it resume to the uninterrupted run's weights."""
    monkeypatch.setattr(distributed, "uses_fit", lambda strategy: path == "fit")
    set_seed(0)
    whole, one, _ = two_phases(tmp_path, "whole", start_from_epoch=6)
    best = 6 + int(np.argmin(one["val_loss"][6:]))
    assert len(one["val_loss"]) == min(best + 3, 20) >= 9  # watched from epoch 6 only
    for kill_at in (3, 8):
        with pytest.raises(Killed):
            two_phases(tmp_path, "killed", ("one", kill_at), start_from_epoch=6)
        resumed, resumed_one, _ = two_phases(tmp_path, "killed", start_from_epoch=6)
        assert max_difference(resumed, whole) == 0.0 and resumed_one["val_loss"] == one["val_loss"]
