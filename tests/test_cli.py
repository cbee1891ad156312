"""Unit tests of common.cli: Config dataclass -> argparse, --quick, seeding, strategies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf

from common.cli import (
    DEBUG_ENV,
    InputError,
    RecipeConfig,
    build_parser,
    knob,
    make_strategy,
    parse_config,
    run_cli,
    set_seed,
)


@dataclass
class DemoConfig(RecipeConfig):
    """A demo recipe."""

    epochs: int = knob(5, "Epochs per phase.")
    learning_rate: float = knob(1e-3, "Adam learning rate.")
    dataset: str = knob("fashion_mnist", "Dataset name.")
    augment: bool = knob(False, "Augment the training images.")

    QUICK = dict(epochs=1)


def test_every_field_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit) as exit_code:
        build_parser(DemoConfig).parse_args(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    for flag, help_text in [
        ("--epochs", "Epochs per phase."),
        ("--learning-rate", "Adam learning rate."),
        ("--augment", "Augment the training images."),
        ("--seed", "Seed for data sampling"),
        ("--out", "Run folder"),
        ("--quick", "Tiny settings"),
        ("--strategy", "default | mirrored"),
    ]:
        assert flag in text and help_text in text
    assert "A demo recipe." in text and "(default: 5)" in text


def test_parse_config_types_and_bools():
    config = parse_config(DemoConfig, ["--epochs", "7", "--learning-rate", "0.1", "--augment", "--seed", "3"])
    assert config == DemoConfig(epochs=7, learning_rate=0.1, augment=True, seed=3)
    assert parse_config(DemoConfig, ["--no-augment"]).augment is False
    assert parse_config(DemoConfig, []) == DemoConfig()
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--epochs", "many"])


def test_quick_overrides_and_strategy_check():
    assert DemoConfig(quick=True).resolved().epochs == 1
    assert DemoConfig(epochs=9).resolved().epochs == 9
    with pytest.raises(ValueError, match="unknown strategy 'tpu'; choose one of default, mirrored"):
        DemoConfig(strategy="tpu").resolved()


def test_set_seed_makes_runs_repeatable():
    set_seed(7)
    first = (np.random.random(3), tf.random.uniform((3,)).numpy())
    set_seed(7)
    second = (np.random.random(3), tf.random.uniform((3,)).numpy())
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_make_strategy():
    assert make_strategy("default") is tf.distribute.get_strategy()
    assert make_strategy("mirrored").num_replicas_in_sync >= 1
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("nope")


def test_quick_never_overrides_a_flag_the_user_gave():
    """--quick changes only what the user left at its default, on the command line or in Config()."""
    assert parse_config(DemoConfig, ["--quick", "--epochs", "9"]).resolved().epochs == 9
    # Given explicitly, even at the default value, the flag wins over --quick.
    assert parse_config(DemoConfig, ["--quick", "--epochs", "5"]).resolved().epochs == 5
    assert parse_config(DemoConfig, ["--quick"]).resolved().epochs == 1
    assert DemoConfig(quick=True, epochs=9).resolved().epochs == 9
    assert parse_config(DemoConfig, ["--quick", "--epochs", "9"]).given == ("epochs", "quick")


def _demo_run(config):
    if config.dataset == "bug":
        raise KeyError("a bug, not bad input")
    raise InputError(f"unknown dataset {config.dataset!r}; choose one of fashion_mnist, digits")


def test_run_cli_reports_bad_input_in_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_code:
        run_cli(DemoConfig, _demo_run, ["--dataset", "no_such_data"])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unknown dataset 'no_such_data'; choose one of fashion_mnist, digits\n"
    # --debug, or RECIPES_DEBUG=1, keeps the traceback; bugs always keep it.
    with pytest.raises(InputError, match="no_such_data"):
        run_cli(DemoConfig, _demo_run, ["--dataset", "no_such_data", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(InputError, match="no_such_data"):
        run_cli(DemoConfig, _demo_run, ["--dataset", "no_such_data"])
    with pytest.raises(KeyError):
        run_cli(DemoConfig, _demo_run, ["--dataset", "bug"])


def test_an_option_only_other_choices_read_is_refused_but_quick_values_are_not_counted():
    reads = {"fast": ("epochs",), "careful": ("epochs", "augment"), "plain": ()}
    DemoConfig(quick=True).resolved().refuse_unread("mode", "plain", reads)  # --quick set epochs=1: not the user
    assert parse_config(DemoConfig, ["--epochs", "5"]).was_set("epochs")  # given, even at the default value
    with pytest.raises(InputError, match=r"--mode plain does not read --augment, --epochs; drop them \(--mode careful does\)"):  # fmt: skip
        DemoConfig(epochs=3, augment=True).refuse_unread("mode", "plain", reads)
    with pytest.raises(InputError, match=r"--mode fast does not read --augment; drop it \(--mode careful does\)$"):
        DemoConfig(augment=True).refuse_unread("mode", "fast", reads)
