"""Dataset sources, class splits, label budgets and ``tf.data`` pipelines.

Every source returns the same thing, a :class:`Dataset` of NumPy arrays: images as
float32 in [0, 1] with shape (N, H, W, C) and integer labels. The collection targets
small-data transfer learning, so holding the arrays in memory keeps the recipes simple.

Sources (``load_dataset(name)``):

- ``fashion_mnist`` (default, offline): the IDX files that Keras downloads, looked for
  in ``$RECIPES_DATA_DIR``, the Keras cache and ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist``) before any download.
- ``digits``: scikit-learn's bundled 8x8 digits (offline).
- ``mnist``, ``cifar10``: ``keras.datasets`` (online the first time).
- ``tfds:<name>``: any TensorFlow Datasets name (online the first time).
- ``folder:<path>``: your images, one sub-folder per class; ``train/`` and ``test/``
  sub-folders are used as the splits when present, else 20% is held out per class.
- ``fashion_mnist_m`` (offline): Fashion-MNIST re-rendered over colour textures generated
  in code, the way MNIST-M was made from MNIST; a target domain for domain adaptation.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError, MissingInputError

BUILTIN_DATASETS = ("fashion_mnist", "fashion_mnist_m", "digits", "mnist", "cifar10")
PREFIXED_DATASETS = ("tfds:<name>", "folder:<path>")
DATA_DIR_ENV = "RECIPES_DATA_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass
class Dataset:
    """Images in [0, 1] as float32 (N, H, W, C), integer labels, and class names."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"shape={self.input_shape}, classes={self.num_classes})"
        )


def load_dataset(name: str = "fashion_mnist", image_size: int | None = None, seed: int = 0) -> Dataset:
    """Load a named source (see the module docstring); ``image_size`` resizes tfds/folder images."""
    if name == "fashion_mnist":
        return _load_fashion_mnist()
    if name == "fashion_mnist_m":
        return load_fashion_mnist_m()
    if name == "digits":
        return _load_digits(seed)
    if name in ("mnist", "cifar10"):
        return _load_keras_dataset(name)
    if name.startswith("tfds:"):
        return _load_tfds(name.removeprefix("tfds:"), image_size, seed)
    if name.startswith("folder:"):
        return _load_folder(Path(name.removeprefix("folder:")), image_size or 64, seed)
    choices = ", ".join(BUILTIN_DATASETS + PREFIXED_DATASETS)
    raise InputError(f"unknown dataset {name!r}; choose one of {choices}")


# --- Fashion-MNIST, offline first -------------------------------------------------


def fashion_mnist_search_dirs() -> list[Path]:
    """Where the Fashion-MNIST IDX files are looked for, in order."""
    dirs = []
    if os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV])
        dirs += [root / "fashion-mnist", root]
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    dirs += [keras_home / "datasets" / "fashion-mnist", DEBIAN_FASHION_MNIST_DIR]
    return dirs


def find_fashion_mnist() -> Path | None:
    """The first search directory that holds all four Fashion-MNIST files, if any."""
    for directory in fashion_mnist_search_dirs():
        if all((directory / f).is_file() for f in FASHION_MNIST_FILES.values()):
            return directory
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST family's format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _download_fashion_mnist() -> Path:
    # Keras stores the files in its cache, which find_fashion_mnist() searches next time.
    import keras

    keras.datasets.fashion_mnist.load_data()
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "fashion-mnist"


