"""Unit tests of common.data: every source (offline), class splits, budgets, shapes, pipelines."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common import data


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the format of the MNIST family."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_dir(tmp_path):
    """A fake Fashion-MNIST folder: 40 train and 20 test images of 28x28, labels 0-9."""
    rng = np.random.default_rng(0)
    files = {
        "x_train": rng.integers(0, 256, (40, 28, 28)),
        "y_train": np.arange(40) % 10,
        "x_test": rng.integers(0, 256, (20, 28, 28)),
        "y_test": np.arange(20) % 10,
    }
    for key, array in files.items():
        write_idx(tmp_path / data.FASHION_MNIST_FILES[key], array)
    return tmp_path, files


@pytest.fixture
def no_fashion_anywhere(tmp_path, monkeypatch):
    """No Fashion-MNIST in any search directory, and the download fails."""
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nothing"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")

    def no_download():
        raise OSError("no network")

    monkeypatch.setattr(data, "_download_fashion_mnist", no_download)


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12) -> None:
    """PNG images, one sub-folder per class; class i is filled with grey level 40*i."""
    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for n in range(count):
            pixels = np.full((size, size, 3), 40 * index, dtype=np.uint8)
            tf.io.write_file(str(root / name / f"{n}.png"), tf.io.encode_png(pixels))


# --- Sources ----------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), array)


def test_fashion_mnist_found_in_env_dir(tiny_fashion_dir, monkeypatch):
    directory, files = tiny_fashion_dir
    monkeypatch.setenv(data.DATA_DIR_ENV, str(directory))
    assert data.find_fashion_mnist() == directory
    ds = data.load_dataset("fashion_mnist")
    assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (20, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_train[..., 0], files["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, files["y_test"])
    assert ds.num_classes == 10 and ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_search_order_prefers_env_dir(tiny_fashion_dir, monkeypatch):
    directory, _ = tiny_fashion_dir
    monkeypatch.setenv(data.DATA_DIR_ENV, str(directory))
    dirs = data.fashion_mnist_search_dirs()
    assert dirs[0] == directory / "fashion-mnist" and dirs[1] == directory
    assert dirs[-1] == data.DEBIAN_FASHION_MNIST_DIR


def test_fashion_mnist_missing_error_says_where_and_how(no_fashion_anywhere, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("fashion_mnist")
    message = str(error.value)
    assert str(tmp_path / "debian") in message and str(tmp_path / "keras") in message
    assert "apt-get install dataset-fashion-mnist" in message and data.DATA_DIR_ENV in message


def test_real_fashion_mnist_is_available():
    """The embedded default: `make setup` must have made the real files findable."""
    ds = data.load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


def test_digits_is_offline_and_split():
    ds = data.load_dataset("digits", seed=0)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.max() <= 1.0
    again = data.load_dataset("digits", seed=0)
    np.testing.assert_array_equal(ds.y_test, again.y_test)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'imagenette'.*fashion_mnist.*folder:<path>"):
        data.load_dataset("imagenette")


def test_tfds_source_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("tfds:mnist")
        resized = data.load_dataset("tfds:tf_flowers", image_size=16)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.num_classes == 10 and ds.name == "tfds:mnist"
    assert resized.input_shape == (16, 16, 3) and resized.num_classes == 5
    assert 0.0 <= resized.x_train.min() and resized.x_train.max() <= 1.0


def test_tfds_unknown_name():
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_thing'"):
        data.load_dataset("tfds:no_such_thing")


def test_folder_source_holds_out_a_test_split(tmp_path):
    make_image_folder(tmp_path, {"cats": 10, "dogs": 10})
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.class_names == ["cats", "dogs"] and ds.input_shape == (8, 8, 3)
    assert len(ds.x_train) == 16 and len(ds.x_test) == 4
    assert np.bincount(ds.y_test).tolist() == [2, 2]
    # Class 1's images are grey level 40, so labels and pixels stay paired.
    np.testing.assert_allclose(ds.x_train[ds.y_train == 1], 40 / 255.0, atol=1e-6)


def test_folder_source_uses_train_and_test_subfolders(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 3, "b": 4})
    make_image_folder(tmp_path / "test", {"a": 2, "b": 2})
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert (len(ds.x_train), len(ds.x_test)) == (7, 4)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'missing'}")
    make_image_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(ValueError, match="at least 2"):
        data.load_dataset(f"folder:{tmp_path / 'one'}")


# --- Class splits and budgets ------------------------------------------------------


def toy_dataset(num_classes: int = 4, per_class: int = 5) -> data.Dataset:
    y = np.repeat(np.arange(num_classes), per_class)
    x = y[:, None, None, None].astype(np.float32) * np.ones((1, 2, 2, 1), np.float32)
    return data.Dataset("toy", x, y, x.copy(), y.copy(), [f"c{i}" for i in range(num_classes)])


def test_parse_classes():
    assert data.parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert data.parse_classes("5,7, 9") == [5, 7, 9]
    assert data.parse_classes("0-1,8") == [0, 1, 8]
    with pytest.raises(ValueError, match="cannot read class list 'a-b'"):
        data.parse_classes("a-b")


def test_check_class_split_errors():
    ds = toy_dataset()
    data.check_class_split(ds, [0, 1], [2, 3])
    with pytest.raises(ValueError, match="empty"):
        data.check_class_split(ds, [0, 1], [])
    with pytest.raises(ValueError, match=r"class 1 \(c1\) is in two class lists"):
        data.check_class_split(ds, [0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"classes \[7\] are not in toy \(it has classes 0-3\)"):
        data.check_class_split(ds, [0], [7])


def test_select_classes_reindexes_in_given_order():
    task = data.select_classes(toy_dataset(), [3, 1])
    assert task.class_names == ["c3", "c1"] and task.num_classes == 2
    assert sorted(set(task.y_train.tolist())) == [0, 1]
    # New label 0 is old class 3, whose pixels are 3.
    assert np.all(task.x_train[task.y_train == 0] == 3) and np.all(task.x_test[task.y_test == 1] == 1)


def test_sample_per_class_is_stratified_seeded_and_bounded():
    labels = np.repeat(np.arange(3), 20)
    picked = data.sample_per_class(labels, 4, seed=1)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 4] and len(set(picked)) == 12
    np.testing.assert_array_equal(picked, data.sample_per_class(labels, 4, seed=1))
    assert not np.array_equal(picked, data.sample_per_class(labels, 4, seed=2))
    with pytest.raises(ValueError, match="label budget 21 per class is larger than class 0, which has 20"):
        data.sample_per_class(labels, 21, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        data.sample_per_class(labels, 0, seed=0)


def test_holdout_split_is_disjoint_and_stratified():
    labels = np.repeat(np.arange(2), 10)
    train, held = data.holdout_split(labels, 0.3, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == 20
    assert np.bincount(labels[held]).tolist() == [3, 3]


# --- Shapes and pipelines ------------------------------------------------------------


def test_to_input_shape_resizes_and_converts_channels():
    grey = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    rgb = data.to_input_shape(grey, (32, 32, 3), batch_size=2)
    assert rgb.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2])
    back = data.to_input_shape(rgb, (32, 32, 1))
    assert back.shape == (5, 32, 32, 1)
    assert data.to_input_shape(grey, (28, 28, 1)) is grey
    with pytest.raises(ValueError, match="1 and 3 channels"):
        data.to_input_shape(grey, (28, 28, 4))


def test_make_pipeline_batches_shuffles_and_augments():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10)
    batches = list(data.make_pipeline(x, y, batch_size=4).as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)

    shuffled = data.make_pipeline(x, y, batch_size=10, shuffle=True, seed=3)
    first, second = (next(iter(shuffled))[1].numpy() for _ in range(2))
    assert sorted(first) == list(range(10)) and not np.array_equal(first, y)
    assert not np.array_equal(first, second)  # reshuffled every epoch

    def add_hundred(images, training):
        return images + 100.0

    augmented = next(iter(data.make_pipeline(x, y, batch_size=10, augment=add_hundred)))
    np.testing.assert_array_equal(augmented[0].numpy().ravel(), np.arange(10) + 100.0)
    images_only = next(iter(data.make_pipeline(x, batch_size=10, augment=add_hundred)))
    assert images_only.shape == (10, 1, 1, 1)
