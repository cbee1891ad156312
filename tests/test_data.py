"""Unit tests of common.data: every source (offline), class splits, budgets, shapes, pipelines."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common import data
from common.errors import InputError


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
    # The flags are named, for a user who never typed them (the defaults assume ten classes).
    with pytest.raises(ValueError, match=r"^--target-classes: classes \[7\] are not in toy .*set --source-classes and"):
        data.check_class_split(ds, [0], [7], flags=("--source-classes", "--target-classes"))


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
    with pytest.raises(ValueError, match="label budget needs 21 images per class, but class 0 has only 20"):
        data.sample_per_class(labels, 21, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        data.sample_per_class(labels, 0, seed=0)
    # The error names the flag that set the number, and the class by name.
    names = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"--labels-per-class 25 needs 25 images per class, but class 0 \('a'\)"):
        data.sample_per_class(labels, 25, seed=0, class_names=names, what="--labels-per-class 25")
    with pytest.raises(ValueError, match="--source-images 2 gives 0 images per class"):
        data.sample_per_class(labels, 0, seed=0, class_names=names, what="--source-images 2")


def test_an_empty_class_is_not_hidden():
    """Class 3 has no example: np.unique / bincount without minlength would not see it."""
    labels = np.repeat(np.arange(3), 20)
    names = ["a", "b", "c", "empty"]
    with pytest.raises(ValueError, match=r"class 3 \('empty'\) has only 0"):
        data.sample_per_class(labels, 1, seed=0, class_names=names)
    with pytest.raises(ValueError, match=r"class 3 \('empty'\) has 0 example"):
        data.holdout_split(labels, 0.2, seed=0, class_names=names)
    x = np.zeros((len(labels), 2, 2, 1), np.float32)
    dataset = data.Dataset("toy", x, labels, x[:3], np.array([0, 1, 2]), names)
    with pytest.raises(ValueError, match=r"class 3 \('empty'\) of toy has no training images"):
        data.select_classes(dataset, [0, 3])


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


# --- Real folders: junk, unusual formats, split layouts -------------------------------


def save_image(path: Path, mode: str = "RGB", value: int = 100, size: tuple[int, int] = (12, 10)) -> None:
    """A Pillow image of one grey ``value`` (0-255) in ``mode``, written in the format of the suffix."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, value)
    if mode in ("I;16", "I"):
        image = Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16))
    elif mode == "P":
        image = image.convert("RGB").quantize(4)
        image.info["transparency"] = 0
    elif mode != "L":
        image = image.convert(mode)
    image.save(path)


def test_class_folder_without_a_readable_image_is_named(tmp_path):
    make_image_folder(tmp_path, {"cats": 4, "dogs": 4})
    save_image(tmp_path / "scans" / "0.tif")
    save_image(tmp_path / "scans" / "1.tif")
    (tmp_path / "scans" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(InputError) as error:
        data.load_dataset(f"folder:{tmp_path}", image_size=8)
    message = str(error.value)
    assert str(tmp_path / "scans") in message and "skipped 3 files" in message
    assert "unsupported format .tif: 2" in message and "hidden: 1" in message
    assert "supported formats: .bmp, .gif, .jpeg, .jpg, .png" in message


def test_class_with_too_few_images_for_the_split_is_named(tmp_path):
    make_image_folder(tmp_path, {"cats": 4, "dogs": 1})
    with pytest.raises(InputError, match=rf"class folder '{tmp_path / 'dogs'}' has 1 readable image.*at least 2"):
        data.load_dataset(f"folder:{tmp_path}", image_size=8)


def test_undecodable_files_are_skipped_and_listed(tmp_path, capsys):
    from PIL import Image

    make_image_folder(tmp_path, {"cats": 3, "dogs": 3})
    (tmp_path / "cats" / "empty.jpg").write_bytes(b"")
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big)
    (tmp_path / "dogs" / "truncated.jpg").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    (tmp_path / "dogs" / "page.png").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    (tmp_path / "dogs" / "notes.txt").write_text("where these came from")
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert len(ds.x_train) + len(ds.x_test) == 6  # the readable images only
    out = capsys.readouterr().out
    assert "skipped 4 files (unsupported format .txt: 1, empty file: 1, cannot be read: 2)" in out
    for name in ("cats/empty.jpg", "dogs/truncated.jpg", "dogs/page.png"):
        assert str(tmp_path / name) in out, out


def test_a_class_of_broken_files_names_one_of_them(tmp_path):
    make_image_folder(tmp_path, {"cats": 3})
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "0.jpg").write_bytes(b"")
    (tmp_path / "dogs" / "1.png").write_text("<html></html>")
    with pytest.raises(InputError) as error:
        data.load_dataset(f"folder:{tmp_path}", image_size=8)
    message = str(error.value)
    assert f"class folder '{tmp_path / 'dogs'}' has no image that can be read" in message
    assert "empty file: 1, cannot be read: 1" in message and str(tmp_path / "dogs" / "0.jpg") in message


