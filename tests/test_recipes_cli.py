"""Every recipe, run as a command: --help works, and bad input ends in one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_recipe(name: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "RECIPES_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", f"recipes.{name}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("name", RECIPES)
def test_unknown_dataset_is_one_line_and_exit_status_2(name, tmp_path):
    result = run_recipe(name, "--dataset", "no_such_data", "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: unknown dataset 'no_such_data'; choose one of" in result.stderr
    assert not (tmp_path / "run").exists()


def test_debug_keeps_the_traceback(tmp_path):
    result = run_recipe("weight_transfer", "--dataset", "no_such_data", "--debug", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr and "InputError" in result.stderr
