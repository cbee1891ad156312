"""Unit tests of common.evaluation: metrics, the comparison table, plots, the run folder."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest

from common import evaluation

RECORD = evaluation.metrics_record(
    "demo",
    "toy",
    "test_accuracy",
    "scratch",
    {"scratch": {"test_accuracy": 0.81}, "transfer": {"test_accuracy": 0.855}},
    seconds=12.34,
    budgets=[10],
)


def test_accuracy_confusion_and_per_class():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    assert evaluation.accuracy(y_true, y_pred) == pytest.approx(0.6)
    matrix = evaluation.confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert evaluation.per_class_accuracy(y_true, y_pred, 3) == [0.5, 1.0, 0.0]
    assert np.isnan(evaluation.per_class_accuracy(y_true, y_pred, 4)[3])


def test_classification_report_of_a_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)])
    model.layers[0].set_weights([np.eye(2, dtype=np.float32)])  # predicts the larger coordinate
    x = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    report = evaluation.classification_report(model, x, np.array([0, 1, 1]), 2)
    assert report["test_accuracy"] == pytest.approx(2 / 3)
    assert report["confusion_matrix"] == [[1, 0], [1, 1]]


def test_mean_confidence_interval():
    mean, half = evaluation.mean_confidence_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(1.96 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_metrics_record_shape_and_checks():
    assert RECORD == {
        "recipe": "demo",
        "dataset": "toy",
        "metric": "test_accuracy",
        "baseline": "scratch",
        "variants": {"scratch": {"test_accuracy": 0.81}, "transfer": {"test_accuracy": 0.855}},
        "seconds": 12.3,
        "budgets": [10],
    }
    with pytest.raises(ValueError, match="baseline 'pretrained' is not one of the variants"):
        evaluation.metrics_record("d", "t", "test_accuracy", "pretrained", {"a": {"test_accuracy": 1}}, 0)
    with pytest.raises(ValueError, match="lack the headline metric"):
        evaluation.metrics_record("d", "t", "mse", "a", {"a": {"mse": 1}, "b": {}}, 0)


def test_comparison_table_shows_gain_in_points():
    table = evaluation.comparison_table(RECORD)
    assert "scratch   81.0%" in table and "(baseline)" in table
    assert "transfer  85.5%" in table and "+4.5 pts" in table
    worse = dict(RECORD, variants={"scratch": {"test_accuracy": 0.8}, "transfer": {"test_accuracy": 0.7}})
    assert "-10.0 pts" in evaluation.comparison_table(worse)  # a negative gain is shown, not hidden


def test_comparison_table_for_a_loss_metric():
    record = evaluation.metrics_record(
        "m", "s", "mse", "pretrained", {"pretrained": {"mse": 2.0}, "maml": {"mse": 0.5}}, 1
    )
    assert "+1.5" in evaluation.comparison_table(record)  # lower is better: gain = baseline - variant


def test_plots_return_figures():
    curves = evaluation.plot_learning_curves(
        {"a": {"accuracy": [0.1, 0.5], "val_accuracy": [0.2, 0.4]}}, boundaries={"fine-tune": 1}
    )
    assert len(curves.axes[0].lines) == 3  # two curves and the phase boundary
    assert evaluation.plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"]).axes
    assert evaluation.plot_budget_curve([10, 50], {"scratch": [0.7, 0.8]}).axes
    bars = evaluation.plot_per_class_accuracy({"scratch": [0.5, 0.9], "transfer": [0.6, 0.8]}, ["a", "b"]).axes[0]
    assert [round(p.get_height(), 1) for p in bars.patches] == [0.5, 0.9, 0.6, 0.8]


def test_make_run_dir_default_is_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = evaluation.make_run_dir("demo"), evaluation.make_run_dir("demo")
    assert first != second and first.parent == second.parent == tmp_path.joinpath("runs", "demo").relative_to(tmp_path)
    assert evaluation.make_run_dir("demo", str(tmp_path / "mine")) == tmp_path / "mine"


@dataclass
class ToyConfig:
    seed: int = 0
    note: str = "x"


def test_write_run_writes_every_artifact(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    histories = {"phase1": {"loss": [1.0, 0.5], "accuracy": [0.5, 0.7]}, "phase2": {"loss": [0.4]}}
    figure = evaluation.plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"])
    run_dir = evaluation.write_run(tmp_path / "run", ToyConfig(), RECORD, histories, {"cm": figure}, model)
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 0, "note": "x"}
    assert json.loads((run_dir / "metrics.json").read_text()) == RECORD
    assert (run_dir / "cm.png").stat().st_size > 1000
    assert not evaluation._pyplot().fignum_exists(figure.number)  # saved, then closed: no leak across runs
    assert keras.models.load_model(run_dir / "model.keras").output_shape == (None, 2)
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    assert [(r["phase"], r["epoch"]) for r in rows] == [("phase1", "1"), ("phase1", "2"), ("phase2", "1")]
    assert rows[1]["accuracy"] == "0.7" and rows[2]["accuracy"] == ""


def test_write_json_atomic_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "metrics.json"
    evaluation.write_json_atomic(path, {"ok": np.float32(0.5), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"ok": 0.5, "n": 3}
    with pytest.raises(TypeError):
        evaluation.write_json_atomic(path, {"ok": 1, "broken": object()})  # fails mid-write
    assert json.loads(path.read_text()) == {"ok": 0.5, "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_epoch_timer_logs_epoch_seconds():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    history = model.fit(np.ones((8, 2)), np.ones(8), epochs=3, verbose=0, callbacks=[evaluation.EpochTimer()])
    assert len(history.history["epoch_seconds"]) == 3 and all(t > 0 for t in history.history["epoch_seconds"])


def test_text_table_and_labelled_scatter():
    table = evaluation.text_table([("name", "score"), ("a", "1.0"), ("longer", "-2")])
    assert table.splitlines() == ["name    score", "------  -----", "a       1.0", "longer  -2"]
    fig = evaluation.plot_labelled_scatter({"a": (1.0, 90.0), "b": (2.0, 80.0)}, "score", "accuracy",
                                           reference=("scratch", 85.0))  # fmt: skip
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["a", "b"] and ax.get_legend() is not None


def test_gap_closed():
    assert evaluation.gap_closed(0.6, baseline=0.4, ceiling=0.8) == pytest.approx(0.5)
    assert evaluation.gap_closed(0.3, baseline=0.4, ceiling=0.8) == pytest.approx(-0.25)  # worse than the baseline
    assert np.isnan(evaluation.gap_closed(0.5, baseline=0.5, ceiling=0.5))


def test_metrics_json_is_strict_and_says_where_values_are_missing(tmp_path):
    path = Path(tmp_path) / "metrics.json"
    evaluation.write_json_atomic(path, {"a": float("nan"), "b": [1.0, np.float32("inf")], "c": {"d": np.nan}})
    written = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert written["a"] is None and written["b"] == [1.0, None] and written["c"]["d"] is None
    assert set(written["null_values"]) == {"a", "b[1]", "c.d"}
