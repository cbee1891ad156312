"""Model builders, weight copy, and freeze/unfreeze helpers.

Every classifier here emits logits (no softmax layer): pair it with
``SparseCategoricalCrossentropy(from_logits=True)``, as ``compile_classifier`` does.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from keras import layers

from common import data
from common.errors import InputError, MissingInputError
from common.evaluation import EpochTimer

# keras.applications backbones: constructor, its own preprocess_input, and the smallest
# input side it accepts (Keras checks this when weights are loaded; smaller inputs
# collapse the feature map to nothing).
BACKBONES = {
    "mobilenet_v2": (keras.applications.MobileNetV2, keras.applications.mobilenet_v2.preprocess_input, 32),
    "efficientnet_b0": (keras.applications.EfficientNetB0, keras.applications.efficientnet.preprocess_input, 32),
    "resnet50": (keras.applications.ResNet50, keras.applications.resnet50.preprocess_input, 32),
    "vgg16": (keras.applications.VGG16, keras.applications.vgg16.preprocess_input, 32),
    "densenet121": (keras.applications.DenseNet121, keras.applications.densenet.preprocess_input, 32),
}


def check_image_side(input_shape: tuple[int, ...], minimum: int, what: str) -> None:
    """``InputError`` if images of ``input_shape`` (H, W, C) are smaller than ``minimum`` on a side."""
    height, width = input_shape[:2]
    if min(height, width) < minimum:
        raise InputError(
            f"{what} needs images of at least {minimum}x{minimum} pixels, got {height}x{width} "
            "(--image-size resizes tfds: and folder: images)"
        )


def cnn_convolutions() -> list[keras.layers.Layer]:
    """New layers Conv32-Pool-Conv64-Pool-Conv64-Flatten (``conv1``..``conv3``), :func:`build_cnn`'s convolutions."""
    return [
        layers.Conv2D(32, 3, activation="relu", name="conv1"),
        layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(64, 3, activation="relu", name="conv2"),
        layers.MaxPooling2D(name="pool2"),
        layers.Conv2D(64, 3, activation="relu", name="conv3"),
        layers.Flatten(name="flatten"),
    ]


def build_cnn(input_shape: tuple[int, int, int], num_classes: int, name: str = "cnn") -> keras.Model:
    """The seed recipe's CNN: Conv32-Pool-Conv64-Pool-Conv64, Dense64, logits.

    Layers are named, so two models from this builder line up for ``copy_weights``.
    Raises ``InputError`` for images smaller than 18x18 (three valid 3x3 convolutions and
    two poolings leave nothing).
    """
    check_image_side(input_shape, 18, "the CNN (three 3x3 convolutions, two 2x2 poolings)")
    return keras.Sequential(
        [
            keras.Input(input_shape),
            *cnn_convolutions(),
            layers.Dense(64, activation="relu", name="dense"),
            layers.Dense(num_classes, name="classifier"),
        ],
        name=name,
    )


def build_bn_cnn(input_shape: tuple[int, int, int], num_classes: int, width: int = 32, dropout: float = 0.3,
                 name: str = "bn_cnn") -> keras.Model:  # fmt: skip
    """A small convolutional backbone with BatchNormalization, then a logits head.

    Three blocks of (Conv-BN-ReLU) x2 + max-pool, widths ``width``, 2x, 4x, then global
    average pooling, dropout and the classifier. The backbone is the sub-model named
    ``"base"`` (``model.get_layer("base")``), so it can be frozen or reused as a unit.
    Raises ``InputError`` for images smaller than 8x8 (three 2x2 poolings).
    """
    check_image_side(input_shape, 8, "the BatchNorm CNN (three 2x2 poolings)")
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((width, 2 * width, 4 * width), start=1):
        for conv in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = layers.BatchNormalization(name=f"block{block}_bn{conv}")(x)
            x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    base = keras.Model(inputs, x, name="base")
    return add_head(base, num_classes, dropout, name=name)


