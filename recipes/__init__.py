"""One standalone module per transfer-learning recipe: ``python -m recipes.<name> --help``."""

import os

# Before TensorFlow is imported: hide its C++ start-up chatter (set TF_CPP_MIN_LOG_LEVEL=0 to see it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 pointed at /dev/null.

    TensorFlow 2.19+ prints its CUDA probing and oneDNN notes through absl before its log level
    is read, whatever ``TF_CPP_MIN_LOG_LEVEL`` says (tensorflow/tensorflow#100442), so a bad flag's
    one-line error would otherwise come after four lines of noise. An import error still raises
    (after stderr is restored); ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.
    """
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


_import_tensorflow_quietly()
