"""More than one machine: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``, one shared train step, resumable phases.

``--strategy multi_worker`` builds ``tf.distribute.MultiWorkerMirroredStrategy``; the
cluster comes from the ``TF_CONFIG`` environment variable, the same command runs on every
host (TensorFlow's multi-worker tutorial). Every replica keeps a copy of the variables;
each step all-reduces the gradients, so all workers end with the same weights.

Keras 3's ``model.fit`` fails under this strategy (keras-team/keras#20585,
tensorflow/tensorflow#72388: "Attempt to convert a value (PerReplica:...) with an
unsupported type to a Tensor", reproduced with TF 2.21 / Keras 3.15). :func:`train` is the
one place that picks the path: ``fit`` under ``default`` and ``mirrored``, and under
``multi_worker`` the custom step of TensorFlow's "Custom training loop with
MultiWorkerMirroredStrategy" tutorial: ``strategy.run`` over
``strategy.experimental_distribute_dataset``, the per-example loss averaged with
``tf.nn.compute_average_loss`` over the global batch, the model's own optimizer, and the
logged metrics summed over all replicas.

``--backup-dir DIR`` makes every phase resumable: :class:`Backup` keeps one sub-folder per
phase; ``keras.callbacks.BackupAndRestore`` backs up a ``fit`` phase, a
``tf.train.CheckpointManager`` (model, optimizer and its step counter, epoch = data
position, Keras random-generator state) the custom loop. A run killed and started again
with the same command resumes each phase at its last finished epoch and ends with the same
metrics; a finished run removes its backup. Early stopping (``train(..., patience=N)``) is
Keras's ``EarlyStopping`` on both paths, its state backed up too (:func:`early_stopping`).

Only the chief (task ``chief``, else ``worker`` 0) writes the run folder; other workers
write into a temporary folder that is removed at exit (see ``evaluation.make_run_dir``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common.errors import InputError

TF_CONFIG = "TF_CONFIG"
TIMEOUT_ENV = "RECIPES_WORKER_TIMEOUT"
DEFAULT_TIMEOUT = 300
TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}\' '
    "on host1, the same with index 1 on host2"
)

_multi_worker_strategy = None  # one per process: TF enables collective ops once

# Run as ``python -c _WATCHDOG PID SECONDS MESSAGE``: unless killed first, print MESSAGE and kill PID.
_WATCHDOG = """
import os, signal, sys, time
time.sleep(float(sys.argv[2]))
print(sys.argv[3], file=sys.stderr, flush=True)
os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


# --- The cluster ------------------------------------------------------------------


