"""Multi-worker runs with local worker processes on 127.0.0.1, and runs killed and resumed.

Every process has a timeout; every address is a loopback one (common.distributed.local_cluster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from common import distributed
from common.cli import InputError
from recipes import (
    choose_source,
    domain_adaptation,
    feature_extraction,
    fine_tune,
    maml,
    self_training,
    weight_transfer,
)
from tests.conftest import assert_cli_error

ROOT = Path(__file__).resolve().parents[1]
PYTHON = [sys.executable, "-m"]
# Small but real: 3 source epochs so a run can be killed after its second.
WEIGHT_TRANSFER = ["recipes.weight_transfer", "--quick", "--source-epochs", "3", "--source-images", "600"]
TOLERANCE = 0.01  # two workers vs one process, same seed and global batch: measured 0.000-0.002 apart

# Which path each recipe's training takes under --strategy multi_worker. Keras 3's fit fails
# under MultiWorkerMirroredStrategy (keras-team/keras#20585), so no recipe may reach it there:
# "distributed step" = every phase through common.distributed.train; "refused" = an InputError.
PATHS = {
    weight_transfer: "distributed step",
    feature_extraction: "distributed step",  # the frozen base is pretrained (or loaded) by each worker
    fine_tune: "distributed step",  # both phases and the baseline, early stopping included; --tune is refused
    maml: "distributed step",  # the meta-batch split across workers (the baselines train on each worker alone)
    self_training: "distributed step",  # scratch and students; the scikit-learn steps run on every worker alike
    choose_source: "refused",
    domain_adaptation: "refused",
}


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), RECIPES_QUICK="")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def accuracies(record: dict) -> dict:
    return {name: figures["test_accuracy"] for name, figures in record["variants"].items()}


@pytest.mark.parametrize("recipe", PATHS, ids=lambda m: m.__name__.rpartition(".")[2])
def test_each_recipe_states_its_multi_worker_path(recipe):
    config = recipe.Config(strategy="multi_worker")
    if PATHS[recipe] == "refused":
        with pytest.raises(InputError, match="multi_worker"):
            config.resolved()
    else:
        assert recipe.Config.MULTI_WORKER and config.resolved().strategy == "multi_worker"


def forbid_fit(monkeypatch, allowed: tuple[str, ...] = ()):
    """Flip the path switch ``distributed.uses_fit`` as multi_worker does; fit then fails unless ``allowed``."""
    fit = keras.Model.fit

    def guarded(model, *args, **kwargs):
        if model.name not in allowed:
            raise AssertionError(f"model.fit called on the multi-worker path by {model.name}")
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(distributed, "uses_fit", lambda strategy: False)
    monkeypatch.setattr(keras.Model, "fit", guarded)


def test_under_multi_worker_weight_transfer_never_calls_fit(monkeypatch, tmp_path):
    forbid_fit(monkeypatch)
    record = weight_transfer.main(["--quick", "--epochs", "1", "--source-images", "300", "--out", str(tmp_path)])
    assert record["source_test_accuracy"] > 0.4


@pytest.mark.parametrize("augment", [False, True], ids=["features", "images"])
def test_under_multi_worker_feature_extraction_trains_head_and_baseline_without_fit(monkeypatch, tmp_path, augment):
    forbid_fit(monkeypatch, allowed=("source_cnn",))  # each worker's own, undistributed base pretraining
    argv = ["--quick", "--epochs", "1", "--test-images", "200", "--out", str(tmp_path)]
    record = feature_extraction.main(argv + (["--augment"] if augment else []))
    assert set(record["variants"]) == {"scratch", "feature_extraction"}


def test_under_multi_worker_fine_tune_trains_both_phases_and_baseline_without_fit(monkeypatch, tmp_path):
    forbid_fit(monkeypatch, allowed=("source_cnn",))  # each worker's own, undistributed base pretraining
    argv = ["--quick", "--head-epochs", "2", "--epochs", "2", "--schedule", "gradual", "--test-images", "100"]
    record = fine_tune.main(argv + ["--out", str(tmp_path)])
    assert set(record["variants"]) == {"scratch", "head_only", "fine_tune"}
    assert record["variants"]["fine_tune"]["epochs"] == 2


def test_fine_tune_refuses_tune_under_multi_worker_and_says_what_is_distributed(capsys):
    message = "--tune with --strategy multi_worker.*phase 1, phase 2 and the scratch baseline are.*KERASTUNER_ORACLE_IP"
    assert_cli_error(capsys, fine_tune.main, ["--tune", "--strategy", "multi_worker"], message)


# --- Runs started in the background when the module starts ----------------------------------
#
# The uninterrupted reference runs and the two-worker runs do not depend on each other: they
# start together (only those the selected tests use) and run while the in-process tests and the
# kill-and-resume tests do; a test waits for the run it reads. Each process is bounded by TIMEOUT.

TIMEOUT = 600  # seconds per process: two CPU cores shared with other jobs can be very busy


class Job:
    """A command started now as one process (or ``workers`` local workers); ``logs()`` waits for it, bounded."""

    def __init__(self, command: list[str], out: Path, workers: int = 0, extra_env: dict | None = None):
        self.out, self.run_dir = out, out / "run"
        command = [*command, "--out", str(self.run_dir)]
        if workers:
            self.processes = distributed.launch_local(command, workers, log_dir=str(out), env=env() | (extra_env or {}))
            self.log_paths = [out / f"worker-{i}.log" for i in range(workers)]
        else:
            self.log_paths = [out / "process.log"]
            with open(self.log_paths[0], "w") as log:
                self.processes = [
                    subprocess.Popen(command, env=env() | (extra_env or {}), stdout=log, stderr=subprocess.STDOUT)
                ]
        self._logs: list[str] | None = None

    def logs(self) -> list[str]:
        """Each process's output, once all exited with status 0."""
        if self._logs is None:
            try:
                codes = [process.wait(timeout=TIMEOUT) for process in self.processes]
            finally:
                self.kill()
            self._logs = [path.read_text() for path in self.log_paths]
            assert codes == [0] * len(codes), self._logs
        return self._logs

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=30)


