"""Custom Keras layers and schedules, registered so a saved ``model.keras`` loads without ``custom_objects``.

Importing this module registers the layers (``keras.saving.register_keras_serializable``),
so ``import common.layers`` before ``keras.saving.load_model(path)`` is all a fresh
process needs.
"""

from __future__ import annotations

import math

import keras
from keras import ops

PACKAGE = "transfer_recipes"


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's schedule of the reversal weight: ``2 / (1 + exp(-gamma * p)) - 1``, p in [0, 1].

    Ganin et al. 2016 ("Domain-adversarial training of neural networks", JMLR, section
    5.2.2): 0 at the start, so the domain classifier's noisy early gradients do not reach
    the features, rising to about 1 (0.9999 at p = 1 with gamma = 10).
    """
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


@keras.saving.register_keras_serializable(package=PACKAGE)
class AnnealedLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """DANN's learning rate ``lr / (1 + alpha p)^beta``, p = step / total_steps clipped to 1.

    Ganin et al. 2016 (JMLR, section 5.2.2: alpha = 10, beta = 0.75): high at the start,
    lr / 5.6 at the end. ``total_steps`` must be >= 1.
    """

    def __init__(self, learning_rate: float, total_steps: int, alpha: float = 10.0, beta: float = 0.75):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.learning_rate, self.total_steps, self.alpha, self.beta = learning_rate, total_steps, alpha, beta

    def __call__(self, step):
        progress = ops.minimum(ops.cast(step, "float32") / self.total_steps, 1.0)
        return self.learning_rate / (1.0 + self.alpha * progress) ** self.beta

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps, "alpha": self.alpha,
                "beta": self.beta}  # fmt: skip


def _reverse_gradient(inputs, weight):
    """``inputs`` unchanged forward (a copy: +-inf and NaN pass as they are), ``-weight * upstream`` backward.

    Through ``keras.ops.custom_gradient``; no arithmetic on the values, as the former
    ``held - w * (x - held)`` did (``inf - inf`` is NaN, reachable in float16 beyond 65504).
    """

    @ops.custom_gradient
    def reverse(x):
        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return ops.negative(ops.multiply(upstream, ops.cast(weight, upstream.dtype)))

        return ops.copy(x), grad

    return reverse(inputs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GradientReversal(keras.layers.Layer):
    """The gradient reversal layer of DANN (Ganin & Lempitsky 2015; Ganin et al. 2016).

    Forward: the identity, ``y = x`` exactly, any shape and dtype (+-inf and NaN included). Backward: the incoming gradient
    times ``-lambda``, so the layers below it learn to *increase* the loss of whatever is
    trained above it (a domain classifier): features that the domain classifier cannot
    separate.

    ``lambda_`` is the weight at the end of the schedule. With ``schedule_steps > 0`` the
    weight rises as ``lambda_ * dann_lambda(step / schedule_steps, gamma)``, where ``step``
    counts the layer's calls with ``training=True`` (one per training step; kept in a
    non-trainable variable, saved with the model), like tllib's
    ``WarmStartGradientReverseLayer(auto_step=True)``. With ``schedule_steps == 0`` the
    weight is the constant ``lambda_``. Inference calls (``training=False``) leave the
    step alone.
    """

    def __init__(self, lambda_: float = 1.0, schedule_steps: int = 0, gamma: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if schedule_steps < 0:
            raise ValueError(f"schedule_steps must be >= 0, got {schedule_steps}")
        self.lambda_ = float(lambda_)
        self.schedule_steps = int(schedule_steps)
        self.gamma = float(gamma)
        self.step = self.add_weight(shape=(), initializer="zeros", trainable=False, name="step", dtype="float32")

    def current_lambda(self):
        """The reversal weight the next training call uses (a scalar tensor)."""
        if self.schedule_steps == 0:
            return ops.convert_to_tensor(self.lambda_, dtype="float32")
        progress = ops.minimum(self.step / float(self.schedule_steps), 1.0)
        return self.lambda_ * (2.0 / (1.0 + ops.exp(-self.gamma * progress)) - 1.0)

    def call(self, inputs, training=False):
        weight = ops.cast(self.current_lambda(), inputs.dtype)
        if training and self.schedule_steps:
            self.step.assign_add(1.0)
        return _reverse_gradient(inputs, weight)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "lambda_": self.lambda_, "schedule_steps": self.schedule_steps,
                "gamma": self.gamma}  # fmt: skip
