"""Pretrained bases that work offline, for the feature-extraction and fine-tuning recipes.

``load_base(spec, ...)`` turns the ``--base`` flag into a :class:`Base`: the frozen-able
feature extractor, the function that turns our [0, 1] images into its inputs, and the
input shape it expects. Three kinds of spec:

- ``source-cnn`` (the default): the BatchNorm CNN of ``common.models.build_bn_cnn``,
  pretrained on the *source* classes of the dataset, and cached on disk under
  ``$RECIPES_CACHE_DIR`` (default ``~/.cache/transfer-recipes``) keyed by every setting
  that changes it, so the second run reuses it;
- a ``keras.applications`` name (``mobilenet_v2``, ``efficientnet_b0``, ``resnet50``, ...)
  with ``weights`` ``imagenet`` (downloads once), ``none`` (random init) or a local weights
  file; images are resized and converted to RGB, then the backbone's own
  ``preprocess_input`` runs;
- a path to a saved ``.keras`` model (e.g. one written by ``recipes.weight_transfer``):
  its sub-model named ``base`` if it has one, else everything below its ``classifier``
  layer, else the whole model.

Every error (unknown name, missing or mismatched weights file, an input too small for a
backbone, a path that is not a model) is raised here, before any training.
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
from keras import layers

from common import data, models
from common.errors import InputError, MissingInputError

CACHE_DIR_ENV = "RECIPES_CACHE_DIR"
SOURCE_CNN = "source-cnn"
SOURCE_CUTS = ("block1", "block2", "block3")
DEFAULT_BACKBONE_SIZE = 96


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
    ``preprocess`` maps images in [0, 1], already of ``input_shape``, to its inputs.
    """

    spec: str
    model: keras.Model
    preprocess: Callable
    input_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)

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
    """``"source-cnn"``, ``"backbone"`` or ``"keras-file"``; a clear error for anything else."""
    if spec == SOURCE_CNN:
        return "source-cnn"
    if spec in models.BACKBONES:
        return "backbone"
    if spec.endswith(".keras") or Path(spec).is_file():
        return "keras-file"
    raise InputError(
        f"unknown base {spec!r}; choose {SOURCE_CNN}, a keras.applications name "
        f"({', '.join(models.BACKBONES)}) or a path to a saved .keras model"
    )


def check_base_args(spec: str, weights: str = "", image_size: int = 0, cut: str = "block2") -> None:
    """Validate ``--base``/``--weights``/``--image-size``/``--source-cut`` without building anything."""
    kind = base_kind(spec)
    if kind == "source-cnn" and cut not in SOURCE_CUTS:
        raise InputError(f"unknown --source-cut {cut!r}; choose one of {', '.join(SOURCE_CUTS)}")
    if kind != "backbone" and weights:
        raise InputError(f"--weights {weights!r} applies to keras.applications bases only, not {spec!r}")
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
              settings: SourceSettings | None = None, cut: str = "block2", verbose: int = 2) -> Base:  # fmt: skip
    """The base named by ``spec`` (see the module docstring).

    ``source`` (the source-class task) and ``settings`` are needed for ``source-cnn`` only;
    ``cut`` is the source-cnn's last block kept; ``image_size`` is the input side of a
    keras.applications backbone (0: 96).
    """
    check_base_args(spec, weights, image_size, cut)
    kind = base_kind(spec)
    if kind == "source-cnn":
        if source is None:
            raise ValueError("the source-cnn base needs the source task (pass source=)")
        return source_cnn_base(source, settings or SourceSettings(), cut=cut, verbose=verbose)
    if kind == "backbone":
        return backbone_base(spec, weights or "imagenet", image_size or DEFAULT_BACKBONE_SIZE)
    return keras_file_base(spec)


# --- keras.applications -----------------------------------------------------------------


def backbone_base(name: str, weights: str, side: int) -> Base:
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
    return Base(name, model, models.backbone_preprocess(name), shape, {"kind": "backbone", "weights": weights})


# --- A saved .keras model ---------------------------------------------------------------


