"""common.loops: n steps per call in one graph, their mean loss, no retracing per n; resumable runs."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from common import loops
from common.errors import InputError


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_the_step_n_times_and_returns_the_mean_loss(jit_compile):
    counter = tf.Variable(0.0)

    def step():
        counter.assign_add(1.0)
        return counter.read_value()  # the loss of step i is i

    run = loops.compiled_loop(step, jit_compile=jit_compile)
    assert float(run(4)) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(counter) == 4
    assert float(run(2)) == pytest.approx((5 + 6) / 2)  # state carries over between calls
    assert float(counter) == 6
    assert run.repeat.experimental_get_tracing_count() == 1  # n is a tensor: no retrace for a new n


def test_trains_a_model_like_repeated_single_steps():
    def make():
        w = tf.Variable([[2.0]])
        x, y = tf.constant([[1.0], [2.0]]), tf.constant([[3.0], [6.0]])

        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(x @ w - y))
            w.assign_sub(0.1 * tape.gradient(loss, w))
            return loss

        return w, step

    w_loop, step = make()
    loops.compiled_loop(step)(5)
    w_plain, step = make()
    for _ in range(5):
        step()
    assert float(w_loop[0, 0]) == pytest.approx(float(w_plain[0, 0]), rel=1e-6)
    assert abs(float(w_loop[0, 0]) - 3.0) < 0.5  # it learned


def test_rejects_fewer_than_one_step():
    run = loops.compiled_loop(lambda: tf.constant(0.0))
    with pytest.raises(ValueError, match="at least one step per call, got 0"):
        run(0)


def test_run_with_progress_calls_in_one_percent_slices_and_keeps_each_mean_loss(capsys):
    calls = []

    def run(n):
        calls.append(n)
        return tf.constant(float(len(calls)))

    history = loops.run_with_progress(run, 250, "label")
    assert calls == [2] * 125 and sum(calls) == 250  # 250 // 100 = 2 iterations a call
    assert history["loss"] == [float(i) for i in range(1, 126)]
    assert capsys.readouterr().out.startswith("label")
    calls.clear()
    loops.run_with_progress(run, 7, "small")
    assert calls == [1] * 7


# --- Resumable runs (backup_dir) ----------------------------------------------------------


class Stopped(Exception):
    """Stand-in for a kill: raised by a call, after the calls before it were checkpointed."""


def resumable(stop_at: int | None = None):
    """A run(n) whose state is a variable, a tf.random.Generator and a numpy generator; raises at call ``stop_at``."""
    total, generator, rng = tf.Variable(0.0), tf.random.Generator.from_seed(1), np.random.default_rng(2)
    calls = []

    def run(n):
        calls.append(n)
        if len(calls) == stop_at:
            raise Stopped
        for _ in range(n):
            total.assign_add(generator.uniform([]) + float(rng.uniform()))
        return total.read_value()

    track = dict(total=total, generator=generator, rng=loops.NumpyRandomState(rng))
    return run, track, calls, total


def test_run_with_progress_resumes_from_its_last_checkpoint_with_the_same_state(tmp_path, capsys):
    run, track, _, whole_total = resumable()
    whole = loops.run_with_progress(run, 10, "phase", reports=5)  # 2 iterations a call
    run, track, calls, _ = resumable(stop_at=3)
    with pytest.raises(Stopped):
        loops.run_with_progress(run, 10, "phase", reports=5, backup_dir=tmp_path, track=track)
    assert calls == [2, 2, 2]  # the third call was stopped: 4 iterations saved
    run, track, calls, total = resumable()  # a new process: fresh objects, restored from the checkpoint
    resumed = loops.run_with_progress(run, 10, "phase", reports=5, backup_dir=tmp_path, track=track)
    assert "phase: resumed at step 4/10" in capsys.readouterr().out
    assert calls == [2, 2, 2]  # only the remaining 6 iterations, in the same chunks
    assert resumed == whole and float(total) == float(whole_total)  # both generators restored too
    run, track, calls, total = resumable()
    again = loops.run_with_progress(run, 10, "phase", reports=5, backup_dir=tmp_path, track=track)
    assert calls == [] and again == whole and float(total) == float(whole_total)  # finished: restored, not run
    with pytest.raises(InputError, match="holds 10 steps of 'phase', more than the 8 asked for"):
        loops.run_with_progress(run, 8, "phase", reports=5, backup_dir=tmp_path, track=track)


def test_step_checkpoint_restores_its_step_and_tracked_state_and_keeps_only_the_newest(tmp_path):
    assert loops.StepCheckpoint(tmp_path, weights=tf.Variable([0.0, 0.0])).restore() == 0  # nothing saved yet
    weights = tf.Variable([1.0, 2.0])
    saved = loops.StepCheckpoint(tmp_path, weights=weights)
    saved.save(1)
    weights.assign([3.0, 4.0])
    saved.save(2)
    fresh = tf.Variable([0.0, 0.0])
    assert loops.StepCheckpoint(tmp_path, weights=fresh).restore() == 2
    assert fresh.numpy().tolist() == [3.0, 4.0]
    assert sorted(path.name.split(".")[0] for path in tmp_path.glob("ckpt-*")) == ["ckpt-2", "ckpt-2"]  # index, data
    with pytest.raises(AssertionError):  # a tracked object the checkpoint does not hold
        loops.StepCheckpoint(tmp_path, weights=fresh, other=tf.Variable(0.0)).restore()
