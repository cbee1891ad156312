"""Turn a recipe's ``Config`` dataclass into a command line, and set up a run.

Every recipe declares its knobs once, as a dataclass whose fields carry a default
and a one-line help text (``knob(default, "help")``). ``parse_config`` builds the
argparse parser from it, so ``python -m recipes.<name> --help`` documents every
field, and a notebook builds the same ``Config(...)`` directly.

Bad input (a flag value, a missing file, a folder or model that cannot be used) is
raised as :class:`InputError`; ``run_cli`` prints it as one ``error: ...`` line on
stderr and exits with status 2, as argparse does for a bad flag. ``--debug`` (or
``RECIPES_DEBUG=1``) shows the full traceback instead. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.errors import InputError, MissingInputError  # noqa: F401  (re-exported for recipes)

STRATEGIES = ("default", "mirrored", "multi_worker")
DEBUG_ENV = "RECIPES_DEBUG"


def knob(default: Any, help: str, minimum: float | None = None, maximum: float | None = None) -> Any:
    """A dataclass field with its default and the help text that ``--help`` shows.

    ``minimum`` / ``maximum`` (inclusive) bound a number: ``RecipeConfig.resolved()`` raises
    ``InputError`` naming the flag for a value outside them, before anything is loaded.
    """
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum})


@dataclass
class RecipeConfig:
    """Flags that every recipe shares; a recipe's ``Config`` subclasses this."""

    seed: int = knob(0, "Seed for data sampling, weight init and shuffling.", minimum=0)
    out: str = knob("", "Run folder; default runs/<recipe>/<timestamp>.")
    quick: bool = knob(False, "Tiny settings for smoke tests and CI; never overrides a flag you give.")
    strategy: str = knob(
        "default",
        "tf.distribute strategy: default | mirrored (all local GPUs, else CPU) | multi_worker (hosts listed in the "
        "TF_CONFIG environment variable; see README 'More than one machine').",
    )
    backup_dir: str = knob(
        "", "Back up every training phase here each epoch; the same command resumes a killed run (removed at the end)."
    )
    debug: bool = knob(False, f"Show the full traceback of an input error (or set {DEBUG_ENV}=1).")
    # Fields given on the command line (filled by parse_config); --quick leaves them alone.
    given: tuple[str, ...] = field(default=(), compare=False, repr=False, metadata={"cli": False})

    # Field overrides applied by --quick; each recipe sets its own.
    QUICK: ClassVar[dict[str, Any]] = {}
    # Whether the recipe trains through common.distributed (multi_worker) and honours --backup-dir.
    MULTI_WORKER: ClassVar[bool] = False
    BACKUP: ClassVar[bool] = False

    def was_set(self, name: str) -> bool:
        """Whether the user set option ``name``: on the command line (``given``), or in
        ``Config(...)`` to a value other than its default and other than ``--quick``'s."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        value = getattr(self, name)
        return name in self.given or (value != default and not (self.quick and self.QUICK.get(name) == value))

    def refuse_unread(self, flag: str, choice: str, reads: dict[str, tuple[str, ...]]) -> None:
        """``InputError`` when an option set by the user (``was_set``) is read only under other
        values of ``--flag`` than ``choice``. ``reads``: {value of --flag: the field names it reads,
        of those that not every value reads}, e.g. {"curriculum": ("fractions",), ...}."""
        unread = sorted(n for n in set().union(*reads.values()) - set(reads[choice]) if self.was_set(n))
        if not unread:
            return
        readers = [value for value, names in reads.items() if set(unread) <= set(names)]
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        raise InputError(f"--{flag} {choice} does not read {flags}; drop {'them' if len(unread) > 1 else 'it'}"
                         + (f" (--{flag} {' or '.join(readers)} does)" if readers else ""))  # fmt: skip

    def resolved(self) -> RecipeConfig:
        """This config with the ``--quick`` overrides applied, and its values checked.

        ``--quick`` changes only the fields the user did not set: a field given on the
        command line, or set in ``Config(...)`` to something other than its default, keeps
        its value. A number outside its knob's ``minimum``/``maximum`` is an ``InputError``.
        """
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        recipe = type(self).__module__.rpartition(".")[2]
        if self.strategy == "multi_worker" and not self.MULTI_WORKER:
            raise InputError(
                f"{recipe} does not support --strategy multi_worker yet: its training does not run through "
                "common.distributed.train, the one path that works under MultiWorkerMirroredStrategy (Keras 3's "
                "fit fails there, keras-team/keras#20585); use --strategy default or mirrored"
            )
        if self.backup_dir and not self.BACKUP:
            raise InputError(f"{recipe} does not support --backup-dir yet; run it without the flag")
        config = self
        if self.quick:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            overrides = {
                name: value
                for name, value in self.QUICK.items()
                if name not in self.given and getattr(self, name) == defaults[name]
            }
            config = dataclasses.replace(self, **overrides)
        for f in dataclasses.fields(config):
            value, low, high = getattr(config, f.name), f.metadata.get("minimum"), f.metadata.get("maximum")
            flag = "--" + f.name.replace("_", "-")
            if low is not None and value < low:
                raise InputError(f"{flag} {value}: must be at least {low}")
            if high is not None and value > high:
                raise InputError(f"{flag} {value}: must be at most {high}")
        return config


def _flag_type(annotation: Any) -> Any:
    # Annotations are strings under `from __future__ import annotations`.
    return {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)


def _cli_fields(config_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli", True)]


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per field of ``config_cls``."""
    parser = argparse.ArgumentParser(
        description=description or config_cls.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    for f in _cli_fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints.get(f.name, f.type))
        help_text = f.metadata.get("help", "")
        low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
        if low is not None and high is not None:
            help_text += f" ({low} to {high})"
        elif low is not None or high is not None:
            help_text += f" (at least {low})" if low is not None else f" (at most {high})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text, metavar=f.name.upper())
    return parser


