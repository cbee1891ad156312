"""tools/results.py (``make results``): the README table agrees with docs/results.md, and rows regenerate."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT
from tools import results


def fake_result(key: str, seeds=(0, 1)) -> dict:
    experiment = results.BY_KEY[key]
    runs = []
    for i, seed in enumerate(seeds):
        variants = {}
        for j, name in enumerate([experiment.baseline, *experiment.variants]):
            variants[name] = {f.metric: 0.5 + 0.1 * j + 0.01 * i for f in experiment.figures}
        runs.append({"seed": seed, "load": 2.0, "seconds": 40.0 + i, "variants": variants})
    machine = {"cpu": "test cpu", "cores": 2, "python": "3.11", "tensorflow": "2.21", "keras": "3.15", "system": "x"}
    return {"key": key, "date": "2026-11-30 07:00 UTC", "machine": machine, "seeds": list(seeds), "runs": runs}


def test_readme_table_agrees_with_docs_results():
    """Every row docs/results.md generated is, word for word, the README's row for that experiment."""
    readme = (ROOT / "README.md").read_text()
    table = results.readme_table(readme)
    for experiment in results.EXPERIMENTS:  # every declared experiment names at most one README row
        assert sum(line.startswith(experiment.row_prefix) for line in table) <= 1, experiment.row_prefix
    if not results.RESULTS_MD.exists():
        pytest.skip("docs/results.md not generated yet (make results)")
    rows = results.rows_from_markdown(results.RESULTS_MD.read_text())
    assert rows, "docs/results.md has no README rows"
    for key, row in rows.items():
        assert row in table, f"README row for {key} differs from docs/results.md; run python -m tools.results --render"


def test_docs_results_md_is_rendered_from_results_json():
    if not results.RESULTS_JSON.exists():
        pytest.skip("docs/results.json not generated yet (make results)")
    stored = json.loads(results.RESULTS_JSON.read_text())
    assert results.RESULTS_MD.read_text() == results.render_markdown(stored)


def test_row_states_mean_range_gain_time_and_command():
    result = fake_result("weight_transfer")
    row = results.readme_row(results.BY_KEY["weight_transfer"], result)
    assert row.startswith("| 1 | [`weight_transfer`](recipes/weight_transfer.py) |")
    assert "scratch: 50.5% (50.0%-51.0%)" in row
    assert "transfer 60.5% (60.0%-61.0%) (**+10.0**, +10.0 to +10.0)" in row
    assert "40-41 s" in row and "`python -m recipes.weight_transfer --seed S`, S = 0, 1" in row
    assert row.count("|") == 8  # seven cells


def test_lower_is_better_rows_show_the_change_of_the_metric():
    result = fake_result("maml_sinusoid", seeds=(0,))
    row = results.readme_row(results.BY_KEY["maml_sinusoid"], result)
    assert "pretrained: 0.50 / 0.50 / 0.50 (MSE 1 step / 5 / 10)" in row
    assert "maml 0.60 / 0.60 / 0.60 (**+0.10** MSE)" in row
    assert "`python -m recipes.maml` |" in row


def test_update_readme_replaces_only_rows_that_have_results():
    text = "intro\n" + results.START + "\n| # | h |\n|---|---|\n" + "\n".join(
        e.row_prefix + " old |" for e in results.EXPERIMENTS
    ) + "\n" + results.END + "\noutro\n"  # fmt: skip
    new_row = results.readme_row(results.BY_KEY["fine_tune"], fake_result("fine_tune"))
    updated = results.update_readme(text, {"fine_tune": new_row})
    table = results.readme_table(updated)
    assert new_row in table and results.BY_KEY["fine_tune"].row_prefix + " old |" not in table
    assert results.BY_KEY["weight_transfer"].row_prefix + " old |" in table  # untouched
    assert updated.startswith("intro\n") and updated.endswith("outro\n")
    assert results.update_readme(updated, {"fine_tune": new_row}) == updated  # idempotent
    # a row the README lacks goes after the last row of its recipe number
    shortened = text.replace(results.BY_KEY["maml_images"].row_prefix + " old |\n", "")
    images_row = results.readme_row(results.BY_KEY["maml_images"], fake_result("maml_images", seeds=(0,)))
    table = results.readme_table(results.update_readme(shortened, {"maml_images": images_row}))
    assert table.index(images_row) == table.index(results.BY_KEY["maml_sinusoid_fomaml"].row_prefix + " old |") + 1


def test_markdown_round_trip_and_missing_markers():
    stored = {"maml_sinusoid": fake_result("maml_sinusoid", seeds=(0,)), "fine_tune": fake_result("fine_tune")}
    text = results.render_markdown(stored)
    rows = results.rows_from_markdown(text)
    assert set(rows) == {"maml_sinusoid", "fine_tune"}
    assert rows["fine_tune"] == results.readme_row(results.BY_KEY["fine_tune"], stored["fine_tune"])
    assert "| mean (range) |" in text and "test cpu, 2 cores" in text
    assert text.count("| mean (range) |") == 1  # one seed: no mean row
    with pytest.raises(ValueError, match="results-table"):
        results.readme_table("no markers here")


def test_best_variant_rows_pick_the_highest_mean():
    result = fake_result("choose_source")
    for run in result["runs"]:
        run["variants"] |= {
            "a": {"test_accuracy": 0.7},
            "b": {"test_accuracy": 0.9},
            "untrained": {"test_accuracy": None},
        }
    row = results.readme_row(results.BY_KEY["choose_source"], result)
    assert "b 90.0%" in row and "a 70.0%" not in row


def test_recorded_runs_must_come_from_the_declared_command(tmp_path):
    experiment = results.BY_KEY["maml_images"]
    metrics = {"recipe": "maml", "seconds": 500.0, "variants": {n: {"accuracy_1_shot": 0.5, "accuracy_5_shot": 0.7}
                                                                  for n in ("pretrained", "maml")}}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "config.json").write_text(
        json.dumps({"seed": 0, "dataset": "fashion_mnist", "given": ["dataset", "out"]})
    )
    result = results.run_experiment(experiment, folders=[tmp_path])
    assert result["seeds"] == [0] and result["runs"][0]["load"] is None
    assert "| 500 | not recorded |" in results.render_markdown({"maml_images": result})
    (tmp_path / "config.json").write_text(
        json.dumps({"seed": 0, "dataset": "fashion_mnist", "given": ["dataset", "ways"]})
    )
    with pytest.raises(SystemExit, match="was not written by"):
        results.run_experiment(experiment, folders=[tmp_path])


def test_a_row_says_alone_only_when_every_seed_ran_on_quiet_cores():
    experiment = results.BY_KEY["weight_transfer"]
    result = fake_result("weight_transfer")  # loads 2.0: quiet on two cores
    assert results.QUIET_NOTE in results.readme_row(experiment, result)
    result["runs"][1]["load"] = 7.5
    assert results.SHARED_NOTE in results.readme_row(experiment, result)
    result["runs"][1]["load"] = None  # taken from run folders: unknown, so not claimed quiet
    assert results.SHARED_NOTE in results.readme_row(experiment, result)
