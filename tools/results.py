"""``make results``: run each recipe's README experiment over its seeds, write docs/results.md, update the README.

Every README results row is declared once, in ``EXPERIMENTS`` below: the command, the seeds,
the baseline and the variants whose headline figures form the row. ``python -m tools.results``
runs each command once per seed (``--out`` a temporary folder), reads the run's
``metrics.json``, and

1. stores the per-seed figures in ``docs/results.json`` (merged: experiments not run this time
   keep their previous results),
2. renders ``docs/results.md`` from it (per seed, mean, range, time, command, date and a machine
   summary; one README row per experiment, generated here and nowhere else),
3. replaces, between the ``<!-- results-table:start -->`` / ``<!-- results-table:end -->``
   markers of README.md, each row whose first two cells match an experiment of
   docs/results.md. Rows of experiments never run by this command stay as they were.

``--only maml_sinusoid`` runs the named experiments; ``--seeds 0`` fewer seeds (the row then
says so); ``--render`` only re-renders docs/results.md and the README from docs/results.json;
``--from-runs KEY=DIR`` takes an experiment's results from run folders its exact command wrote
(checked against their config.json; the load average is then not recorded).
A full run takes about an hour on two CPU cores. tests/test_results.py checks that the README
and docs/results.md agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_MD = ROOT / "docs" / "results.md"
RESULTS_JSON = ROOT / "docs" / "results.json"
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
ROW_TAG = "<!-- readme-row:{key} -->"
SHARED_NOTE = "measured with other jobs on the cores"
QUIET_NOTE = "measured alone on the cores"
QUIET_LOAD = 2.5  # load average at or below which a run on this 2-core machine had the cores to itself


@dataclass(frozen=True)
class Figure:
    """One headline figure of a row: ``metric`` of a variant in metrics.json, shown as ``percent`` or raw."""

    metric: str
    label: str = ""
    percent: bool = True


@dataclass(frozen=True)
class Experiment:
    """A README results row: how to reproduce it and which figures of metrics.json form it."""

    key: str
    row_prefix: str  # the README row's first two cells, "| 1 | [`weight_transfer`](recipes/weight_transfer.py) |"
    description: str  # the "Default experiment" cell
    recipe: str
    args: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str
    variants: tuple[str, ...]
    figures: tuple[Figure, ...]
    lower_is_better: bool = False
    extra: dict = field(default_factory=dict)

    def command(self, seed: int | None = None) -> list[str]:
        seed_args = [] if seed is None else ["--seed", str(seed)]
        return ["python", "-m", f"recipes.{self.recipe}", *self.args, *seed_args]


ACCURACY = (Figure("test_accuracy"),)
EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "weight_transfer",
        "| 1 | [`weight_transfer`](recipes/weight_transfer.py) |",
        "CNN trained on Fashion-MNIST 0-4, conv layers copied to a CNN for classes 5-9, 10 labels per class",
        "weight_transfer",
        (),
        (0, 1, 2, 3, 4),
        "scratch",
        ("transfer", "frozen"),
        ACCURACY,
    ),
    Experiment(
        "feature_extraction",
        "| 2 | [`feature_extraction`](recipes/feature_extraction.py) |",
        "BatchNorm CNN pretrained on 0-4 (cached), frozen; a new head on cached features for 5-9, 10 labels per class",
        "feature_extraction",
        (),
        (0, 1, 2, 3, 4),
        "scratch",
        ("feature_extraction",),
        ACCURACY,
    ),
    Experiment(
        "feature_extraction_lite0",
        "| 2 | `feature_extraction`, ImageNet base |",
        "EfficientNet-Lite0 pretrained on ImageNet (offline weights), frozen, 96x96 RGB; a new head for 5-9, "
        "10 labels per class",
        "feature_extraction",
        ("--base", "efficientnet_lite0"),
        (0, 1, 2),
        "scratch",
        ("feature_extraction",),
        ACCURACY,
    ),
    Experiment(
        "fine_tune",
        "| 3 | [`fine_tune`](recipes/fine_tune.py) |",
        "the same base; head until early stopping, then its top block (4 layers) unfrozen at lr 1e-4, BatchNorm "
        "frozen; "
        "10 labels + 10 for validation per class",
        "fine_tune",
        (),
        (0, 1, 2, 3, 4),
        "scratch",
        ("fine_tune", "head_only"),
        ACCURACY,
    ),
    Experiment(
        "fine_tune_lite0",
        "| 3 | `fine_tune`, ImageNet base |",
        "EfficientNet-Lite0 (ImageNet), 96x96; head, then its top block (`top_conv`) unfrozen, BatchNorm frozen; "
        "10 + 10 labels per class",
        "fine_tune",
        ("--base", "efficientnet_lite0"),
        (0, 1, 2),
        "scratch",
        ("fine_tune", "head_only"),
        ACCURACY,
    ),
    Experiment(
        "maml_sinusoid",
        "| 4 | [`maml`](recipes/maml.py) |",
        "sinusoid regression (the MAML paper's setup), K = 10, 600 test tasks",
        "maml",
        (),
        (0,),
        "pretrained",
        ("maml",),
        (
            Figure("mse_after_1_step", "MSE 1 step", False),
            Figure("mse_after_5_steps", "5", False),
            Figure("mse_after_10_steps", "10", False),
        ),
        lower_is_better=True,
    ),
    Experiment(
        "maml_sinusoid_fomaml",
        "| 4 | `maml`, first-order |",
        "the same, first-order MAML (the inner gradients treated as constants)",
        "maml",
        ("--algorithm", "fomaml"),
        (0,),
        "pretrained",
        ("fomaml",),
        (
            Figure("mse_after_1_step", "MSE 1 step", False),
            Figure("mse_after_5_steps", "5", False),
            Figure("mse_after_10_steps", "10", False),
        ),
        lower_is_better=True,
    ),
    Experiment(
        "maml_images",
        "| 4 | `maml`, images |",
        "Fashion-MNIST 5-way, meta-train classes 0-4, meta-test 5-9, 600 episodes",
        "maml",
        ("--dataset", "fashion_mnist"),
        (0,),
        "pretrained",
        ("maml",),
        (Figure("accuracy_1_shot", "1-shot"), Figure("accuracy_5_shot", "5-shot")),
    ),
    Experiment(
        "self_training",
        "| 5 | [`self_training`](recipes/self_training.py) |",
        "the `source-cnn` base (pretrained on 0-4, cached) and Fashion-MNIST 5-9, 10 labels per class, the other "
        "29,950 training images of 5-9 unlabeled; Curriculum Labeling in feature space",
        "self_training",
        (),
        (0, 1, 2),
        "transfer",
        ("self_training", "scratch"),
        ACCURACY,
    ),
    Experiment(
        "self_training_lite0",
        "| 5 | `self_training`, ImageNet base |",
        "EfficientNet-Lite0 (ImageNet), 96x96, the same labels and pool; Curriculum Labeling in its feature space",
        "self_training",
        ("--base", "efficientnet_lite0"),
        (0, 1, 2),
        "transfer",
        ("self_training", "scratch"),
        ACCURACY,
    ),
    Experiment(
        "choose_source",
        "| 6 | [`choose_source`](recipes/choose_source.py) |",
        "Fashion-MNIST 5-9, 20 labels per class; seven candidate sources (one ImageNet) scored before training (LogME, LEEP, NCE, "
        "H-score), truth: a head on each one's features",
        "choose_source",
        (),
        (0, 1, 2),
        "scratch",
        (),
        ACCURACY,
        extra={"best_variant": True},
    ),
    Experiment(
        "domain_adaptation",
        "| 7 | [`domain_adaptation`](recipes/domain_adaptation.py) |",
        "source: 10,000 labelled Fashion-MNIST images; target: 10,000 other images of `fashion_mnist_m`, labels "
        "unused; the same small BatchNorm CNN, 600 steps",
        "domain_adaptation",
        (),
        (0, 1, 2),
        "source_only",
        ("dann", "adabn", "target_oracle"),
        ACCURACY,
    ),
    Experiment(
        "zero_shot",
        "| 9 | [`zero_shot`](recipes/zero_shot.py) |",
        "Fashion-MNIST; Pullover, Dress, Sneaker unseen, known only by 15 attributes; base pretrained on the 7 "
        "seen classes (cached); DAP and ESZSL on its features, chosen on pseudo-unseen seen classes",
        "zero_shot",
        (),
        (0, 1, 2),
        "chance",
        ("dap", "eszsl", "oracle"),
        (
            Figure("unseen_accuracy", "ZSL unseen"),
            Figure("gzsl_harmonic_mean", "GZSL H"),
            Figure("gzsl_harmonic_mean_calibrated", "H calibrated"),
        ),
    ),
)
EXPERIMENTS += (
    Experiment(
        "multi_task",
        "| 8 | [`multi_task`](recipes/multi_task.py) |",
        "one CNN trunk, a head per task: Fashion-MNIST 0-4 (30,000 labels), 5-9 (10 labels per class, the "
        "headline), 4-way rotation of every image; 1,000 steps of 32 images per task",
        "multi_task",
        (),
        (0, 1, 2),
        "single_task",
        ("sequential", "multi_task", "uncertainty", "pcgrad"),
        (Figure("test_accuracy", "5-9"), Figure("source_accuracy", "0-4")),
    ),
    Experiment(
        "multi_task_conflict",
        "| 8 | `multi_task`, `--conflict` |",
        "the same plus a harmful task: the 50 labelled 5-9 images with random labels (`--conflict`)",
        "multi_task",
        ("--conflict",),
        (0, 1, 2),
        "single_task",
        ("multi_task", "uncertainty", "pcgrad"),
        (Figure("test_accuracy", "5-9"), Figure("source_accuracy", "0-4")),
    ),
)
BY_KEY = {e.key: e for e in EXPERIMENTS}


# --- Running -------------------------------------------------------------------------


def machine_summary() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import importlib.metadata as md

    versions = {}
    for package in ("tensorflow", "keras"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "absent"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions,
            "system": f"{platform.system()} {platform.release()}"}  # fmt: skip


def run_seed(experiment: Experiment, seed: int) -> dict:
    """Run the experiment's command for one seed in a subprocess; its metrics.json plus the load average."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, *experiment.command(seed)[1:], "--out", out]
        load_before = os.getloadavg()[0]
        print("$", " ".join(experiment.command(seed)), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        record = json.loads((Path(out) / "metrics.json").read_text())
    return {"seed": seed, "load": round(max(load_before, os.getloadavg()[0]), 1), "record": record}


def recorded_run(experiment: Experiment, folder: Path) -> dict:
    """A run folder written earlier by exactly the experiment's command (checked against its config.json)."""
    config = json.loads((folder / "config.json").read_text())
    record = json.loads((folder / "metrics.json").read_text())
    declared = dict(zip(experiment.args[::2], experiment.args[1::2]))
    given = {f"--{name.replace('_', '-')}" for name in config.get("given", [])} - {"--out", "--seed"}
    mismatched = [flag for flag, value in declared.items() if str(config[flag[2:].replace("-", "_")]) != value]
    if given != set(declared) or mismatched or record["recipe"] != experiment.recipe:
        raise SystemExit(f"{folder} was not written by `{' '.join(experiment.command())}` (flags {sorted(given)})")
    return {"seed": config["seed"], "load": None, "record": record}


def run_experiment(experiment: Experiment, seeds: tuple[int, ...] | None = None, folders: list[Path] = ()) -> dict:
    seeds = seeds if seeds is not None else experiment.seeds
    runs = [recorded_run(experiment, f) for f in folders] if folders else [run_seed(experiment, s) for s in seeds]
    seeds = tuple(r["seed"] for r in runs)
    return {
        "key": experiment.key,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_summary(),
        "seeds": list(seeds),
        "runs": [
            {
                "seed": r["seed"],
                "load": r["load"],
                "seconds": r["record"]["seconds"],
                "variants": slim_variants(experiment, r["record"]),
            }
            for r in runs
        ],  # fmt: skip
    }


def slim_variants(experiment: Experiment, record: dict) -> dict:
    """The figures a row needs, per variant (metrics.json keeps the rest)."""
    names = [experiment.baseline, *experiment.variants]
    if experiment.extra.get("best_variant"):
        names = list(record["variants"])
    return {
        name: {f.metric: record["variants"][name].get(f.metric) for f in experiment.figures}
        for name in names
        if name in record["variants"]
    }


# --- Summaries and the README row ----------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def _fmt(value: float, figure: Figure) -> str:
    return f"{100 * value:.1f}%" if figure.percent else f"{value:.2f}"


def _points(value: float, figure: Figure) -> str:
    return f"{100 * value:+.1f}" if figure.percent else f"{value:+.2f}"


def resolved_variants(experiment: Experiment, result: dict) -> tuple[str, ...]:
    """The declared variants; with ``best_variant``, the non-baseline variant of highest mean headline figure."""
    if not experiment.extra.get("best_variant"):
        return experiment.variants
    figure = experiment.figures[0]
    names = [n for n in result["runs"][0]["variants"] if n != experiment.baseline]
    names = [n for n in names if all(r["variants"].get(n, {}).get(figure.metric) is not None for r in result["runs"])]
    means = {n: _stats([r["variants"][n][figure.metric] for r in result["runs"]])[0] for n in names}
    return (max(means, key=means.get),) if means else ()


def describe(experiment: Experiment, result: dict, name: str) -> str:
    """``82.1% (80.0-84.3)`` per figure, joined by " / "; the range only with more than one seed."""
    parts = []
    for figure in experiment.figures:
        values = [r["variants"][name][figure.metric] for r in result["runs"]]
        mean, low, high = _stats(values)
        spread = f" ({_fmt(low, figure)}-{_fmt(high, figure)})" if len(values) > 1 else ""
        parts.append(_fmt(mean, figure) + spread)
    return " / ".join(parts)


def gain(experiment: Experiment, result: dict, name: str) -> str:
    """The change of the first figure against the baseline: mean, and its range over seeds."""
    figure = experiment.figures[0]
    diffs = [r["variants"][name][figure.metric] - r["variants"][experiment.baseline][figure.metric]
             for r in result["runs"]]  # fmt: skip
    mean, low, high = _stats(diffs)
    spread = f", {_points(low, figure)} to {_points(high, figure)}" if len(diffs) > 1 else ""
    unit = "" if figure.percent else f" {figure.metric.split('_')[0].upper()}"
    return f"**{_points(mean, figure)}**{unit}{spread}"


def readme_row(experiment: Experiment, result: dict) -> str:
    labels = " / ".join(f.label for f in experiment.figures if f.label)
    labels = f" ({labels})" if labels else ""
    baseline = f"{experiment.baseline}: {describe(experiment, result, experiment.baseline)}{labels}"
    cells = []
    for name in resolved_variants(experiment, result):
        cells.append(f"{name} {describe(experiment, result, name)} ({gain(experiment, result, name)})")
    seconds = [r["seconds"] for r in result["runs"]]
    time = f"{min(seconds):.0f}-{max(seconds):.0f} s" if len(seconds) > 1 else f"{seconds[0]:.0f} s"
    seeds = result["seeds"]
    command = " ".join(experiment.command())
    if len(seeds) > 1:
        reproduce = f"`{command} --seed S`, S = {', '.join(map(str, seeds))}"
    else:
        reproduce = f"`{command}`" + ("" if seeds == [0] else f" `--seed {seeds[0]}`")
    loads = [r["load"] for r in result["runs"]]
    quiet = all(load is not None and load <= QUIET_LOAD for load in loads)
    return (
        f"{experiment.row_prefix} {experiment.description} | {baseline} | {'; '.join(cells)} | "
        f"{time} ({QUIET_NOTE if quiet else SHARED_NOTE}; {result['date'][:10]}) | {reproduce} |"
    )


# --- docs/results.md and the README --------------------------------------------------


def render_markdown(results: dict) -> str:
    lines = [
        "# Results of `make results`",
        "",
        "Generated by `python -m tools.results` (`make results`) from docs/results.json; do not edit by hand.",
        "Each section: the command, every seed's figures, mean and range, the run time of each seed (as the",
        "recipe measured it, with the load average), the date and the machine. The last line of each section",
        f"is the README row generated from it. A row says it ran alone when every seed's load was <= {QUIET_LOAD}.",
        "",
    ]
    for experiment in EXPERIMENTS:
        result = results.get(experiment.key)
        if result is None:
            continue
        m = result["machine"]
        lines += [
            f"## {experiment.key}",
            "",
            f"Command: `{' '.join(experiment.command())} --seed S`, S = {', '.join(map(str, result['seeds']))}",
            f"Run {result['date']} on {m['cpu']}, {m['cores']} cores, {m['system']}, Python {m['python']}, "
            f"TensorFlow {m['tensorflow']}, Keras {m['keras']}.",
            "",
        ]
        names = [experiment.baseline, *resolved_variants(experiment, result)]
        header = ["seed"] + [f"{n}: {f.metric}" for n in names for f in experiment.figures] + ["seconds", "load"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in result["runs"]:
            cells = [str(run["seed"])]
            cells += [_fmt(run["variants"][n][f.metric], f) for n in names for f in experiment.figures]
            load = "not recorded" if run["load"] is None else f"{run['load']:.1f}"
            lines.append("| " + " | ".join(cells + [f"{run['seconds']:.0f}", load]) + " |")
        means = ["mean (range)"] + [
            f"{_fmt(_stats(v)[0], f)} ({_fmt(_stats(v)[1], f)}-{_fmt(_stats(v)[2], f)})"
            for n in names
            for f in experiment.figures
            for v in [[r["variants"][n][f.metric] for r in result["runs"]]]
        ]
        seconds = [r["seconds"] for r in result["runs"]]
        if len(seconds) > 1:
            lines.append("| " + " | ".join(means + [f"{min(seconds):.0f}-{max(seconds):.0f}", ""]) + " |")
        lines += ["", "README row:", "", ROW_TAG.format(key=experiment.key), readme_row(experiment, result), ""]
    return "\n".join(lines)


def rows_from_markdown(text: str) -> dict[str, str]:
    """``{experiment key: README row}`` as docs/results.md states them."""
    rows = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = re.fullmatch(r"<!-- readme-row:([\w-]+) -->", line.strip())
        if found and i + 1 < len(lines):
            rows[found.group(1)] = lines[i + 1]
    return rows


def readme_table(text: str) -> list[str]:
    """The lines between the README's results-table markers; ``ValueError`` if the markers are missing."""
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} ... {END} markers around the results table")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n").splitlines()


