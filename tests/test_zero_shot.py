"""Unit tests of common/zero_shot.py and smoke, accuracy and bad-input tests of recipes/zero_shot.py (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import data
from common import zero_shot as zs
from common.errors import InputError
from recipes import zero_shot as zsl
from tests.conftest import ROOT, assert_cli_error, execute_notebook
from tests.test_recipes_cli import image_folder

# Quick run, seed 0 (measured): DAP 76.3%, ESZSL 86.3%, oracle 97.7% on the unseen classes; chance 33.3%.
# A recipe whose attribute models stopped learning lands near chance.
QUICK_FLOOR = 0.55


# --- ESZSL and DAP on toy problems ------------------------------------------------------


def test_eszsl_closed_form_matches_a_direct_least_squares_solve():
    """Eq. 8 against the objective ||X^T V S - Y||^2 + g||V S||^2 + l||X^T V||^2 + g l ||V||^2 solved by lstsq."""
    rng = np.random.default_rng(0)
    n, d, a, z = 40, 6, 3, 4
    features, labels = rng.normal(size=(n, d)), rng.integers(z, size=n)
    signatures = rng.random((z, a))
    gamma, lam = 0.7, 0.3
    v = zs.eszsl_fit(features, labels, signatures, gamma, lam)

    x, s = features.T, signatures.T  # the paper's X (d, n) and S (a, z)
    y = -np.ones((n, z))
    y[np.arange(n), labels] = 1
    # vec(A V B) = (B^T kron A) vec(V), column-major vec
    system = np.vstack([
        np.kron(s.T, x.T),
        np.sqrt(gamma) * np.kron(s.T, np.eye(d)),
        np.sqrt(lam) * np.kron(np.eye(a), x.T),
        np.sqrt(gamma * lam) * np.eye(d * a),
    ])  # fmt: skip
    target = np.concatenate([y.reshape(-1, order="F"), np.zeros(d * z + n * a + d * a)])
    direct = np.linalg.lstsq(system, target, rcond=None)[0].reshape(d, a, order="F")
    np.testing.assert_allclose(v, direct, rtol=1e-8, atol=1e-10)


def toy_attribute_problem(seed: int = 0, per_class: int = 40):
    """Features are the class's 0/1 attributes plus noise (and two noise dimensions): attributes decide the class.

    The seen classes are every other 4-bit description, so that no attribute is a function of the
    others over the seen classes (a classifier could not tell it from them otherwise).
    """
    unseen = np.array([[1, 0, 1, 0], [0, 1, 0, 1]])
    every = np.array([[(i >> bit) & 1 for bit in range(4)] for i in range(16)])
    seen = np.array([row for row in every if not any(np.array_equal(row, u) for u in unseen)])
    rng = np.random.default_rng(seed)

    def images(signatures):
        labels = np.repeat(np.arange(len(signatures)), per_class)
        noise = rng.normal(0, 0.3, (len(labels), signatures.shape[1] + 2))
        return np.hstack([signatures[labels], np.zeros((len(labels), 2))]) + noise, labels

    return seen, unseen, images(seen), images(unseen)


def test_dap_recovers_the_unseen_class_on_a_toy_problem():
    seen, unseen, (x, y), (x_unseen, y_unseen) = toy_attribute_problem()
    dap = zs.fit_dap(x, y, seen, ["a", "b", "c", "d"])
    assert np.allclose(dap.prior, 0.5)
    predicted = dap.scores(x_unseen, unseen).argmax(axis=1)
    assert np.mean(predicted == y_unseen) >= 0.95
    probabilities = dap.attribute_probabilities(x_unseen)
    assert np.mean((probabilities > 0.5) == unseen[y_unseen].astype(bool)) >= 0.9  # noise 0.3: ~5% per attribute


def test_eszsl_recovers_the_unseen_class_on_the_same_toy_problem():
    seen, unseen, (x, y), (x_unseen, y_unseen) = toy_attribute_problem()
    v = zs.eszsl_fit(x, y, zs.eszsl_signatures(seen), 1.0, 0.1)
    predicted = zs.eszsl_scores(x_unseen, v, zs.eszsl_signatures(unseen)).argmax(axis=1)
    assert np.mean(predicted == y_unseen) >= 0.95


def test_calibrated_stacking_trades_seen_for_unseen_accuracy():
    """Scores biased towards the seen classes: gamma = 0 names no unseen class, the chosen gamma fixes that."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    scores = np.eye(4)[labels] + rng.normal(0, 0.2, (200, 4))
    seen_mask = np.array([True, True, False, False])
    scores[:, seen_mask] += 2.0
    assert zs.gzsl_report(scores, labels, seen_mask)["unseen_accuracy"] == 0.0
    gamma = zs.choose_calibration(scores, labels, seen_mask)
    report = zs.gzsl_report(scores, labels, seen_mask, gamma)
    assert 1.0 < gamma < 3.0 and report["harmonic_mean"] >= 0.9
    assert zs.harmonic_mean(0.8, 0.2) == pytest.approx(0.32)


