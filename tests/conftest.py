"""Shared test fixtures: offline guard, a temporary run folder, and the notebook runner."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests never touch the user's cache of pretrained bases (~/.cache/transfer-recipes): quick-mode
# bases are useless for real runs. One temporary cache for the whole session, inherited by the
# subprocesses and notebook kernels the tests start.
os.environ["RECIPES_CACHE_DIR"] = tempfile.mkdtemp(prefix="recipes-test-cache-")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests run offline: any attempt to open a network connection fails loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def close_figures():
    """Tests that plot leave their figures open; close them so they do not pile up."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def execute_notebook(path: Path, timeout: int = 600) -> None:
    """Run every cell of a notebook in quick mode (``RECIPES_QUICK=1``), from the repository root."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env_before = os.environ.get("RECIPES_QUICK")
    os.environ["RECIPES_QUICK"] = "1"
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try:
        NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
    finally:
        if env_before is None:
            os.environ.pop("RECIPES_QUICK", None)
        else:
            os.environ["RECIPES_QUICK"] = env_before


def assert_cli_error(capsys, main, argv: list[str], message: str) -> str:
    """``main(argv)`` exits with status 2 and one ``error: ...`` line on stderr matching ``message``."""
    import re

    capsys.readouterr()  # drop what ran before
    with pytest.raises(SystemExit) as exit_code:
        main(argv)
    err = capsys.readouterr().err
    assert exit_code.value.code == 2, err
    assert err.startswith("error: ") and re.search(message, err), err
    return err
