"""common.multi_task (PCGrad, uncertainty weighting, rotations) and recipes.multi_task end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from common import loops
from common import multi_task as mt
from common.cli import InputError
from recipes import multi_task
from tests.conftest import ROOT, assert_cli_error, execute_notebook

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


# --- PCGrad ---------------------------------------------------------------------------------


def test_pcgrad_removes_the_conflicting_component_exactly():
    grads = tf.constant([[1.0, 0.0], [-1.0, 1.0]])  # dot product -1: they conflict
    projected = mt.project_conflicting(grads, orders=tf.constant([[1], [0]])).numpy()
    # g1 - (g1.g2)/|g2|^2 g2 = [1, 0] + 0.5 [-1, 1]; g2 - (g2.g1)/|g1|^2 g1 = [-1, 1] + [1, 0]
    np.testing.assert_allclose(projected, [[0.5, 0.5], [0.0, 1.0]], atol=1e-7)
    assert abs(projected[0] @ grads.numpy()[1]) < 1e-7 and abs(projected[1] @ grads.numpy()[0]) < 1e-7


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    grads = tf.constant([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # pairwise dots 1, 0, 0
    for generator in (tf.random.Generator.from_seed(0), tf.random.Generator.from_seed(1)):
        np.testing.assert_array_equal(mt.project_conflicting(grads, generator=generator).numpy(), grads.numpy())


def test_pcgrad_with_three_tasks_projects_in_the_given_order():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 6)).astype(np.float32)
    orders = np.array([[2, 1], [0, 2], [1, 0]])
    expected = []
    for i in range(3):
        v = g[i].astype(np.float64)
        for j in orders[i]:
            dot = v @ g[j]
            if dot < 0:
                v = v - dot / (g[j] @ g[j]) * g[j]
        expected.append(v)
    got = mt.project_conflicting(tf.constant(g), orders=tf.constant(orders, tf.int32)).numpy()
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5, atol=1e-6)
    order = mt.random_order(4, 2, tf.random.Generator.from_seed(3)).numpy()
    assert sorted(order.tolist()) == [0, 1, 3]
    with pytest.raises(ValueError, match="orders must have shape"):
        mt.project_conflicting(tf.constant(g), orders=tf.constant([[1], [0], [0]]))


def test_gradient_cosines():
    cosines = mt.gradient_cosines(tf.constant([[1.0, 0.0], [-2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])).numpy()
    assert cosines[0, 1] == pytest.approx(-1.0) and cosines[0, 2] == pytest.approx(2**-0.5)
    assert cosines[0, 0] == pytest.approx(1.0) and cosines[3, 0] == 0.0  # a zero gradient: 0, not NaN


# --- Uncertainty weighting -----------------------------------------------------------------


def learned_weights(losses: list[float], steps: int = 3000) -> np.ndarray:
    """The log-variances of Kendall et al.'s loss minimised by Adam for fixed task losses; their weights."""
    log_variances = tf.Variable(tf.zeros(len(losses)))
    optimizer = tf.keras.optimizers.Adam(0.01)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = mt.uncertainty_loss(tf.constant(losses), log_variances)
        optimizer.apply_gradients([(tape.gradient(loss, log_variances), log_variances)])
    return mt.uncertainty_weights(log_variances.numpy())


def test_uncertainty_weights_fall_for_the_task_whose_loss_is_scaled_up():
    equal = learned_weights([1.0, 1.0])
    scaled = learned_weights([1.0, 10.0])  # task 2's loss scaled up 10x
    np.testing.assert_allclose(equal, [0.5, 0.5], rtol=0.02)  # the stationary point exp(-s) = 1 / (2 L)
    np.testing.assert_allclose(scaled, [0.5, 0.05], rtol=0.02)
    assert scaled[1] < equal[1] and scaled[0] == pytest.approx(equal[0], rel=0.02)