@pytest.mark.parametrize(
    "file, mode, grey",
    [
        ("scan.bmp", "1", 255),  # 1-bit BMP (TensorFlow's decoder refuses it)
        ("palette.png", "P", 100),  # palette with a transparent index
        ("grey.png", "L", 100),
        ("alpha.png", "RGBA", 100),
        ("deep.png", "I;16", 100),  # 16-bit grey
        ("print.jpg", "CMYK", 100),
        ("grey.jpg", "L", 100),
        ("anim.gif", "L", 100),
        ("grey.bmp", "L", 100),
    ],
)
def test_valid_unusual_formats_load(tmp_path, file, mode, grey):
    make_image_folder(tmp_path, {"a": 2})
    save_image(tmp_path / "b" / file, mode, grey)
    save_image(tmp_path / "b" / f"2{Path(file).suffix}", mode, grey)
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=6)
    images = np.concatenate([ds.x_train[ds.y_train == 1], ds.x_test[ds.y_test == 1]])
    assert images.shape == (2, 6, 6, 3)
    np.testing.assert_allclose(images, grey / 255.0, atol=3 / 255.0)


def test_class_order_is_code_point_order_and_junk_folders_are_ignored(tmp_path):
    make_image_folder(tmp_path, {"cat": 2, "Äpfel": 2, "apple": 2, "Zebra": 2, "10": 2, "9": 2})
    save_image(tmp_path / ".ipynb_checkpoints" / "0.png")
    save_image(tmp_path / "__MACOSX" / "cat" / "._0.png")
    save_image(tmp_path / "cat" / "more" / "deeper.png")  # images below a class folder belong to it
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=4)
    assert ds.class_names == ["10", "9", "Zebra", "apple", "cat", "Äpfel"]
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [2, 2, 2, 2, 3, 2]


def test_train_and_val_folders_val_is_the_test_split(tmp_path, capsys):
    make_image_folder(tmp_path / "train", {"a": 5, "b": 5})
    make_image_folder(tmp_path / "val", {"a": 2, "b": 3})
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.class_names == ["a", "b"] and (len(ds.x_train), len(ds.x_test)) == (10, 5)
    assert "test split from val/" in capsys.readouterr().out


def test_train_validation_and_test_folders_validation_joins_training(tmp_path):
    make_image_folder(tmp_path / "Train", {"a": 5, "b": 5})
    make_image_folder(tmp_path / "validation", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "test", {"a": 3, "b": 3})
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert (len(ds.x_train), len(ds.x_test)) == (14, 6)
    assert np.bincount(ds.y_train).tolist() == [7, 7]


def test_train_folder_alone_holds_out_a_test_split(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 5, "b": 5})
    ds = data.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert (len(ds.x_train), len(ds.x_test)) == (8, 2)


def test_split_layouts_that_cannot_be_used_say_what_is_expected(tmp_path):
    make_image_folder(tmp_path / "mixed" / "train", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "mixed" / "extra", {"a": 2})
    with pytest.raises(InputError, match=r"split folders \['train'\] but also holds \['extra'\]; expected one"):
        data.load_dataset(f"folder:{tmp_path / 'mixed'}", image_size=8)
    make_image_folder(tmp_path / "no_train" / "val", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "no_train" / "test", {"a": 2, "b": 2})
    with pytest.raises(InputError, match="has no train/ folder"):
        data.load_dataset(f"folder:{tmp_path / 'no_train'}", image_size=8)
    make_image_folder(tmp_path / "differ" / "train", {"a": 2, "b": 2, "c": 2})
    make_image_folder(tmp_path / "differ" / "test", {"a": 2, "b": 2, "d": 2})
    with pytest.raises(InputError, match=r"only in train/: \['c'\], only in test/: \['d'\]"):
        data.load_dataset(f"folder:{tmp_path / 'differ'}", image_size=8)


def test_folder_without_class_folders_says_what_it_found(tmp_path):
    for n in range(3):
        save_image(tmp_path / "loose" / f"{n}.png")
    with pytest.raises(InputError, match="found no sub-folder and 3 image files directly in it"):
        data.load_dataset(f"folder:{tmp_path / 'loose'}", image_size=8)
    make_image_folder(tmp_path / "wrapped" / "dataset", {"a": 2, "b": 2})
    with pytest.raises(InputError, match=f"did you mean folder:{tmp_path / 'wrapped' / 'dataset'}"):
        data.load_dataset(f"folder:{tmp_path / 'wrapped'}", image_size=8)