def add_head(base: keras.Model, num_classes: int, dropout: float = 0.2, name: str = "classifier_model") -> keras.Model:
    """``base`` -> global pooling (``head_pool``) if its output is a feature map, else ``head_features``
    (identity) -> dropout -> Dense logits.

    In Keras 3 the ``training=False`` given to the base here is only a default: a call
    ``model(x, training=True)`` (as ``fit`` makes) passes ``training=True`` down to every
    layer. What keeps a BatchNormalization layer in inference mode is being frozen
    (``trainable=False``), which ``freeze`` and ``unfreeze_top`` ensure; a base built to
    be trained (``build_bn_cnn``) normalises with batch statistics as usual.
    """
    inputs = keras.Input(base.input_shape[1:])
    x = base(inputs, training=False)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    else:  # a named layer whose output is the features, as head_pool's is (common.regularizers.attach_bss)
        x = layers.Identity(name="head_features")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def logistic_regression_head(features, labels, c: float = 1.0, class_weight: str | None = None):
    """A classifier on cached features: standardisation, then multinomial logistic regression
    (scikit-learn, L2 penalty of inverse strength ``c``, L-BFGS to convergence); a fitted
    ``Pipeline``. ``features``: (N, D), ``labels``: (N,) integers; ``class_weight="balanced"``
    weighs each class inversely to its frequency, so a skewed training set does not shift the
    head's prior. Convert it for Keras with ``linear_head_weights``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = LogisticRegression(C=c, max_iter=1000, class_weight=class_weight)
    return make_pipeline(StandardScaler(), regression).fit(features, labels)


def linear_head_weights(head, num_classes: int) -> list:
    """``[kernel (D, K), bias (K,)]`` of one Dense layer on the raw features that gives the same
    logits as ``head`` (a ``logistic_regression_head``); a class absent from its training labels
    gets a bias of -1e9, so it is never predicted."""
    import numpy as np

    scaler, regression = head[0], head[1]
    coef, intercept = regression.coef_, regression.intercept_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row; logits (0, z) give the same softmax
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    full_coef, full_bias = np.zeros((num_classes, coef.shape[1])), np.full(num_classes, -1e9)
    full_coef[regression.classes_], full_bias[regression.classes_] = coef, intercept
    kernel = (full_coef / scaler.scale_).T
    bias = full_bias - (full_coef * scaler.mean_ / scaler.scale_).sum(axis=1)
    return [kernel.astype("float32"), bias.astype("float32")]


def build_backbone(name: str, input_shape: tuple[int, int, int], weights: str | None = None) -> keras.Model:
    """A ``keras.applications`` model without its top, as a feature extractor.

    ``weights``: ``"imagenet"`` (downloads once), ``None`` (random init) or a path to a
    local weights file of the same architecture.
    """
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    constructor, _, min_side = BACKBONES[name]
    height, width, channels = input_shape
    if channels != 3 or min(height, width) < min_side:
        raise InputError(
            f"backbone {name} needs RGB inputs of at least {min_side}x{min_side}, got {input_shape}; "
            "pass a larger image size (inputs are resized and converted to RGB for you)"
        )
    local_file = weights not in (None, "imagenet")
    if local_file and not Path(weights).is_file():
        raise MissingInputError(f"weights file {weights!r} for backbone {name} does not exist")
    base = constructor(include_top=False, weights=None if local_file else weights, input_shape=input_shape)
    if local_file:
        try:
            base.load_weights(weights)
        except Exception as error:
            raise InputError(f"weights file {weights!r} does not fit backbone {name}: {error}") from error
    return base


def backbone_preprocess(name: str):
    """The backbone's own ``preprocess_input``, taking images in [0, 1] (ours) not [0, 255]."""
    preprocess = BACKBONES[name][1]
    return lambda images: preprocess(images * 255.0)


