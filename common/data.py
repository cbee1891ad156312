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
- ``folder:<path>``: your images, one sub-folder per class (classes numbered in the
  code-point order of the folder names), or split folders ``train/``, ``val/`` (or
  ``validation/``) and ``test/`` each holding the same class folders. ``train/`` +
  ``test/``: used as given, a ``val/`` joins the training split (the recipes draw their
  label budgets, and ``fine_tune`` its validation images, from it; the test split is only
  scored). ``train/`` + ``val/``: ``val/`` is the test split. No split folders, or
  ``train/`` alone: 20% of each class is held out for testing, with the seed.
- ``fashion_mnist_m`` (offline): Fashion-MNIST re-rendered over colour textures generated
  in code, the way MNIST-M was made from MNIST; a target domain for domain adaptation.

Junk in a folder follows one policy (``read_image_folder``): hidden files and folders
(``.DS_Store``, ``.ipynb_checkpoints``, ``__MACOSX``) are ignored; files of another format
(``IMAGE_EXTENSIONS``: .bmp .gif .jpeg .jpg .png) and files that do not decode (empty,
truncated, an HTML page named .png) are skipped, and the run prints how many and the
first few paths. A class folder left with no image, or with too few for the split, is an
``InputError`` naming it, before any training. A corrupt Fashion-MNIST file is an error
naming the file.
"""

from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
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
    if image_size is not None and image_size < 1:
        raise InputError(f"--image-size {image_size}: the image side must be a positive number of pixels")
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
    """Read a gzipped IDX file (the MNIST family's format) into a uint8 array.

    Raises ``InputError`` naming the file if it is not gzip, not IDX, or shorter than its
    header says (an interrupted download).
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path} is not a readable gzip file ({type(error).__name__}: {error})") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise InputError(f"{path} is not an IDX file of unsigned bytes (it starts with {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise InputError(f"{path} holds {len(data)} bytes but its header {shape} needs {expected}: a damaged copy")
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
        train, test = holdout_split(y, 0.2, seed, list(names))
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


# --- Your own images: folder:<path> ---------------------------------------------------

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
IGNORED_FOLDERS = ("__MACOSX",)  # what macOS adds to zip archives
SHOWN_SKIPPED = 5  # undecodable files listed by path; the rest are counted
EXPECTED_LAYOUT = (
    "one sub-folder per class (photos/cat/*.jpg, photos/dog/*.jpg), or split folders train/ and test/ "
    "(or val/) each holding the same class folders"
)


@dataclass
class ImageFolder:
    """What ``read_image_folder`` read from one folder of class folders.

    ``images``: uint8 (N, size, size, 3); ``labels``: int64 (N,), the index of the class
    folder in ``class_names`` (code-point order); ``skipped``: (path, reason) of every file
    that was not read, hidden files excepted.
    """

    path: Path
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[Path, str]]

    def class_folder(self, label: int) -> Path:
        return self.path / self.class_names[label]


def _visible(entry: Path) -> bool:
    return not entry.name.startswith(".") and entry.name not in IGNORED_FOLDERS


def _subfolders(path: Path) -> list[Path]:
    return sorted((d for d in path.iterdir() if d.is_dir() and _visible(d)), key=lambda d: d.name)


def _load_folder(path: Path, image_size: int, seed: int) -> Dataset:
    """``folder:<path>``: class folders, or train/ (+ val/) (+ test/) split folders of class folders.

    Splits: ``train/`` + ``test/``: as given, and a ``val/`` (or ``validation/``) folder is
    added to the training images (the recipes draw their label budgets, and ``fine_tune``
    its validation images, from the training split; the test split is only ever scored).
    ``train/`` + ``val/`` and no ``test/``: ``val/`` is the test split. Class folders only
    (or ``train/`` alone): 20% of each class is held out for testing, with ``seed``.
    """
    if path.is_file():
        raise InputError(f"image folder {str(path)!r} is a file; give a folder (unpack an archive first)")
    if not path.is_dir():
        raise MissingInputError(f"image folder {str(path)!r} does not exist")
    splits = _split_folders(path)
    if not splits or list(splits) == ["train"]:
        folder = read_image_folder(splits.get("train", path), image_size)
        for label, count in enumerate(np.bincount(folder.labels, minlength=len(folder.class_names))):
            if count < 2:
                raise InputError(
                    f"class folder {str(folder.class_folder(label))!r} has {count} readable image; holding out "
                    "20% of each class for testing needs at least 2 per class (or give train/ and test/ folders)"
                )
        train, test = holdout_split(folder.labels, 0.2, seed, folder.class_names)
        x, y, names = _as_images(folder.images), folder.labels, folder.class_names
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
        layout = f"class folders of {folder.path.name}/, 20% of each class held out for testing (seed {seed})"
        read = [folder]
    else:
        read = [read_image_folder(folder, image_size) for folder in splits.values()]
        by_role = dict(zip(splits, read))
        names = by_role["train"].class_names
        for role, folder in by_role.items():
            if folder.class_names != names:
                only_train = sorted(set(names) - set(folder.class_names))
                only_here = sorted(set(folder.class_names) - set(names))
                raise InputError(
                    f"{splits['train']} and {splits[role]} must hold the same class folders; only in "
                    f"{splits['train'].name}/: {only_train}, only in {splits[role].name}/: {only_here}"
                )
        test_role = "test" if "test" in by_role else "val"
        train_parts = [folder for role, folder in by_role.items() if role != test_role]
        x_train = _as_images(np.concatenate([folder.images for folder in train_parts]))
        y_train = np.concatenate([folder.labels for folder in train_parts])
        x_test, y_test = _as_images(by_role[test_role].images), by_role[test_role].labels
        layout = " + ".join(f"{splits[role].name}/" for role in by_role if role != test_role)
        layout = f"training split from {layout}, test split from {splits[test_role].name}/"
    _report_skipped(read)
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    print(f"folder:{path}: {layout}; {len(x_train)} training and {len(x_test)} test images; classes in "
          f"code-point order of the folder names: {shown}")  # fmt: skip
    return Dataset(f"folder:{path}", x_train, y_train, x_test, y_test, names)


def _split_folders(path: Path) -> dict[str, Path]:
    """{"train": path/train, "val": ..., "test": ...} for the split folders present; {} if none."""
    found: dict[str, Path] = {}
    subfolders = _subfolders(path)
    for folder in subfolders:
        for role, spellings in SPLIT_FOLDERS.items():
            if folder.name.lower() in spellings:
                if role in found:
                    raise InputError(f"{path} has two {role} folders, {found[role].name}/ and {folder.name}/")
                found[role] = folder
    if not found:
        return {}
    others = [folder.name for folder in subfolders if folder not in found.values()]
    if others or "train" not in found:
        problem = f"also holds {others}" if others else "has no train/ folder"
        raise InputError(
            f"image folder {str(path)!r} has split folders {[f.name for f in found.values()]} but {problem}; "
            f"expected {EXPECTED_LAYOUT}"
        )
    return {role: found[role] for role in SPLIT_FOLDERS if role in found}


def read_image_folder(path: Path, image_size: int) -> ImageFolder:
    """Every readable image under ``path``'s class folders, resized to ``image_size`` square, as RGB.

    Class folders are ``path``'s sub-folders, numbered in the code-point order of their
    names (Python's ``sorted``, as ``keras.utils.image_dataset_from_directory`` does:
    ``Zebra`` before ``apple`` before ``Äpfel``); hidden ones (``.name``) and ``__MACOSX``
    are ignored. Images are read with Pillow from anywhere below a class folder, in the
    formats of ``IMAGE_EXTENSIONS`` (any mode: 1-bit, palette, grey, 16-bit grey, RGBA, CMYK).

    The policy for files that cannot be used: hidden files are ignored, other formats and
    files that do not decode (empty, truncated, not an image) are skipped, and
    ``_load_folder`` prints how many and the first few paths with the reason. Raises
    ``InputError`` for fewer than two class folders, or a class folder left with no image,
    naming it, what was skipped and the supported formats.
    """
    class_folders = _subfolders(path)
    if len(class_folders) < 2:
        raise InputError(
            f"image folder {str(path)!r} needs at least 2 class folders: {EXPECTED_LAYOUT}; "
            f"{_describe(path, class_folders)}"
        )
    files, labels, skipped = [], [], []
    hidden_in_class = []
    for label, folder in enumerate(class_folders):
        hidden = 0
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if _visible(Path(d)))
            for name in sorted(names):
                file = Path(root) / name
                if name.startswith("."):
                    hidden += 1
                elif file.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append((file, f"unsupported format {file.suffix.lower() or 'without extension'}"))
                else:
                    files.append(file)
                    labels.append(label)
        hidden_in_class.append(hidden)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        decoded = list(pool.map(lambda file: _read_image_or_reason(file, image_size), files))
    keep = [i for i, image in enumerate(decoded) if not isinstance(image, str)]
    skipped += [(files[i], decoded[i]) for i, image in enumerate(decoded) if isinstance(image, str)]
    labels = np.asarray(labels, dtype=np.int64)[keep]
    counts = np.bincount(labels, minlength=len(class_folders))
    for label, folder in enumerate(class_folders):
        if counts[label] == 0:
            mine = [(file, reason) for file, reason in skipped if folder in file.parents]
            broken = [f"; e.g. {file}: {reason}" for file, reason in mine if reason.startswith(("empty", "cannot"))]
            raise InputError(
                f"class folder {str(folder)!r} has no image that can be read: "
                f"{_count_reasons([reason for _, reason in mine], hidden_in_class[label])}; supported formats: "
                f"{', '.join(IMAGE_EXTENSIONS)}{broken[0] if broken else ''}"
            )
    images = np.stack([decoded[i] for i in keep])
    return ImageFolder(path, images, labels, [folder.name for folder in class_folders], skipped)