def parse_config(config_cls: type, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a ``config_cls`` instance.

    The instance's ``given`` lists the fields named on the command line, which ``--quick``
    does not override.
    """
    parser = build_parser(config_cls, description)
    args = vars(parser.parse_args(argv))
    # A second parse with every default suppressed leaves only what the user typed.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = tuple(sorted(vars(parser.parse_args(argv))))
    return config_cls(**args, given=given)


def run_cli(config_cls: type, run: Callable, argv: list[str] | None = None, description: str | None = None):
    """A recipe's ``main``: parse the flags, ``run(config)``, and report bad input in one line.

    An :class:`InputError` prints ``error: <message>`` on stderr and exits with status 2
    (argparse's convention), unless ``--debug`` or ``RECIPES_DEBUG=1`` asks for the
    traceback. Other exceptions are bugs and propagate with their traceback.
    """
    config = parse_config(config_cls, argv, description)
    try:
        return run(config)
    except InputError as error:
        if config.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_budgets(budgets: str, labels_per_class: int) -> list[int]:
    """``--budgets '10,50,200'`` -> [10, 50, 200] (sorted, each >= 1); ``''`` -> [labels_per_class].

    Raises ``InputError`` naming the flag for anything else.
    """
    if not budgets:
        return [labels_per_class]
    try:
        parsed = sorted({int(b) for b in budgets.split(",")})
    except ValueError:
        raise InputError(f"cannot read --budgets {budgets!r}; write e.g. '10,50,200'") from None
    if parsed[0] < 1:
        raise InputError(f"--budgets {budgets!r}: every budget must be at least 1 label per class")
    return parsed


def set_seed(seed: int) -> None:
    """The one seeding block: Python, NumPy and TensorFlow, and deterministic TF ops.

    Same seed, same data split, same initial weights, same metrics.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_strategy(name: str, timeout: float | None = None):
    """``tf.distribute`` strategy by name; ``mirrored`` uses every visible GPU, or the CPU devices.

    ``multi_worker``: ``MultiWorkerMirroredStrategy`` with the cluster read from ``TF_CONFIG``
    (``InputError`` with a two-worker example when it is missing or malformed, or when a
    worker does not join within ``timeout`` seconds); see ``common.distributed``.
    """
    import tensorflow as tf

    if name == "multi_worker":
        from common import distributed

        return distributed.multi_worker_strategy(timeout)

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise InputError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
