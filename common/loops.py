"""Run many training steps per call: a custom step repeated inside one compiled graph.

Keras' ``fit`` has ``steps_per_execution``; a hand-written step (a meta-step, a GAN step)
called once per iteration from Python pays the ``tf.function`` call overhead (hundreds of
microseconds) every time, which dominates when the step itself is small.
:func:`compiled_loop` wraps a step in a ``tf.while_loop`` so that one call runs ``n`` steps,
optionally compiled by XLA (``jit_compile=True``), and returns their mean loss.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


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


def run_with_progress(run: Callable[[int], tf.Tensor], iterations: int, label: str, reports: int = 100) -> dict:
    """Call ``run(n)`` (n iterations, returns their mean loss) about ``reports`` times to do ``iterations``.

    Shows a Keras progress bar headed by ``label``; returns ``{"loss": [...]}``, the mean loss
    of each call (one entry per ``iterations // reports`` iterations, i.e. every 1% by default).
    """
    import keras

    print(label)
    progress = keras.utils.Progbar(iterations, stateful_metrics=["loss"])
    every = max(1, iterations // reports)
    history, done = {"loss": []}, 0
    while done < iterations:
        n = min(every, iterations - done)
        loss = float(run(n))
        done += n
        history["loss"].append(loss)
        progress.update(done, [("loss", loss)])
    return history