def test_an_archive_is_not_a_folder(tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(InputError, match="photos.zip' is a file; give a folder"):
        data.load_dataset(f"folder:{tmp_path / 'photos.zip'}")


def test_bad_image_size(tmp_path):
    make_image_folder(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(InputError, match="--image-size -3"):
        data.load_dataset(f"folder:{tmp_path}", image_size=-3)


def test_damaged_fashion_mnist_file_is_named(tiny_fashion_dir, monkeypatch):
    directory, _ = tiny_fashion_dir
    monkeypatch.setenv(data.DATA_DIR_ENV, str(directory))
    labels = directory / data.FASHION_MNIST_FILES["y_train"]
    with gzip.open(labels, "rb") as f:
        content = f.read()
    with gzip.open(labels, "wb") as f:
        f.write(content[:-5])  # an interrupted download
    with pytest.raises(InputError, match=rf"{labels} holds 43 bytes but its header \(40,\) needs 48"):
        data.load_dataset("fashion_mnist")
    labels.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(InputError, match=f"{labels} is not a readable gzip file"):
        data.load_dataset("fashion_mnist")


def test_image_stream_matches_to_input_shape_and_preprocess():
    rng = np.random.default_rng(0)
    grey = rng.random((5, 28, 28, 1), dtype=np.float32)
    expected = data.to_input_shape(grey, (32, 32, 3)) * 2.0 - 1.0
    batches = list(data.image_stream(grey, (32, 32, 3), lambda b: b * 2.0 - 1.0, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    got = np.concatenate([b.numpy() for b in batches])
    assert got.dtype == np.float32 and got.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    rgb = rng.random((3, 32, 32, 3), dtype=np.float32)  # no resize, RGB -> grey, no preprocess
    np.testing.assert_allclose(
        next(iter(data.image_stream(rgb, (32, 32, 1), batch_size=8))).numpy(),
        data.to_input_shape(rgb, (32, 32, 1)),
        atol=1e-6,
    )
    with pytest.raises(InputError, match="1 and 3 channels only, not 4 -> 3"):
        data.image_stream(np.zeros((2, 8, 8, 4), np.float32), (8, 8, 3))


def test_check_same_classes_names_what_differs():
    def dataset(name, classes):
        x = np.zeros((len(classes), 4, 4, 1), np.float32)
        y = np.arange(len(classes))
        return data.Dataset(name, x, y, x, y, classes)

    data.check_same_classes(dataset("a", ["cat", "dog"]), dataset("b", ["cat", "dog"]))
    with pytest.raises(InputError, match=r"only in the source: \['dog'\]; only in the target: \['fox'\]"):
        data.check_same_classes(dataset("a", ["cat", "dog"]), dataset("b", ["cat", "fox"]))
    with pytest.raises(InputError, match="the same names in another order"):
        data.check_same_classes(dataset("a", ["cat", "dog"]), dataset("b", ["dog", "cat"]))


@pytest.mark.parametrize("n_other", [3, 50])  # smaller than a batch, and several batches
def test_paired_pipeline_gives_full_batches_of_both_sides(n_other):
    x, y = np.arange(20, dtype=np.float32).reshape(20, 1), np.arange(20)
    x_other = 100 + np.arange(n_other, dtype=np.float32).reshape(n_other, 1)
    batches = list(data.paired_pipeline(x, y, x_other, batch_size=8, seed=0).take(12).as_numpy_iterator())
    assert len(batches) == 12
    for (images, labels), other in batches:
        assert images.shape == (8, 1) and other.shape == (8, 1)
        np.testing.assert_array_equal(images[:, 0], labels)  # labels stay with their images
        assert other.min() >= 100
    assert len({int(v) for (_, labels), _ in batches for v in labels}) == 20  # every labelled image comes round


def test_load_tasks_splits_checks_and_reindexes():
    source, target = data.load_tasks("digits", "0-4", "5,7,9")
    assert source.num_classes == 5 and target.class_names == ["5", "7", "9"]
    assert sorted(set(target.y_train.tolist())) == [0, 1, 2] and sorted(set(source.y_test.tolist())) == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="in two class lists"):
        data.load_tasks("digits", "0-4", "4-6")


def test_label_budget_and_subsample_test():
    ds = toy_dataset(num_classes=4, per_class=5)
    x, y, x_test, y_test = data.label_budget(ds, 2, seed=0, test_images=8)
    assert np.bincount(y).tolist() == [2, 2, 2, 2] and np.all(x[:, 0, 0, 0] == y)  # images follow their labels
    assert np.bincount(y_test).tolist() == [2, 2, 2, 2] and np.all(x_test[:, 0, 0, 0] == y_test)
    assert len(data.label_budget(ds, 2, seed=0)[2]) == 20  # test_images 0: the whole test set
    assert len(data.subsample_test(ds, 100, seed=0)[0]) == 20  # more than there are: all of them
    assert len(data.subsample_test(ds, 2, seed=0)[0]) == 4  # at least one per class
    np.testing.assert_array_equal(data.subsample_test(ds, 8, 3)[1], data.subsample_test(ds, 8, 3)[1])
    with pytest.raises(InputError, match="--labels-per-class 6"):
        data.label_budget(ds, 6, seed=0)


def test_with_input_shape_converts_both_splits():
    converted = data.with_input_shape(toy_dataset(), (4, 4, 3))
    assert converted.x_train.shape == (20, 4, 4, 3) and converted.x_test.shape == (20, 4, 4, 3)
    assert converted.name == "toy" and converted.num_classes == 4
