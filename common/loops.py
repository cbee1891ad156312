"""Run many training steps per call: a custom step repeated inside one compiled graph.

Keras' ``fit`` has ``steps_per_execution``; a hand-written step (a meta-step, a GAN step)
called once per iteration from Python pays the ``tf.function`` call overhead (hundreds of
microseconds) every time, which dominates when the step itself is small.
:func:`compiled_loop` wraps a step in a ``tf.while_loop`` so that one call runs ``n`` steps,
optionally compiled by XLA (``jit_compile=True``), and returns their mean loss.
:func:`run_with_progress` calls it until a number of iterations is done; with ``backup_dir``
it saves a checkpoint after each call (:class:`StepCheckpoint`: the step counter, the loss
history and whatever the caller tracks: model, optimizer, random-generator states,
:class:`NumpyRandomState`), so a killed run started again resumes at its last saved step.
The epoch-level custom loop of ``common.distributed`` backs up through the same class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.errors import InputError


def compiled_loop(step: Callable[[], tf.Tensor], jit_compile: bool = False) -> Callable[[int], tf.Tensor]:
    """A compiled function ``run(n)`` that calls ``step()`` ``n`` times in one graph; returns the mean loss.

    ``step`` takes no argument (it draws its own data inside the graph, e.g. from a
    ``tf.random.Generator``), updates variables, and returns a scalar float32 loss.
    ``n`` is passed as a tensor, so changing it does not retrace (nor recompile under XLA).
    Raises ``ValueError`` for ``n < 1``. Like ``steps_per_execution`` in ``keras.Model.compile``.
    """

    @tf.function(jit_compile=jit_compile)
    def repeat(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            total += tf.cast(step(), tf.float32)
        return total / tf.cast(n, tf.float32)

    def run(n: int) -> tf.Tensor:
        if int(n) < 1:
            raise ValueError(f"compiled_loop needs at least one step per call, got {n}")
        return repeat(tf.constant(int(n), tf.int32))

    run.repeat = repeat  # the tf.function itself (tracing counts, concrete functions)
    return run


class JSONState(tf.train.experimental.PythonState):
    """Python values saved inside a ``tf.train.Checkpoint`` as JSON: ``get()`` returns them, ``put(value)`` restores.

    The value is written with the checkpoint's tensors in the same files, so it can never
    disagree with them (unlike a side file written before or after the checkpoint).
    """

    def __init__(self, get: Callable[[], object], put: Callable[[object], None]):
        self._get, self._put = get, put

    def serialize(self) -> str:
        return json.dumps(self._get())

    def deserialize(self, string: str) -> None:
        self._put(json.loads(string))


class NumpyRandomState(JSONState):
    """A ``numpy.random.Generator``'s bit-generator state (e.g. PCG64's 128-bit state and increment), checkpointed.

    Track it in :func:`run_with_progress` (``track={"rng": NumpyRandomState(rng)}``) when a
    step draws its data with numpy: a resumed run then draws what an uninterrupted one would.
    """

    def __init__(self, rng: np.random.Generator):
        def put(state):
            rng.bit_generator.state = state

        super().__init__(lambda: rng.bit_generator.state, put)


class StepCheckpoint:
    """A resumable position: a ``tf.train.CheckpointManager`` over a step counter and the caller's trackables.

    ``StepCheckpoint(directory, model=model, optimizer=optimizer, rng=...)`` tracks the
    given objects (Keras models and optimizers, ``tf.Variable``s and ``tf.random.Generator``s,
    a :class:`JSONState`) with an int64 counter ``step`` (iterations or epochs: the
    caller's unit). :meth:`restore` loads the latest checkpoint in ``directory`` if there is
    one and returns its step (0 if none); :meth:`save` writes the state at ``step``,
    keeping only the newest checkpoint (``directory/ckpt-<step>.*``; the write is
    TensorFlow's, atomic). Create it where the tracked variables live (inside
    ``strategy.scope()`` for a distributed model). Raises TensorFlow's ``AssertionError``
    from :meth:`restore` if a tracked object has no counterpart in the checkpoint.
    Follows TensorFlow's guide "Training checkpoints" (tf.train.CheckpointManager).
    """

    def __init__(self, directory: Path | str, **track):
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(step=self.step, **track)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=1)

    def restore(self) -> int:
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.step.numpy())

    def save(self, step: int) -> None:
        self.step.assign(step)
        self.manager.save(checkpoint_number=step)


def run_with_progress(run: Callable[[int], tf.Tensor], iterations: int, label: str, reports: int = 100,
                      backup_dir: Path | str | None = None, track: dict | None = None) -> dict:  # fmt: skip
    """Call ``run(n)`` (n iterations, returns their mean loss) about ``reports`` times to do ``iterations``.

    Shows a Keras progress bar headed by ``label``; returns ``{"loss": [...]}``, the mean loss
    of each call (one entry per ``iterations // reports`` iterations, i.e. every 1% by default).

    ``backup_dir``: resumable. After each call a ``tf.train.CheckpointManager`` (one checkpoint
    kept, ``backup_dir/ckpt-<step>.*``) saves the iterations done so far (an int64 step
    counter), the loss history and every object of ``track`` (a dict name -> trackable: the
    Keras model, its optimizer with its own step counter and moments, a
    ``tf.random.Generator``, a :class:`NumpyRandomState`). If ``backup_dir`` holds a
    checkpoint, it is restored first and only the remaining iterations run, in the same
    chunks as an uninterrupted run (the checkpointed steps are multiples of the chunk), so
    with the same ``track`` the run ends in the same state; a finished phase (step =
    ``iterations``) is restored without running. Raises ``InputError`` if the checkpoint
    holds more steps than ``iterations`` (the command changed: the
    recipe ends in one ``error:`` line naming the folder), and TensorFlow's
    ``AssertionError`` if an object of ``track`` has no counterpart in the checkpoint.
    """
    import keras

    every = max(1, iterations // reports)
    history, done = {"loss": []}, 0
    state = None
    if backup_dir is not None:

        def put(saved):
            history["loss"] = list(saved["loss"])

        state = StepCheckpoint(backup_dir, history=JSONState(lambda: history, put), **(track or {}))
        done = state.restore()
        if done > iterations:
            raise InputError(f"{backup_dir} holds {done} steps of {label!r}, more than the {iterations} asked for; "
                             "resume with the command that wrote it, or remove the folder")  # fmt: skip
        if done:
            print(f"{label}: resumed at step {done}/{iterations} from {state.manager.latest_checkpoint}")
    print(label)
    progress = keras.utils.Progbar(iterations, stateful_metrics=["loss"])
    if done:
        progress.update(done, [("loss", history["loss"][-1])] if history["loss"] else None)
    while done < iterations:
        n = min(every, iterations - done)
        loss = float(run(n))
        done += n
        history["loss"].append(loss)
        if state is not None:
            state.save(done)
        progress.update(done, [("loss", loss)])
    return history