def _load_fashion_mnist() -> Dataset:
    directory = find_fashion_mnist()
    if directory is None:
        try:
            directory = _download_fashion_mnist()
        except Exception as error:  # no network: say where we looked and how to fix it
            looked = "\n  ".join(str(d) for d in fashion_mnist_search_dirs())
            raise MissingInputError(
                f"Fashion-MNIST files ({', '.join(FASHION_MNIST_FILES.values())}) not found in:\n  {looked}\n"
                f"and the Keras download failed ({type(error).__name__}: {error}).\n"
                "Get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or copy "
                f"the four files into a folder and set {DATA_DIR_ENV} to it."
            ) from error
    arrays = {key: read_idx(directory / file) for key, file in FASHION_MNIST_FILES.items()}
    return Dataset(
        name="fashion_mnist",
        x_train=_as_images(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=_as_images(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int64),
        class_names=list(FASHION_MNIST_CLASSES),
    )


def _as_images(pixels: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> float32 (N, H, W, C) in [0, 1]."""
    images = pixels.astype(np.float32) / scale
    return images[..., None] if images.ndim == 3 else images


# --- Fashion-MNIST-M: a target domain generated in code -----------------------------

FASHION_MNIST_M_SEED = 0  # the rendering seed of the `fashion_mnist_m` dataset (fixed, like MNIST-M's)
FASHION_MNIST_M_BRIGHTNESS = 0.5  # textures in [0, 0.5]: see make_fashion_mnist_m
TEXTURE_KINDS = ("smoothed_noise", "stripes", "gradient")


def make_textures(count: int, size: int = 64, seed: int = 0, brightness: float = 1.0) -> np.ndarray:
    """``count`` random colour textures, float32 (count, size, size, 3) in [0, brightness], deterministic per seed.

    Each texture mixes two layers, each one of ``TEXTURE_KINDS`` with random colours:
    Gaussian-smoothed RGB noise (scipy.ndimage), sine stripes at a random angle and period,
    or a linear colour gradient. They stand in for the BSDS500 photo crops of MNIST-M.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def layer() -> np.ndarray:
        kind = TEXTURE_KINDS[rng.integers(len(TEXTURE_KINDS))]
        low, high = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        if kind == "smoothed_noise":
            noise = gaussian_filter(
                rng.random((size, size, 3), dtype=np.float32), sigma=(rng.uniform(2, 6),) * 2 + (0,)
            )
            noise = (noise - noise.min()) / (np.ptp(noise) + 1e-6)
            return low + (high - low) * noise
        angle = rng.uniform(0, np.pi)
        position = np.cos(angle) * cols + np.sin(angle) * rows  # 0..~1.4 along the direction
        if kind == "stripes":
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * position * size / rng.uniform(8, 24) + rng.uniform(0, 2 * np.pi))
            return low + (high - low) * wave[..., None]
        ramp = (position - position.min()) / np.ptp(position)  # gradient
        return low + (high - low) * ramp[..., None]

    textures = np.empty((count, size, size, 3), dtype=np.float32)
    for i in range(count):
        weight = rng.uniform(0.4, 1.0)
        textures[i] = weight * layer() + (1 - weight) * layer()
    return brightness * np.clip(textures, 0.0, 1.0)


def blend_with_textures(images: np.ndarray, textures: np.ndarray, seed: int) -> np.ndarray:
    """MNIST-M's rendering (Ganin et al. 2016, section 5.2.2): ``|patch - image|`` per channel.

    ``images``: grey float (N, H, W, 1) in [0, 1]; ``textures``: (T, S, S, 3) with S >= H, W.
    Every image gets a random texture and a random H x W crop of it, drawn with ``seed``.
    Returns float32 (N, H, W, 3) in [0, 1]: the background (0) shows the texture, a white
    object (1) its colour-inverted texture.
    """
    count, height, width = images.shape[:3]
    size = textures.shape[1]
    if images.shape[-1] != 1 or size < max(height, width):
        raise InputError(f"need grey images no larger than the {size}px textures, got shape {images.shape[1:]}")
    rng = np.random.default_rng(seed)
    which = rng.integers(len(textures), size=count)
    top = rng.integers(size - height + 1, size=count)
    left = rng.integers(size - width + 1, size=count)
    out = np.empty((count, height, width, 3), dtype=np.float32)
    for start in range(0, count, 4096):  # in chunks: the temporaries stay small (and fast)
        end = start + 4096
        rows = top[start:end, None, None] + np.arange(height)[None, :, None]
        cols = left[start:end, None, None] + np.arange(width)[None, None, :]
        patches = textures[which[start:end, None, None], rows, cols]  # (chunk, H, W, 3)
        np.abs(np.subtract(patches, images[start:end], out=patches), out=out[start:end])
    return out


def make_fashion_mnist_m(source: Dataset, seed: int = FASHION_MNIST_M_SEED, num_textures: int = 200,
                         brightness: float = FASHION_MNIST_M_BRIGHTNESS) -> Dataset:  # fmt: skip
    """``source`` (grey Fashion-MNIST) re-rendered over ``num_textures`` generated colour textures.

    Deterministic per ``seed``: the texture bank and every image's crop follow from it.
    Train and test images draw their crops independently from the same bank, as MNIST-M
    did. Labels and class names are the source's. Textures are dimmed to at most
    ``brightness``: Fashion-MNIST's garments are large bright areas, not MNIST's thin strokes,
    and over full-brightness textures a CNN trained on the grey images is at chance on the
    rendered ones (measured: 8-11% for four small CNNs), which leaves nothing to adapt from;
    at 0.5 the same training reaches about 45% (docs/domain_adaptation_experiments.md).
    """
    textures = make_textures(num_textures, seed=seed, brightness=brightness)
    train_seed, test_seed = np.random.default_rng(seed).integers(2**31, size=2)
    return Dataset(
        name="fashion_mnist_m",
        x_train=blend_with_textures(source.x_train, textures, int(train_seed)),
        y_train=source.y_train,
        x_test=blend_with_textures(source.x_test, textures, int(test_seed)),
        y_test=source.y_test,
        class_names=list(source.class_names),
    )


def load_fashion_mnist_m() -> Dataset:
    """The ``fashion_mnist_m`` dataset: Fashion-MNIST rendered with ``FASHION_MNIST_M_SEED``.

    Like MNIST-M it is one fixed dataset: every run and every recipe seed sees the same
    target images (60,000 + 10,000, RGB 28x28, about 660 MB as float32).
    """
    return make_fashion_mnist_m(_load_fashion_mnist(), FASHION_MNIST_M_SEED)


# --- Other sources ------------------------------------------------------------------


def _load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _as_images(digits.images, scale=16.0)  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train, test = holdout_split(labels, 0.2, seed)
    names = [str(d) for d in range(10)]
    return Dataset("digits", images[train], labels[train], images[test], labels[test], names)


def _load_keras_dataset(name: str) -> Dataset:
    import keras

    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    names = {
        "mnist": [str(d) for d in range(10)],
        "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    }[name]
    return Dataset(
        name,
        _as_images(x_train),
        y_train.reshape(-1).astype(np.int64),
        _as_images(x_test),
        y_test.reshape(-1).astype(np.int64),
        names,
    )


def _load_tfds(name: str, image_size: int | None, seed: int) -> Dataset:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)
    except Exception as error:  # tfds raises its own DatasetNotFoundError
        reason = str(error).splitlines()[0]  # the rest lists every TFDS name
        raise InputError(f"unknown TFDS dataset {name!r} ({reason}); see tfds.list_builders()") from error
    image_key, label_key = _tfds_keys(builder.info)
    # Split names come from the dataset's metadata; without it (tfds.testing.mock_data) assume train/test.
    splits = list(builder.info.splits.keys()) or ["train", "test"]
    size = image_size or _fixed_size(builder.info.features[image_key].shape, name)

    def as_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = tfds.load(name, split=split, shuffle_files=False)
        ds = ds.map(lambda ex: (_resize(ex[image_key], size), ex[label_key]))
        images, labels = zip(*ds.as_numpy_iterator()) if ds.cardinality() != 0 else ((), ())
        return np.stack(images).astype(np.float32) / 255.0, np.asarray(labels, dtype=np.int64)

    names = builder.info.features[label_key].names
    if "train" in splits and "test" in splits:
        x_train, y_train = as_arrays("train")
        x_test, y_test = as_arrays("test")
    else:  # one split only (tf_flowers, cats_vs_dogs): hold out 20% per class
        x, y = as_arrays("train" if "train" in splits else splits[0])
        train, test = holdout_split(y, 0.2, seed)
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    return Dataset(f"tfds:{name}", x_train, y_train, x_test, y_test, list(names))


def _tfds_keys(info) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    features = info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise InputError(f"TFDS dataset {info.name!r} has no image + class-label features; found {list(features)}")
    return images[0], "label" if "label" in labels else labels[0]


def _fixed_size(shape: tuple, name: str) -> int:
    if shape[0] is None or shape[0] != shape[1]:
        raise InputError(f"TFDS dataset {name!r} has images of shape {shape}; pass --image-size")
    return shape[0]


def _resize(image, size: int):
    import tensorflow as tf

    return tf.cast(tf.image.resize(image, (size, size)), tf.uint8) if image.shape[0] != size else image


def _load_folder(path: Path, image_size: int, seed: int) -> Dataset:
    if not path.is_dir():
        raise MissingInputError(f"image folder {str(path)!r} does not exist")
    if (path / "train").is_dir() and (path / "test").is_dir():
        x_train, y_train, names = _read_image_folder(path / "train", image_size)
        x_test, y_test, test_names = _read_image_folder(path / "test", image_size)
        if test_names != names:
            raise InputError(f"{path}/train has classes {names} but {path}/test has {test_names}")
    else:
        x, y, names = _read_image_folder(path, image_size)
        train, test = holdout_split(y, 0.2, seed)
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    return Dataset(f"folder:{path}", x_train, y_train, x_test, y_test, names)


def _read_image_folder(path: Path, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import keras

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise InputError(f"image folder {str(path)!r} needs one sub-folder per class, at least 2; found {classes}")
    ds = keras.utils.image_dataset_from_directory(
        path, image_size=(image_size, image_size), batch_size=None, shuffle=False, verbose=False
    )
    images, labels = zip(*ds.as_numpy_iterator())
    return np.stack(images) / np.float32(255.0), np.asarray(labels, dtype=np.int64), list(ds.class_names)


# --- Class splits and label budgets --------------------------------------------------


def parse_classes(spec: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"5,7,9"`` -> [5, 7, 9]; ranges and lists mix."""
    classes: list[int] = []
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-"))
                classes += list(range(low, high + 1))
            else:
                classes.append(int(part))
        except ValueError:
            raise InputError(f"cannot read class list {spec!r}; write e.g. '0-4' or '5,6,7'") from None
    return classes


def check_class_split(dataset: Dataset, *class_lists: list[int]) -> None:
    """Each list non-empty, inside the dataset's classes, and no class in two lists."""
    seen: dict[int, int] = {}
    for position, classes in enumerate(class_lists):
        if not classes:
            raise InputError(f"class list #{position + 1} is empty")
        unknown = sorted(set(classes) - set(range(dataset.num_classes)))
        if unknown:
            raise InputError(
                f"classes {unknown} are not in {dataset.name} (it has classes 0-{dataset.num_classes - 1})"
            )
        for c in classes:
            if c in seen and seen[c] != position:
                raise InputError(f"class {c} ({dataset.class_names[c]}) is in two class lists; they must not overlap")
            seen[c] = position


def select_classes(dataset: Dataset, classes: list[int]) -> Dataset:
    """The sub-task on ``classes``, labels re-indexed 0..len(classes)-1 in the order given."""
    check_class_split(dataset, classes)
    lookup = np.full(dataset.num_classes, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))

    def subset(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = np.isin(y, classes)
        return x[keep], lookup[y[keep]]

    x_train, y_train = subset(dataset.x_train, dataset.y_train)
    x_test, y_test = subset(dataset.x_test, dataset.y_test)
    names = [dataset.class_names[c] for c in classes]
    return Dataset(dataset.name, x_train, y_train, x_test, y_test, names)


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` examples of every class, drawn with ``seed`` (stratified)."""
    if per_class < 1:
        raise InputError(f"label budget must be at least 1 per class, got {per_class}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if per_class > len(members):
            raise InputError(f"label budget {per_class} per class is larger than class {c}, which has {len(members)}")
        picked.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index arrays, ``fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_held = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        held.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


# --- Shapes and pipelines ------------------------------------------------------------


def to_input_shape(images: np.ndarray, shape: tuple[int, int, int], batch_size: int = 1024) -> np.ndarray:
    """Resize images and convert grey <-> RGB so they fit a model expecting ``shape``."""
    import tensorflow as tf

    height, width, channels = shape
    if images.shape[-1] not in (1, 3) or channels not in (1, 3):
        raise InputError(f"can convert between 1 and 3 channels only, not {images.shape[-1]} -> {channels}")
    if images.shape[1:] == tuple(shape):
        return images
    out = np.empty((len(images), height, width, channels), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start : start + batch_size])
        if batch.shape[1:3] != (height, width):
            batch = tf.image.resize(batch, (height, width))
        if batch.shape[-1] == 1 and channels == 3:
            batch = tf.image.grayscale_to_rgb(batch)
        elif batch.shape[-1] == 3 and channels == 1:
            batch = tf.image.rgb_to_grayscale(batch)
        out[start : start + batch_size] = batch.numpy()
    return out


def make_pipeline(
    x: np.ndarray,
    y: np.ndarray | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    augment=None,
    seed: int = 0,
    cache: bool = True,
):
    """A ``tf.data`` pipeline: cache, shuffle (reseeded each epoch), batch, augment, prefetch.

    ``augment`` is a callable on a batch of images (e.g. a ``keras.Sequential`` of
    preprocessing layers); it runs after batching so it is vectorised.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y) if y is not None else x)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        if y is None:
            ds = ds.map(lambda images: augment(images, training=True), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(
                lambda images, labels: (augment(images, training=True), labels), num_parallel_calls=tf.data.AUTOTUNE
            )
    return ds.prefetch(tf.data.AUTOTUNE)
