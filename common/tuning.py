"""keras-tuner plumbing: the tuner's name checked, the tuner built, its best trial summarised.

Also the two-phase fine-tuning search (:func:`fine_tune_hypermodel`, :func:`search`), which
takes the recipe's own steps (build, train the head, unfreeze) as functions; ``keras_tuner``
is imported only when a tuner is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import InputError

TUNERS = ("hyperband", "random")


def check_tuner(name: str) -> None:
    """Raise :class:`InputError` (naming the choices) unless ``name`` is one of :data:`TUNERS`."""
    if name not in TUNERS:
        raise InputError(f"unknown --tuner {name!r}; choose one of {', '.join(TUNERS)}")


def check_strategy(strategy: str, distributed: str, best_flags: str) -> None:
    """Refuse a search under ``--strategy multi_worker``, before any training.

    keras-tuner's trials train with ``model.fit``, which fails under
    ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585). ``strategy``: the
    ``--strategy`` name; ``distributed``: what of the recipe does run distributed (said in
    the message); ``best_flags``: the flags that take the tuned values. Raises
    :class:`InputError` when ``strategy == "multi_worker"``; returns None otherwise.
    """
    if strategy == "multi_worker":
        raise InputError(
            "--tune with --strategy multi_worker: keras-tuner's trials train with model.fit, which fails under "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585), so the search is not distributed here; only "
            f"{distributed} are. Search first without --strategy multi_worker (one "
            "process, or keras-tuner's own distributed mode, which spreads whole trials over hosts: a chief oracle "
            "and workers with KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, see "
            "keras.io/keras_tuner/guides/distributed_tuning), then pass the best values from "
            f"best_hyperparameters.json ({best_flags}) to the multi_worker run without --tune"
        )


def without_tensorboard(tuner_class):
    """``tuner_class`` (a ``keras_tuner.Tuner`` subclass), usable without the ``tensorboard`` package.

    keras-tuner 1.4 imports tensorboard at every trial on the TensorFlow backend, only to
    patch TensorBoard callbacks (``Tuner._configure_tensorboard_dir``); we pass none, and
    TensorFlow 2.21 no longer installs it. With tensorboard installed, ``tuner_class`` itself.
    """
    try:
        import tensorboard  # noqa: F401

        return tuner_class
    except ImportError:

        class Tuner(tuner_class):
            def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
                return None

        return Tuner


def make_tuner(hypermodel, kind: str, directory: Path | str, max_trials: int, max_epochs: int, seed: int,
               objective: str = "val_accuracy", project_name: str = "tuner"):  # fmt: skip
    """A keras-tuner ``Hyperband`` or ``RandomSearch`` over ``hypermodel``, fresh (``overwrite=True``).

    ``kind``: ``"hyperband"`` (Li et al. 2018, ``factor=3``, ``max_epochs`` at least 2: the
    most epochs a trial trains) or ``"random"``; at most ``max_trials`` trials either way
    (Hyperband has no ``max_trials`` argument; its oracle honours the attribute). The
    tuner's files go to ``directory/project_name``; ``objective`` is maximised (a metric
    name as in ``fit``'s logs). Raises :class:`InputError` for an unknown ``kind``.
    """
    import keras_tuner as kt

    check_tuner(kind)
    common = dict(objective=objective, directory=str(directory), project_name=project_name, overwrite=True, seed=seed)
    if kind == "hyperband":
        tuner = without_tensorboard(kt.Hyperband)(hypermodel, max_epochs=max(2, max_epochs), factor=3, **common)
        tuner.oracle.max_trials = max_trials
        return tuner
    return without_tensorboard(kt.RandomSearch)(hypermodel, max_trials=max_trials, **common)


def best_trial(tuner, kind: str) -> dict:
    """What a finished search found: ``{"best": {name: value}, <objective>: score, "trials": n, "tuner": kind}``.

    ``best``: the best trial's hyperparameters without keras-tuner's own ``tuner/...``
    bookkeeping values; the score is the best trial's objective (e.g. ``val_accuracy``, a
    fraction); ``trials``: how many trials the oracle ran.
    """
    values = tuner.get_best_hyperparameters(1)[0].values
    best = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    score = tuner.oracle.get_best_trials(1)[0].score
    return {"best": best, tuner.oracle.objective.name: score, "trials": len(tuner.oracle.trials), "tuner": kind}


def fine_tune_hypermodel(build, train_head, unfreeze, max_layers: int, regularizer: str = "none"):
    """A ``keras_tuner.HyperModel`` over a two-phase fine-tune: each trial trains the head, then unfreezes.

    Searched: ``dropout`` (0-0.5), ``unfreeze_layers`` (1..``max_layers``),
    ``fine_tune_learning_rate`` (1e-5-1e-4, log) and the strength of ``regularizer``
    (``l2sp_alpha`` 1e-4-1, ``bss_eta`` 1e-4-0.1, log; nothing for ``"none"``). The recipe's
    steps are passed in: ``build(dropout) -> compiled model`` (a fresh copy of the base with
    a new head), ``train_head(model)`` (phase 1; skipped when Hyperband resumes a trial from its
    checkpoint) and ``unfreeze(model, num_layers, learning_rate, strengths: dict)`` (recompiles).
    The tuner's ``fit`` arguments then train phase 2.
    """
    import keras_tuner as kt

    def strength(hp) -> dict:
        if regularizer == "l2sp":
            return {"l2sp_alpha": hp.Float("l2sp_alpha", 1e-4, 1.0, sampling="log")}
        if regularizer == "bss":
            return {"bss_eta": hp.Float("bss_eta", 1e-4, 1e-1, sampling="log")}
        return {}

    class FineTuneModel(kt.HyperModel):
        def build(self, hp):
            dropout = hp.Float("dropout", 0.0, 0.5, step=0.1)
            hp.Int("unfreeze_layers", 1, max_layers)
            hp.Float("fine_tune_learning_rate", 1e-5, 1e-4, sampling="log")
            strength(hp)
            return build(dropout)

        def fit(self, hp, model, *args, **kwargs):
            if "tuner/trial_id" not in hp.values:  # a new trial, not a resumed one
                train_head(model)
            unfreeze(model, hp.get("unfreeze_layers"), hp.get("fine_tune_learning_rate"), strength(hp))
            return model.fit(*args, **kwargs)

    return FineTuneModel()


def search(hypermodel, kind: str, run_dir: Path, train, val, max_trials: int, epochs: int, seed: int) -> dict:
    """Run the search (``val_accuracy`` maximised, the tuner's files in ``run_dir/tuner``); :func:`best_trial`.

    ``train``/``val``: ``tf.data`` pipelines of (image, label) batches; ``epochs``: the most a
    trial trains. Writes the result to ``run_dir/best_hyperparameters.json`` and prints it in one line.
    """
    from common.evaluation import write_json_atomic

    tuner = make_tuner(hypermodel, kind, run_dir, max_trials=max_trials, max_epochs=epochs, seed=seed)
    tuner.search(train, validation_data=val, epochs=epochs, verbose=0)
    result = best_trial(tuner, kind)
    write_json_atomic(Path(run_dir) / "best_hyperparameters.json", result)
    print(f"  tuner ({kind}, {result['trials']} trials): best {json.dumps(result['best'])}, "
          f"val accuracy {result['val_accuracy']:.3f}")  # fmt: skip
    return result
