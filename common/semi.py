"""Semi-supervised building blocks: augmentation views, pseudo-label selection and its
statistics, label spreading, and an EMA trainer for FixMatch-style consistency.

No algorithm lives here, only the pieces a self-training recipe assembles:

- views (``make_view``): Keras preprocessing layers for images in [0, 1], from the weak
  view a teacher looks at to the strong views a noised student learns from
  (``keras.layers.RandomErasing``, ``keras.layers.RandAugment``);
- selection of pseudo-labels from class probabilities: the most confident fraction of each
  class (``select_top_fraction``, the step of Curriculum Labeling), a confidence threshold
  with a per-class cap (``select_confident``), FlexMatch's per-class thresholds
  (``flexmatch_thresholds``), class balancing by Sinkhorn-Knopp (``balance_classes``), and
  label spreading on a k-nearest-neighbour graph
  (``knn_graph``, ``label_spreading``; scikit-learn);
- ``pseudo_label_stats``: how many were kept, their precision against held-back labels;
  ``plot_rounds``: accuracy and precision round by round;
- ``Split`` / ``split_labeled_pool``: the labeled images, the unlabeled pool (hidden labels
  kept for precision only) and the test images; ``check_disjoint``: a pool must not contain
  the labeled images; ``read_unlabeled_folder``: a user's pool of images without labels;
- a student in image space: ``build_student`` (a trainable copy of a base with a classifier
  started from a linear head), ``train_on_view`` (augmented views, through
  ``distributed.train``), ``predict_probabilities`` (in shards under multi_worker);
  ``log_round``: one round's record, printed;
- ``EMATrainer``: Adam with a cosine decay, an exponential moving average of the weights,
  and ``tf.function`` steps for labels only and for FixMatch-style consistency.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import bases, data, distributed, models
from common.errors import InputError

VIEWS = ("weak", "erasing", "randaugment")


# --- Views ------------------------------------------------------------------------------


def make_view(kind: str, seed: int, name: str | None = None) -> keras.Sequential:
    """Augmentation for images in [0, 1] (any size, 1 or 3 channels), applied with ``training=True``.

    - ``weak``: a horizontal flip and a shift of up to 10% of the side;
    - ``erasing``: weak, then a random contrast (factor 0.5) and, on half of the images, a grey
      rectangle over 2-25% of the area (``keras.layers.RandomErasing``; Zhong et al. 2020);
    - ``randaugment``: weak, then two RandAugment operations at strength 0.5 (Cubuk et al.
      2020, the strong view of FixMatch and Noisy Student), then the same erasing.

    Raises ``InputError`` for another ``kind``.
    """
    if kind not in VIEWS:
        raise InputError(f"unknown view {kind!r}; choose one of {', '.join(VIEWS)}")
    ops = [
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed + 1),
    ]
    if kind == "randaugment":
        ops.append(layers.RandAugment(value_range=(0, 1), num_ops=2, factor=0.5, seed=seed + 2))
    elif kind == "erasing":
        ops.append(layers.RandomContrast(0.5, value_range=(0, 1), seed=seed + 3))
    if kind != "weak":
        ops.append(layers.RandomErasing(1.0, scale=(0.02, 0.25), fill_value=0.5, value_range=(0, 1), seed=seed + 4))
    return keras.Sequential(ops, name=name or f"{kind}_view")


def view_then(kind: str, seed: int, preprocess=None):
    """``make_view(kind, seed)`` followed by ``preprocess`` (e.g. a base's own preprocessing): a
    function ``(images, training=True) -> inputs`` for a trainer's weak or strong view."""
    view = make_view(kind, seed)
    preprocess = preprocess or (lambda images: images)
    return lambda images, training=True: preprocess(view(images, training=training))


def copy_model(model: keras.Model) -> keras.Model:
    """A model of the same architecture with its own variables, holding ``model``'s weights."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


# --- Selecting pseudo-labels ---------------------------------------------------------------


def parse_fractions(spec: str, flag: str = "--fractions") -> list[float]:
    """Curriculum shares ``"0.2,0.4,1.0"`` -> ``[0.2, 0.4, 1.0]``: each in (0, 1], none smaller than
    the one before; otherwise ``InputError`` naming ``flag``."""
    try:
        fractions = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        fractions = []
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise InputError(f"{flag} {spec!r}: give comma-separated shares in (0, 1], e.g. 0.2,0.4,1.0")
    if fractions != sorted(fractions):
        raise InputError(f"{flag} {spec!r} must not decrease")
    return fractions


def select_top_fraction(probabilities: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The most confident ``fraction`` of the images predicted as each class.

    ``probabilities``: (N, K). Returns (kept indices, sorted; their pseudo-labels). Per class,
    so that an easy class cannot crowd out a hard one; the ranking step of Curriculum Labeling
    (Cascante-Bonilla et al. 2021), which raises the fraction round by round.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"pseudo-label fraction {fraction} is outside (0, 1]")
    confidence, labels = probabilities.max(axis=1), probabilities.argmax(axis=1)
    kept = []
    for c in range(probabilities.shape[1]):
        members = np.flatnonzero(labels == c)
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        kept.append(ranked[: int(round(fraction * len(members)))])
    kept = np.sort(np.concatenate(kept)).astype(np.int64)
    return kept, labels[kept]


def select_confident(probabilities: np.ndarray, threshold, class_cap: float = 0.0) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Predictions whose confidence reaches ``threshold`` (a float, or one per class).

    With ``class_cap`` > 0 each class keeps at most ``ceil(class_cap * kept / K)`` of them, the
    most confident first. Returns (kept indices, their pseudo-labels, the cap or 0).
    """
    confidence, labels = probabilities.max(axis=1), probabilities.argmax(axis=1)
    per_image = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (probabilities.shape[1],))[labels]
    passed = np.flatnonzero(confidence >= per_image)
    if class_cap <= 0:
        return passed, labels[passed], 0
    num_classes = probabilities.shape[1]
    cap = max(1, math.ceil(class_cap * len(passed) / num_classes))
    kept = []
    for c in range(num_classes):
        members = passed[labels[passed] == c]
        kept.append(members[np.argsort(-confidence[members], kind="stable")][:cap])
    kept = np.sort(np.concatenate(kept)).astype(np.int64)
    return kept, labels[kept], cap


