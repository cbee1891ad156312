"""Multi-worker runs with local worker processes on 127.0.0.1, and runs killed and resumed.

Every process has a timeout; every address is a loopback one (common.distributed.local_cluster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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
    multi_task,
    self_training,
    weight_transfer,
    zero_shot,
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
    weight_transfer: "distributed step",  # pinned by its two real workers below (fit would fail there)
    feature_extraction: "distributed step",  # the frozen base is pretrained (or loaded) by each worker
    fine_tune: "distributed step",  # both phases and the baseline, early stopping included; --tune is refused
    maml: "distributed step",  # the meta-batch split across workers (the baselines train on each worker alone)
    self_training: "distributed step",  # scratch and students; the scikit-learn steps run on every worker alike
    choose_source: "refused",
    domain_adaptation: "refused",
    multi_task: "refused",  # its per-task-gradient step runs on one device
    zero_shot: "refused",  # the seen-class base does not train through common.distributed.train
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
# Every run below is a separate process (or two local workers). They do not depend on each other
# (except where `after` says so): they start together when the module starts - only those the
# selected tests read - and run while the in-process tests above do, so the two cores stay busy;
# a test waits for the runs it reads. Each process is bounded by TIMEOUT.

TIMEOUT = 600  # seconds per process: two CPU cores shared with other jobs can be very busy


class Background:
    """``work()`` run in a thread started now; ``result()`` waits for it (bounded) and re-raises its error."""

    def __init__(self, work):
        self.processes: list[subprocess.Popen] = []
        self._lock, self._killed = threading.Lock(), False
        self._value, self._error = None, None

        def target() -> None:
            try:
                self._value = work()
            except BaseException as error:  # noqa: BLE001 (re-raised in the test's thread by result())
                self._error = error

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def popen(self, command: list[str], **kwargs) -> subprocess.Popen:
        """Start a process that ``kill()`` will stop; refuse once killed."""
        with self._lock:
            assert not self._killed, "the module's tests have ended"
            process = subprocess.Popen(command, **kwargs)
            self.processes.append(process)
            return process

    def join(self) -> None:
        self._thread.join(3 * TIMEOUT)
        assert not self._thread.is_alive(), f"still running after {3 * TIMEOUT} s"

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value

    def kill(self) -> None:
        with self._lock:
            self._killed = True
        for process in self.processes:
            process.kill()
            process.wait(timeout=30)


class Job(Background):
    """A command run as one process or as ``workers`` local workers, once job ``after`` (if any) has ended;
    ``logs()`` waits for it and returns each process's output, asserting that all exited with status 0."""

    def __init__(self, command: list[str], out: Path, workers: int = 0, extra_env: dict | None = None,
                 after: Job | None = None):  # fmt: skip
        self.out, self.run_dir = out, out / "run"
        self.log_paths = [out / f"worker-{i}.log" for i in range(workers)] if workers else [out / "process.log"]
        command, job_env = [*command, "--out", str(self.run_dir)], env() | (extra_env or {})

        def work() -> list[int]:
            if after is not None:
                after.join()
            if workers:
                with self._lock:
                    assert not self._killed, "the module's tests have ended"
                    self.processes = distributed.launch_local(command, workers, log_dir=str(out), env=job_env)
            else:
                with open(self.log_paths[0], "w") as log:
                    self.popen(command, env=job_env, stdout=log, stderr=subprocess.STDOUT)
            return [process.wait(timeout=TIMEOUT) for process in self.processes]

        super().__init__(work)

    def logs(self) -> list[str]:
        try:
            codes = self.result()
        finally:
            self.kill()
        logs = [path.read_text() for path in self.log_paths]
        assert codes == [0] * len(codes), logs
        return logs


def kill_when(process: subprocess.Popen, ready, seconds: float = TIMEOUT) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every 50 ms); fail if it ended first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


