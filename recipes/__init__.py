"""One standalone module per transfer-learning recipe: ``python -m recipes.<name> --help``."""

import os

# Before TensorFlow is imported: hide its C++ start-up chatter (set to 0 to see it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
