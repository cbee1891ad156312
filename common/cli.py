"""Turn a recipe's ``Config`` dataclass into a command line, and set up a run.

Every recipe declares its knobs once, as a dataclass whose fields carry a default
and a one-line help text (``knob(default, "help")``). ``parse_config`` builds the
argparse parser from it, so ``python -m recipes.<name> --help`` documents every
field, and a notebook builds the same ``Config(...)`` directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

STRATEGIES = ("default", "mirrored")


def knob(default: Any, help: str) -> Any:
    """A dataclass field with its default and the help text that ``--help`` shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class RecipeConfig:
    """Flags that every recipe shares; a recipe's ``Config`` subclasses this."""

    seed: int = knob(0, "Seed for data sampling, weight init and shuffling.")
    out: str = knob("", "Run folder; default runs/<recipe>/<timestamp>.")
    quick: bool = knob(False, "Tiny settings for smoke tests and CI (seconds, not minutes).")
    strategy: str = knob("default", "tf.distribute strategy: default | mirrored.")

    # Field overrides applied by --quick; each recipe sets its own.
    QUICK: ClassVar[dict[str, Any]] = {}

    def resolved(self) -> RecipeConfig:
        """This config with the ``--quick`` overrides applied, and its values checked."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        return dataclasses.replace(self, **self.QUICK) if self.quick else self


def _flag_type(annotation: Any) -> Any:
    # Annotations are strings under `from __future__ import annotations`.
    return {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per field of ``config_cls``."""
    parser = argparse.ArgumentParser(
        description=description or config_cls.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints.get(f.name, f.type))
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text, metavar=f.name.upper())
    return parser


def parse_config(config_cls: type, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a ``config_cls`` instance."""
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def set_seed(seed: int) -> None:
    """The one seeding block: Python, NumPy and TensorFlow, and deterministic TF ops.

    Same seed, same data split, same initial weights, same metrics.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_strategy(name: str):
    """``tf.distribute`` strategy by name; ``mirrored`` uses every visible GPU, or the CPU devices."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
