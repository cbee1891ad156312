"""Loading a saved Keras model file, with an error that says what is missing and how to fix it.

Every model file the recipes load goes through :func:`load_model`: a ``--base`` or
``--candidates`` ``.keras`` path and the cached bases (source CNN, EfficientNet-Lite0).
When Keras cannot deserialise a ``.keras`` file, the error alone does not say which class
is missing; :func:`load_model` then reads the archive's ``config.json`` and names, in one
line, every class that is neither built into Keras nor registered here (with its
``module`` and ``registered_name``), and every ``Lambda`` layer that safe mode refuses.

Two environment variables, read on every load:

- ``RECIPES_IMPORT=module1,module2``: modules imported before loading, e.g. the module
  that defines (and registers, with ``@keras.saving.register_keras_serializable()``) a
  custom layer; it must be importable (on ``PYTHONPATH`` or in the working directory).
- ``RECIPES_SAFE_MODE=0``: load with Keras' ``safe_mode=False``, which a ``Lambda`` layer
  holding Python bytecode needs. Only for files you trust: loading runs the code stored in
  the file, so an untrusted file can run anything on your machine. Default 1 (safe).

``common.layers`` (this project's own layers, e.g. ``GradientReversal``) is always imported.
"""

from __future__ import annotations

import importlib
import json
import os
import zipfile
from pathlib import Path

import keras

from common.errors import InputError, MissingInputError

IMPORT_ENV = "RECIPES_IMPORT"
SAFE_MODE_ENV = "RECIPES_SAFE_MODE"
HELP = (
    f"A custom layer class loads once its module is imported: {IMPORT_ENV}=module1,module2; a Lambda layer needs "
    f"{SAFE_MODE_ENV}=0 (runs the file's code: trusted files only)."
)


def import_modules() -> list[str]:
    """Import every module named in ``$RECIPES_IMPORT`` (comma list); returns their names.

    Raises ``InputError`` naming the variable and the module that does not import.
    """
    import common.layers  # noqa: F401  (registers this project's layers)

    names = [name.strip() for name in os.environ.get(IMPORT_ENV, "").split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise InputError(
                f"{IMPORT_ENV}: module {name!r} does not import ({type(error).__name__}: {_first_line(error)}); "
                "put the folder that holds it on PYTHONPATH"
            ) from error
    return names


def safe_mode() -> bool:
    """``$RECIPES_SAFE_MODE``: True (the default, "1") or False ("0"); anything else is an ``InputError``."""
    value = os.environ.get(SAFE_MODE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise InputError(f"{SAFE_MODE_ENV}={value!r}: choose 1 (the default, safe) or 0 (trusted files only)")
    return value == "1"


def load_model(path: str | Path, what: str = "--base") -> keras.Model:
    """The model saved in ``path`` (``.keras``, or a legacy ``.h5``), uncompiled; ``what`` names it in errors.

    ``what`` is the flag or the role of the file (``"--base"``, ``"candidate 'x'"``, ``"cached
    source-cnn base"``). Imports ``$RECIPES_IMPORT`` first and honours ``$RECIPES_SAFE_MODE``
    (module docstring). Raises ``MissingInputError`` if ``path`` does not exist and
    ``InputError`` (one line) if it does not load: the unregistered classes and the Lambda
    layers by name with the variable that fixes each, else Keras' own reason (a damaged or
    foreign file), or if it holds something other than a Keras model.
    """
    if not Path(path).is_file():
        raise MissingInputError(f"{what} {str(path)!r}: no such model file")
    imported, safe = import_modules(), safe_mode()
    try:
        loaded = keras.saving.load_model(path, compile=False, safe_mode=safe)
    except Exception as error:  # zipfile, h5py, JSON and deserialisation errors all mean "cannot use this file"
        problems = diagnose(path, safe)
        if problems:
            raise InputError(f"{what} {str(path)!r} does not load: " + "; ".join(problems)) from error
        tried = f"; imported {', '.join(imported)}" if imported else ""
        raise InputError(
            f"{what} {str(path)!r} is not a Keras model that loads here ({type(error).__name__}: "
            f"{_first_line(error)}{tried})"
        ) from error
    if not isinstance(loaded, keras.Model):
        raise InputError(f"{what} {str(path)!r} holds a {type(loaded).__name__}, not a Keras model")
    return loaded


def diagnose(path: str | Path, safe: bool = True) -> list[str]:
    """What in the ``.keras`` file ``path`` stops it loading here: one sentence per kind, [] if nothing found.

    Walks ``config.json`` of the archive: every object (``class_name`` with ``module`` and
    ``registered_name``) that is neither registered (``keras.saving.get_registered_object``)
    nor a Keras built-in, and, with ``safe``, every ``Lambda`` layer whose function is
    stored as bytecode. A file that is not a readable ``.keras`` archive gives [].
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    missing: dict[tuple, None] = {}
    lambdas: list[str] = []
    for item in _objects(config):
        if item.get("class_name") == "Lambda" and safe and _holds_bytecode(item.get("config", {})):
            lambdas.append(str(item.get("config", {}).get("name", "?")))
        elif not _resolvable(item):
            missing[(item["class_name"], item.get("module"), item.get("registered_name"))] = None
    problems = []
    if missing:
        named = ", ".join(
            f"{name} (module {module!r}, registered_name {registered!r})" for name, module, registered in missing
        )
        modules = sorted({m for _, m, _ in missing if m and not m.startswith("keras")})
        example = f"{IMPORT_ENV}={','.join(modules)}" if modules else f"{IMPORT_ENV}=your_module"
        problems.append(
            f"its config uses classes that are not registered here: {named}; make them importable: put the "
            f"module that defines them on PYTHONPATH and name it in {IMPORT_ENV} ({example}), imported before "
            "loading; the class must be decorated with @keras.saving.register_keras_serializable()"
        )
    if lambdas:
        problems.append(
            f"it holds Lambda layers ({', '.join(lambdas)}) whose Python code Keras' safe mode refuses to load; "
            f"only if you trust the file, set {SAFE_MODE_ENV}=0 (loading then runs the code stored in the file, "
            "which can do anything on this machine), or rebuild the model with a registered layer instead"
        )
    return problems


def _objects(node):
    """Every serialised Keras object (a dict with ``class_name``) in a config, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("class_name"), str) and not node["class_name"].startswith("__"):
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def _holds_bytecode(config: dict) -> bool:
    function = config.get("function")
    return isinstance(function, dict) and function.get("class_name") == "__lambda__"


def _resolvable(item: dict) -> bool:
    """Whether Keras finds the class of ``item`` as ``serialization_lib`` does: registered, or a Keras built-in."""
    name, module = item["class_name"], item.get("module")
    if name == "function":  # a function, saved by its name
        function = item.get("config")
        if not isinstance(function, str) or keras.saving.get_registered_object(function) is not None:
            return True
        return module != "builtins" or any(
            hasattr(getattr(keras, group), function) for group in ("activations", "losses", "metrics")
        )
    if keras.saving.get_registered_object(item.get("registered_name") or name) is not None:
        return True
    if module and (module == "keras" or module.split(".")[0] in {"keras", "keras_hub", "keras_cv", "keras_nlp"}):
        try:
            return hasattr(importlib.import_module(module), name)
        except ImportError:
            return False
    return module is None and item.get("registered_name") is None  # not a saved object (e.g. a dtype dict)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