def compile_classifier(model: keras.Model, learning_rate: float = 1e-3, steps_per_execution: int = 1,
                       optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:  # fmt: skip
    """Adam (or ``optimizer``) + sparse cross-entropy on logits + accuracy. Call again after (un)freezing.

    ``steps_per_execution`` > 1 runs that many training steps per compiled call: the same
    updates with less Python overhead, which dominates for a tiny model such as a head.
    """
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def fit_steps(model: keras.Model, pipeline, steps: int, chunks: int = 10) -> dict:
    """Train ``steps`` steps on a pipeline that repeats, logged as ``chunks`` "epochs" of steps // chunks.

    ``model`` is compiled; ``pipeline`` a ``tf.data.Dataset`` (repeated here). Returns
    ``history.history`` with ``epoch_seconds`` (``evaluation.EpochTimer``). For training
    budgets counted in steps rather than passes over the data.
    """
    chunks = max(1, min(chunks, steps))
    history = model.fit(pipeline.repeat(), epochs=chunks, steps_per_epoch=steps // chunks, verbose=0,
                        callbacks=[EpochTimer()])  # fmt: skip
    return history.history


# --- Training on arrays, and heads on cached features ---------------------------------


def fit_timed(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, seed: int,
              augment=None, strategy=None, backup_dir=None) -> tuple[dict, float]:  # fmt: skip
    """Train on (x, y) through a shuffling ``data.make_pipeline`` (reseeded each epoch by ``seed``).

    ``augment``: a callable on a batch of images (``make_pipeline``). Training goes through
    ``distributed.train``: ``model.fit`` except under ``--strategy multi_worker`` (the shared
    distributed step); ``backup_dir`` (``distributed.Backup.phase``) makes it resumable.
    Returns the history dict (with ``epoch_seconds``) and the wall seconds of training.
    ``model`` must be compiled (under ``strategy.scope()`` if a strategy is given).
    """
    import tensorflow as tf

    from common import distributed

    start = time.perf_counter()
    train = data.make_pipeline(x, y, batch_size, shuffle=True, augment=augment, seed=seed)
    history = distributed.train(model, train, epochs, strategy or tf.distribute.get_strategy(), backup_dir=backup_dir,
                                verbose=0)  # fmt: skip
    return history, time.perf_counter() - start


def feature_head(feature_dim: int, num_classes: int, dropout: float) -> keras.Model:
    """Dropout and a Dense layer (``classifier``) emitting logits, on feature vectors (N, feature_dim)."""
    inputs = keras.Input((feature_dim,))
    x = layers.Dropout(dropout, name="head_dropout")(inputs)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name="head")


def train_head_on_features(features: np.ndarray, y: np.ndarray, num_classes: int, dropout: float, learning_rate: float,
                           epochs: int, batch_size: int, seed: int, strategy=None,
                           backup_dir=None) -> tuple[keras.Model, dict, float]:  # fmt: skip
    """A new ``feature_head`` trained alone on cached features: the fast path of a frozen base.

    ``features`` (N, D), ``y`` (N,) integer labels. A frozen base without augmentation maps
    an image to the same features at every epoch, so they are computed once (Keras guide
    "Transfer learning & fine-tuning"). The head is built under ``strategy.scope()`` if a
    strategy is given; its initial weights follow the global RNG state (seed first for a
    reproducible head). ``backup_dir``: resumable (``fit_timed``). Returns the head, its
    history and the training seconds.
    """
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        # A head step takes microseconds: run 64 per compiled call, not one (same updates).
        head = compile_classifier(feature_head(features.shape[1], num_classes, dropout), learning_rate,
                                  steps_per_execution=64)  # fmt: skip
    history, seconds = fit_timed(head, features, y, epochs, batch_size, seed, strategy=strategy, backup_dir=backup_dir)
    return head, history, seconds


def head_on_base(base_model: keras.Model, head: keras.Model, num_classes: int, dropout: float, learning_rate: float,
                 name: str) -> keras.Model:  # fmt: skip
    """The frozen ``base_model`` and a ``feature_head`` trained on its features as one compiled model on images.

    ``add_head`` on the frozen base, with the head's ``classifier`` weights copied (its
    dropout has none); pooled like ``bases.feature_extractor`` if the base emits a feature map.
    """
    model = add_head(freeze(base_model), num_classes, dropout, name=name)
    model.get_layer("classifier").set_weights(head.get_layer("classifier").get_weights())
    return compile_classifier(model, learning_rate)


def inner_base(model: keras.Model) -> keras.Model:
    """The base sub-model inside a model built by ``add_head`` (its first layer that is a ``keras.Model``)."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def count_weighted_layers(model: keras.Model) -> int:
    """How many of ``model``'s (top-level) layers have weights: what ``unfreeze_top`` counts."""
    return len([layer for layer in model.layers if layer.weights])