# --- The table and the split check --------------------------------------------------------


def test_the_builtin_table_and_default_split():
    table = zs.fashion_mnist_table()
    assert table.values.shape == (10, 15) and table.class_names == data.FASHION_MNIST_CLASSES
    assert len({tuple(row) for row in table.binary()}) == 10  # every class has its own description
    seen, unseen = zs.resolve_split(table, ",".join(zs.DEFAULT_UNSEEN))
    assert unseen == [2, 3, 7] and zs.resolve_split(table, "2,3,7") == (seen, unseen)


@pytest.mark.parametrize(
    "unseen, message",
    [
        ("Trouser,Pullover", r"unseen class 'Trouser' has attribute 'two_legs', but no seen class has it"),
        ("Coat,Shirt", r"'front_opening'.*make one of \['Shirt'\] seen"),
        ("Bag", "at least two unseen classes"),
        ("Pullover,Jumper", r"\['Jumper'\] are neither class numbers nor class names"),
    ],
)
def test_a_split_zero_shot_cannot_learn_is_refused_naming_the_attribute(unseen, message):
    with pytest.raises(InputError, match=message):
        zs.resolve_split(zs.fashion_mnist_table(), unseen)


def test_unseen_classes_with_the_same_description_are_refused():
    table = zs.AttributeTable(["a", "b", "c", "d"], ["x", "y"], np.array([[1, 0], [0, 1], [1, 1], [1, 1.0]]))
    with pytest.raises(InputError, match="'c' and 'd' have the same attributes"):
        zs.check_split(table, [0, 1], [2, 3])


def test_validation_split_holds_out_seen_classes_that_pass_the_check():
    table = zs.fashion_mnist_table()
    held = zs.validation_split(table, [0, 1, 4, 5, 6, 8, 9], 2, seed=0)
    assert len(held) == 2 and set(held) < {0, 1, 4, 5, 6, 8, 9}
    zs.check_split(table, [c for c in [0, 1, 4, 5, 6, 8, 9] if c not in held], held)
    assert zs.validation_split(table, [1, 8], 2) is None  # two seen classes leave nothing to hold out


def test_csv_round_trip_and_graded_values(tmp_path):
    (tmp_path / "t.csv").write_text("\ufeffclass, stripes ,legs\n\nzebra,100,4\nhorse, 0 ,4.0\nduck,20,2\n")
    table = zs.read_attribute_csv(tmp_path / "t.csv")
    assert table.class_names == ["zebra", "horse", "duck"] and table.attributes == ["stripes", "legs"]
    assert table.binary().tolist() == [[1, 0], [0, 0], [0, 0]]  # thresholded at the table's mean (21.7)
    zs.write_attribute_csv(table, tmp_path / "copy.csv")
    assert np.array_equal(zs.read_attribute_csv(tmp_path / "copy.csv").values, table.values)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("class\na\nb\n", "the header must be"),
        ("class,x,x\na,1,0\nb,0,1\n", r"\['x'\] named twice"),
        ("class,x\na,1\n", "at least two classes"),
        ("class,x,y\na,1,0\nb,0\n", "line 3: 2 cells, the header has 3"),
        ("class,x,y\na,1,0\na,0,1\n", "line 3: class 'a' has a second row"),
        ("class,x,y\na,1,0\nb,yes,1\n", r"line 3: class 'b', attribute 'x': 'yes' is not a number"),
        ("class,x,y\na,1,nan\nb,0,1\n", r"line 2: class 'a', attribute 'y': 'nan' is not a number"),
        ("class,x,y\na,1,1\nb,0,1\n", r"attribute\(s\) \['y'\] have the same value for every class"),
    ],
)
def test_a_bad_csv_is_one_error_naming_the_line(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        zs.read_attribute_csv(tmp_path / "t.csv")


def test_strict_json_replaces_nan():
    cleaned = zs.strict_json({"a": [np.float64("nan"), np.int64(2)], "b": np.array([1.0, np.inf])})
    assert json.dumps(cleaned, allow_nan=False) == '{"a": [null, 2], "b": [1.0, null]}'


# --- The recipe ------------------------------------------------------------------------------


def strict_load(path):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_quick_run_learns_and_writes_the_run_folder(tmp_path):
    import keras

    record = zsl.main(["--quick", "--out", str(tmp_path / "run")])
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "history.csv", "model.keras", "attributes.csv",
                 "confusion_matrix_dap.png", "confusion_matrix_eszsl.png", "attribute_ablation.png",
                 "per_attribute_accuracy.png"):  # fmt: skip
        assert (run / name).is_file(), name
    assert strict_load(run / "metrics.json") == json.loads(json.dumps(record))
    variants = record["variants"]
    assert record["metric"] == "unseen_accuracy" and record["baseline"] == "chance"
    assert variants["chance"]["unseen_accuracy"] == pytest.approx(1 / 3)
    for method in ("dap", "eszsl"):
        accuracy = variants[method]["unseen_accuracy"]
        assert accuracy >= QUICK_FLOOR, f"{method}: {accuracy:.3f} on the unseen classes, chance 0.333"
        assert set(variants[method]["ablation"]) == set(record["attributes"])
        assert variants[method]["gzsl_harmonic_mean_calibrated"] >= variants[method]["gzsl_harmonic_mean"]
    assert variants["oracle"]["unseen_accuracy"] >= variants["eszsl"]["unseen_accuracy"]
    assert record["validation"]["pseudo_unseen"] and not set(record["validation"]["pseudo_unseen"]) & set(
        record["unseen_classes"]
    )
    assert np.array(variants["eszsl"]["confusion_matrix"]).shape == (3, 3)

    # model.keras: images -> ESZSL's calibrated scores over every class, the same GZSL figures
    dataset = data.load_dataset("fashion_mnist")
    x_test, y_test = data.subsample_test(dataset, 1000, 0)
    scores = keras.models.load_model(run / "model.keras").predict(x_test, verbose=0)
    seen_mask = ~np.isin(np.arange(10), [2, 3, 7])
    report = zs.gzsl_report(scores, y_test, seen_mask)
    calibrated = variants["eszsl"]["gzsl"]["calibrated"]
    assert report["seen_accuracy"] == pytest.approx(calibrated["seen_accuracy"], abs=0.01)
    assert report["unseen_accuracy"] == pytest.approx(calibrated["unseen_accuracy"], abs=0.01)


