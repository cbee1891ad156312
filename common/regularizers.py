"""Regularised fine-tuning: keep what the pretrained base knows while its top layers adapt.

Three small pieces, each a standard Keras mechanism, so they work with ``fit``, with every
``tf.distribute`` strategy (``common.distributed``'s custom step adds ``model.losses`` too)
and with ``--backup-dir``:

- :class:`L2SP`: a weight regulariser pulling the pretrained weights towards their *starting*
  values instead of towards 0 (Li, Grandvalet & Davoine 2018, "Explicit inductive bias for
  transfer learning with convolutional networks", ICML), set on the variables that fine-tuning
  unfreezes by :func:`attach_l2sp`.
- :class:`BatchSpectralShrinkage`: an activity regulariser on the batch of features, the sum
  of its ``k`` smallest squared singular values (Chen, Wang, Fu, Long & Wang 2019,
  "Catastrophic forgetting meets negative transfer: batch spectral shrinkage for safe transfer
  learning", NeurIPS), set on the head's input by :func:`attach_bss`.
- :class:`LayerwiseAdam`: Adam whose learning rate is multiplied per variable (discriminative
  or layer-wise learning rates: Howard & Ruder 2018, ULMFiT; Bao et al. 2022, BEiT's layer
  decay); :func:`layer_decay_multipliers` gives ``decay ** depth`` per block from the top.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


class L2SP(keras.regularizers.Regularizer):
    """``alpha * sum((w - w0) ** 2)``: zero at the starting weights ``w0``, gradient ``2 alpha (w - w0)``.

    ``reference``: the starting value of the variable (any shape; copied). ``alpha`` >= 0 is
    per weight and unnormalised, as in the paper's ``alpha / 2 * ||w - w0||^2`` (this is
    twice that alpha). Not serialised with a saved model (the reference lives only in
    the run that fine-tunes).
    """

    def __init__(self, reference, alpha: float):
        if alpha < 0:
            raise ValueError(f"L2SP alpha must be >= 0, got {alpha}")
        self.reference = np.array(reference, dtype="float32", copy=True)
        self.alpha = float(alpha)

    def __call__(self, weights):
        return self.alpha * ops.sum(ops.square(weights - ops.cast(self.reference, weights.dtype)))

    def get_config(self) -> dict:
        return {"alpha": self.alpha}


def attach_l2sp(layers, alpha: float) -> int:
    """Set :class:`L2SP` (towards each variable's current value) on every trainable variable of ``layers``.

    Call it once the layers to fine-tune are unfrozen, before the first fine-tuning step: their
    current values are the pretrained starting point. BatchNorm layers are skipped (frozen
    here), and so are variables that already carry an L2SP (a gradual schedule unfreezes the top
    again with each new block: their reference stays the pretrained value). Recompile
    afterwards for ``fit`` to see the new losses. Returns how many variables were regularised.
    """
    count = 0
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization) or not layer.trainable:
            continue
        for variable in layer.trainable_weights:
            if isinstance(variable.regularizer, L2SP):  # unfrozen earlier (gradual): keep its pretrained reference
                continue
            variable.regularizer = L2SP(variable.numpy(), alpha)
            count += 1
    return count


class BatchSpectralShrinkage(keras.regularizers.Regularizer):
    """``eta * sum of the k smallest squared singular values`` of a (batch, features) matrix.

    BSS (Chen et al. 2019): the small singular values of a batch's features are the directions
    that fine-tuning on few labels distorts first (negative transfer); shrinking them keeps the
    transferable, dominant ones. Input (B, D) (or (B, ...), flattened); with B < D only B
    singular values exist, and ``k`` counts from the smallest of those. The paper's defaults:
    ``k = 1``, ``eta = 1e-3``.
    """

    def __init__(self, k: int = 1, eta: float = 1e-3):
        if k < 1 or eta < 0:
            raise ValueError(f"BSS needs k >= 1 and eta >= 0, got k={k}, eta={eta}")
        self.k, self.eta = int(k), float(eta)

    def __call__(self, features):
        import tensorflow as tf

        flat = tf.reshape(tf.cast(features, tf.float32), (tf.shape(features)[0], -1))
        # The squared singular values are the eigenvalues of the smaller Gram matrix (eigvalsh's
        # gradient V diag(g) V^T needs no known batch size, unlike TF's SVD gradient).
        rows, columns = tf.shape(flat)[0], tf.shape(flat)[1]
        gram = tf.cond(rows <= columns, lambda: flat @ tf.transpose(flat), lambda: tf.transpose(flat) @ flat)
        squared = tf.linalg.eigvalsh(gram)[: self.k]  # ascending
        return tf.cast(self.eta * tf.reduce_sum(tf.maximum(squared, 0.0)), features.dtype)

    def get_config(self) -> dict:
        return {"k": self.k, "eta": self.eta}


class _BatchTotal:
    """An activity regulariser Keras will divide by the batch size (``Layer.__call__`` does), pre-multiplied."""

    def __init__(self, regularizer):
        self.regularizer = regularizer

    def __call__(self, outputs):
        return self.regularizer(outputs) * ops.cast(ops.shape(outputs)[0], outputs.dtype)


def _feature_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer whose output is what the head's Dense layer reads: ``head_pool`` or ``head_features``."""
    names = [layer.name for layer in model.layers]
    return model.get_layer("head_pool" if "head_pool" in names else "head_features")


def attach_bss(model: keras.Model, k: int = 1, eta: float = 1e-3) -> None:
    """Put :class:`BatchSpectralShrinkage` on the features ``model``'s head reads ((batch, D)).

    ``model``: a ``common.models.add_head`` model; the features are its ``head_pool`` output,
    or ``head_features`` (the base's own output, when that is already a vector). The loss gets the batch's penalty
    as the paper writes it (Keras divides activity regularisation by the batch size; this
    undoes that), at every call, so ``val_loss`` includes it too. Recompile afterwards, and
    call :func:`detach_bss` before saving the model.
    """
    _feature_layer(model).activity_regularizer = _BatchTotal(BatchSpectralShrinkage(k, eta))


def detach_bss(model: keras.Model) -> None:
    """Remove what :func:`attach_bss` set (the saved model then needs nothing from this module)."""
    layer = _feature_layer(model)
    if isinstance(layer.activity_regularizer, _BatchTotal):
        layer.activity_regularizer = None


@keras.saving.register_keras_serializable(package="recipes")
class LayerwiseAdam(keras.optimizers.Adam):
    """Adam with a learning-rate multiplier per variable: ``{variable.path: multiplier}`` (default 1).

    The multiplier scales the step itself (Adam's update is invariant to the gradient's scale, so
    scaling gradients would not do it). Variables not in ``multipliers`` use the base rate.
    """

    def __init__(self, multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.multipliers = dict(multipliers or {})

    def build(self, variables):
        super().build(variables)
        self._multiplier_by_index = [float(self.multipliers.get(v.path, 1.0)) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multiplier_by_index[self._get_variable_index(variable)]
        return super().update_step(gradient, variable, learning_rate * multiplier)

    def get_config(self) -> dict:
        return super().get_config() | {"multipliers": self.multipliers}


def layer_decay_multipliers(base: keras.Model, blocks: list[list[str]], decay: float) -> dict[str, float]:
    """``{variable.path: decay ** (depth + 1)}`` for the blocks of ``base``, ``blocks[-1]`` the top (depth 0).

    ``blocks``: layer names per block, bottom first (``common.bases.weight_blocks``).
    The head (not in ``blocks``) keeps multiplier 1; the top block of the base gets ``decay``,
    the next ``decay ** 2``, and so on down (BEiT's layer decay). ``decay`` in (0, 1].
    """
    if not 0 < decay <= 1:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    multipliers = {}
    for depth, block in enumerate(reversed(blocks)):
        for name in block:
            for variable in base.get_layer(name).weights:
                multipliers[variable.path] = decay ** (depth + 1)
    return multipliers


REGULARIZERS = ("none", "l2sp", "bss")


def check(regularizer: str, layer_lr_decay: float = 1.0) -> None:
    """Raise ``InputError`` for a ``--regularizer`` not in :data:`REGULARIZERS` or a decay outside (0, 1]."""
    from common.errors import InputError

    if regularizer not in REGULARIZERS:
        raise InputError(f"unknown --regularizer {regularizer!r}; choose one of {', '.join(REGULARIZERS)}")
    if not 0 < layer_lr_decay <= 1:
        raise InputError(f"--layer-lr-decay {layer_lr_decay:g} must be in (0, 1]")


def phase2_optimizer(model: keras.Model, base: keras.Model, unfrozen: list[str], blocks: list[list[str]],
                     learning_rate: float, regularizer: str = "none", l2sp_alpha: float = 0.01,
                     bss_eta: float = 1e-3, bss_k: int = 1, layer_lr_decay: float = 1.0):  # fmt: skip
    """Set ``regularizer`` on what fine-tuning opened; the optimizer to recompile ``model`` with.

    ``model``: a ``common.models.add_head`` model around ``base``; ``unfrozen``: the names of
    ``base``'s layers just unfrozen (L2-SP goes on their trainable variables, towards their
    current values); ``bss``: :func:`attach_bss` on the head's input features; ``blocks``: the
    base's layer names per block, bottom first, for ``layer_lr_decay`` < 1. Returns a
    :class:`LayerwiseAdam` at ``learning_rate`` when the decay is < 1, else None (the caller's
    default Adam). Raises ``InputError`` through :func:`check`.
    """
    check(regularizer, layer_lr_decay)
    if regularizer == "l2sp":
        attach_l2sp([base.get_layer(name) for name in unfrozen], l2sp_alpha)
    elif regularizer == "bss":
        attach_bss(model, bss_k, bss_eta)
    if layer_lr_decay < 1:
        return LayerwiseAdam(layer_decay_multipliers(base, blocks, layer_lr_decay), learning_rate=learning_rate)
    return None