def keras_file_base(path: str) -> Base:
    try:
        loaded = keras.models.load_model(path, compile=False)
    except Exception as error:
        raise InputError(f"--base {path!r} is not a Keras model ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, keras.Model):
        raise InputError(f"--base {path!r} holds a {type(loaded).__name__}, not a Keras model")
    names = [layer.name for layer in loaded.layers]
    if "base" in names and isinstance(loaded.get_layer("base"), keras.Model):
        model, cut = loaded.get_layer("base"), "sub-model 'base'"
    elif "classifier" in names:
        model = keras.Model(loaded.inputs, loaded.get_layer("classifier").input, name="base")
        cut = "everything below 'classifier'"
    else:
        model, cut = loaded, "the whole model"
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise InputError(f"--base {path!r} takes inputs of shape {shape}; an image model of fixed (H, W, C) is needed")
    return Base(path, model, _identity, shape, {"kind": "keras-file", "uses": cut})


def _identity(images):
    return images


# --- The source CNN, pretrained and cached -------------------------------------------------


def source_cache_key(source: data.Dataset, settings: SourceSettings) -> str:
    """A short hash of everything that changes the pretrained source CNN."""
    described = {
        "dataset": source.name,
        "classes": source.class_names,
        "input_shape": list(source.input_shape),
        "train_images": len(source.x_train),
        "settings": asdict(settings),
        "keras": keras.__version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def source_cnn_base(source: data.Dataset, settings: SourceSettings, cut: str = "block2", verbose: int = 2) -> Base:
    """``build_bn_cnn``'s base, pretrained on ``source``; loaded from the cache when present."""
    key = source_cache_key(source, settings)
    path = cache_dir() / f"source-cnn-{key}.keras"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        model = keras.models.load_model(path, compile=False)
        info = json.loads(meta_path.read_text())
        info["cached"] = True
        print(f"source-cnn base: reusing {path}")
    else:
        print(f"source-cnn base: pretraining on {source} (cached as {path})")
        model, info = pretrain_source_cnn(source, settings, verbose=verbose)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, path)
        meta_path.write_text(json.dumps(info, indent=2))
        info["cached"] = False
    info = dict(info, kind="source-cnn", path=str(path), cut=cut)
    return Base(SOURCE_CNN, spatial_base(model.get_layer("base"), cut), _identity, tuple(source.input_shape), info)


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
    """Train ``build_bn_cnn`` on the source classes; returns it and its source test accuracy."""
    keras.utils.set_random_seed(settings.seed)
    x, y = source.x_train, source.y_train
    if settings.max_images and settings.max_images < len(x):
        keep = np.random.default_rng(settings.seed).choice(len(x), settings.max_images, replace=False)
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    if settings.shuffle_labels:
        y = np.random.default_rng(settings.seed).permutation(y)
    model = models.build_bn_cnn(source.input_shape, source.num_classes, width=settings.width, name="source_cnn")
    models.compile_classifier(model, settings.learning_rate)
    start = time.perf_counter()
    train = data.make_pipeline(x, y, settings.batch_size, shuffle=True, seed=settings.seed)
    model.fit(train, epochs=settings.epochs, verbose=verbose)
    seconds = time.perf_counter() - start
    _, test_accuracy = model.evaluate(data.make_pipeline(source.x_test, source.y_test, 512), verbose=0)
    info = {
        "source": repr(source),
        "settings": asdict(settings),
        "train_images": len(x),
        "source_test_accuracy": float(test_accuracy),
        "pretrain_seconds": round(seconds, 1),
    }
    print(f"source-cnn base: {100 * test_accuracy:.1f}% on the source test images after {seconds:.0f} s")
    return model, info


# --- Helpers both recipes use -------------------------------------------------------------


def feature_extractor(base: Base) -> keras.Model:
    """``base.model`` in inference mode, globally pooled if it emits a feature map."""
    inputs = keras.Input(base.input_shape)
    x = base.model(inputs, training=False)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    return keras.Model(inputs, x, name="features")


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


def weight_blocks(model: keras.Model) -> list[list[str]]:
    """Layers that hold weights, grouped into blocks by name (``block3_conv1`` -> ``block3``),
    bottom to top. The prefix up to the first number names the block: ``block_12_expand``
    -> ``block_12``, ``conv4_block2_1_conv`` -> ``conv4``; names without digits stand alone.
    """
    blocks: list[list[str]] = []
    last = None
    for layer in model.layers:
        if not layer.weights:
            continue
        match = re.match(r"\D*\d+", layer.name)
        prefix = match.group(0) if match else layer.name
        if prefix != last:
            blocks.append([])
            last = prefix
        blocks[-1].append(layer.name)
    return blocks


# --- Candidates of the transferability scores (recipes.choose_source) -----------------------


def untrained_source_cnn(input_shape: tuple[int, int, int], num_classes: int, width: int = 16, cut: str = "block2",
                         seed: int = 0) -> Base:  # fmt: skip
    """``build_bn_cnn``'s base cut at ``cut``, with its random initial weights (seeded; no training).

    Reseeds Keras, NumPy and Python's RNGs with ``seed`` (``keras.utils.set_random_seed``).
    Its BatchNorm layers hold their initial statistics (mean 0, variance 1).
    """
    keras.utils.set_random_seed(seed)
    model = models.build_bn_cnn(input_shape, num_classes, width=width, name="untrained_cnn")
    info = {"kind": "untrained", "cut": cut, "seed": seed, "width": width}
    return Base("untrained", spatial_base(model.get_layer("base"), cut), _identity, tuple(input_shape), info)


def source_classifier(base: Base) -> keras.Model | None:
    """The model ``base`` was cut from, up to its outputs over the source classes; None if there is none.

    A ``source-cnn`` base: the cached pretrained CNN (logits over the source classes). A
    ``.keras`` base cut below its top: the whole saved model, if it ends in one vector of at
    least 2 outputs. Anything else has no source classifier: a keras.applications backbone
    (built without its top), an untrained network, a ``.keras`` model used whole.
    """
    kind = base.info.get("kind")
    if kind == "source-cnn":
        return keras.models.load_model(base.info["path"], compile=False)
    if kind == "keras-file" and base.info.get("uses") != "the whole model":
        model = keras.models.load_model(base.spec, compile=False)
        shape = model.output_shape
        if isinstance(shape, tuple) and len(shape) == 2 and (shape[1] or 0) >= 2:
            return model
    return None


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