def unfreeze_base_top(model: keras.Model, num_layers: int, learning_rate: float) -> list[str]:
    """Unfreeze the top ``num_layers`` layers with weights of ``model``'s base (``unfreeze_top``) and recompile.

    ``model``: an ``add_head`` model. BatchNorm stays frozen; the recompile (Adam at
    ``learning_rate``) makes the change take effect. Returns the names of the layers unfrozen.
    """
    unfrozen = unfreeze_top(inner_base(model), num_layers)
    compile_classifier(model, learning_rate)  # recompile, or the change is ignored
    return unfrozen


# --- Weight copy ------------------------------------------------------------------


@dataclass
class WeightCopy:
    """What ``copy_weights`` did: copied layer names, and skipped ones with the reason."""

    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        skipped = ", ".join(f"{name} ({why})" for name, why in self.skipped) or "none"
        return f"copied {len(self.copied)} layers: {', '.join(self.copied)}; skipped: {skipped}"


def copy_weights(source: keras.Model, target: keras.Model, exclude: tuple[str, ...] = ()) -> WeightCopy:
    """Copy weights layer by layer where the shapes fit; report what was copied and skipped.

    Layers that hold weights are paired in order (the two models share an architecture,
    possibly with a different classifier). A pair is skipped when the target layer is in
    ``exclude`` or its weight shapes differ. Raises ``ValueError`` if nothing fits.
    """
    source_layers = [layer for layer in source.layers if layer.weights]
    target_layers = [layer for layer in target.layers if layer.weights]
    report = WeightCopy()
    for position, target_layer in enumerate(target_layers):
        if target_layer.name in exclude:
            report.skipped.append((target_layer.name, "excluded"))
            continue
        if position >= len(source_layers):
            report.skipped.append((target_layer.name, "no source layer at this position"))
            continue
        source_weights = source_layers[position].get_weights()
        source_shapes = [w.shape for w in source_weights]
        target_shapes = [tuple(w.shape) for w in target_layer.weights]
        if source_shapes != target_shapes:
            report.skipped.append((target_layer.name, f"shape {target_shapes} != source {source_shapes}"))
            continue
        target_layer.set_weights(source_weights)
        report.copied.append(target_layer.name)
    if not report.copied:
        raise InputError(
            f"no layer of {source.name!r} fits {target.name!r}; nothing copied. Skipped: "
            + "; ".join(f"{name}: {why}" for name, why in report.skipped)
        )
    return report


# --- Freezing ---------------------------------------------------------------------


def freeze(model: keras.Model) -> keras.Model:
    """Make every weight of ``model`` non-trainable. Compile (again) afterwards."""
    model.trainable = False
    return model


def unfreeze_top(base: keras.Model, num_layers: int) -> list[str]:
    """Unfreeze the top ``num_layers`` layers that hold weights; BatchNorm stays frozen.

    Returns the names of the layers now trainable. Compile (again) afterwards, with a
    learning rate 10-100x lower than the head's.
    """
    weighted = [layer for layer in base.layers if layer.weights]
    if not 0 <= num_layers <= len(weighted):
        raise InputError(f"cannot unfreeze {num_layers} layers: {base.name} has {len(weighted)} layers with weights")
    base.trainable = True
    top = set(id(layer) for layer in weighted[len(weighted) - num_layers :]) if num_layers else set()
    unfrozen = []
    for layer in base.layers:
        layer.trainable = id(layer) in top and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


# --- Domain adaptation ------------------------------------------------------------