def one_worker_env() -> dict:
    """A cluster of one worker on 127.0.0.1: --strategy multi_worker, so the shared custom step, in one process."""
    return {"TF_CONFIG": distributed.local_cluster(1)[0], "CUDA_VISIBLE_DEVICES": ""}


# Its own small base (500 source images), pretrained by each worker while the other tests run.
FINE_TUNE = ["recipes.fine_tune", "--quick", "--source-images", "500", "--head-epochs", "2", "--epochs", "2",
             "--test-images", "200"]  # fmt: skip
# name: (the tests that read it, how to start it in folder `out`)
JOBS = {
    "one_process": (  # the reference: default strategy (fit), uninterrupted, with a backup (removed at its end)
        {"test_two_workers_match_one_process_and_only_the_chief_writes",
         "test_a_killed_fit_run_resumes_at_epoch_3_with_the_same_metrics"},
        lambda out: Job([*PYTHON, *WEIGHT_TRANSFER, "--backup-dir", str(out / "backup")], out),
    ),
    "two_workers": (
        {"test_two_workers_match_one_process_and_only_the_chief_writes"},
        lambda out: Job([*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker"], out, workers=2),
    ),
    "one_worker": (  # the custom loop's reference: one worker, uninterrupted, with a backup
        {"test_a_killed_custom_loop_run_resumes_at_epoch_3_with_the_same_metrics"},
        lambda out: Job([*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker", "--backup-dir",
                         str(out / "backup")], out, extra_env=one_worker_env()),
    ),
    "fine_tune_two_workers": (
        {"test_fine_tune_on_two_workers_finishes_with_the_same_numbers_on_both"},
        lambda out: Job([*PYTHON, *FINE_TUNE, "--strategy", "multi_worker"], out, workers=2),
    ),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def jobs(request, tmp_path_factory):
    """Start every job that a selected test of this module reads; kill what is left at the end."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    started = {name: start(tmp_path_factory.mktemp(name)) for name, (readers, start) in JOBS.items()
               if readers & selected}  # fmt: skip
    yield started
    for job in started.values():
        job.kill()


@pytest.fixture(scope="module")
def one_process(jobs) -> dict:
    job = jobs["one_process"]
    job.logs()
    assert not (job.out / "backup").exists()
    return metrics(job.run_dir)


def test_two_workers_match_one_process_and_only_the_chief_writes(jobs, one_process):
    job = jobs["two_workers"]
    logs, chief_out = job.logs(), job.run_dir
    worker_dir = logs[1].split("run folder: ")[1].split("\n")[0]
    assert not Path(worker_dir).exists()  # the other worker wrote only a temporary folder, removed at exit
    assert "Epoch 1/" not in logs[0] and "epoch 1/3" in logs[0]  # the shared step's log line, not fit's
    two, one = metrics(chief_out), one_process
    assert abs(two["source_test_accuracy"] - one["source_test_accuracy"]) <= TOLERANCE
    for name, value in accuracies(two).items():
        assert abs(value - accuracies(one)[name]) <= TOLERANCE, (accuracies(two), accuracies(one))


# The image-space student too (one, quick), so that its training and the sharded pseudo-labelling run; a run
# that reached fit under multi_worker would fail (keras#20585), and the chief's log shows the shared step's line.
SELF_TRAINING = ["--quick", "--method", "noisy_student", "--unlabeled", "1000", "--test-images", "250", "--scratch-epochs", "1",
                 "--batch-size", "256"]  # fmt: skip
# Two workers against one process, these flags, seed 0: transfer identical (the same features), scratch and the student
# 0.008 apart (2 of 250 test images: the student's augmentation draws differ when each worker augments half a batch).
# 19 s of CPU for one process, 21 s per worker (measured with other jobs on the cores).
SELF_TRAINING_TOLERANCE = 0.02


def test_two_workers_run_self_training_and_only_the_chief_writes(tmp_path):
    one = self_training.main([*SELF_TRAINING, "--out", str(tmp_path / "one")])  # also caches the base for both workers
    command = [*PYTHON, "recipes.self_training", *SELF_TRAINING, "--strategy", "multi_worker"]
    workers = distributed.launch_local([*command, "--out", str(tmp_path / "two")], 2, str(tmp_path), env())
    try:
        codes = [worker.wait(timeout=420) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert not Path(logs[1].split("run folder: ")[1].split("\n")[0]).exists()
    assert "Epoch 1/" not in logs[0] and "epoch 1/1" in logs[0]  # the student's shared step, not fit
    two = metrics(tmp_path / "two")
    print(f"one process {accuracies(one)}, two workers {accuracies(two)}")
    assert two["variants"]["transfer"]["confusion_matrix"] == one["variants"]["transfer"]["confusion_matrix"]
    for name, value in accuracies(two).items():
        assert abs(value - accuracies(one)[name]) <= SELF_TRAINING_TOLERANCE, (accuracies(two), accuracies(one))


def test_a_worker_that_never_comes_up_fails_the_chief_in_bounded_time(tmp_path):
    tf_config = distributed.local_cluster(2)[0]  # worker 1 is never started
    start = time.monotonic()
    chief = subprocess.run(
        [*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker", "--out", str(tmp_path)],
        env=dict(env(), TF_CONFIG=tf_config, RECIPES_WORKER_TIMEOUT="5"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chief.returncode == -signal.SIGKILL, chief.stderr  # by the watchdog: TF's wait ignores SIGTERM
    assert "error: not every worker of TF_CONFIG joined within 5 s" in chief.stderr
    assert time.monotonic() - start < 120
    assert not (tmp_path / "metrics.json").exists()


def test_a_killed_fit_run_resumes_at_epoch_3_with_the_same_metrics(tmp_path, one_process):
    backup, killed_out = tmp_path / "backup", tmp_path / "killed"
    command = [*PYTHON, *WEIGHT_TRANSFER, "--backup-dir", str(backup), "--out", str(killed_out)]
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = backup / "source" / "training_metadata.json"
    kill_when(process, lambda: metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 2)
    assert json.loads(metadata.read_text())["epoch"] == 2 and not (killed_out / "metrics.json").exists()

    resumed = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert "Epoch 3/3" in resumed.stdout and "Epoch 1/3" not in resumed.stdout  # resumed at epoch 3
    assert not backup.exists()  # a finished run removes its backup
    assert metrics(killed_out)["source_test_accuracy"] == one_process["source_test_accuracy"]
    assert accuracies(metrics(killed_out)) == accuracies(one_process)


# --- Kill-and-resume of the shared distributed step (the custom loop), in its own process ------------


def kill_when(process: subprocess.Popen, ready, seconds: float = TIMEOUT) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every 50 ms); fail if it ended first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def custom_epochs(backup: Path) -> int:
    """Source epochs the custom loop's backup holds: its history is written right after each epoch's checkpoint."""
    history = backup / "source" / "history.json"
    try:
        return len(json.loads(history.read_text())["loss"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_a_killed_custom_loop_run_resumes_at_epoch_3_with_the_same_metrics(tmp_path, jobs):
    """The shared distributed step (a one-worker multi_worker run) killed after its second source epoch, started
    again: it restores the CheckpointManager's model, optimizer, epoch and RNG state, and ends exactly as an
    uninterrupted run of the same command."""
    backup, killed_out = tmp_path / "backup", tmp_path / "killed"
    command = [*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker", "--backup-dir", str(backup), "--out",
               str(killed_out)]  # fmt: skip
    process = subprocess.Popen(
        command, env=env() | one_worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when(process, lambda: custom_epochs(backup) >= 2)
    assert custom_epochs(backup) == 2 and (backup / "source" / "ckpt").exists()
    assert not (killed_out / "metrics.json").exists()

    resumed = subprocess.run(command, env=env() | one_worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 3/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout  # resumed at epoch 3
    assert "Epoch 1/" not in resumed.stdout  # the shared step's log line, not fit's
    assert not backup.exists()  # a finished run removes its backup
    whole = jobs["one_worker"]
    whole.logs()
    assert not (whole.out / "backup").exists()
    assert metrics(killed_out)["source_test_accuracy"] == metrics(whole.run_dir)["source_test_accuracy"]
    assert accuracies(metrics(killed_out)) == accuracies(metrics(whole.run_dir))


# --- fine_tune on two real workers -------------------------------------------------------------


def test_fine_tune_on_two_workers_finishes_with_the_same_numbers_on_both(jobs):
    """Both phases and the baseline (early stopping included) under a real MultiWorkerMirroredStrategy: both
    workers finish, stop at the same epochs and print the same table (their replicas hold the same weights); only
    the chief writes a run folder."""
    job = jobs["fine_tune_two_workers"]
    logs = job.logs()
    record = metrics(job.run_dir)
    assert set(record["variants"]) == {"scratch", "head_only", "fine_tune"}
    assert min(accuracies(record).values()) > 0.3  # 5 classes, chance 0.2; measured 0.42-0.79 with these settings
    worker_dir = logs[1].split("run folder: ")[1].split("\n")[0]
    assert not Path(worker_dir).exists()
    results = [[line for line in log.splitlines() if "test accuracy" in line or " pts" in line] for log in logs]
    assert len(results[0]) == 5 and results[0] == results[1]  # 3 variants' lines, 2 gains: the same on both workers