def read_image(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 RGB array (size, size, 3), resized bilinearly (aspect ratio not kept).

    Any Pillow mode: 16-bit grey is scaled to 8 bits, palette and alpha images are
    flattened (alpha dropped, as Keras does), a GIF gives its first frame. Raises Pillow's
    ``OSError`` (``UnidentifiedImageError``, truncated file) for a file that does not decode.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the file is much larger
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey PNG
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8))
        elif image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _read_image_or_reason(path: Path, size: int) -> np.ndarray | str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
        return read_image(path, size)
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError... for broken files
        return f"cannot be read ({type(error).__name__}: {str(error).replace(str(path), path.name)})"


def _count_reasons(reasons: list[str], hidden: int = 0) -> str:
    """Counts by reason, e.g. "skipped 3 files (unsupported format .tif: 2, hidden: 1)"."""
    kinds: dict[str, int] = {}
    for reason in reasons:
        kind = reason.split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    if hidden:
        kinds["hidden"] = hidden
    total = sum(kinds.values())
    if not total:
        return "it holds no file"
    return f"skipped {total} file{'s' * (total > 1)} (" + ", ".join(f"{kind}: {n}" for kind, n in kinds.items()) + ")"


def _report_skipped(folders: list[ImageFolder]) -> None:
    """Print what was skipped: counts by reason, and the first few undecodable files by path."""
    skipped = [item for folder in folders for item in folder.skipped]
    if not skipped:
        return
    print(f"warning: {_count_reasons([reason for _, reason in skipped])}; supported formats: "
          f"{', '.join(IMAGE_EXTENSIONS)}")  # fmt: skip
    broken = [(file, reason) for file, reason in skipped if reason.startswith(("empty", "cannot"))]
    for file, reason in broken[:SHOWN_SKIPPED]:
        print(f"  skipped {file}: {reason}")
    if len(broken) > SHOWN_SKIPPED:
        print(f"  ... and {len(broken) - SHOWN_SKIPPED} more files that cannot be read")