def read_tf_config(text: str | None = None) -> dict:
    """``TF_CONFIG`` (default: from the environment) parsed and checked.

    Returns the dict ``{"cluster": {job: ["host:port", ...]}, "task": {"type", "index"}}``.
    Raises ``InputError`` naming ``TF_CONFIG`` with a two-worker example when it is missing,
    not JSON, has no ``cluster``/``task``, or its task is not one of the cluster's.
    """
    text = os.environ.get(TF_CONFIG, "") if text is None else text

    def bad(reason: str) -> InputError:
        return InputError(
            f"--strategy multi_worker reads the cluster from {TF_CONFIG}: {reason}; e.g. {TF_CONFIG_EXAMPLE}"
        )

    if not text.strip():
        raise bad(f"{TF_CONFIG} is not set")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise bad(f"{TF_CONFIG} is not JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or not config["cluster"]:
        raise bad(f'{TF_CONFIG} has no "cluster" mapping job names to address lists')
    cluster = config["cluster"]
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise bad(f'{TF_CONFIG} job {job!r} is not "chief" or "worker" (MultiWorkerMirroredStrategy has no others)')
        if not isinstance(addresses, list) or not addresses:
            raise bad(f"{TF_CONFIG} job {job!r} needs a non-empty list of 'host:port' addresses")
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit():
                raise bad(f"{TF_CONFIG} address {address!r} of job {job!r} is not 'host:port'")
    if len(cluster.get("chief", [])) > 1:
        raise bad(f"{TF_CONFIG} has {len(cluster['chief'])} chiefs; at most one")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise bad(f'{TF_CONFIG} has no "task" with "type" and "index" (which of the cluster\'s tasks this host is)')
    if task["type"] not in cluster:
        raise bad(f"{TF_CONFIG} task type {task['type']!r} is not a job of the cluster ({', '.join(cluster)})")
    if not isinstance(task["index"], int) or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise bad(
            f"{TF_CONFIG} task index {task['index']!r} is out of range for job {task['type']!r} "
            f"({len(cluster[task['type']])} addresses)"
        )
    return config


def multi_worker_strategy(timeout: float | None = None):
    """``MultiWorkerMirroredStrategy`` for the cluster in ``TF_CONFIG``; created once per process.

    ``timeout`` (seconds; default ``$RECIPES_WORKER_TIMEOUT`` or 300) bounds the wait for
    every worker to join: past it a watchdog prints one ``error: ...`` line naming the
    workers and ``TF_CONFIG`` and kills the process (SIGKILL: TensorFlow's wait cannot be
    interrupted from Python) instead of letting it hang.
    """
    global _multi_worker_strategy
    if _multi_worker_strategy is not None:
        return _multi_worker_strategy
    config = read_tf_config()
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    # MultiWorkerMirroredStrategy joins the workers through TensorFlow's coordination service,
    # which waits in C++ for every worker to register, holding the GIL (no Python thread or
    # signal handler runs) and deaf to SIGTERM. A watchdog process bounds that wait: past
    # ``timeout`` it prints the error and kills this process.
    import subprocess

    import tensorflow as tf

    addresses = [a for job in config["cluster"].values() for a in job]
    message = (
        f"error: not every worker of {TF_CONFIG} joined within {timeout:.0f} s (workers {', '.join(addresses)}; "
        f"this is {config['task']['type']} {config['task']['index']}): start the same command on every host, "
        f"check the addresses and ports, or raise ${TIMEOUT_ENV}"
    )
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message])
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.kill()
        watchdog.wait()
    _multi_worker_strategy = strategy
    return strategy


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_index() -> tuple[str, int]:
    """(task type, index) of this process: ``("chief", 0)`` outside a multi-worker run."""
    if _multi_worker_strategy is None:
        return "chief", 0
    resolver = _multi_worker_strategy.cluster_resolver
    return resolver.task_type, resolver.task_id


def is_chief() -> bool:
    """True outside a multi-worker run; inside, for task ``chief``, or ``worker`` 0 when there is no chief."""
    if _multi_worker_strategy is None:
        return True
    task_type, task_id = worker_index()
    cluster = _multi_worker_strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)


