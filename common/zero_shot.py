"""Zero-shot learning from class attributes: the attribute table, the split check, DAP, ESZSL, GZSL metrics.

Every class is described by a row of attributes (``AttributeTable``: classes x attributes,
values in any numeric range, binary or graded). Models learn, on images of the *seen*
classes only, to predict the attributes from image features; an image of an *unseen*
class is then named by the class whose description fits the predicted attributes best.

- ``FASHION_MNIST_ATTRIBUTES``: a table for Fashion-MNIST's ten classes written for this
  collection, 15 attributes a person can check by looking at the garment.
- ``read_attribute_csv``: a user's own table (a header row ``class,attr1,attr2,...``, one
  row per class); every problem is one ``InputError`` naming the file, line and cell.
- ``check_split``: refuses a seen/unseen split in which an unseen class has an attribute
  value that no seen class shows (no classifier can learn it), or two unseen classes
  with the same description (no attribute can tell them apart).
- ``DAP``: Direct Attribute Prediction (Lampert, Nickisch & Harmeling, CVPR 2009; TPAMI
  2014): one probabilistic classifier per attribute, class by attribute likelihood.
- ``eszsl_fit``: ESZSL (Romera-Paredes & Torr, ICML 2015): a linear map from features to
  attribute space in closed form.
- ``gzsl_report``, ``choose_calibration``: generalised ZSL (test images of seen and unseen
  classes, all classes to choose from): seen and unseen accuracy, their harmonic mean,
  and calibrated stacking (Chao, Changpinyo, Gong & Sha, ECCV 2016).

Accuracies are per-class mean accuracies (the mean of the classes' recalls, as Xian et
al., "Zero-shot learning - the good, the bad and the ugly", CVPR 2017, report them); on a
test set with as many images of every class they equal plain accuracy.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError, MissingInputError

# --- The attribute table ------------------------------------------------------------

# Fashion-MNIST's classes, in label order: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat,
# 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot. Each attribute: what to look for, and the classes
# that show it (1); every other class lacks it (0). A value describes the class as a whole, as the
# Animals with Attributes table does: most dresses in Fashion-MNIST are sleeveless or nearly so, most
# shirts have long sleeves, the coats end around the hips.
FASHION_MNIST_ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "covers_torso": ("worn on the upper body: covers chest and belly",
                     ("T-shirt/top", "Pullover", "Dress", "Coat", "Shirt")),
    "sleeves": ("has sleeves of any length", ("T-shirt/top", "Pullover", "Coat", "Shirt")),
    "long_sleeves": ("sleeves reach the wrists", ("Pullover", "Coat", "Shirt")),
    "front_opening": ("opens down the front: buttons or a zip", ("Coat", "Shirt")),
    "collar": ("a collar or lapels at the neck", ("Coat", "Shirt")),
    "pockets": ("pockets on the front: what sets a coat apart from a shirt", ("Coat",)),
    "covers_legs": ("reaches down over the legs", ("Trouser", "Dress")),
    "two_legs": ("splits into two tubes, one per leg", ("Trouser",)),
    "footwear": ("worn on the feet", ("Sandal", "Sneaker", "Ankle boot")),
    "open_toe": ("straps with gaps: the foot shows through", ("Sandal",)),
    "closed_shoe": ("encloses the whole foot", ("Sneaker", "Ankle boot")),
    "low_cut": ("a shoe that ends below the ankle", ("Sandal", "Sneaker")),
    "covers_ankle": ("a shaft that rises over the ankle", ("Ankle boot",)),
    "handle": ("a handle or strap to carry it by", ("Bag",)),
    "boxy": ("a rectangular outline", ("Bag",)),
}  # fmt: skip

# The default split: three unseen classes, each a combination of attribute values that seen classes
# show: a pullover is a T-shirt's closed front with a coat's long sleeves, a dress covers the torso like
# a top and the legs like trousers, a sneaker is as closed as an ankle boot and as low as a sandal.
# The classes with an attribute of their own (trouser: two legs, coat: pockets, sandal: open toe,
# ankle boot: covers the ankle, bag: handle) must be seen, or nothing could learn that attribute.
DEFAULT_UNSEEN = ("Pullover", "Dress", "Sneaker")


@dataclass(frozen=True)
class AttributeTable:
    """Class descriptions: ``values[c, a]`` is how much class ``class_names[c]`` shows ``attributes[a]``.

    ``values``: float (C, A), any range (binary 0/1, graded 0-1, AwA's 0-100). ``origin`` says where
    the table came from (named in errors). ``binary()`` is the table DAP uses.
    """

    class_names: list[str]
    attributes: list[str]
    values: np.ndarray
    origin: str = "the built-in Fashion-MNIST table"

    @property
    def threshold(self) -> float:
        """Values above it count as "has the attribute": the mean of the table.

        Lampert et al. binarised the continuous Animals with Attributes matrix at its mean; a 0/1
        table keeps its values.
        """
        return float(self.values.mean())

    def binary(self) -> np.ndarray:
        """(C, A) int array of 0/1: the table thresholded at ``threshold``."""
        return (self.values > self.threshold).astype(np.int64)

    def for_classes(self, class_names: list[str], dataset: str) -> AttributeTable:
        """The table's rows in the order of ``class_names`` (a dataset's classes).

        Raises ``InputError`` naming the classes of ``dataset`` the table lacks, or the rows it has
        that ``dataset`` lacks.
        """
        missing = [name for name in class_names if name not in self.class_names]
        extra = [name for name in self.class_names if name not in class_names]
        if missing or extra:
            problem = (
                f"has no row for {dataset}'s classes {missing}" if missing else f"has rows {extra} that {dataset} lacks"
            )
            raise InputError(f"{self.origin} {problem}; its classes: {self.class_names}; {dataset}'s: {class_names}")
        order = [self.class_names.index(name) for name in class_names]
        return AttributeTable(list(class_names), list(self.attributes), self.values[order], self.origin)

    def without(self, attribute: str) -> AttributeTable:
        """The table without one attribute's column (drop-one ablation)."""
        keep = [i for i, name in enumerate(self.attributes) if name != attribute]
        return AttributeTable(self.class_names, [self.attributes[i] for i in keep], self.values[:, keep], self.origin)