def balance_classes(probabilities: np.ndarray, prior: np.ndarray | None = None, iterations: int = 100) -> np.ndarray:
    """Class probabilities rescaled so that the pool's predicted classes follow ``prior``.

    Sinkhorn-Knopp (Cuturi 2013), as in self-labelling by optimal transport (Asano et al.
    2020): alternately scale each class's column so that its mean is the class's prior, and
    each row back to a distribution. It assumes the pool's classes are about as frequent as
    ``prior`` says (default: uniform, which the per-class label budget gives). A teacher that
    sends a share of one class to another (sandals called ankle boots) is pulled back.
    ``probabilities``: (N, K); returns (N, K), rows summing to one.
    """
    q = np.asarray(probabilities, dtype=np.float64) + 1e-12
    prior = np.full(q.shape[1], 1.0 / q.shape[1]) if prior is None else np.asarray(prior, dtype=np.float64)
    for _ in range(iterations):
        q *= prior / q.mean(axis=0)
        q /= q.sum(axis=1, keepdims=True)
    return q


def estimate_prior(probabilities: np.ndarray, train_prior: np.ndarray | None = None, iterations: int = 1000,
                   tolerance: float = 1e-6) -> np.ndarray:  # fmt: skip
    """The class mix of an unlabeled set, from a classifier's probabilities on it, by EM.

    Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of a classifier to new a
    priori probabilities": the posteriors are re-weighted by ``prior / train_prior`` and
    re-normalised, the prior is their mean, until it moves less than ``tolerance``.
    ``probabilities``: (N, K) from a classifier trained with class frequencies ``train_prior``
    (K,) (default: uniform, a per-class label budget). Returns the estimated prior (K,),
    summing to one. It assumes the classes' images look alike in both sets (label shift); a
    poorly calibrated classifier biases the estimate.
    """
    q = np.asarray(probabilities, dtype=np.float64) + 1e-12
    k = q.shape[1]
    base = np.full(k, 1.0 / k) if train_prior is None else np.asarray(train_prior, dtype=np.float64)
    base = base / base.sum()
    prior = base.copy()
    for _ in range(iterations):
        adjusted = q * (prior / base)
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        new = adjusted.mean(axis=0)
        if np.abs(new - prior).max() < tolerance:
            return new
        prior = new
    return prior