def worker_temp_dir(recipe: str) -> Path:
    """A non-chief worker's run folder: a temporary folder removed when the process exits."""
    task_type, task_id = worker_index()
    path = Path(tempfile.mkdtemp(prefix=f"{recipe}-{task_type}{task_id}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# --- Resumable phases -------------------------------------------------------------


class Backup:
    """``--backup-dir``: one sub-folder per training phase, removed by :meth:`finish`.

    ``Backup("")`` is off: :meth:`phase` returns ``None`` and nothing is written. A
    non-chief worker of a multi-worker run keeps its own copy under ``worker-<i>/`` (all
    replicas hold the same weights, so no shared file system is needed).
    """

    def __init__(self, directory: str = ""):
        self.root = Path(directory) if directory else None
        if self.root is not None and not is_chief():
            task_type, task_id = worker_index()
            self.root = self.root / f"{task_type}-{task_id}"

    def phase(self, name: str) -> Path | None:
        if self.root is None:
            return None
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finish(self) -> None:
        """The run finished: remove the backup (only this worker's part)."""
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)


def _history_path(phase_dir: Path) -> Path:
    return phase_dir / "history.json"


def _load_history(phase_dir: Path | None) -> dict:
    if phase_dir is None or not _history_path(phase_dir).exists():
        return {}
    return json.loads(_history_path(phase_dir).read_text())


def _save_history(phase_dir: Path, history: dict) -> None:
    tmp = _history_path(phase_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(history))
    os.replace(tmp, _history_path(phase_dir))


def _append(history: dict, logs: dict) -> None:
    for key, value in logs.items():
        history.setdefault(key, []).append(float(value))


# --- Training: one entry point, two paths -------------------------------------------


def uses_fit(strategy) -> bool:
    """Which path :func:`train` takes: ``fit`` except under ``MultiWorkerMirroredStrategy`` (keras#20585)."""
    return not is_multi_worker(strategy)


def train(model, dataset, epochs: int, strategy, validation_data=None, backup_dir: Path | None = None,
          callbacks: list | None = None, verbose="auto", patience: int | None = None,
          start_from_epoch: int = 0) -> dict:  # fmt: skip
    """Train a compiled Keras ``model`` for ``epochs`` passes over ``dataset``; return the history dict.

    ``dataset``: a finite ``tf.data.Dataset`` of ``(x, y)`` batches of the *global* batch
    size (it may reshuffle each pass). ``model`` was built and compiled in
    ``strategy.scope()``; its ``loss``, ``optimizer`` and (for sparse cross-entropy)
    accuracy are used. ``validation_data``: a batched dataset evaluated after every epoch
    (``val_loss``, ``val_accuracy``). History keys are those of ``fit``: ``loss``,
    ``accuracy``, ``val_*``, plus ``epoch_seconds``.

    Path: ``model.fit`` unless ``strategy`` is ``MultiWorkerMirroredStrategy``, where
    :func:`distributed_fit` runs the shared custom step (``fit`` fails there, keras#20585).
    ``backup_dir`` (from :meth:`Backup.phase`): resume from / back up to that folder each
    epoch. A resumed run first replays the finished epochs' passes over ``dataset``
    (:func:`skip_passes`), so it sees the same batches as an uninterrupted one. A phase
    that had finished is restored from ``finished-<epochs>.weights.h5`` without training, its passes
    replayed too (a pipeline shared with the next phase then serves that phase the same batches);
    ``epochs`` must be the same as when it ran.
    ``callbacks``: Keras callbacks; under the custom step only their epoch-level hooks run.
    ``patience``: early stopping on ``val_loss`` with the best epoch's weights restored at
    the end, ``keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
    restore_best_weights=True)`` on both paths (needs ``validation_data``); with
    ``backup_dir`` it is resumable (:func:`early_stopping`). ``start_from_epoch``: Keras's
    warm-up, epochs before early stopping starts watching (a deep network from random weights
    can sit at chance on validation for tens of epochs before it learns).
    """
    if not uses_fit(strategy):
        return distributed_fit(model, dataset, epochs, strategy, validation_data, backup_dir, verbose=verbose,
                               callbacks=callbacks, patience=patience, start_from_epoch=start_from_epoch)  # fmt: skip
    import keras

    from common.evaluation import EpochTimer

    callbacks = [EpochTimer(), *(callbacks or [])]
    if backup_dir is None:
        if patience is not None:
            callbacks.append(early_stopping(patience, start_from_epoch=start_from_epoch))
        return model.fit(
            dataset, epochs=epochs, validation_data=validation_data, callbacks=callbacks, verbose=verbose
        ).history
    backup_dir.mkdir(parents=True, exist_ok=True)
    finished = _restore_finished(model, dataset, backup_dir, epochs)
    if finished is not None:
        return finished
    start = _finished_epochs(backup_dir)
    history = {key: values[:start] for key, values in _load_history(backup_dir).items()}
    if start >= epochs:  # the phase finished before the run was stopped: restore its end state
        _build_optimizer(model)
        model.load_weights(backup_dir / "latest.weights.h5")
        return history
    # Keras's epoch iterator opens a pass at each epoch's end and another at the next
    # epoch's start (keras/src/trainers/epoch_iterator.py): two draws of the order per epoch
    # (also in an epoch that early stopping ends).
    skip_passes(dataset, 2 * start, consume=False)
    stopper = early_stopping(patience, backup_dir, history, start_from_epoch) if patience is not None else None

    def record(epoch, logs):
        _append(history, logs)
        if not model.stop_training:  # a stopping epoch is recorded by the finished phase instead
            _save_history(backup_dir, history)

    class Backup(keras.callbacks.BackupAndRestore):
        def on_epoch_end(self, epoch, logs=None):
            if not self.model.stop_training:
                super().on_epoch_end(epoch, logs)

    callbacks += [
        *([stopper] if stopper else []),
        # History first: if the process dies between the two writes, the weights' epoch count wins.
        keras.callbacks.LambdaCallback(on_epoch_end=record),
        Backup(str(backup_dir), delete_checkpoint=False),
        *([keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: stopper.prune())] if stopper else []),
    ]
    try:
        model.fit(dataset, epochs=epochs, validation_data=validation_data, callbacks=callbacks, verbose=verbose)
    finally:
        model._initial_epoch = None  # set by a restoring BackupAndRestore, it would also start the model's next fit
    _save_finished(model, backup_dir, history, epochs)
    return history


