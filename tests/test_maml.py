"""MAML recipe: meta-gradients, the meta-batch split across replicas, bad input, short runs, resuming, the notebook.

The machinery in common.meta (MetaTrainer, the episode sampler) has its unit tests in tests/test_meta.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from common import loops, meta
from recipes import maml
from tests.conftest import ROOT, execute_notebook

# --- Meta-gradients -----------------------------------------------------------------


def sine_batch(tasks: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y, _ = meta.sample_sinusoid_tasks(tasks, 20, rng)
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def learner(algorithm: str, alpha: float = 0.1, steps: int = 2):
    import keras

    keras.utils.set_random_seed(3)
    model = meta.build_sinusoid_model()
    return maml.MetaLearner(model, meta.mse, meta.mse, algorithm, alpha=alpha, inner_steps=steps)


def test_second_order_meta_gradients_exist_and_differ_from_first_order():
    batch = sine_batch()
    second = learner("maml")
    first = learner("fomaml")  # same seed: same initial weights
    for a, b in zip(second.model.trainable_variables, first.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loss2, grads2 = second.meta_gradients(batch)
    loss1, grads1 = first.meta_gradients(batch)
    assert all(g is not None for g in grads2)
    np.testing.assert_allclose(loss1.numpy(), loss2.numpy(), rtol=1e-5)  # same forward pass
    differences = [float(tf.reduce_max(tf.abs(g2 - g1))) for g2, g1 in zip(grads2, grads1)]
    assert max(differences) > 1e-3, differences


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights():
    batch = sine_batch()
    first = learner("fomaml")
    _, grads = first.meta_gradients(batch)
    params = [v.value for v in first.model.trainable_variables]
    expected = [np.zeros(p.shape, np.float32) for p in params]
    for xs, ys, xq, yq in zip(*batch):
        adapted = first.adapt(params, tf.constant(xs), tf.constant(ys), first.inner_steps, first_order=True)
        adapted = [tf.constant(a.numpy()) for a in adapted]  # a fresh point: no path back to params
        with tf.GradientTape() as tape:
            tape.watch(adapted)
            loss = first.task_loss(adapted, tf.constant(xq), tf.constant(yq))
        for total, g in zip(expected, tape.gradient(loss, adapted)):
            total += g.numpy() / len(batch[0])
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


def test_reptile_moves_towards_the_adapted_weights():
    batch = sine_batch(tasks=3)
    reptile = learner("reptile", alpha=0.05, steps=3)
    _, grads = reptile.meta_gradients(batch)
    params = [v.value for v in reptile.model.trainable_variables]
    expected = [np.zeros(p.shape, np.float32) for p in params]
    for xs, ys, xq, yq in zip(*batch):
        x, y = np.concatenate([xs, xq]), np.concatenate([ys, yq])
        adapted = reptile.adapt(params, tf.constant(x), tf.constant(y), 3, first_order=True)
        for total, p, a in zip(expected, params, adapted):
            total += (p.numpy() - a.numpy()) / 0.05 / len(batch[0])
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-5)


def test_evaluation_scores_each_task_alone_whatever_the_chunk():
    tasks = sine_batch(tasks=6, seed=1)
    first = learner("maml")
    whole = first.evaluate(tasks, [0, 1, 3], chunk=6)
    np.testing.assert_allclose(first.evaluate(tasks, [0, 1, 3], chunk=4), whole, rtol=1e-5)
    assert whole.shape == (6, 3) and (whole[:, 1] < whole[:, 0]).mean() > 0.5  # adapting lowers the MSE
    summary = meta.summarise(whole, [0, 1, 3], "mse")
    assert summary["mse_after_1_step"] == pytest.approx(whole[:, 1].mean())
    assert set(summary["ci95"]) == {"mse_after_0_steps", "mse_after_1_step", "mse_after_3_steps"}


# --- The meta-batch split across replicas (--strategy mirrored) --------------------------

# Run in a process of its own: the two logical CPU devices must be configured before TensorFlow starts.
DISTRIBUTED = r"""
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from common import meta
from recipes import maml

