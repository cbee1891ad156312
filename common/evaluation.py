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
import math
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
    return text_table(rows)


def budget_table(budgets: list[int], accuracies: dict[str, list[float]], baseline: str) -> str:
    """Test accuracy (percent) of every variant at every label budget, with each variant's gain over ``baseline``.

    ``accuracies``: {variant: [accuracy in [0, 1] at each of ``budgets``]}.
    """
    names = list(accuracies)
    rows = [("labels/class", *names, *[f"{name} vs {baseline}" for name in names if name != baseline])]
    for i, budget in enumerate(budgets):
        shown = [f"{100 * accuracies[name][i]:.1f}%" for name in names]
        gains = [
            f"{100 * (accuracies[name][i] - accuracies[baseline][i]):+.1f} pts" for name in names if name != baseline
        ]
        rows.append((str(budget), *shown, *gains))
    return text_table(rows)


def text_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of strings as left-aligned columns, the first row the header, a dashed rule under it."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# --- Plots ------------------------------------------------------------------------


def _in_jupyter_kernel() -> bool:
    """Running inside a Jupyter (IPython) kernel; ``ipykernel`` merely imported (nbclient does) does not count."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _pyplot():
    import matplotlib

    if not os.environ.get("MPLBACKEND") and not _in_jupyter_kernel():
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


def plot_labelled_scatter(points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str = "",
                          reference: tuple[str, float] | None = None):  # fmt: skip
    """One point per name at ``(x, y)``, labelled; ``reference`` = (label, y) draws a dashed horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in points.items():
        ax.scatter(x, y, color="tab:blue")
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    if reference is not None:
        ax.axhline(reference[1], color="grey", linestyle="--", label=reference[0])
        ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.ticklabel_format(axis="x", useOffset=False)  # nearly equal scores: their values, not an offset
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- The run folder ---------------------------------------------------------------


def make_run_dir(recipe: str, out: str = "") -> Path:
    """``out`` if given, else ``runs/<recipe>/<YYYYmmdd-HHMMSS>`` (made unique).

    In a multi-worker run only the chief gets that folder; another worker gets a temporary
    folder removed at exit (TensorFlow's convention: non-chief workers write nowhere else).
    """
    from common import distributed

    if not distributed.is_chief():
        return distributed.worker_temp_dir(recipe)
    path = Path(out) if out else Path("runs") / recipe / time.strftime("%Y%m%d-%H%M%S")
    if not out:
        base, n = path, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, data) -> None:
    """Write strict JSON (RFC 8259: no NaN or Infinity) to a temporary file in the same folder,
    then rename it over ``path``. A non-finite float becomes ``null``; when ``data`` is a dict,
    its key ``null_values`` then lists where (``"a.b[2]"``) and why, for strict parsers
    (``JSON.parse``, ``jq``, Go, Java) that reject Python's bare ``NaN``."""
    path = Path(path)
    nulls = {}
    data = _finite(data, "", nulls)
    if nulls and isinstance(data, dict):
        data = {**data, "null_values": {**data.get("null_values", {}), **nulls}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_to_json, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value, where: str, nulls: dict):
    """``value`` with every NaN / Infinity float (Python or NumPy, at any depth) replaced by None,
    each recorded in ``nulls`` as ``{where: reason}``."""
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), nulls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", nulls) for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist(), where, nulls)
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        nulls[where] = "no value: nothing to compute it from (e.g. a class absent from the test images)" if math.isnan(value) else f"{float(value)} (not representable in JSON)"  # fmt: skip
        return None
    return value


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
        if not _in_jupyter_kernel():  # in Jupyter the figure stays open to be shown inline
            _pyplot().close(figure)
    if model is not None:
        model.save(run_dir / "model.keras")
    write_json_atomic(run_dir / "metrics.json", record)
    return run_dir


# --- Domain adaptation: how far apart two domains are in a feature space -----------


def gap_closed(accuracy: float, baseline: float, ceiling: float) -> float:
    """Share of the baseline-to-ceiling gap an accuracy closes: 0 = the baseline, 1 = the ceiling (nan if equal).

    E.g. domain adaptation: baseline = source only, ceiling = trained on target labels.
    """
    return (accuracy - baseline) / (ceiling - baseline) if ceiling != baseline else float("nan")