def toy_tasks(n: int = 256, side: int = 18) -> list[mt.Task]:
    """Two tasks on the same random images: 'easy' (label: bright or dark image) and 'noise' (random labels)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (n, side, side, 1)).astype(np.float32) * rng.uniform(0.2, 1, (n, 1, 1, 1)).astype(np.float32)
    easy = (x.mean(axis=(1, 2, 3)) > np.median(x.mean(axis=(1, 2, 3)))).astype(np.int64)
    noise = rng.integers(0, 2, n)
    return [mt.Task("easy", "classification", x, easy, 2, x, easy, 32),
            mt.Task("noise", "classification", x, noise, 2, x, noise, 32)]  # fmt: skip


def test_the_trainer_weighs_down_the_task_whose_loss_stays_high():
    tasks = toy_tasks()
    trunk = mt.build_trunk((18, 18, 1))
    heads = {t.name: mt.build_head(trunk.output_shape[-1], 2, t.name) for t in tasks}
    trainer = mt.MultiTaskTrainer(trunk, heads, tasks, "uncertainty", learning_rate=0.01, seed=0)
    history = trainer.train(200, "toy", log_every=50)
    weights = dict(zip(trainer.names, trainer.weights().numpy()))
    assert history["loss_noise"][-1] > history["loss_easy"][-1]
    assert weights["easy"] > 1.0 > weights["noise"], weights
    assert history["weight_easy"] == sorted(history["weight_easy"])  # rose all along
    assert set(history) >= {"step", "cosine_easy/noise", "conflict_easy/noise", "weight_noise"}


def test_unknown_weighting_and_one_class_task_are_input_errors():
    tasks = toy_tasks(32)
    with pytest.raises(InputError, match="unknown weighting 'gradsum'; choose one of equal, uncertainty, pcgrad"):
        mt.MultiTaskTrainer(mt.build_trunk((18, 18, 1)), {}, tasks, "gradsum")
    with pytest.raises(InputError, match="task 'one' has 1 class"):
        mt.Task("one", "classification", tasks[0].x, np.zeros(32, np.int64), 1, tasks[0].x, np.zeros(32), 8)


def test_rotate_turns_each_image_by_its_own_quarter_turns():
    images = np.arange(4 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 1)
    turned = mt.rotate(images, tf.constant([0, 1, 2, 3])).numpy()
    for i in range(4):
        np.testing.assert_array_equal(turned[i, ..., 0], np.rot90(images[i, ..., 0], i))
    x_test, y_test = mt.rotation_test_set(images)
    assert y_test.tolist() == [0, 1, 2, 3] and np.array_equal(x_test, turned)
    with pytest.raises(InputError, match="needs square images, got 3x4"):
        mt.rotate(np.zeros((1, 3, 4, 1), np.float32), tf.constant([1]))


# --- The recipe -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    return multi_task.main(["--quick", "--out", str(out)]), out


def test_quick_run_writes_strict_json_and_every_figure(quick_run):
    record, out = quick_run
    assert record["recipe"] == "multi_task" and record["baseline"] == "single_task"
    assert list(record["variants"]) == list(multi_task.VARIANTS)
    text = (out / "metrics.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json")) == json.loads(
        json.dumps(record)
    )
    for name in ("multi_task", "uncertainty", "pcgrad"):
        figures = record["variants"][name]
        assert set(figures["task_accuracy"]) == {"source", "target", "rotation"}
        assert set(figures["gradient_cosine"]) == {"source/target", "source/rotation", "target/rotation"}
        assert all(-1 <= c <= 1 for c in figures["gradient_cosine"].values())
        assert figures["test_accuracy"] == figures["task_accuracy"]["target"]
    assert set(record["variants"]["single_task"]["task_accuracy"]) == {"source", "target"}
    assert record["variants"]["multi_task"]["task_weights"] == {"source": 1.0, "target": 1.0, "rotation": 1.0}
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "history.csv", "model.keras", "task_weights.png",
            "gradient_cosine.png", "task_accuracy.png"} <= written  # fmt: skip


def test_conflict_adds_the_shuffled_task_to_every_joint_variant(tmp_path):
    argv = ["--quick", "--conflict", "--steps", "30", "--variants", "single_task,uncertainty", "--out", str(tmp_path)]
    record = multi_task.main(argv)
    assert record["tasks"] == ["source", "target", "rotation", "shuffled"]
    assert "shuffled" in record["variants"]["uncertainty"]["task_weights"]


def test_multi_task_beats_single_task_on_the_target(tmp_path):
    """The accuracy check (seed 0, 400 steps): multi-task training must gain on the 50-label target task."""
    argv = ["--steps", "400", "--source-images", "10000", "--test-images", "2000",
            "--variants", "single_task,multi_task", "--out", str(tmp_path)]  # fmt: skip
    variants = multi_task.main(argv)["variants"]
    single, joint = variants["single_task"]["test_accuracy"], variants["multi_task"]["test_accuracy"]
    print(f"single_task {single:.3f}, multi_task {joint:.3f}")
    assert single > 0.7  # the baseline itself learns
    assert joint >= single + 0.03  # measured +5.5 points


RUN_WITH_PROGRESS = loops.run_with_progress


class Stopped(Exception):
    """Stand-in for a kill, raised in place of a compiled call after the calls before it were checkpointed."""


def test_a_run_stopped_mid_training_resumes_and_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    argv = ["--quick", "--steps", "40", "--log-every", "10", "--variants", "single_task,pcgrad"]
    whole = multi_task.main([*argv, "--out", str(tmp_path / "whole")])
    calls = {"pcgrad": 0}

    def stopping(run, iterations, label, *args, **kwargs):
        def counted(n):
            if label.startswith("[pcgrad]"):
                calls["pcgrad"] += 1
                if calls["pcgrad"] == 3:
                    raise Stopped(label)
            return run(n)

        return RUN_WITH_PROGRESS(counted, iterations, label, *args, **kwargs)

    backup = tmp_path / "backup"
    monkeypatch.setattr(loops, "run_with_progress", stopping)
    with pytest.raises(Stopped):
        multi_task.main([*argv, "--backup-dir", str(backup), "--out", str(tmp_path / "r")])
    monkeypatch.setattr(loops, "run_with_progress", RUN_WITH_PROGRESS)
    resumed = multi_task.main([*argv, "--backup-dir", str(backup), "--out", str(tmp_path / "r")])
    without_time = [{k: {f: v for f, v in fig.items() if f != "train_seconds"} for k, fig in r["variants"].items()}
                    for r in (whole, resumed)]  # fmt: skip
    assert without_time[0] == without_time[1]
    assert (tmp_path / "r" / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert not backup.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "source,target,colour"], "--tasks 'source,target,colour': unknown name 'colour'; choose from"),
        (["--tasks", "source,rotation"], "must include 'target'"),
        (["--variants", "single_task,gradnorm"], "unknown name 'gradnorm'; choose from single_task, sequential"),
        (["--variants", "multi_task"], "--variants 'multi_task' must include 'single_task'"),
        (["--source-classes", "3"], r"--source-classes gives one class \('Dress'\); a task needs at least two"),
        (["--source-classes", "0-5"], r"class 5 \(Sandal\) is in two class lists"),
        (["--labels-per-class", "7000"], r"--labels-per-class 7000 needs 7000 images per class"),
        (["--strategy", "mirrored"], "multi_task does not support --strategy mirrored yet"),
        (["--strategy", "multi_worker"], "multi_task does not support --strategy multi_worker yet"),
    ],
)
def test_bad_input_is_one_error_line_before_training(tmp_path, flags, message, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(multi_task, "train_network", no_training)
    assert_cli_error(capsys, multi_task.main, ["--quick", *flags, "--out", str(tmp_path / "run")], message)
    assert not (tmp_path / "run").exists()


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "recipes.multi_task", "--help"], env=ENV, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for flag in ("--tasks", "--variants", "--conflict", "--steps", "--batch-size", "--labels-per-class",
                 "--source-classes", "--target-classes", "--backup-dir", "--strategy", "--quick"):  # fmt: skip
        assert flag in out


def test_notebook_runs_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "08_multi_task.ipynb")