def fashion_mnist_table() -> AttributeTable:
    """``FASHION_MNIST_ATTRIBUTES`` as a 10 x 15 table of 0/1, rows in Fashion-MNIST's label order."""
    from common.data import FASHION_MNIST_CLASSES

    values = np.array(
        [[float(name in classes) for _, classes in FASHION_MNIST_ATTRIBUTES.values()] for name in FASHION_MNIST_CLASSES]
    )
    return AttributeTable(list(FASHION_MNIST_CLASSES), list(FASHION_MNIST_ATTRIBUTES), values)


def read_attribute_csv(path: str | Path) -> AttributeTable:
    """A table from a CSV file: a header ``class,<attribute>,...`` and one row per class.

    Example (classes named as the dataset names them, e.g. its folder names)::

        class,striped,four_legs,swims
        zebra,1,1,0
        horse,0,1,0

    Values are numbers in any range (0/1, 0-1 grades, 0-100). Blank lines are skipped; spaces
    around cells are ignored. Raises ``MissingInputError`` for a missing file and ``InputError``
    (one line, naming the file, line number and cell) for: an empty file, a header with fewer than
    two columns or duplicate attribute names, a row of the wrong length, an empty class name, a
    class given twice, a cell that is not a finite number, and an attribute with the same value
    for every class (it cannot tell any two classes apart).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--attributes {str(path)!r}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's byte-order mark
            rows = [(n, [cell.strip() for cell in row]) for n, row in enumerate(csv.reader(f), start=1)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot be read as a UTF-8 CSV file ({type(error).__name__}: {error})") from None
    rows = [(n, row) for n, row in rows if any(row)]
    if not rows:
        raise InputError(f"{path} is empty; expected a header 'class,<attribute>,...' and one row per class")
    (_, header), body = rows[0], rows[1:]
    attributes = header[1:]
    if not attributes or not all(attributes):
        raise InputError(f"{path} line 1: the header must be 'class,<attribute>,<attribute>,...', got {header}")
    duplicates = sorted({a for a in attributes if attributes.count(a) > 1})
    if duplicates:
        raise InputError(f"{path} line 1: attribute(s) {duplicates} named twice")
    if len(body) < 2:
        raise InputError(f"{path}: {len(body)} class row(s); at least two classes are needed")
    names, values = [], []
    for n, row in body:
        if len(row) != len(header):
            raise InputError(f"{path} line {n}: {len(row)} cells, the header has {len(header)}: {row}")
        name = row[0]
        if not name:
            raise InputError(f"{path} line {n}: the class name (first cell) is empty")
        if name in names:
            raise InputError(f"{path} line {n}: class {name!r} has a second row")
        numbers = []
        for attribute, cell in zip(attributes, row[1:]):
            try:
                number = float(cell)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise InputError(f"{path} line {n}: class {name!r}, attribute {attribute!r}: {cell!r} is not a number")
            numbers.append(number)
        names.append(name)
        values.append(numbers)
    values = np.array(values, dtype=np.float64)
    constant = [a for a, column in zip(attributes, values.T) if np.all(column == column[0])]
    if constant:
        raise InputError(f"{path}: attribute(s) {constant} have the same value for every class; remove them")
    return AttributeTable(names, attributes, values, origin=str(path))


def write_attribute_csv(table: AttributeTable, path: str | Path) -> None:
    """The table as ``read_attribute_csv`` reads it (the run folder keeps the table a run used)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *table.attributes])
        for name, row in zip(table.class_names, table.values):
            writer.writerow([name, *(f"{v:g}" for v in row)])