FINISHED = "finished-{epochs}.weights.h5"  # a phase asked for that many epochs (early stopping may end it sooner)


def _restore_finished(model, dataset, backup_dir: Path | None, epochs: int) -> dict | None:
    """A finished phase's history, its end weights loaded into ``model`` and its passes over ``dataset`` replayed;
    ``None`` if the phase has not finished."""
    if backup_dir is None or not (backup_dir / FINISHED.format(epochs=epochs)).exists():
        return None
    _build_optimizer(model)
    model.load_weights(backup_dir / FINISHED.format(epochs=epochs))
    history = _load_history(backup_dir)
    skip_passes(dataset, 2 * len(history.get("loss", [])), consume=False)  # two draws per epoch on both paths
    return history


def _save_finished(model, backup_dir: Path, history: dict, epochs: int) -> None:
    """Mark a phase finished: its history, then its end weights (written last, atomically: the marker)."""
    _save_history(backup_dir, history)
    tmp = backup_dir / "finished.tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, backup_dir / FINISHED.format(epochs=epochs))


def early_stopping(patience: int, backup_dir: Path | None = None, history: dict | None = None,
                   start_from_epoch: int = 0):  # fmt: skip
    """``keras.callbacks.EarlyStopping(monitor="val_loss", patience, restore_best_weights=True, start_from_epoch)``, resumable.

    Without ``backup_dir`` it is Keras's callback unchanged. With it, the best epoch's
    weights are also written to ``backup_dir/best-<epoch>.npz`` (``prune()`` removes older
    ones once the epoch's checkpoint is saved), and ``history`` (the finished epochs of a
    resumed phase) is replayed at ``on_train_begin`` with Keras's rule (``val_loss`` lower
    than the best so far; ``min_delta`` 0) to restore the best value, the wait count and
    the best weights: a resumed phase stops at the epoch an uninterrupted one would, with
    the same weights restored.
    """
    import keras
    import numpy as np

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            losses = (history or {}).get("val_loss", [])
            for epoch, value in enumerate(losses):
                if epoch < self.start_from_epoch:  # Keras's rule: the warm-up epochs are not watched
                    continue
                self.wait += 1
                if self.best is None or value < self.best:
                    self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.best is not None:  # some replayed epoch was watched: its weights are the best so far
                with np.load(backup_dir / f"best-{self.best_epoch}.npz") as saved:
                    self.best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            if backup_dir is not None and self.best_epoch == epoch and self.best_weights is not None:
                tmp = backup_dir / f"best-{epoch}.tmp.npz"
                np.savez(tmp, *self.best_weights)
                os.replace(tmp, backup_dir / f"best-{epoch}.npz")

        def prune(self):
            for path in backup_dir.glob("best-*.npz"):
                if path.name != f"best-{self.best_epoch}.npz":
                    path.unlink(missing_ok=True)

    return ResumableEarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True,
                                  start_from_epoch=start_from_epoch)  # fmt: skip