strategy = maml.make_strategy("mirrored")  # both logical CPU devices
# One strategy per process, as in a real run: a second MirroredStrategy restarts the collective
# instance keys, and its all-reduces then collide with the first one's (measured: "Shape mismatch").
maml.make_strategy = lambda name: strategy
rng = np.random.default_rng(0)
x, y, _ = meta.sample_sinusoid_tasks(4, 20, rng)
sampler = meta.EpisodeSampler(rng.random((60, 8, 8, 1), dtype=np.float32), np.repeat(np.arange(3), 20), [0, 1, 2])
cases = {
    "sine": (meta.build_sinusoid_model, meta.mse, meta.mse, (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]), "vectorized"),
    "conv4": (lambda: meta.build_conv4((8, 8, 1), 3, 4), meta.cross_entropy, meta.accuracy,
              sampler.sample(4, 3, 2, 2, rng)[:4], "map"),
}

def step(case, algorithm, strategy=None):
    build, loss_fn, score_fn, batch, task_map = cases[case]
    keras.utils.set_random_seed(3)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build()
    before = [v.numpy() for v in model.trainable_variables]
    learner = maml.MetaLearner(model, loss_fn, score_fn, algorithm, alpha=0.1, inner_steps=2, task_map=task_map,
                               strategy=strategy)
    loss = float(learner.meta_step(batch))
    after = [v.numpy() for v in model.trainable_variables]
    return loss, after, max(float(np.abs(a - b).max()) for a, b in zip(before, after))

out = {"replicas": strategy.num_replicas_in_sync}
for case, algorithm in [("sine", "maml"), ("sine", "reptile"), ("conv4", "maml"), ("conv4", "fomaml")]:
    loss1, weights1, moved = step(case, algorithm)
    loss2, weights2, _ = step(case, algorithm, strategy)
    out[f"{case}_{algorithm}"] = dict(
        loss=abs(loss1 - loss2), weights=max(float(np.abs(a - b).max()) for a, b in zip(weights1, weights2)),
        moved=moved,
    )