def parse_class_names(spec: str, class_names: list[str], flag: str = "--unseen-classes") -> list[int]:
    """``"2,3,7"``, ``"0-2"`` or class names ``"Pullover,Dress"`` -> class indices into ``class_names``.

    Raises ``InputError`` naming ``flag`` for an unknown name or an empty list.
    """
    from common.data import parse_classes

    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise InputError(f"{flag} is empty; name at least two classes")
    try:
        return parse_classes(spec)
    except InputError:
        pass
    unknown = [p for p in parts if p not in class_names]
    if unknown:
        raise InputError(f"{flag}: {unknown} are neither class numbers nor class names; the classes: {class_names}")
    return [class_names.index(p) for p in parts]


def check_split(table: AttributeTable, seen: list[int], unseen: list[int]) -> None:
    """Refuse a seen/unseen split that zero-shot learning cannot work with (``InputError``).

    On the binary table: every attribute value an unseen class has (1) or lacks (0) must be shown by
    at least one seen class, or the attribute's classifier never sees an example of it; the error
    names the attribute, the unseen class and the classes that would supply the example. Two
    unseen classes with the same description cannot be told apart; at least one seen class and
    two unseen classes are needed.
    """
    names = table.class_names
    if len(unseen) < 2:
        raise InputError(f"--unseen-classes {[names[c] for c in unseen]}: at least two unseen classes are needed")
    if not seen:
        raise InputError("--unseen-classes names every class; at least one class must stay seen")
    binary = table.binary()
    for u in unseen:
        for a, attribute in enumerate(table.attributes):
            value = binary[u, a]
            if value in binary[seen, a]:
                continue
            donors = [names[c] for c in unseen if c != u and binary[c, a] == value]
            has = "has" if value else "lacks"
            shown = "no seen class has it" if value else "every seen class has it"
            hint = f"make one of {donors} seen, " if donors else ""
            raise InputError(
                f"unseen class {names[u]!r} {has} attribute {attribute!r}, but {shown}: its classifier would never "
                f"see an example; {hint}choose other --unseen-classes, or drop {attribute!r} from the table"
            )
    for u, v in itertools.combinations(unseen, 2):
        if np.array_equal(binary[u], binary[v]):
            raise InputError(
                f"unseen classes {names[u]!r} and {names[v]!r} have the same attributes in {table.origin}; "
                "no attribute can tell them apart: add one that does, or make one of them seen"
            )