class KilledAndResumed(Background):
    """``command`` (writing to ``out/killed``, backing up to ``out/backup``) started, SIGKILLed as soon as
    ``epochs_done(backup) >= 2``, then started again and run to its end. ``result()`` is (epochs the backup held
    at the kill, whether the killed run had written metrics, the second run's CompletedProcess)."""

    def __init__(self, command: list[str], out: Path, epochs_done, extra_env: dict | None = None):
        self.backup, self.run_dir = out / "backup", out / "killed"
        command = [*command, "--backup-dir", str(self.backup), "--out", str(self.run_dir)]
        run_env = env() | (extra_env or {})

        # The killed run pauses after each epoch's backup (tests/paused_epochs.py), so the kill lands before epoch 3.
        paused = [*PYTHON, "tests.paused_epochs", *command[len(PYTHON) :]]

        def work():
            first = self.popen(paused, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kill_when(first, lambda: epochs_done(self.backup) >= 2)
            at_kill = epochs_done(self.backup), (self.run_dir / "metrics.json").exists()
            second = self.popen(command, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = second.communicate(timeout=TIMEOUT)
            return (*at_kill, subprocess.CompletedProcess(command, second.returncode, stdout, stderr))

        super().__init__(work)


def fit_epochs(backup: Path) -> int:
    """Source epochs that keras.callbacks.BackupAndRestore has saved (its metadata names the last one)."""
    try:
        return json.loads((backup / "source" / "training_metadata.json").read_text()).get("epoch", 0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def custom_epochs(backup: Path) -> int:
    """Source epochs the custom loop's backup holds: its history is written right after each epoch's checkpoint."""
    try:
        return len(json.loads((backup / "source" / "history.json").read_text())["loss"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def one_worker_env() -> dict:
    """A cluster of one worker on 127.0.0.1: --strategy multi_worker, so the shared custom step, in one process."""
    return {"TF_CONFIG": distributed.local_cluster(1)[0], "CUDA_VISIBLE_DEVICES": ""}


# Its own small base (500 source images), pretrained by each worker while the other tests run.
FINE_TUNE = ["recipes.fine_tune", "--quick", "--source-images", "500", "--head-epochs", "2", "--epochs", "2",
             "--test-images", "200"]  # fmt: skip
# self_training: the image-space student too (one, quick), so that its training and the sharded pseudo-labelling
# run; a run that reached fit under multi_worker would fail (keras#20585), and the chief's log shows the shared step.
SELF_TRAINING = ["recipes.self_training", "--quick", "--method", "noisy_student", "--unlabeled", "1000",
                 "--test-images", "250", "--scratch-epochs", "1", "--batch-size", "256"]  # fmt: skip
FIT_KILL = "test_a_killed_fit_run_resumes_at_epoch_3_with_the_same_metrics"
CUSTOM_KILL = "test_a_killed_custom_loop_run_resumes_at_epoch_3_with_the_same_metrics"
WEIGHT_TRANSFER_WORKERS = "test_two_workers_match_one_process_and_only_the_chief_writes"
SELF_TRAINING_WORKERS = "test_two_workers_run_self_training_and_only_the_chief_writes"
# name: (the tests that read it, how to start it in folder `out`, given the jobs started before it)
JOBS = {
    "one_process": (  # the reference: default strategy (fit), uninterrupted, with a backup (removed at its end)
        {WEIGHT_TRANSFER_WORKERS, FIT_KILL},
        lambda out, jobs: Job([*PYTHON, *WEIGHT_TRANSFER, "--backup-dir", str(out / "backup")], out),
    ),
    "two_workers": (
        {WEIGHT_TRANSFER_WORKERS},
        lambda out, jobs: Job([*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker"], out, workers=2),
    ),
    "fit_killed": ({FIT_KILL}, lambda out, jobs: KilledAndResumed([*PYTHON, *WEIGHT_TRANSFER], out, fit_epochs)),
    "one_worker": (  # the custom loop's reference: one worker, uninterrupted, with a backup
        {CUSTOM_KILL},
        lambda out, jobs: Job([*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker", "--backup-dir",
                               str(out / "backup")], out, extra_env=one_worker_env()),
    ),
    "custom_killed": (
        {CUSTOM_KILL},
        lambda out, jobs: KilledAndResumed([*PYTHON, *WEIGHT_TRANSFER, "--strategy", "multi_worker"], out,
                                           custom_epochs, extra_env=one_worker_env()),
    ),
    "fine_tune_two_workers": (
        {"test_fine_tune_on_two_workers_finishes_with_the_same_numbers_on_both"},
        lambda out, jobs: Job([*PYTHON, *FINE_TUNE, "--strategy", "multi_worker"], out, workers=2),
    ),
    "self_training": (  # one process, default strategy; it also caches the base that the two workers then load
        {SELF_TRAINING_WORKERS},
        lambda out, jobs: Job([*PYTHON, *SELF_TRAINING], out),
    ),
    "self_training_two_workers": (
        {SELF_TRAINING_WORKERS},
        lambda out, jobs: Job([*PYTHON, *SELF_TRAINING, "--strategy", "multi_worker"], out, workers=2,
                              after=jobs["self_training"]),
    ),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def jobs(request, tmp_path_factory):
    """Start every job that a selected test of this module reads; kill what is left at the end."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    started: dict[str, Background] = {}
    for name, (readers, start) in JOBS.items():
        if readers & selected:
            started[name] = start(tmp_path_factory.mktemp(name), started)
    yield started
    for job in started.values():
        job.kill()


def test_two_workers_match_one_process_and_only_the_chief_writes(jobs):
    one_job, job = jobs["one_process"], jobs["two_workers"]
    one_job.logs()
    assert not (one_job.out / "backup").exists()  # a finished run removes its backup
    logs, one, two = job.logs(), metrics(one_job.run_dir), metrics(job.run_dir)
    worker_dir = logs[1].split("run folder: ")[1].split("\n")[0]
    assert not Path(worker_dir).exists()  # the other worker wrote only a temporary folder, removed at exit
    assert "Epoch 1/" not in logs[0] and "epoch 1/3" in logs[0]  # the shared step's log line, not fit's
    assert abs(two["source_test_accuracy"] - one["source_test_accuracy"]) <= TOLERANCE
    for name, value in accuracies(two).items():
        assert abs(value - accuracies(one)[name]) <= TOLERANCE, (accuracies(two), accuracies(one))


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


def test_a_killed_fit_run_resumes_at_epoch_3_with_the_same_metrics(jobs):
    """weight_transfer (fit, keras.callbacks.BackupAndRestore) killed after its second source epoch and started
    again: it resumes at epoch 3 and ends exactly as the uninterrupted run of the same command."""
    killed = jobs["fit_killed"]
    epochs_at_kill, wrote_metrics, resumed = killed.result()
    assert epochs_at_kill == 2 and not wrote_metrics
    assert resumed.returncode == 0, resumed.stderr
    assert "Epoch 3/3" in resumed.stdout and "Epoch 1/3" not in resumed.stdout  # resumed at epoch 3
    assert not killed.backup.exists()  # a finished run removes its backup
    jobs["one_process"].logs()
    whole = metrics(jobs["one_process"].run_dir)
    assert metrics(killed.run_dir)["source_test_accuracy"] == whole["source_test_accuracy"]
    assert accuracies(metrics(killed.run_dir)) == accuracies(whole)


def test_a_killed_custom_loop_run_resumes_at_epoch_3_with_the_same_metrics(jobs):
    """The shared distributed step (a one-worker multi_worker run) killed after its second source epoch, started
    again: it restores the CheckpointManager's model, optimizer, epoch and RNG state, and ends exactly as an
    uninterrupted run of the same command."""
    killed = jobs["custom_killed"]
    epochs_at_kill, wrote_metrics, resumed = killed.result()
    assert epochs_at_kill == 2 and not wrote_metrics
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 3/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout  # resumed at epoch 3
    assert "Epoch 1/" not in resumed.stdout  # the shared step's log line, not fit's
    assert not killed.backup.exists()  # a finished run removes its backup
    whole = jobs["one_worker"]
    whole.logs()
    assert not (whole.out / "backup").exists()
    assert metrics(killed.run_dir)["source_test_accuracy"] == metrics(whole.run_dir)["source_test_accuracy"]
    assert accuracies(metrics(killed.run_dir)) == accuracies(metrics(whole.run_dir))


# --- fine_tune and self_training on two real workers ------------------------------------------


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


# Two workers against one process, seed 0, the same base: transfer identical (the same features); scratch and the
# student measured 0.000-0.020 apart (up to 5 of 250 test images: the student's augmentation draws differ when each
# worker augments half a batch, and the threads' float sums differ between runs).
SELF_TRAINING_TOLERANCE = 0.03


def test_two_workers_run_self_training_and_only_the_chief_writes(jobs):
    jobs["self_training"].logs()
    one, job = metrics(jobs["self_training"].run_dir), jobs["self_training_two_workers"]
    logs = job.logs()
    assert not Path(logs[1].split("run folder: ")[1].split("\n")[0]).exists()
    assert "reusing" in logs[0] and "reusing" in logs[1]  # both workers loaded the base that the first run cached
    assert "Epoch 1/" not in logs[0] and "epoch 1/1" in logs[0]  # the student's shared step, not fit
    two = metrics(job.run_dir)
    print(f"one process {accuracies(one)}, two workers {accuracies(two)}")
    assert two["variants"]["transfer"]["confusion_matrix"] == one["variants"]["transfer"]["confusion_matrix"]
    for name, value in accuracies(two).items():
        assert abs(value - accuracies(one)[name]) <= SELF_TRAINING_TOLERANCE, (accuracies(two), accuracies(one))