def proxy_a_distance(source_features: np.ndarray, target_features: np.ndarray, seed: int = 0,
                     max_per_domain: int = 2000) -> dict:  # fmt: skip
    """Proxy A-distance ``2 (1 - 2 err)`` between two sets of features (Ben-David et al. 2007).

    ``err`` is the test error of a linear domain classifier (scikit-learn
    ``LinearSVC`` on standardised features, as in Ganin et al. 2016, section 5.2.4) trained
    to tell source from target on half of the examples and tested on the other half. Up to
    ``max_per_domain`` feature vectors (N, D) of each domain are used, as many from each,
    drawn with ``seed``. 2.0: the domains are perfectly separable; 0: a coin flip
    (negative values, slightly worse than chance, are reported as they are).
    Returns ``{"proxy_a_distance", "domain_error"}``.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(seed)
    n = min(len(source_features), len(target_features), max_per_domain)
    source = np.asarray(source_features)[rng.choice(len(source_features), n, replace=False)]
    target = np.asarray(target_features)[rng.choice(len(target_features), n, replace=False)]
    x = np.concatenate([source, target]).reshape(2 * n, -1)
    domain = np.concatenate([np.zeros(n), np.ones(n)])
    x_fit, x_held, d_fit, d_held = train_test_split(x, domain, test_size=0.5, stratify=domain, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=5000, random_state=seed))
    classifier.fit(x_fit, d_fit)
    error = float(np.mean(classifier.predict(x_held) != d_held))
    return {"proxy_a_distance": 2.0 * (1.0 - 2.0 * error), "domain_error": error}


def plot_feature_projection(panels: dict[str, tuple[np.ndarray, np.ndarray]], method: str = "pca", seed: int = 0,
                            labels: tuple[str, str] = ("source", "target")):  # fmt: skip
    """Side-by-side 2-D projections of source and target features, one panel per model.

    ``panels`` maps a title (e.g. "source_only", "dann") to (source_features, target_features),
    arrays (N, D). ``method``: ``"pca"`` (scikit-learn PCA, fitted per panel on both domains)
    or ``"tsne"`` (scikit-learn TSNE, slower). Overlapping clouds mean aligned domains.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in ("pca", "tsne"):
        raise ValueError(f"unknown projection {method!r}; choose pca or tsne")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, (source, target)) in zip(axes[0], panels.items()):
        both = np.concatenate([source, target]).reshape(len(source) + len(target), -1)
        if method == "pca":
            points = PCA(n_components=2, random_state=seed).fit_transform(both)
        else:
            points = TSNE(n_components=2, init="pca", random_state=seed).fit_transform(both)
        ax.scatter(*points[: len(source)].T, s=4, alpha=0.5, label=labels[0])
        ax.scatter(*points[len(source) :].T, s=4, alpha=0.5, label=labels[1])
        ax.set(title=title, xticks=[], yticks=[])
        ax.legend(fontsize=8, markerscale=3)
    fig.suptitle(f"features of the two domains ({method.upper()})")
    fig.tight_layout()
    return fig


# --- Zero-shot learning: which attributes carry the result ----------------------------


def plot_attribute_ablation(attributes: list[str], changes: dict[str, list[float]],
                            title: str = "drop-one attribute ablation"):  # fmt: skip
    """Horizontal grouped bars: the change of a metric (points) when each attribute is left out, per method.

    ``changes`` maps a method name to one value per attribute (accuracy without it minus accuracy with
    all, in [-1, 1]); a long bar to the left marks an attribute the method leans on.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(attributes)))
    height = 0.8 / max(1, len(changes))
    positions = np.arange(len(attributes))
    for i, (name, values) in enumerate(changes.items()):
        ax.barh(positions + (i - (len(changes) - 1) / 2) * height, 100 * np.asarray(values), height, label=name)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(positions, attributes)
    ax.invert_yaxis()
    ax.set(xlabel="change of unseen-class accuracy without the attribute (points)", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