def resolve_split(table: AttributeTable, spec: str) -> tuple[list[int], list[int]]:
    """``--unseen-classes`` (numbers or names) -> (seen, unseen) class indices, checked by ``check_split``.

    Every class of ``table`` that is not unseen is seen. Raises ``InputError`` for a class outside
    the table, a class named twice, and the splits ``check_split`` refuses.
    """
    unseen = parse_class_names(spec, table.class_names)
    outside = [c for c in unseen if not 0 <= c < len(table.class_names)]
    if outside:
        raise InputError(
            f"--unseen-classes: classes {outside} are not in the table (classes 0-{len(table.class_names) - 1}: "
            f"{table.class_names})"
        )
    if len(set(unseen)) != len(unseen):
        raise InputError(f"--unseen-classes {spec!r} names a class twice")
    seen = [c for c in range(len(table.class_names)) if c not in unseen]
    check_split(table, seen, unseen)
    return seen, unseen


def validation_split(table: AttributeTable, seen: list[int], n_unseen: int, seed: int = 0) -> list[int] | None:
    """Seen classes to hold out as *pseudo-unseen* for model selection, or None if no subset qualifies.

    Class-wise validation, as Chao et al. (2016) tune calibrated stacking: the seen classes are
    split again into pseudo-seen and pseudo-unseen, and hyperparameters are chosen on that split,
    so that no image or description of a real unseen class is ever used. ``n_unseen`` pseudo-unseen
    classes (at least 2, at most ``len(seen) - 1``) that pass ``check_split``; the subsets are tried
    in an order drawn with ``seed``.
    """
    n_unseen = min(max(2, n_unseen), len(seen) - 1)
    if n_unseen < 2:
        return None
    subsets = list(itertools.combinations(seen, n_unseen))
    for i in np.random.default_rng(seed).permutation(len(subsets)):
        held = list(subsets[i])
        try:
            check_split(table, [c for c in seen if c not in held], held)
        except InputError:
            continue
        return held
    return None


# --- DAP: Direct Attribute Prediction -------------------------------------------------

EPSILON = 1e-6  # probabilities are clipped to [EPSILON, 1 - EPSILON] before taking logarithms