def _finished_epochs(backup_dir: Path) -> int:
    """Epochs a ``BackupAndRestore`` folder holds (0 if none): where a resumed ``fit`` starts."""
    metadata = backup_dir / "training_metadata.json"
    return json.loads(metadata.read_text())["epoch"] if metadata.exists() else 0


def skip_passes(dataset, passes: int, consume: bool = True) -> None:
    """Open ``passes`` passes over ``dataset`` (and read them, if ``consume``), so its next pass is the one
    an uninterrupted run would see next.

    A shuffling ``tf.data`` pipeline draws each pass's order from a seed generator owned by
    the dataset object when the pass's iterator is created: restoring the data position of
    a resumed run is replaying those draws.
    """
    for _ in range(passes):
        iterator = iter(dataset)
        if consume:
            for _ in iterator:
                pass


def _build_optimizer(model) -> None:
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _per_example_loss(model):
    """The compiled loss with no reduction: per-example values for ``tf.nn.compute_average_loss``."""
    import keras

    loss = model.loss
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = dict(loss.get_config(), reduction=None)
        config.pop("name", None)
        return type(loss).from_config(config), loss
    raise ValueError(f"distributed_fit needs a keras.losses.Loss or its name as the compiled loss, not {loss!r}")


def distributed_fit(model, dataset, epochs: int, strategy, validation_data=None, backup_dir: Path | None = None,
                    verbose="auto", callbacks: list | None = None, patience: int | None = None,
                    start_from_epoch: int = 0) -> dict:  # fmt: skip
    """The shared distributed custom loop: ``strategy.run`` of one step per global batch.

    Works under any ``tf.distribute`` strategy (``default`` included, which the unit tests
    compare with ``fit``). Per step each replica computes its per-example losses; the loss
    is averaged over the batch's *actual* global size (an all-reduced count, so a short last
    batch weighs as in ``fit``) with ``tf.nn.compute_average_loss``, plus the model's
    regularisation losses scaled by ``tf.nn.scale_regularization_loss``; the model's
    optimizer applies the gradients (which sums them across replicas). Loss and accuracy
    sums are reduced over all replicas, so every worker logs the same numbers.
    ``backup_dir``: a ``tf.train.CheckpointManager`` there holds the model, the optimizer
    (with its step counter), the epoch (the data position: a resumed run replays the
    finished passes, :func:`skip_passes`) and the random-generator states of the model's
    layers (``keras.random.SeedGenerator``, e.g. of dropout); a finished phase is restored
    without training (as in :func:`train`).
    ``callbacks``: Keras callbacks of which the epoch-level hooks run (``on_train_begin``,
    ``on_epoch_begin``, ``on_epoch_end`` with the epoch's logs, ``on_train_end``; no batch
    hooks); one that sets ``model.stop_training`` ends the phase after that epoch.
    ``patience``: early stopping as in :func:`train` (every worker sees the same reduced
    ``val_loss``, so all stop at the same epoch).
    Follows TensorFlow's tutorial "Custom training loop with MultiWorkerMirroredStrategy".
    """
    import keras
    import tensorflow as tf

    from common.loops import StepCheckpoint

    finished = _restore_finished(model, dataset, backup_dir, epochs)
    if finished is not None:
        return finished

    per_example, loss_object = _per_example_loss(model)
    sparse = isinstance(loss_object, keras.losses.SparseCategoricalCrossentropy)
    optimizer = model.optimizer
    state, start, history = None, 0, {}
    with strategy.scope():
        _build_optimizer(model)
        if backup_dir is not None:  # step = epochs done (the data position)
            backup_dir.mkdir(parents=True, exist_ok=True)
            rng = [v for v in model.variables if "seed_generator_state" in v.path]
            state = StepCheckpoint(backup_dir / "ckpt", model=model, optimizer=optimizer, rng=rng)
            start = state.restore()
            history = {key: values[:start] for key, values in _load_history(backup_dir).items()}  # checkpoint wins

    def step_sums(x, y, training: bool):
        logits = model(x, training=training)
        losses = per_example(y, logits)
        count = tf.cast(tf.shape(losses)[0], tf.float32)
        correct = tf.constant(0.0)
        if sparse:
            predicted = tf.cast(tf.argmax(logits, axis=-1), tf.int64)
            correct = tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(tf.reshape(y, [-1]), tf.int64)), tf.float32))
        return losses, tf.stack([tf.reduce_sum(losses), correct, count])

    def replica_train(x, y):
        context = tf.distribute.get_replica_context()
        global_count = context.all_reduce("SUM", tf.cast(tf.shape(y)[0], tf.float32))
        with tf.GradientTape() as tape:
            losses, sums = step_sums(x, y, training=True)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=tf.cast(global_count, tf.int64))
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return sums

    def replica_eval(x, y):
        return step_sums(x, y, training=False)[1]

    @tf.function(reduce_retracing=True)
    def train_step(batch):
        x, y = batch
        return strategy.reduce("SUM", strategy.run(replica_train, args=(x, y)), axis=None)

    @tf.function(reduce_retracing=True)
    def eval_step(batch):
        x, y = batch
        return strategy.reduce("SUM", strategy.run(replica_eval, args=(x, y)), axis=None)

    def logs_of(sums, prefix=""):
        total_loss, correct, count = (float(v) for v in sums)
        logs = {f"{prefix}loss": total_loss / max(count, 1.0)}
        if sparse:
            logs[f"{prefix}accuracy"] = correct / max(count, 1.0)
        return logs

    batches = strategy.experimental_distribute_dataset(dataset)
    skip_passes(batches, 2 * start, consume=False)
    validation = strategy.experimental_distribute_dataset(validation_data) if validation_data is not None else None
    show = verbose not in (0, False) and is_chief()
    stopper = early_stopping(patience, backup_dir, history, start_from_epoch) if patience is not None else None
    hooks = keras.callbacks.CallbackList([*(callbacks or []), *([stopper] if stopper else [])], model=model)
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in range(start, epochs):
        hooks.on_epoch_begin(epoch)
        began = time.perf_counter()
        sums, steps = tf.zeros(3), 0
        for batch in batches:  # a new pass: a shuffling pipeline reshuffles, as under fit
            sums += train_step(batch)
            steps += 1
        iter(batches)  # draw the next order as fit does at an epoch's end: same seed, same batches as fit
        logs = logs_of(sums)
        if validation is not None:
            val_sums = tf.zeros(3)
            for batch in validation:
                val_sums += eval_step(batch)
            logs |= logs_of(val_sums, "val_")
        logs["epoch_seconds"] = time.perf_counter() - began
        hooks.on_epoch_end(epoch, logs)
        _append(history, logs)
        if show:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "epoch_seconds")
            print(f"epoch {epoch + 1}/{epochs}  {steps} steps  {logs['epoch_seconds']:.1f} s  {shown}", flush=True)
        if model.stop_training:  # recorded by the finished phase below, not as a checkpoint to resume from
            break
        if state is not None:
            state.save(epoch + 1)
            _save_history(backup_dir, history)
            if stopper is not None:
                stopper.prune()
    hooks.on_train_end()
    if backup_dir is not None:
        _save_finished(model, backup_dir, history, epochs)
    return history