def _describe(path: Path, class_folders: list[Path]) -> str:
    """What ``path`` holds instead of class folders, with a hint when the classes sit one level down."""
    loose = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    found = f"found sub-folders {[f.name for f in class_folders]}" if class_folders else "found no sub-folder"
    if loose:
        found += f" and {len(loose)} image files directly in it (put each class's images in a sub-folder)"
    if len(class_folders) == 1 and len(_subfolders(class_folders[0])) >= 2:
        found += f"; did you mean folder:{class_folders[0]}?"
    return found


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


def check_class_split(dataset: Dataset, *class_lists: list[int], flags: tuple[str, ...] = ()) -> None:
    """Each list non-empty, inside the dataset's classes, and no class in two lists.

    ``flags``: the command-line flag of each list (e.g. ``("--source-classes",
    "--target-classes")``), named in the ``InputError`` so that a user who never typed them
    (the defaults 0-4 / 5-9 assume ten classes) knows what to set.
    """
    seen: dict[int, int] = {}
    for position, classes in enumerate(class_lists):
        flag = flags[position] if position < len(flags) else f"class list #{position + 1}"
        if not classes:
            raise InputError(f"{flag} is empty")
        unknown = sorted(set(classes) - set(range(dataset.num_classes)))
        if unknown:
            raise InputError(
                f"{flag}: classes {unknown} are not in {dataset.name} (it has classes 0-{dataset.num_classes - 1}); "
                f"set {' and '.join(flags) or 'the class lists'} to classes it has"
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
    for split, y in (("training", y_train), ("test", y_test)):
        empty = [classes[i] for i, n in enumerate(np.bincount(y, minlength=len(classes))) if n == 0]
        if empty:
            raise InputError(
                f"class {empty[0]} ({dataset.class_names[empty[0]]!r}) of {dataset.name} has no {split} images"
            )
    return Dataset(dataset.name, x_train, y_train, x_test, y_test, names)


def load_tasks(name: str, source_classes: str, target_classes: str, image_size: int = 0,
               seed: int = 0) -> tuple[Dataset, Dataset]:  # fmt: skip
    """The source and target tasks of dataset ``name``: class lists parsed and checked, labels re-indexed from 0.

    ``source_classes`` and ``target_classes`` as ``parse_classes`` reads them (``"0-4"``,
    ``"5,7,9"``); they must not overlap (``InputError`` otherwise). ``image_size`` resizes
    ``tfds:`` and ``folder:`` images (0: native); ``seed`` draws a folder's test split.
    """
    dataset = load_dataset(name, image_size=image_size or None, seed=seed)
    source, target = parse_classes(source_classes), parse_classes(target_classes)
    check_class_split(dataset, source, target, flags=("--source-classes", "--target-classes"))
    return select_classes(dataset, source), select_classes(dataset, target)


def label_budget(target: Dataset, labels_per_class: int, seed: int,
                 test_images: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``labels_per_class`` training images per class drawn with ``seed``, and the test set.

    Returns ``(x, y, x_test, y_test)``: x (C * labels_per_class, H, W, ch); the test set as
    ``subsample_test(target, test_images, seed)`` (0: all of it). A class with fewer than
    ``labels_per_class`` training images is an ``InputError`` naming ``--labels-per-class``
    and the class.
    """
    picked = sample_per_class(target.y_train, labels_per_class, seed, target.class_names,
                              what=f"--labels-per-class {labels_per_class}")  # fmt: skip
    return (target.x_train[picked], target.y_train[picked], *subsample_test(target, test_images, seed))


def pick_budget_with_validation(target: Dataset, labels_per_class: int, val_per_class: int, seed: int,
                                test_images: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """``{"train", "val", "test"}``: (images, labels) of a label budget, a disjoint validation split, the test set.

    ``labels_per_class`` + ``val_per_class`` images of every class drawn from
    ``target``'s training set with ``seed``, split per class (``train``: the budget;
    ``val``: the rest, for early stopping and tuning); ``test``: :func:`subsample_test`.
    Raises ``InputError`` naming both flags when either is below 1 or a class has too few images.
    """
    if labels_per_class < 1 or val_per_class < 1:
        raise InputError(
            f"--labels-per-class {labels_per_class} and --val-per-class {val_per_class} must both be at least 1"
        )
    both = sample_per_class(target.y_train, labels_per_class + val_per_class, seed, target.class_names,
                            what=f"--labels-per-class {labels_per_class} + --val-per-class {val_per_class}")  # fmt: skip
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(target.num_classes):
        members = rng.permutation(both[target.y_train[both] == c])
        train.append(members[:labels_per_class])
        val.append(members[labels_per_class:])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    return {
        "train": (target.x_train[train], target.y_train[train]),
        "val": (target.x_train[val], target.y_train[val]),
        "test": subsample_test(target, test_images, seed),
    }


def subsample_test(dataset: Dataset, test_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``dataset``'s test set, or a stratified subset of about ``test_images`` of it drawn with ``seed``.

    The same number per class (``test_images // num_classes``, at least 1, at most the
    smallest class's count); ``test_images`` 0 or at least the test set's size keeps it all.
    Returns ``(x_test, y_test)``.
    """
    x_test, y_test = dataset.x_test, dataset.y_test
    if test_images and test_images < len(x_test):
        per_class = max(1, test_images // dataset.num_classes)
        smallest = int(np.bincount(y_test, minlength=dataset.num_classes).min())
        keep = sample_per_class(y_test, min(per_class, smallest), seed, dataset.class_names)
        x_test, y_test = x_test[keep], y_test[keep]
    return x_test, y_test


def check_per_class(labels: np.ndarray, per_class: int, class_names: list[str] | None = None, what: str = "") -> None:
    """Raise ``InputError`` unless every class has at least ``per_class`` examples (and ``per_class`` >= 1).

    ``class_names`` lists every class, so that one without any example is caught too
    (without it, the classes are those present in ``labels``). ``what`` is what set the
    number, named in the error: the flag and its value, e.g. ``"--labels-per-class 20"``.
    """
    what = what or "the label budget"
    if per_class < 1:
        raise InputError(f"{what} gives {per_class} images per class; at least 1 is needed")
    classes = range(len(class_names)) if class_names is not None else np.unique(labels)
    counts = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    for c in classes:
        if counts[c] < per_class:
            name = f" ({class_names[c]!r})" if class_names is not None else ""
            raise InputError(f"{what} needs {per_class} images per class, but class {c}{name} has only {counts[c]}")


def sample_per_class(labels: np.ndarray, per_class: int, seed: int, class_names: list[str] | None = None,
                     what: str = "") -> np.ndarray:  # fmt: skip
    """Indices of ``per_class`` examples of every class, drawn with ``seed`` (stratified).

    Errors as ``check_per_class`` (``class_names`` and ``what`` make them name the class
    and the flag).
    """
    check_per_class(labels, per_class, class_names, what)
    classes = range(len(class_names)) if class_names is not None else np.unique(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def holdout_split(labels: np.ndarray, fraction: float, seed: int,
                  class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Stratified (train, held-out) index arrays, ``fraction`` of each class held out.

    Every class needs at least 2 examples (one to train on, one to test on), else
    ``InputError``; ``class_names`` lists every class, so that one without any example is
    caught too.
    """
    classes = range(len(class_names)) if class_names is not None else np.unique(labels)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < 2:
            name = f" ({class_names[c]!r})" if class_names is not None else ""
            raise InputError(
                f"class {c}{name} has {len(members)} example(s); holding out {fraction:.0%} of each class for "
                "testing needs at least 2 per class"
            )
        n_held = min(max(1, round(len(members) * fraction)), len(members) - 1)
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


def check_same_classes(source: Dataset, target: Dataset) -> None:
    """``InputError`` unless two datasets name the same classes in the same order (e.g. two domains).

    The message lists the class names found in only one of them, or both orders when the
    names are the same.
    """
    if source.class_names == target.class_names:
        return
    only_source = sorted(set(source.class_names) - set(target.class_names))
    only_target = sorted(set(target.class_names) - set(source.class_names))
    detail = f"only in the source: {only_source}; only in the target: {only_target}"
    if not only_source and not only_target:
        detail = f"the same names in another order: {source.class_names} vs {target.class_names}"
    raise InputError(f"source {source.name!r} and target {target.name!r} must have the same classes; {detail}")


def with_input_shape(dataset: Dataset, shape: tuple[int, int, int]) -> Dataset:
    """``dataset`` with its training and test images converted (``to_input_shape``) to ``shape``."""
    return replace(dataset, x_train=to_input_shape(dataset.x_train, shape),
                   x_test=to_input_shape(dataset.x_test, shape))  # fmt: skip


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


def image_stream(images: np.ndarray, shape: tuple[int, int, int], preprocess=None, batch_size: int = 128):
    """A ``tf.data`` stream of model-ready batches: resize, grey <-> RGB and ``preprocess`` run in the graph.

    ``images``: (N, H, W, 1 or 3) in [0, 1] (any float or integer dtype); ``shape``: the model's
    (height, width, channels); ``preprocess``: a callable on a float32 batch (a backbone's
    ``preprocess_input`` wrapper), or None. Batches are prepared in parallel with the model's
    forward pass (``map`` with AUTOTUNE, ``prefetch``), so no (N, height, width, channels) float32
    copy is ever held in memory: what ``to_input_shape`` + ``preprocess`` do, streamed. Feed it to
    ``model.predict``. Moderate batches (64-128) run MobileNetV2 faster on a CPU than 512.
    Raises ``InputError`` for channel counts other than 1 and 3.
    """
    import tensorflow as tf

    height, width, channels = shape
    if images.shape[-1] not in (1, 3) or channels not in (1, 3):
        raise InputError(f"can convert between 1 and 3 channels only, not {images.shape[-1]} -> {channels}")

    def prepare(batch):
        batch = tf.cast(batch, tf.float32)
        if tuple(batch.shape[1:3]) != (height, width):
            batch = tf.image.resize(batch, (height, width))
        if batch.shape[-1] == 1 and channels == 3:
            batch = tf.image.grayscale_to_rgb(batch)
        elif batch.shape[-1] == 3 and channels == 1:
            batch = tf.image.rgb_to_grayscale(batch)
        return batch if preprocess is None else tf.cast(preprocess(batch), tf.float32)

    stream = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def paired_pipeline(x: np.ndarray, y: np.ndarray, x_other: np.ndarray, batch_size: int, seed: int = 0):
    """Endless full batches of ``((x, y), x_other)``: labelled images beside unlabelled ones.

    Each side is shuffled on its own (seeds ``seed`` and ``seed + 1``) and repeats on its
    own, so the two may differ in size; every batch holds ``batch_size`` of each: a pair
    with an epoch's short last batch is skipped, and a side smaller than a batch repeats
    within one. Used by DANN (source images with labels, target images without).
    """
    import tensorflow as tf

    def endless(images, labels, side_seed: int):
        if len(images) < batch_size:
            ds = tf.data.Dataset.from_tensor_slices((images, labels) if labels is not None else images).cache()
            return ds.shuffle(len(images), seed=side_seed, reshuffle_each_iteration=True).repeat().batch(batch_size)
        return make_pipeline(images, labels, batch_size, shuffle=True, seed=side_seed).repeat()

    return tf.data.Dataset.zip(endless(x, y, seed), endless(x_other, None, seed + 1)).filter(
        lambda a, b: tf.logical_and(tf.shape(a[0])[0] == batch_size, tf.shape(b)[0] == batch_size)
    )
