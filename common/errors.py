"""The one exception kind for bad input, shared by ``common`` and every recipe.

Bad input (a flag value, a dataset name, a folder, a file or a model that cannot be
used) is raised as :class:`InputError`, before any training where possible, with a
message that names the value at fault and the choices. ``common.cli.run_cli`` prints it
as one ``error: ...`` line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user. A ``ValueError``, so code that catches those keeps working."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist."""