def total_variation(prior: np.ndarray, hidden_labels: np.ndarray, num_classes: int) -> float:
    """Total variation distance (half the L1 distance, in [0, 1]) between a class mix ``prior``
    (K,) and the class frequencies of ``hidden_labels`` (n,); labels outside 0..K-1 (foreign
    images) are not counted."""
    hidden = np.asarray(hidden_labels)
    hidden = hidden[(hidden >= 0) & (hidden < num_classes)]
    mix = np.bincount(hidden, minlength=num_classes) / max(len(hidden), 1)
    return float(0.5 * np.abs(np.asarray(prior) - mix).sum())


def foreign_scores(labeled: np.ndarray, labels: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How unlike the labeled classes each pool image is: the cosine distance from its features to
    the nearest class mean of the labeled images (nearest class mean, Mensink et al. 2013),
    with features standardised on the labeled images.

    ``labeled`` (n, D) with ``labels`` (n,), ``pool`` (N, D). Returns (the pool's scores (N,),
    the labeled images' own scores (n,), each against class means that leave it out), so a
    threshold can be calibrated on images known to belong: ``foreign_mask``. A class with one
    labeled image has no left-out mean; its image scores 0.
    """
    from sklearn.preprocessing import StandardScaler

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    scaler = StandardScaler().fit(labeled)
    z, zp = unit(scaler.transform(labeled)), unit(scaler.transform(pool))
    classes = np.unique(labels)
    sums = np.stack([z[labels == c].sum(axis=0) for c in classes])
    counts = np.array([np.sum(labels == c) for c in classes], dtype=np.float64)
    pool_scores = 1.0 - (zp @ unit(sums / counts[:, None]).T).max(axis=1)
    own = np.zeros(len(z))
    for i, c in enumerate(np.searchsorted(classes, labels)):
        if counts[c] < 2:
            continue
        means = sums / counts[:, None]
        means[c] = (sums[c] - z[i]) / (counts[c] - 1)
        own[i] = 1.0 - (unit(means) @ z[i]).max()
    return pool_scores, own


def foreign_mask(labeled: np.ndarray, labels: np.ndarray, pool: np.ndarray, quantile: float) -> np.ndarray:
    """True for pool images that look foreign: their ``foreign_scores`` exceed the ``quantile``
    of the labeled images' own (left-out) scores. ``quantile`` in (0, 1]; 1 sets the threshold
    at the least typical labeled image. Returns a boolean (N,) mask."""
    pool_scores, own = foreign_scores(labeled, labels, pool)
    return pool_scores > np.quantile(own, quantile)


def flexmatch_thresholds(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """FlexMatch's per-class thresholds (Zhang et al. 2021, "Curriculum Pseudo Labeling").

    A class's learning effect is how many images are predicted as it above ``threshold``,
    normalised by the largest such count (or by the unused images while most are still
    unused: the warm-up); it is mapped by ``x / (2 - x)``, and the class's threshold is
    ``threshold`` times that. A class the model is still learning gets a lower threshold.
    ``probabilities``: (N, K); returns K thresholds in [0, threshold].
    """
    confidence, labels = probabilities.max(axis=1), probabilities.argmax(axis=1)
    counts = np.bincount(labels[confidence >= threshold], minlength=probabilities.shape[1]).astype(np.float64)
    unused = len(labels) - counts.sum()
    effect = counts / max(counts.max(), unused, 1.0)
    return threshold * effect / (2.0 - effect)


def knn_graph(features: np.ndarray, neighbors: int = 10, components: int = 64, seed: int = 0):
    """The k-nearest-neighbour graph that ``label_spreading`` spreads labels along.

    ``features`` (N, D) are standardised and reduced to ``components`` principal components;
    each image is joined to its ``neighbors`` nearest (itself included) in that space, as
    scikit-learn's ``LabelSpreading(kernel="knn")`` does. Returns a sparse (N, N) 0/1 matrix.
    Built once, it serves every round of a curriculum.
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import kneighbors_graph
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    components = min(components, features.shape[1], len(features))
    reduced = make_pipeline(StandardScaler(), PCA(components, random_state=seed)).fit_transform(features)
    return kneighbors_graph(reduced, neighbors, mode="connectivity", include_self=True)


def label_spreading(graph, labels: np.ndarray, num_classes: int, alpha: float = 0.99) -> np.ndarray:
    """Class probabilities of every node of ``graph`` by label spreading (Zhou et al. 2004).

    ``labels`` (N,): a class for the seeds, -1 for the images to label. scikit-learn's
    ``LabelSpreading`` runs on the given graph (``knn_graph``); ``alpha`` is the share of a
    label passed on to the neighbours at each step (0.99 as in the paper; scikit-learn's
    default 0.2 leaves images a few hops from a seed nearly unlabeled). Returns (N, K); a row
    with no path to a seed is uniform.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.semi_supervised import LabelSpreading

    spreading = LabelSpreading(kernel=lambda *_: graph, alpha=alpha, max_iter=1000)  # the graph, not a kernel
    with warnings.catch_warnings():
        # Its stopping test sums the last step's change over every entry (N x K): at alpha 0.99 a
        # large pool uses all 1,000 steps, long after the arg-max has settled.
        warnings.simplefilter("ignore", ConvergenceWarning)
        spreading.fit(np.zeros((len(labels), 1)), labels)
    distributions = np.nan_to_num(spreading.label_distributions_, nan=1.0 / num_classes)
    full = np.zeros((len(labels), num_classes))
    full[:, spreading.classes_] = distributions  # classes_ lists the classes among the seeds
    return full / np.maximum(full.sum(axis=1, keepdims=True), 1e-12)


def pseudo_label_stats(pseudo_labels: np.ndarray, hidden_labels: np.ndarray | None, num_classes: int,
                       seen: int) -> dict:  # fmt: skip
    """Count kept, share of ``seen``, the pseudo-labels per class and, against ``hidden_labels``,
    their precision overall and per class. Without hidden labels (a user's unlabeled folder)
    the precisions are None and ``precision_unknown`` says why; a class given no pseudo-label
    has precision None. ``pseudo_labels``, ``hidden_labels``: (n,) integers."""
    kept = len(pseudo_labels)
    counts = np.bincount(pseudo_labels, minlength=num_classes).astype(int)
    stats = {"pseudo_labels_kept": int(kept), "kept_share": kept / seen if seen else 0.0,
             "class_histogram": counts.tolist()}  # fmt: skip
    if hidden_labels is None or not kept:
        why = "the pool has no labels (a folder of images)" if hidden_labels is None else "no pseudo-label was kept"
        return {**stats, "pseudo_label_precision": None, "precision_per_class": None, "precision_unknown": why}
    right = pseudo_labels == hidden_labels
    per_class = [float(right[pseudo_labels == c].mean()) if counts[c] else None for c in range(num_classes)]
    return {**stats, "pseudo_label_precision": float(right.mean()), "precision_per_class": per_class}


def log_round(name: str, test_accuracy: float, stats: dict, start: float) -> dict:
    """One round's record: ``name``, ``test_accuracy``, ``stats`` (``pseudo_label_stats``, plus
    optional ``prior_estimate`` / ``prior_error`` / ``balanced_to``: ``estimate_prior``'s class
    mix, its total variation distance to the hidden one, the mix the pseudo-labels were balanced to) and the seconds since ``start``
    (``time.perf_counter``); printed as a line and, per class, the pseudo-labels kept and their
    precision. Returns the record."""
    record = {"round": name, "test_accuracy": test_accuracy, **stats, "seconds": round(time.perf_counter() - start, 1)}
    precision = record["pseudo_label_precision"]
    print(f"  {name}: test accuracy {test_accuracy:.3f}, {record['pseudo_labels_kept']} pseudo-labels, precision "
          f"{'unknown' if precision is None else f'{precision:.3f}'}, {record['seconds']:.0f} s", flush=True)  # fmt: skip
    per_class = record.get("precision_per_class") or [None] * len(record["class_histogram"])
    cells = [f"{n}" + ("" if p is None else f" ({p:.2f})") for n, p in zip(record["class_histogram"], per_class)]
    print(f"    kept per class{' (precision)' if record.get('precision_per_class') else ''}: {' | '.join(cells)}")
    if record.get("prior_estimate") is not None:
        error, target = record.get("prior_error"), record.get("balanced_to")
        print(f"    pool class mix estimated: {' | '.join(f'{p:.2f}' for p in record['prior_estimate'])}"
              + ("" if error is None else f" (total variation from the hidden mix {error:.3f})") + "; balanced to "
              + ("nothing" if target is None else " | ".join(f"{p:.2f}" for p in target)))  # fmt: skip
    return record


def plot_rounds(rounds: list[dict], baseline_accuracy: float, baseline: str):
    """Test accuracy after every round against the baseline, and the pseudo-labels' precision and share
    of the pool per round (``rounds``: records with ``round``, ``test_accuracy``, ``pseudo_label_precision``
    and ``kept_share``, as ``pseudo_label_stats`` gives). Returns the matplotlib figure."""
    from common.evaluation import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["round"] for r in rounds]
    left.plot(names, [r["test_accuracy"] for r in rounds], "o-", label="self-training")
    left.axhline(baseline_accuracy, color="grey", linestyle="--", label=baseline)
    left.set(ylabel="test accuracy", title="test accuracy after each round")
    precision = [np.nan if r["pseudo_label_precision"] is None else r["pseudo_label_precision"] for r in rounds]
    right.plot(names, precision, "o-", label="precision (hidden labels)")
    right.plot(names, [r["kept_share"] for r in rounds], "s--", label="share of the pool used")
    right.set(ylabel="fraction", title="pseudo-labels per round", ylim=(0, 1.02))
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- The labeled images, the unlabeled pool, the test images ---------------------------------


@dataclass
class Split:
    """Labeled images, the unlabeled pool (hidden labels only for precision), the test images."""

    x_labeled: np.ndarray
    y_labeled: np.ndarray
    x_pool: np.ndarray
    hidden_labels: np.ndarray | None  # None for a user's pool: precision is then unknown
    x_test: np.ndarray
    y_test: np.ndarray
    labeled_index: np.ndarray = field(repr=False)
    pool_index: np.ndarray = field(repr=False)

    def __repr__(self) -> str:
        return f"Split(labeled={len(self.x_labeled)}, pool={len(self.x_pool)}, test={len(self.x_test)})"


def split_labeled_pool(target: data.Dataset, labels_per_class: int, seed: int, pool: str = "", unlabeled: int = 0,
                       test_images: int = 0) -> Split:  # fmt: skip
    """``labels_per_class`` labeled training images per class drawn with ``seed``; the pool is the rest
    of the training split (labels hidden), or the images of ``pool`` = ``folder:<path>`` (no labels).

    ``unlabeled`` > 0 keeps that many pool images (drawn with ``seed``); ``test_images`` > 0 that many
    test images, stratified. Errors (``InputError``, naming the flags ``--labels-per-class`` and
    ``--pool``): too few images of a class, a pool that holds labeled images, a missing folder.
    """
    if pool and not pool.startswith("folder:"):
        raise InputError(f"--pool {pool!r}: give folder:<path> (your unlabeled images) or nothing")
    what = f"--labels-per-class {labels_per_class}"
    labeled = data.sample_per_class(target.y_train, labels_per_class, seed, target.class_names, what=what)
    if pool:
        x_pool = read_unlabeled_folder(pool.removeprefix("folder:"), target.input_shape)
        index, hidden = np.arange(len(x_pool)), None
    else:
        index = np.setdiff1d(np.arange(len(target.y_train)), labeled)
        x_pool, hidden = target.x_train, target.y_train
    if 0 < unlabeled < len(index):
        index = np.sort(np.random.default_rng(seed + 1).choice(index, unlabeled, replace=False))
    if not len(index):
        raise InputError(f"the unlabeled pool is empty: {labels_per_class} labels per class use every image")
    x_pool, hidden = x_pool[index], None if hidden is None else hidden[index]
    check_disjoint(target.x_train[labeled], x_pool, f"the unlabeled pool {pool}".strip())
    x_test, y_test = target.x_test, target.y_test
    if 0 < test_images < len(x_test):
        smallest = int(np.bincount(y_test, minlength=target.num_classes).min())
        per_class = min(max(1, test_images // target.num_classes), smallest)
        keep = data.sample_per_class(y_test, per_class, seed, target.class_names)
        x_test, y_test = x_test[keep], y_test[keep]
    return Split(target.x_train[labeled], target.y_train[labeled], x_pool, hidden, x_test, y_test, labeled, index)


def check_disjoint(labeled: np.ndarray, pool: np.ndarray, what: str = "the unlabeled pool") -> None:
    """Raise ``InputError`` if an image of ``pool`` equals a labeled image (compared at 8 bits)."""

    def keys(images):
        flat = np.round(np.asarray(images).reshape(len(images), -1) * 255).astype(np.uint8)
        return {row.tobytes(): i for i, row in enumerate(flat)}

    labeled_keys = keys(labeled)
    shared = [i for key, i in keys(pool).items() if key in labeled_keys]
    if shared:
        raise InputError(
            f"{what} contains {len(shared)} of the labeled images (e.g. pool image {min(shared)}); "
            "the pool must hold images whose labels are unknown, not the labeled ones"
        )


def read_unlabeled_folder(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Every image under ``path`` (in sub-folders or not) as float32 in [0, 1], resized to ``shape``
    (H, W, 1 or 3) by ``keras.utils.image_dataset_from_directory``; ``InputError`` if there are none."""
    from pathlib import Path

    from common.errors import MissingInputError

    if not Path(path).is_dir():
        raise MissingInputError(f"unlabeled image folder {path!r} does not exist")
    try:
        images = keras.utils.image_dataset_from_directory(
            path, labels=None, image_size=shape[:2], batch_size=None, shuffle=False, verbose=False,
            color_mode="grayscale" if shape[2] == 1 else "rgb",
        )  # fmt: skip
        return np.stack(list(images.as_numpy_iterator())).astype(np.float32) / np.float32(255.0)
    except (ValueError, OSError, tf.errors.OpError) as error:
        raise InputError(f"unlabeled image folder {path!r}: no usable images ({error})") from error


def index_batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless fixed-size batches of indices into ``n`` items, one fresh permutation per pass."""
    buffer = np.empty(0, dtype=np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, rng.permutation(n)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


# --- A student in image space ------------------------------------------------------------------


def build_student(base: bases.Base, head, num_classes: int, dropout: float, name: str = "student") -> keras.Model:
    """A copy of ``base`` with its pretrained weights, every layer trainable (BatchNorm learns the
    target's statistics), then dropout and a Dense ``classifier`` that starts as ``head`` (a
    ``models.logistic_regression_head``; None: fresh). Outputs logits; build it in
    ``strategy.scope()`` to train it under a ``tf.distribute`` strategy."""
    copy = bases.fresh_copy(base).model
    copy.trainable = True
    inputs = keras.Input(base.input_shape)
    x = copy(inputs)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(layers.Flatten(name="head_flatten")(x))
    model = keras.Model(inputs, layers.Dense(num_classes, name="classifier")(x), name=name)
    if head is not None:
        model.get_layer("classifier").set_weights(models.linear_head_weights(head, num_classes))
    return model


def train_on_view(model: keras.Model, base: bases.Base, x: np.ndarray, y: np.ndarray, view: str, epochs: int,
                  batch_size: int, learning_rate: float, seed: int, strategy=None, backup_dir=None) -> dict:  # fmt: skip
    """Adam with a cosine decay to 0 over ``epochs`` passes of (x, y) seen through ``make_view(view, seed)``.

    ``x``: images in [0, 1] at the base's input shape (N, H, W, C), ``y`` (N,) integer labels;
    the base's preprocessing runs after the view. Trains through ``distributed.train`` (``fit``,
    or under multi_worker the shared distributed step; ``model`` built in ``strategy.scope()``);
    ``backup_dir`` makes it resumable. Returns the history dict.
    """
    strategy = strategy or tf.distribute.get_strategy()
    augmentation = make_view(view, seed)  # outside the strategy's scope: it runs in the tf.data pipeline

    def augment(images, labels):
        return base.preprocess(augmentation(images, training=True)), labels

    pipeline = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).batch(batch_size)
                .map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))  # fmt: skip
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * int(pipeline.cardinality()))
    with strategy.scope():
        models.compile_classifier(model, schedule)
    return distributed.train(model, pipeline, epochs, strategy, backup_dir=backup_dir, verbose=2)


def predict_probabilities(model: keras.Model, x: np.ndarray, strategy=None, batch_size: int = 1024,
                          base: bases.Base | None = None) -> np.ndarray:  # fmt: skip
    """Softmax of ``model``'s logits on ``x``: (N, K) float32. Under multi_worker each worker predicts
    its shard of ``x`` and all get every row (``distributed.predict_in_shards``).

    With ``base``, ``x`` are raw images in [0, 1] streamed through ``base``'s resizing and
    preprocessing (``data.image_stream``, batches of 128), so no prepared copy of ``x`` is held;
    without it, ``x`` is already the model's input."""

    def predict(images):
        if base is not None:
            images = data.image_stream(images, base.input_shape, base.preprocess, 128)
        return tf.nn.softmax(tf.cast(model.predict(images, batch_size=batch_size, verbose=0), tf.float32)).numpy()

    return distributed.predict_in_shards(predict, x, strategy)


# --- Training with an EMA teacher -----------------------------------------------------------


class EMATrainer:
    """One training phase: Adam with a cosine decay over ``steps``, an EMA of the weights.

    ``ema_model`` (same architecture) follows ``model`` as an exponential moving average with
    the usual warm-up ``min(decay, (1 + t) / (10 + t))``, or with ``warmup=False`` the plain
    ``decay`` from step 0 (a teacher that starts as a pretrained model stays close to it while
    the student moves; with the warm-up it is mostly the moving student for the first hundred
    steps); it teaches and is evaluated (Mean Teacher, Tarvainen & Valpola 2017). ``consistency_step`` is FixMatch's (Sohn et al. 2020):
    the EMA teacher labels a weak view of the unlabeled batch; where its confidence reaches the
    threshold (``threshold``, or FlexMatch's per-class thresholds when ``flexmatch`` and the
    pool indices are given), the student learns that label on a strong view. Labeled and
    unlabeled images share one forward pass, so BatchNorm sees one batch distribution.
    """

    def __init__(self, model: keras.Model, ema_model: keras.Model, steps: int, learning_rate: float,
                 ema: float = 0.99, weak=None, strong=None, threshold: float = 0.95, pool_size: int = 0,
                 flexmatch: bool = False, warmup: bool = True):  # fmt: skip
        self.model, self.ema_model, self.ema, self.threshold = model, ema_model, ema, threshold
        self.warmup = warmup
        self.optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps)))
        self.optimizer.build(model.trainable_variables)
        self.weak, self.strong, self.flexmatch = weak, strong, flexmatch
        self.pairs = [(e, v) for e, v in zip(ema_model.weights, model.weights) if e.shape == v.shape]
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        # FlexMatch's memory: the last confident prediction for every pool image (-1: none yet).
        self.memory = tf.Variable(tf.fill([max(1, pool_size)], tf.constant(-1, tf.int64)), trainable=False)
        self.labels_step = tf.function(self._labels_step)
        self.consistency_step = tf.function(self._consistency_step)

    def _apply(self, tape, loss):
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        t = tf.cast(self.optimizer.iterations, tf.float32)
        decay = tf.minimum(self.ema, (1.0 + t) / (10.0 + t)) if self.warmup else tf.constant(self.ema)
        for ema_weight, weight in self.pairs:
            ema_weight.assign(decay * ema_weight + (1.0 - decay) * weight)

    def _labels_step(self, x, y):
        """One supervised step on a weak view of (x, y); returns the loss."""
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self.loss(y, self.model(self.weak(x, training=True), training=True)))
        self._apply(tape, loss)
        return loss

    def _thresholds(self, num_classes):
        if not self.flexmatch:
            return tf.fill([num_classes], tf.constant(self.threshold, tf.float32))
        memory = self.memory.value()
        counts = tf.reduce_sum(tf.one_hot(memory, num_classes), axis=0)  # -1 (not yet confident) counts nowhere
        unused = tf.cast(tf.reduce_sum(tf.cast(memory < 0, tf.int32)), tf.float32)
        effect = counts / tf.maximum(tf.maximum(tf.reduce_max(counts), unused), 1.0)
        return self.threshold * effect / (2.0 - effect)

    def _consistency_step(self, x, y, u, u_index):
        """Returns (labeled loss, pseudo-label loss, pseudo-labels, 0/1 mask) for the batch."""
        x = self.weak(x, training=True)
        teacher_logits = self.ema_model(self.weak(u, training=True), training=False)
        probabilities = tf.nn.softmax(tf.cast(teacher_logits, tf.float32))
        pseudo_labels, confidence = tf.argmax(probabilities, axis=1), tf.reduce_max(probabilities, axis=1)
        thresholds = self._thresholds(probabilities.shape[1])
        mask = tf.cast(confidence >= tf.gather(thresholds, pseudo_labels), tf.float32)
        if self.flexmatch:
            confident = confidence >= self.threshold
            self.memory.scatter_nd_update(u_index[:, None], tf.where(confident, pseudo_labels, tf.gather(self.memory, u_index)))  # fmt: skip
        n = tf.shape(x)[0]
        with tf.GradientTape() as tape:
            logits = tf.cast(self.model(tf.concat([x, self.strong(u, training=True)], 0), training=True), tf.float32)
            labeled_loss = tf.reduce_mean(self.loss(y, logits[:n]))
            pseudo_loss = tf.reduce_mean(mask * self.loss(pseudo_labels, logits[n:]))
            loss = labeled_loss + pseudo_loss
        self._apply(tape, loss)
        return labeled_loss, pseudo_loss, pseudo_labels, mask
