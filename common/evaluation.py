"""Metrics, the transfer-vs-baseline table, plots, and the run-folder writer.

Every run writes ``runs/<recipe>/<timestamp>/`` (or ``--out``):

- ``config.json``: the resolved Config;
- ``metrics.json``: one shape for every recipe (see ``metrics_record``), written
  atomically so a crash never leaves it half-written;
- ``history.csv``: per-epoch logs of every training phase, one row per epoch;
- PNG plots and the trained model as ``model.keras``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

# --- Metrics ----------------------------------------------------------------------


def predict_labels(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Arg-max class of every image, predicted in batches."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return np.argmax(logits, axis=-1)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class (``sklearn.metrics.confusion_matrix``)."""
    from sklearn import metrics

    return metrics.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)).astype(np.int64)


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[float]:
    """Recall of every class (NaN for a class absent from ``y_true``; ``sklearn.metrics.recall_score``)."""
    from sklearn import metrics

    recall = metrics.recall_score(
        y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=np.nan
    )  # fmt: skip
    return [float(v) for v in recall]


def classification_report(model, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """Test accuracy, per-class accuracy and confusion matrix of ``model`` on (x, y)."""
    y_pred = predict_labels(model, x)
    return {
        "test_accuracy": accuracy(y, y_pred),
        "per_class_accuracy": per_class_accuracy(y, y_pred, num_classes),
        "confusion_matrix": confusion_matrix(y, y_pred, num_classes).tolist(),
    }


def mean_confidence_interval(values, z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation)."""
    values = np.asarray(values, dtype=np.float64)
    half_width = z * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half_width)


class EpochTimer(keras.callbacks.Callback):
    """Logs each epoch's wall time as ``epoch_seconds``, so it lands in the history and history.csv."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # the History callback runs after this one and records it
            logs["epoch_seconds"] = time.perf_counter() - self._start


# --- The comparison every recipe reports --------------------------------------------


def metrics_record(recipe: str, dataset: str, metric: str, baseline: str, variants: dict, seconds: float,
                   **extra) -> dict:  # fmt: skip
    """The ``metrics.json`` shape shared by every recipe (``extra`` adds top-level keys)."""
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    missing = [name for name, figures in variants.items() if metric not in figures]
    if missing:
        raise ValueError(f"variants {missing} lack the headline metric {metric!r}")
    return {
        "recipe": recipe,
        "dataset": dataset,
        "metric": metric,
        "baseline": baseline,
        "variants": variants,
        "seconds": round(seconds, 1),
        **extra,
    }


def comparison_table(record: dict) -> str:
    """A terminal table of every variant's headline metric and its gain over the baseline.

    Accuracies are shown in percent and gains in points; other metrics (MSE) as they are,
    with the gain as baseline minus variant so that a positive gain is always better.
    """
    metric, baseline = record["metric"], record["baseline"]
    is_accuracy = "accuracy" in metric
    base_value = record["variants"][baseline][metric]
    rows = [("variant", metric, f"gain vs {baseline}")]
    for name, figures in record["variants"].items():
        value = figures[metric]
        if is_accuracy:
            shown, gain = f"{100 * value:.1f}%", f"{100 * (value - base_value):+.1f} pts"
        else:
            shown, gain = f"{value:.4g}", f"{base_value - value:+.4g}"
        rows.append((name, shown, "(baseline)" if name == baseline else gain))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- Plots ------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    if not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")  # no screen needed when running from a terminal or CI
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(histories: dict[str, dict], metric: str = "accuracy", boundaries: dict[str, int] | None = None,
                         title: str = ""):  # fmt: skip
    """One line per run (and its ``val_`` twin if logged); dashed lines mark phase boundaries.

    ``histories`` maps a run name to a Keras ``History.history`` dict;
    ``boundaries`` maps a label (e.g. "start fine-tuning") to an epoch index.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                ax.plot(epochs, history[key], style, label=f"{name} ({key})")
    for label, epoch in (boundaries or {}).items():
        ax.axvline(epoch + 0.5, color="grey", linestyle=":")
        ax.annotate(label, (epoch + 0.5, ax.get_ylim()[0]), rotation=90, va="bottom", ha="right", fontsize=8)
    ax.set(xlabel="epoch", ylabel=metric, title=title or f"{metric} per epoch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix, class_names: list[str], title: str = "confusion matrix"):
    plt = _pyplot()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(class_names), 0.8 + 0.6 * len(class_names)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(results: dict[str, list[float]], class_names: list[str],
                            title: str = "test accuracy per class"):  # fmt: skip
    """Grouped bars, one group per class and one bar per variant: where a method gains or loses."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(class_names)), 4))
    width = 0.8 / max(1, len(results))
    positions = np.arange(len(class_names))
    for i, (name, values) in enumerate(results.items()):
        ax.bar(positions + (i - (len(results) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(positions, class_names, rotation=45, ha="right")
    ax.set(ylabel="test accuracy", title=title, ylim=(0, 1.15))  # headroom for the legend
    ax.legend(fontsize=8, loc="upper center", ncols=len(results))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_budget_curve(budgets: list[int], results: dict[str, list[float]], metric: str = "test accuracy"):
    """Metric against labels per class, one line per variant (log-scaled x axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in results.items():
        ax.plot(budgets, values, "o-", label=name)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set(xlabel="labels per class", ylabel=metric, title=f"{metric} against label budget")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- The run folder ---------------------------------------------------------------


def make_run_dir(recipe: str, out: str = "") -> Path:
    """``out`` if given, else ``runs/<recipe>/<YYYYmmdd-HHMMSS>`` (made unique)."""
    path = Path(out) if out else Path("runs") / recipe / time.strftime("%Y%m%d-%H%M%S")
    if not out:
        base, n = path, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_to_json)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_json(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_history_csv(path: Path, histories: dict[str, dict]) -> None:
    """One row per (phase, epoch) with every logged metric as a column."""
    keys = sorted({key for history in histories.values() for key in history})
    rows = []
    for phase, history in histories.items():
        length = max((len(values) for values in history.values()), default=0)
        for epoch in range(length):
            row = {"phase": phase, "epoch": epoch + 1}
            row.update({k: history[k][epoch] for k in keys if k in history and epoch < len(history[k])})
            rows.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["phase", "epoch", *keys])
        writer.writeheader()
        writer.writerows(rows)


def write_run(run_dir: Path, config, record: dict, histories: dict[str, dict] | None = None,
              figures: dict | None = None, model=None) -> Path:  # fmt: skip
    """Write config, history, plots and model, then ``metrics.json`` last (atomically).

    ``config`` is a dataclass; ``figures`` maps a file stem to a matplotlib figure;
    ``model`` is saved as ``model.keras``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", dataclasses.asdict(config))
    write_history_csv(run_dir / "history.csv", histories or {})
    for stem, figure in (figures or {}).items():
        figure.savefig(run_dir / f"{stem}.png", dpi=110)
        if "ipykernel" not in sys.modules:  # in Jupyter the figure stays open to be shown inline
            _pyplot().close(figure)
    if model is not None:
        model.save(run_dir / "model.keras")
    write_json_atomic(run_dir / "metrics.json", record)
    return run_dir