def build_dann_cnn(input_shape: tuple[int, int, int], num_classes: int, bn_momentum: float = 0.9,
                   dropout: float = 0.0, name: str = "dann_cnn") -> keras.Model:  # fmt: skip
    """The digit-sized CNN of Ganin et al. 2016 (DANN, MNIST experiments), with BatchNormalization.

    Base (the sub-model named ``"base"``, the features): (Conv 5x5 32 - BN - ReLU - max-pool),
    (Conv 5x5 48 - BN - ReLU - max-pool), flatten, Dense 100 - ReLU: features (N, 100). Head:
    [dropout] - Dense 100 - ReLU - logits. The paper ends the features at the flattened
    conv maps; here they include the first Dense layer, where DANN's alignment measured
    steadier on Fashion-MNIST -> ``fashion_mnist_m`` (see ``recipes.domain_adaptation``).
    Flattening keeps *where* a feature fires: ``build_bn_cnn``'s global average pooling
    transferred no better than chance there. ``bn_momentum`` 0.9 (Keras' default is 0.99)
    lets the moving statistics settle within a few hundred steps.
    """
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((32, 48), start=1):
        x = layers.Conv2D(filters, 5, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{block}")(x)
        x = layers.ReLU(name=f"relu{block}")(x)
        x = layers.MaxPooling2D(name=f"pool{block}")(x)
    x = layers.Dense(100, activation="relu", name="dense1")(layers.Flatten(name="flatten")(x))
    base = keras.Model(inputs, x, name="base")
    inputs = keras.Input(input_shape)
    x = layers.Dropout(dropout, name="head_dropout")(base(inputs))
    x = layers.Dense(100, activation="relu", name="dense2")(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="classifier")(x), name=name)


def features_and_logits(
    classifier: keras.Model, x: np.ndarray, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Features and class logits of images ``x`` (N, H, W, C), in inference mode, as numpy arrays.

    ``classifier`` is shaped like ``build_dann_cnn``'s: an input, a sub-model named ``"base"``
    (the features, e.g. (N, 100)), then the head's layers in order (logits, (N, classes)).
    Plain calls in batches of ``batch_size``: eager, so repeated evaluations trace no graph.
    Raises ``ValueError`` (Keras) if the model has no layer named ``"base"``.
    """
    base = classifier.get_layer("base")
    head = keras.Sequential(classifier.layers[2:])  # the layers after the input and the base
    features, logits = [], []
    for start in range(0, len(x), batch_size):
        batch_features = base(x[start : start + batch_size], training=False)
        features.append(keras.ops.convert_to_numpy(batch_features))
        logits.append(keras.ops.convert_to_numpy(head(batch_features, training=False)))
    return np.concatenate(features), np.concatenate(logits)


def batchnorm_layers(model: keras.Model) -> list[layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model``, nested models included, in the order of ``model.layers``."""
    found = []
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += batchnorm_layers(layer)
    return found


def adapt_batchnorm(model: keras.Model, images, batch_size: int = 500) -> list[str]:
    """AdaBN (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation").

    Replaces every BatchNormalization layer's moving mean and variance by the mean and
    variance of its inputs over ``images`` (the target domain, no labels), layer by layer
    from the input up, each layer seeing the outputs of the layers below it already
    adapted (the paper's Algorithm 1). Nothing else changes: no weight, no gamma/beta.

    ``images``: array (N, H, W, C) the model takes. Runs the model eagerly, in inference
    mode, once per BatchNormalization layer (N images each time). Returns the adapted
    layers' names. Raises ``InputError`` if the model has no BatchNormalization layer.
    """
    import numpy as np

    bn_layers = batchnorm_layers(model)
    if not bn_layers:
        raise InputError(f"model {model.name!r} has no BatchNormalization layer to adapt")
    for layer in bn_layers:
        totals = {"count": 0, "sum": 0.0, "sum_sq": 0.0}
        original_call = layer.call

        def recording_call(inputs, *args, _layer=layer, _call=original_call, _totals=totals, **kwargs):
            x = np.asarray(keras.ops.convert_to_numpy(inputs), dtype=np.float64)
            axes = tuple(i for i in range(x.ndim) if i != _layer.axis % x.ndim)
            _totals["count"] += x.size // x.shape[_layer.axis]
            _totals["sum"] = _totals["sum"] + x.sum(axis=axes)
            _totals["sum_sq"] = _totals["sum_sq"] + np.square(x).sum(axis=axes)
            return _call(inputs, *args, **kwargs)

        layer.call = recording_call  # an instance attribute shadows the class's call, for these passes only
        try:
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size], training=False)
        finally:
            del layer.call
        mean = totals["sum"] / totals["count"]
        variance = np.maximum(totals["sum_sq"] / totals["count"] - np.square(mean), 0.0)
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(variance.astype("float32"))
    return [layer.name for layer in bn_layers]
