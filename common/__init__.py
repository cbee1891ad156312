"""Shared infrastructure of the recipes: data sources, model builders, evaluation, CLI."""

import os

# Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines); set it to 0 to see it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