record = maml.main(["--strategy", "mirrored", "--quick", "--iterations", "100", "--batch-size", "24", "--eval-tasks", "20", "--out", OUT])
out["run_mse_after_1_step"] = record["variants"]["maml"]["mse_after_1_step"]
print("RESULT " + json.dumps(out))
"""


def test_mirrored_meta_step_equals_the_single_device_step(tmp_path):
    """Two replicas, two tasks each: the same updated weights as one device on the four tasks."""
    script = "OUT = " + repr(str(tmp_path / "run")) + DISTRIBUTED
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", RECIPES_QUICK="")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ")[-1])
    assert out.pop("replicas") == 2
    assert out.pop("run_mse_after_1_step") > 0 and (tmp_path / "run" / "metrics.json").is_file()
    for case, diff in out.items():
        assert diff["loss"] < 1e-5, (case, diff)
        # Adam's first step divides by |g|: float differences of the all-reduce order grow to ~3e-5 (measured)
        # on gradients near zero; the weights themselves move by about the learning rate, 1e-3.
        assert diff["weights"] < 5e-5 and diff["moved"] > 5e-4, (case, diff)


def test_meta_batch_must_split_evenly_across_replicas(tmp_path, monkeypatch):
    class TwoReplicas:
        num_replicas_in_sync = 2

    monkeypatch.setattr(maml, "make_strategy", lambda name: TwoReplicas())
    with pytest.raises(ValueError, match=r"--batch-size 25: .* split across 2 replicas and must be a multiple"):
        maml.run(maml.Config(strategy="mirrored", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


# --- Bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(ways=4, train_classes="0-6", test_classes="7-9"),
            r"4-way episodes need 4 meta-test classes, but .* only 3",
        ),
        (dict(ways=6), r"6-way episodes need 6 meta-train classes, but there are only 5"),
        (
            dict(shots="1,200", query=5),
            r"--shots 200 \+ --query 5 need 205 images per class, but meta-train class 0 \('0'\) has only \d+",
        ),
        (dict(train_classes="0-5", test_classes="5-9"), r"class 5 .* two class lists"),
        (dict(image_alpha=0.0), r"--image-alpha must be positive, got 0.0"),
        (dict(inner_steps=0), r"--inner-steps must be positive, got 0"),
        (dict(algorithm="sgd"), r"unknown algorithm 'sgd'; choose one of maml, fomaml, reptile"),
        (dict(shots="0"), r"every K must be at least 1"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, changes, message):
    config = maml.Config(dataset="digits", out=str(tmp_path / "run"), **changes)
    with pytest.raises(ValueError, match=message):
        maml.run(config)
    assert not (tmp_path / "run").exists()


def test_bad_sinusoid_input(tmp_path):
    with pytest.raises(ValueError, match="--alpha must be positive, got -0.01"):
        maml.run(maml.Config(alpha=-0.01, out=str(tmp_path)))
    with pytest.raises(ValueError, match="cannot read eval steps 'one'"):
        maml.run(maml.Config(eval_steps="one", out=str(tmp_path)))


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        maml.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--algorithm", "--iterations", "--batch-size", "--alpha", "--shots", "--ways", "--quick"):
        assert flag in text


# --- Short runs ------------------------------------------------------------------------


def test_short_sinusoid_run_adapts_and_beats_pretrained(tmp_path):
    config = maml.Config(iterations=2000, pretrain_iterations=500, eval_tasks=200, out=str(tmp_path))
    record = maml.run(config)
    ours, baseline = record["variants"]["maml"], record["variants"]["pretrained"]
    assert record["metric"] == "mse_after_1_step" and record["baseline"] == "pretrained"
    assert ours["mse_after_1_step"] < 0.6 * ours["mse_after_0_steps"]
    assert ours["mse_after_1_step"] < 0.8 * baseline["mse_after_1_step"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["variants"]["maml"]["mse_after_10_steps"] == pytest.approx(ours["mse_after_10_steps"])
    for name in ("config.json", "history.csv", "learning_curves.png", "test_tasks.png", "model.keras"):
        assert (tmp_path / name).is_file(), name


def test_short_fashion_mnist_run_is_well_above_chance(tmp_path):
    record = maml.run(maml.Config(dataset="fashion_mnist", quick=True, out=str(tmp_path)))
    ours = record["variants"]["maml"]
    assert record["metric"] == "accuracy_1_shot" and record["chance"] == pytest.approx(0.2)
    assert ours["accuracy_1_shot"] > 0.3, ours
    assert 0 < ours["ci95"]["accuracy_1_shot"] < 0.1
    assert 0.0 <= record["variants"]["pretrained"]["accuracy_1_shot"] <= 1.0
    assert (tmp_path / "metrics.json").is_file()


def test_omniglot_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    def as_dataset(*args, **kwargs):
        # 10 characters, 8 drawings each, in every split; pixel intensity depends on the character.
        labels = np.repeat(np.arange(10), 8)
        images = np.broadcast_to((labels * 20 + 30).astype(np.uint8)[:, None, None, None], (80, 105, 105, 3))
        return tf.data.Dataset.from_tensor_slices({"image": np.ascontiguousarray(images), "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        config = maml.Config(
            dataset="tfds:omniglot", quick=True, train_classes="0-4", test_classes="5-9", ways=3, query=3,
            rotations=True, eval_tasks=12, out=str(tmp_path),
        )  # fmt: skip
        record = maml.run(config)
    assert record["dataset"] == "tfds:omniglot" and record["ways"] == 3
    assert 0.0 <= record["variants"]["maml"]["accuracy_1_shot"] <= 1.0


# --- Resuming (--backup-dir) -------------------------------------------------------------


RUN_WITH_PROGRESS = loops.run_with_progress  # the real one: a second watch_phases replaces the first


class Stopped(Exception):
    """Stand-in for a kill: raised in place of a compiled call, after the calls before it were checkpointed."""


def watch_phases(monkeypatch, stop_at: tuple[str, int] | None = None) -> dict:
    """Count the iterations each phase runs (label -> iterations); raise ``Stopped`` at call ``stop_at[1]`` of the
    phase whose label starts with ``stop_at[0]``."""
    original, ran = RUN_WITH_PROGRESS, {}

    def watched(run, iterations, label, *args, **kwargs):
        ran[label], calls = 0, []

        def counted(n):
            calls.append(n)
            if stop_at and label.startswith(stop_at[0]) and len(calls) == stop_at[1]:
                raise Stopped(label)
            ran[label] += n
            return run(n)

        return original(counted, iterations, label, *args, **kwargs)

    monkeypatch.setattr(loops, "run_with_progress", watched)
    return ran


def test_sinusoid_run_stopped_twice_resumes_and_ends_as_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """--quick: 300 meta-steps in calls of 3, 200 pretraining steps in calls of 2. Stopped in meta-training after
    2 calls, then (resumed) in pretraining after 2 calls, then finished: each rerun starts at the saved step, the
    finished phase is restored without training, and the metrics and loss histories equal, to the last bit, those
    of a run without --backup-dir."""
    whole = maml.main(["--quick", "--out", str(tmp_path / "whole")])
    backup, out = tmp_path / "backup", tmp_path / "resumed"
    argv = ["--quick", "--backup-dir", str(backup), "--out", str(out)]
    watch_phases(monkeypatch, stop_at=("meta-train", 3))
    with pytest.raises(Stopped, match="meta-train"):
        maml.main(argv)
    capsys.readouterr()
    ran = watch_phases(monkeypatch, stop_at=("pretrain", 3))
    with pytest.raises(Stopped, match="pretrain"):
        maml.main(argv)
    assert ran == {"meta-train (maml)": 300 - 2 * 3, "pretrain (joint)": 2 * 2}
    assert "meta-train (maml): resumed at step 6/300" in capsys.readouterr().out
    ran = watch_phases(monkeypatch)
    resumed = maml.main(argv)
    assert ran == {"meta-train (maml)": 0, "pretrain (joint)": 200 - 2 * 2}  # finished phase restored, not rerun
    printed = capsys.readouterr().out
    assert (
        "meta-train (maml): resumed at step 300/300" in printed and "pretrain (joint): resumed at step 4/200" in printed
    )
    assert resumed["variants"] == whole["variants"]  # exactly: same ops on the same restored state
    assert (out / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert not backup.exists()  # a finished run removes its backup


def test_fashion_mnist_run_stopped_in_meta_training_resumes_and_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """The image path (--quick: 20 meta-steps, one a call; episodes drawn with numpy, its generator checkpointed):
    stopped after 5 meta-steps, resumed with the baseline restored from its finished fit; same metrics."""
    common = ["--dataset", "fashion_mnist", "--quick", "--eval-tasks", "20"]
    whole = maml.main([*common, "--out", str(tmp_path / "whole")])
    backup, argv = (
        tmp_path / "backup",
        [*common, "--backup-dir", str(tmp_path / "backup"), "--out", str(tmp_path / "r")],
    )
    watch_phases(monkeypatch, stop_at=("meta-train", 6))
    with pytest.raises(Stopped):
        maml.main(argv)
    assert (backup / "pretrain" / "finished-1.weights.h5").is_file()
    ran = watch_phases(monkeypatch)
    resumed = maml.main(argv)
    assert ran == {"meta-train (maml, 1-shot)": 20 - 5}
    assert resumed["variants"] == whole["variants"]
    assert (tmp_path / "r" / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert not backup.exists()


# --- The notebook ----------------------------------------------------------------------


def test_notebook_runs_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "04_maml.ipynb")


def test_two_local_workers_match_one_process(tmp_path):
    """--strategy multi_worker: two workers on 127.0.0.1 each take half of every meta-batch (same seed, same
    tasks drawn on both); the result equals one process's (the plain graph on both sides: XLA is not used under
    a strategy)."""
    from common import distributed

    argv = ["--quick", "--batch-size", "24", "--eval-tasks", "50", "--no-jit-compile"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", RECIPES_QUICK="")
    command = [sys.executable, "-m", "recipes.maml", *argv, "--strategy", "multi_worker"]
    workers = distributed.launch_local(command + ["--out", str(tmp_path / "workers")], 2, str(tmp_path), env)
    try:
        codes = [worker.wait(timeout=600) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert codes == [0, 0], [(tmp_path / f"worker-{i}.log").read_text()[-2000:] for i in range(2)]
    one = maml.main([*argv, "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "workers" / "metrics.json").read_text())  # only the chief wrote it
    for variant in ("maml", "pretrained"):
        for key in ("mse_after_0_steps", "mse_after_1_step", "mse_after_5_steps"):
            assert two["variants"][variant][key] == pytest.approx(one["variants"][variant][key], rel=1e-4)