def predict_in_shards(predict, x, strategy=None):
    """``predict(x)`` (arrays -> arrays of one row per input row), shared out over the replicas.

    Under ``MultiWorkerMirroredStrategy`` replica ``r`` of ``R`` predicts only rows
    ``[r * ceil(N / R), (r + 1) * ceil(N / R))`` of ``x`` (N, ...), and ``strategy.gather``
    (an all-gather) gives every worker all N rows, in order: e.g. pseudo-labelling an unlabeled
    pool with a model every worker holds. Any other strategy (or ``None``): ``predict(x)``.
    """
    import numpy as np

    if strategy is None or not is_multi_worker(strategy):
        return np.asarray(predict(x))
    import tensorflow as tf

    size = -(-len(x) // strategy.num_replicas_in_sync)

    def shard(context):
        start = context.replica_id_in_sync_group * size
        part = np.asarray(predict(x[start : start + size] if start < len(x) else x[:1]))[: max(0, len(x) - start)]
        return tf.constant(np.pad(part, [(0, size - len(part))] + [(0, 0)] * (part.ndim - 1)))

    # Shards are full up to the last non-empty one, so the padding rows all come after row N.
    gathered = strategy.gather(strategy.experimental_distribute_values_from_function(shard), axis=0)
    return gathered.numpy()[: len(x)]


# --- Local workers (demo, tests, benchmark) -------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` free TCP ports on 127.0.0.1 (bound, read, released)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster(workers: int) -> list[str]:
    """``TF_CONFIG`` of each of ``workers`` processes on this machine (loopback, free ports)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(workers)]


def launch_local(command: list[str], workers: int = 2, log_dir: str | None = None, env: dict | None = None):
    """Start ``command`` (e.g. ``[python, -m, recipes.weight_transfer, --quick]``) as ``workers`` local workers.

    Each gets its own ``TF_CONFIG`` (127.0.0.1, free ports) and sees no GPU. Returns the
    ``subprocess.Popen`` objects; output goes to ``log_dir/worker-<i>.log`` if given, else
    it is inherited. Starts processes only: the cluster itself is TensorFlow's.
    """
    import subprocess

    processes = []
    for index, tf_config in enumerate(local_cluster(workers)):
        worker_env = dict(os.environ, **(env or {}), TF_CONFIG=tf_config, CUDA_VISIBLE_DEVICES="")
        output = None
        if log_dir is not None:
            output = open(Path(log_dir) / f"worker-{index}.log", "w")  # noqa: SIM115 (closed with the process)
        processes.append(
            subprocess.Popen(command, env=worker_env, stdout=output, stderr=subprocess.STDOUT if output else None)
        )
    return processes


def main(argv: list[str] | None = None) -> int:
    """``python -m common.distributed [--workers N] [--timeout S] MODULE [ARGS...]``: run a recipe as local workers.

    Every worker runs ``python -m MODULE ARGS --strategy multi_worker``; the chief's output is
    shown, the others' go to ``runs/workers/worker-<i>.log``. Exits with the first non-zero
    status, or 0.
    """
    import argparse
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds before every worker is stopped.")
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    log_dir = Path("runs") / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", options.module, *options.args, "--strategy", "multi_worker"]
    processes = launch_local(command, options.workers, log_dir=str(log_dir))
    chief_log = log_dir / "worker-0.log"
    print(f"started {options.workers} workers on 127.0.0.1: {' '.join(command[1:])}\nlogs in {log_dir}/", flush=True)
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=options.timeout))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            codes.append(-9)
    print(chief_log.read_text(), end="")
    failed = [code for code in codes if code]
    for index, code in enumerate(codes):
        if code:
            print(f"worker {index} exited with status {code}; see {log_dir}/worker-{index}.log", file=sys.stderr)
    return failed[0] if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