@dataclass
class DAP:
    """Direct Attribute Prediction (Lampert et al. 2009, 2014): a classifier per attribute, class by likelihood.

    ``classifiers[a]``: a fitted scikit-learn ``LogisticRegression`` estimating p(a = 1 | x), or None
    for an attribute every training class shows equally (its probability is that constant value);
    ``prior[a]``: p(a = 1), the share of training classes that have it (the paper's uniform class
    prior). Build it with ``fit_dap``.
    """

    attributes: list[str]
    classifiers: list
    constant: np.ndarray
    prior: np.ndarray

    def attribute_probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, A) estimates of p(a = 1 | x) for features (N, D)."""
        columns = [
            model.predict_proba(features)[:, 1] if model is not None else np.full(len(features), self.constant[a])
            for a, model in enumerate(self.classifiers)
        ]
        return np.stack(columns, axis=1)

    def scores(self, features: np.ndarray, signatures: np.ndarray, keep: list[int] | None = None) -> np.ndarray:
        """(N, Z) log-posteriors up to a constant: sum_a [log p(a_z | x) - log p(a_z)] (Lampert et al. 2014, eq. 2).

        ``signatures``: (Z, A) 0/1 descriptions of the candidate classes; ``keep``: the attribute
        columns to use (default all; the drop-one ablation leaves one out).
        """
        return self.scores_from_probabilities(self.attribute_probabilities(features), signatures, keep)

    def scores_from_probabilities(self, probabilities: np.ndarray, signatures: np.ndarray,
                                  keep: list[int] | None = None) -> np.ndarray:  # fmt: skip
        keep = list(range(len(self.attributes))) if keep is None else keep
        p = np.clip(probabilities[:, keep], EPSILON, 1 - EPSILON)
        prior = np.clip(self.prior[keep], EPSILON, 1 - EPSILON)
        z = np.asarray(signatures)[:, keep].astype(np.float64)  # (Z, A)
        log_likelihood = np.log(p) @ z.T + np.log1p(-p) @ (1 - z).T  # (N, Z)
        log_prior = np.log(prior) @ z.T + np.log1p(-prior) @ (1 - z).T  # (Z,)
        return log_likelihood - log_prior


def fit_dap(features: np.ndarray, labels: np.ndarray, signatures: np.ndarray, attributes: list[str],
            c: float = 1.0, max_iter: int = 500) -> DAP:  # fmt: skip
    """Fit one L2-regularised logistic regression per attribute on the training classes' images.

    ``features``: (N, D), standardised; ``labels``: (N,) indices into ``signatures`` (Z_train, A) of
    0/1, each image's targets being its class's row; ``c``: scikit-learn's inverse regularisation
    strength. An attribute with one value over all training classes gets no classifier.
    """
    from sklearn.linear_model import LogisticRegression

    signatures = np.asarray(signatures)
    targets = signatures[labels]  # (N, A)
    classifiers, constant = [], np.zeros(signatures.shape[1])
    for a in range(signatures.shape[1]):
        if np.all(signatures[:, a] == signatures[0, a]):
            classifiers.append(None)
            constant[a] = signatures[0, a]
            continue
        model = LogisticRegression(C=c, max_iter=max_iter)
        classifiers.append(model.fit(features, targets[:, a]))
    return DAP(list(attributes), classifiers, constant, signatures.mean(axis=0))


# --- ESZSL: a closed-form linear map to attribute space ---------------------------------


def eszsl_fit(features: np.ndarray, labels: np.ndarray, signatures: np.ndarray, gamma: float,
              lam: float) -> np.ndarray:  # fmt: skip
    """ESZSL's closed form (Romera-Paredes & Torr 2015, eq. 8): V = (X X^T + gamma I)^-1 X Y S^T (S S^T + lam I)^-1.

    In the paper's notation X = ``features``.T (D, N), Y (N, Z) holds +1 for an image's class and -1
    elsewhere, S = ``signatures``.T (A, Z) the training classes' descriptions; ``labels``: (N,)
    indices into the Z training classes. ``gamma``, ``lam`` > 0 regularise the feature and the
    attribute side. Returns V, (D, A); a class z scores x^T V s_z (``eszsl_scores``).
    """
    x = np.asarray(features, dtype=np.float64).T  # (D, N)
    s = np.asarray(signatures, dtype=np.float64).T  # (A, Z)
    y = -np.ones((x.shape[1], s.shape[1]))
    y[np.arange(x.shape[1]), labels] = 1.0
    left = np.linalg.solve(x @ x.T + gamma * np.eye(x.shape[0]), x @ y @ s.T)  # (D, A)
    return np.linalg.solve(s @ s.T + lam * np.eye(s.shape[0]), left.T).T  # S S^T is symmetric


def eszsl_signatures(values: np.ndarray) -> np.ndarray:
    """Class descriptions (Z, A) scaled to unit length per class, the form ESZSL uses here.

    Unscaled 0/1 rows favour the classes with more attributes (a larger x^T V s); on the default
    split (1,568 source-cnn features, 1,000 images per seen class, gamma 0.1, lambda 0.01) unit rows
    gave 79.8% unseen accuracy against 77.4% (docs/zero_shot_experiments.md). A row of zeros stays zero.
    """
    values = np.asarray(values, dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.where(norms > 0, norms, 1.0)


def eszsl_scores(features: np.ndarray, v: np.ndarray, signatures: np.ndarray) -> np.ndarray:
    """(N, Z) compatibility x^T V s_z of features (N, D) with classes described by ``signatures`` (Z, A)."""
    return np.asarray(features, dtype=np.float64) @ v @ np.asarray(signatures, dtype=np.float64).T


# --- Metrics: ZSL, GZSL, calibrated stacking ----------------------------------------------


def mean_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean over the classes present in ``y_true`` of their accuracy (recall)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def harmonic_mean(seen: float, unseen: float) -> float:
    """H = 2 s u / (s + u) (Xian et al. 2017); 0 when both are 0."""
    return 2 * seen * unseen / (seen + unseen) if seen + unseen > 0 else 0.0


def gzsl_report(scores: np.ndarray, labels: np.ndarray, seen_mask: np.ndarray, gamma: float = 0.0) -> dict:
    """Generalised ZSL on test images of every class, every class a candidate.

    ``scores``: (N, C) over all classes; ``labels``: (N,) in 0..C-1; ``seen_mask``: (C,) bool;
    ``gamma``: calibrated stacking's calibration factor (Chao et al. 2016, eq. 3), subtracted from
    the seen classes' scores (0: none). Returns ``seen_accuracy`` (mean class accuracy over the seen
    classes' images), ``unseen_accuracy``, ``harmonic_mean`` and ``gamma``.
    """
    predicted = np.argmax(scores - gamma * np.asarray(seen_mask, dtype=np.float64), axis=1)
    is_seen = np.asarray(seen_mask)[labels]
    seen = mean_class_accuracy(labels[is_seen], predicted[is_seen])
    unseen = mean_class_accuracy(labels[~is_seen], predicted[~is_seen])
    return {"seen_accuracy": seen, "unseen_accuracy": unseen, "harmonic_mean": harmonic_mean(seen, unseen),
            "gamma": float(gamma)}  # fmt: skip


def calibration_candidates(scores: np.ndarray, seen_mask: np.ndarray, count: int = 101) -> np.ndarray:
    """Values of gamma worth trying: 0 and the quantiles of (best seen score - best unseen score).

    Each quantile is where one more share of the images switches from a seen to an unseen class,
    so the grid follows the scores' own scale (log-probabilities for DAP, linear scores for ESZSL).
    """
    seen_mask = np.asarray(seen_mask)
    margin = scores[:, seen_mask].max(axis=1) - scores[:, ~seen_mask].max(axis=1)
    return np.unique(np.concatenate([[0.0], np.quantile(margin, np.linspace(0, 1, count))]))


def choose_calibration(scores: np.ndarray, labels: np.ndarray, seen_mask: np.ndarray) -> float:
    """The calibration factor that maximises the harmonic mean on validation images (ties: the smallest |gamma|).

    ``scores``, ``labels``, ``seen_mask`` as ``gzsl_report`` takes them, on a validation split whose
    "unseen" classes are held-out seen classes (``validation_split``), never the real unseen ones.
    """
    best, best_h = 0.0, -1.0
    for gamma in sorted(calibration_candidates(scores, seen_mask), key=abs):
        h = gzsl_report(scores, labels, seen_mask, gamma)["harmonic_mean"]
        if h > best_h + 1e-12:
            best, best_h = float(gamma), h
    return best


def strict_json(value):
    """``value`` with every NaN or infinity replaced by None, numpy scalars and arrays by Python ones.

    ``json.dump`` writes NaN as ``NaN``, which strict JSON parsers (JavaScript, jq) reject.
    """
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
