"""Shared infrastructure of the recipes: data sources, model builders, evaluation, CLI."""

import os

# Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines); set it to 0 to see it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings

# Keras warns that fit()'s default shuffle=True is ignored for a tf.data pipeline; ours shuffles itself.
warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