def own_folder_and_table(tmp_path, csv_text: str):
    root = image_folder(tmp_path / "images", {"a": 12, "b": 12, "c": 12, "d": 12}, side=16)
    (tmp_path / "table.csv").write_text(csv_text)
    return ["--dataset", f"folder:{root}", "--attributes", str(tmp_path / "table.csv"), "--unseen-classes", "c,d",
            "--train-per-class", "5", "--val-per-class", "2", "--oracle-per-class", "5", "--out", str(tmp_path / "run")]  # fmt: skip


GOOD_TABLE = "class,dark,striped,round,tall\na,1,0,0,1\nb,0,1,1,0\nc,1,1,0,0\nd,0,0,1,1\n"


def test_own_folder_and_attribute_table(tmp_path, capsys):
    record = zsl.main(["--quick", *own_folder_and_table(tmp_path, GOOD_TABLE)])
    assert record["unseen_classes"] == ["c", "d"] and record["attribute_table"].endswith("table.csv")
    assert record["validation"]["pseudo_unseen"] is None  # two seen classes: nothing to hold out
    assert "no calibration" in capsys.readouterr().out
    assert (tmp_path / "run" / "attributes.csv").read_text().splitlines()[0] == "class,dark,striped,round,tall"


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("class,dark,striped\na,1,0\nb,0,1\nc,1,1\n", r"table.csv has no row for folder:.*'s classes \['d'\]"),
        ("class,dark,striped\na,1,0\nb,0,1\nc,1,x\nd,0,0\n", r"line 4: class 'c', attribute 'striped': 'x' is not"),
        ("class,dark,striped\na,1,0\nb,1,0\nc,1,1\nd,0,0\n", r"unseen class 'c' has attribute 'striped'"),
    ],
)
def test_a_bad_table_for_a_folder_is_one_error_line(tmp_path, capsys, csv_text, message):
    assert_cli_error(capsys, zsl.main, own_folder_and_table(tmp_path, csv_text), message)
    assert not (tmp_path / "run").exists()


def test_a_folder_without_a_table_and_a_refused_split_stop_before_training(tmp_path, capsys):
    root = image_folder(tmp_path / "images", {"a": 6, "b": 6, "c": 6, "d": 6})
    argv = ["--dataset", f"folder:{root}", "--out", str(tmp_path / "run")]
    assert_cli_error(capsys, zsl.main, argv, "the built-in attribute table describes Fashion-MNIST.*--attributes")
    argv = ["--unseen-classes", "Trouser,Pullover", "--out", str(tmp_path / "run")]
    assert_cli_error(capsys, zsl.main, argv, "'two_legs'")
    assert_cli_error(capsys, zsl.main, ["--oracle-per-class", "7000"], r"--oracle-per-class need 7000 .*'Pullover'")
    assert_cli_error(capsys, zsl.main, ["--backup-dir", str(tmp_path / "b")], "does not support --backup-dir")
    assert not (tmp_path / "run").exists()


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        zsl.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--attributes", "--unseen-classes", "--base", "--train-per-class", "--val-per-class",
                 "--oracle-per-class", "--pca-dims", "--seed", "--out", "--quick", "--strategy"):  # fmt: skip
        assert flag in text


def test_notebook_executes_in_quick_mode():
    execute_notebook(ROOT / "notebooks" / "09_zero_shot.ipynb")