def update_readme(text: str, rows: dict[str, str]) -> str:
    """README text with each row whose first two cells match an experiment replaced by that experiment's row."""
    table = readme_table(text)
    for key, row in rows.items():
        prefix = BY_KEY[key].row_prefix
        matches = [i for i, line in enumerate(table) if line.startswith(prefix)]
        if matches:
            table[matches[0]] = row
        else:  # a new row goes after the last row of the same recipe number
            number = prefix.split("|")[1]
            same = [i for i, line in enumerate(table) if line.startswith("|") and line.split("|")[1] == number]
            table.insert(same[-1] + 1 if same else len(table), row)
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    return head + START + "\n" + "\n".join(table) + "\n" + END + tail


def render(results: dict) -> None:
    RESULTS_MD.write_text(render_markdown(results))
    README.write_text(update_readme(README.read_text(), rows_from_markdown(RESULTS_MD.read_text())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated experiments: {', '.join(BY_KEY)}")
    parser.add_argument("--seeds", default="", help="comma-separated seeds in place of each experiment's own")
    parser.add_argument("--render", action="store_true", help="only re-render docs/results.md and the README")
    parser.add_argument("--from-runs", default="", metavar="KEY=DIR[,DIR]",
                        help="take KEY's results from run folders its exact command wrote (one per seed)")  # fmt: skip
    args = parser.parse_args(argv)
    wanted = [k for k in args.only.split(",") if k] or list(BY_KEY)
    unknown = [k for k in wanted if k not in BY_KEY]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(BY_KEY)}")
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if args.from_runs:
        key, _, folders = args.from_runs.partition("=")
        if key not in BY_KEY:
            parser.error(f"unknown experiment {key!r}; choose from {', '.join(BY_KEY)}")
        results[key] = run_experiment(BY_KEY[key], folders=[Path(f) for f in folders.split(",") if f])
        RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    elif not args.render:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s) or None
        for key in wanted:
            results[key] = run_experiment(BY_KEY[key], seeds)
            RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")  # after each: a crash keeps what ran
    render(results)
    print(f"wrote {RESULTS_MD.relative_to(ROOT)}, {RESULTS_JSON.relative_to(ROOT)} and the README table")


if __name__ == "__main__":
    main()
