"""Zero-shot learning: recognise classes that no training image showed, from their attributes.

Describe every class by attributes a person can check by looking (footwear? long sleeves?
covers the ankle?). Learn, on images of the *seen* classes only, to read those attributes
off an image; then name an image of an *unseen* class by the description that fits best.
Nothing about the unseen classes is used but their row of the attribute table.

When to use it: some classes have no labelled images at all, but you can describe them,
and every unseen class is made of attribute values some seen class shows (the run refuses
a split where one is not, naming the attribute). The table for Fashion-MNIST
(``common.zero_shot.FASHION_MNIST_ATTRIBUTES``: 15 attributes), or yours:
``--attributes table.csv --dataset folder:photos --unseen-classes zebra,okapi``.

What the default run does (``python -m recipes.zero_shot``):

1. Split: unseen Pullover, Dress, Sneaker (each a mix of seen attribute values: a T-shirt's
   closed front with a coat's long sleeves, a top that covers the legs like trousers, a shoe
   as closed as a boot and as low as a sandal); the other seven classes are seen.
2. Base (``--base source-cnn``): the BatchNorm CNN pretrained on the seven seen classes only
   and cached, as in ``recipes.feature_extraction``. Features of 500 + 200 images per seen
   class are standardised and reduced to 128 PCA dimensions fitted on the 500.
3. ``dap``: one logistic regression per attribute, class by attribute likelihood (Lampert et
   al. 2009). ``eszsl``: a linear map to attribute space in closed form (Romera-Paredes & Torr
   2015). Their hyperparameters, and calibrated stacking's factor for generalised ZSL (Chao
   et al. 2016), are chosen on the seen classes alone: two of them are held out as
   pseudo-unseen, scored on the 200 validation images per class.
4. Baselines: ``chance`` among the unseen classes, and ``oracle``, a logistic regression on
   the same features of 500 *labelled* unseen images per class (the ceiling).
5. Scored on the 10,000 test images: ZSL accuracy among the unseen classes; GZSL (every class
   a candidate) seen and unseen accuracy and their harmonic mean H, raw and calibrated;
   DAP's per-attribute accuracy; a drop-one attribute ablation; the unseen confusion matrices.

Measured over seeds 0-2 (``make results``, 2 CPU cores): ZSL accuracy on the unseen classes
ESZSL 80.7-94.4% (mean 88.8%), DAP 73.2-79.6% (76.2%), against chance 33.3% and the oracle
97.6-98.2%. GZSL is much lower: uncalibrated, every unseen image is given a seen class (H 0);
calibrated, H is 44-64% (ESZSL) and 25-58% (DAP). A run took 54 s with the base pretrained
in it, 6 s with it cached (docs/zero_shot_experiments.md). ``model.keras``: the base and ESZSL's
calibrated scores over every class (the attribute table is in ``attributes.csv``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np

from common import bases, data, evaluation
from common import zero_shot as zs
from common.cli import InputError, RecipeConfig, knob, make_strategy, run_cli, set_seed

DAP_C_GRID = (0.001, 0.01, 0.1, 1.0)  # inverse L2 strength of the attribute classifiers
ESZSL_GAMMA_GRID = tuple(10.0**k for k in range(0, 9))  # feature side; X X^T is about N x D here
ESZSL_LAMBDA_GRID = (0.001, 0.01, 0.1, 1.0)  # attribute side
FALLBACK = {"dap_c": 1.0, "eszsl_gamma": 1.0, "eszsl_lambda": 1.0}  # when no validation split qualifies


@dataclass
class Config(RecipeConfig):
    """Name images of classes never seen in training from their attributes (DAP, ESZSL), against chance and an oracle."""

    dataset: str = knob("fashion_mnist", "Dataset: fashion_mnist, digits, mnist, cifar10, tfds:<name>, folder:<path>.")
    image_size: int = knob(
        0, "Image side: resizes tfds:/folder: images and is a backbone's input (0: native).", minimum=0
    )
    attributes: str = knob(
        "", "CSV table 'class,<attribute>,...', one row per class (default: the Fashion-MNIST table)."
    )
    unseen_classes: str = knob(
        "Pullover,Dress,Sneaker", "Unseen classes, by name or number ('2,3,7'); the rest are seen."
    )
    base: str = knob("source-cnn", "Pretrained base: source-cnn (trained on the seen classes), efficientnet_lite0, a keras.applications name, or a .keras path.")  # fmt: skip
    weights: str = knob("", "keras.applications weights: imagenet (default, online), none, or a weights file.")
    base_layer: str = knob("", "Layer of a keras.applications or .keras base whose output is the features.")
    source_width: int = knob(16, "Width (first conv filters) of the source-cnn base.", minimum=1)
    source_epochs: int = knob(2, "Pretraining epochs of the source-cnn base.", minimum=1)
    source_images: int = knob(0, "Seen-class training images for the source-cnn base (0: all).", minimum=0)
    source_cut: str = knob("block2", "Last block of the source-cnn kept as the base: block1 | block2 | block3.")
    train_per_class: int = knob(500, "Seen-class images per class the attribute models learn from.", minimum=1)
    val_per_class: int = knob(200, "Further seen-class images per class for choosing hyperparameters.", minimum=1)
    oracle_per_class: int = knob(
        500, "Labelled unseen-class images per class for the oracle (ceiling) only.", minimum=1
    )
    pca_dims: int = knob(128, "PCA dimensions of the standardised features (0: keep them all).", minimum=0)
    test_images: int = knob(0, "Evaluate on this many test images of all classes, stratified (0: all).", minimum=0)

    QUICK = dict(source_epochs=1, source_images=2000, train_per_class=100, val_per_class=40, oracle_per_class=100,
                 pca_dims=32, test_images=1000)  # fmt: skip


@dataclass
class Task:
    """The dataset, its attribute table (rows in class order), and the seen and unseen class indices."""

    dataset: data.Dataset
    table: zs.AttributeTable
    seen: list[int]
    unseen: list[int]

    @property
    def seen_mask(self) -> np.ndarray:
        return np.isin(np.arange(self.dataset.num_classes), self.seen)

    def names(self, classes: list[int]) -> list[str]:
        return [self.dataset.class_names[c] for c in classes]


# --- Steps ------------------------------------------------------------------------


def load_task(config: Config) -> Task:
    """Table (read first: a bad CSV fails fast), dataset, split; every input error before any training."""
    table = zs.read_attribute_csv(config.attributes) if config.attributes else None
    dataset = data.load_dataset(config.dataset, image_size=config.image_size or None, seed=config.seed)
    if table is None:
        table = zs.fashion_mnist_table()
        if dataset.class_names != table.class_names:
            raise InputError(
                f"the built-in attribute table describes Fashion-MNIST's classes, not {dataset.name}'s "
                f"{dataset.class_names[:10]}; pass --attributes table.csv (a header 'class,<attribute>,...', one row per class)"
            )
    table = table.for_classes(dataset.class_names, dataset.name)
    seen, unseen = zs.resolve_split(table, config.unseen_classes)
    return Task(dataset, table, seen, unseen)


def draw_images(task: Task, config: Config) -> dict[str, np.ndarray]:
    """Indices into the training split (seen ``train``/``val``, unseen ``oracle``) drawn with the seed.

    ``InputError`` naming the flags when a class has too few training images.
    """
    y, names = task.dataset.y_train, task.dataset.class_names
    rng = np.random.default_rng(config.seed)
    picked = {"train": [], "val": [], "oracle": []}
    wants = [(task.seen, config.train_per_class, config.val_per_class, "--train-per-class + --val-per-class"),
             (task.unseen, config.oracle_per_class, 0, "--oracle-per-class")]  # fmt: skip
    for classes, first, second, flags in wants:
        for c in classes:
            members = np.flatnonzero(y == c)
            if len(members) < first + second:
                raise InputError(f"{flags} need {first + second} training images per class, but class {c} "
                                 f"({names[c]!r}) has only {len(members)}")  # fmt: skip
            chosen = rng.choice(members, first + second, replace=False)
            if second:
                picked["train"].append(chosen[:first])
                picked["val"].append(chosen[first:])
            else:
                picked["oracle"].append(chosen)
    return {key: np.sort(np.concatenate(parts)) for key, parts in picked.items()}


def load_pretrained_base(config: Config, task: Task) -> bases.Base:
    """The ``--base``; a source-cnn is pretrained on the seen classes only (their training images) and cached."""
    seen_task = data.select_classes(task.dataset, task.seen)
    settings = bases.SourceSettings(
        width=config.source_width, epochs=config.source_epochs, max_images=config.source_images
    )
    return bases.load_base(config.base, config.weights, config.image_size, source=seen_task, settings=settings,
                           cut=config.source_cut, layer=config.base_layer)  # fmt: skip


def embed(base: bases.Base, task: Task, picked: dict, config: Config):
    """Features of every image set, standardised and PCA-reduced (fitted on the seen ``train`` images only).

    Returns ``({set: (features, labels)}, transform, seconds)``; labels are dataset class indices.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ds = task.dataset
    x_test, y_test = data.subsample_test(ds, config.test_images, config.seed)
    sets = {key: (ds.x_train[idx], ds.y_train[idx]) for key, idx in picked.items()} | {"test": (x_test, y_test)}
    start = time.perf_counter()
    raw = {key: (bases.extract_features(base, x)[0].reshape(len(x), -1), y) for key, (x, y) in sets.items()}
    steps = [StandardScaler()]
    dims = min(config.pca_dims, *raw["train"][0].shape)
    if config.pca_dims:
        steps.append(PCA(dims, random_state=config.seed))
    transform = make_pipeline(*steps).fit(raw["train"][0])
    features = {key: (transform.transform(f), y) for key, (f, y) in raw.items()}
    return features, transform, time.perf_counter() - start


def local(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Dataset class indices -> their positions in ``classes`` (every label must be one of them)."""
    lookup = np.full(max(int(np.max(labels, initial=0)), *classes) + 1, -1)
    lookup[classes] = np.arange(len(classes))
    return lookup[labels]


def method_scores(method: str, params: dict, train: tuple, classes: list[int], table: zs.AttributeTable):
    """Fit ``dap`` or ``eszsl`` on ``train`` (features, labels of ``classes``); a function features -> (N, C) scores.

    The scores cover every class of ``table`` (column c = class c); ``params`` holds ``dap_c`` or
    ``eszsl_gamma`` and ``eszsl_lambda``.
    """
    features, labels = train
    binary = table.binary()
    if method == "dap":
        model = zs.fit_dap(features, local(labels, classes), binary[classes], table.attributes, c=params["dap_c"])
        return lambda f: model.scores(f, binary), model
    signatures = zs.eszsl_signatures(table.values)
    v = zs.eszsl_fit(features, local(labels, classes), signatures[classes], params["eszsl_gamma"],
                     params["eszsl_lambda"])  # fmt: skip
    return lambda f: zs.eszsl_scores(f, v, signatures), v


def zsl_accuracy(scores: np.ndarray, labels: np.ndarray, candidates: list[int]) -> float:
    """Conventional ZSL: images of the ``candidates`` classes, each named among ``candidates`` only."""
    keep = np.isin(labels, candidates)
    predicted = np.asarray(candidates)[np.argmax(scores[keep][:, candidates], axis=1)]
    return zs.mean_class_accuracy(labels[keep], predicted)


def select_hyperparameters(features: dict, task: Task, config: Config) -> dict:
    """Class-wise validation on the seen classes: hyperparameters and calibration factor of each method.

    Some seen classes are held out as pseudo-unseen (``zs.validation_split``); each setting is fitted
    on the others' ``train`` images and scored on the ``val`` images: ZSL accuracy among the held-out
    classes picks the hyperparameters, the GZSL harmonic mean picks the calibration factor. The real
    unseen classes take no part. Returns ``{"pseudo_unseen": [...], "dap": {...}, "eszsl": {...}}``.
    """
    n_held = round(len(task.seen) * len(task.unseen) / task.dataset.num_classes)
    held = zs.validation_split(task.table, task.seen, n_held, config.seed)
    if held is None:
        print("warning: no subset of the seen classes passes the split check as pseudo-unseen classes: "
              f"hyperparameters fall back to {FALLBACK}, no calibration")  # fmt: skip
        return {"pseudo_unseen": None, "dap": {"dap_c": FALLBACK["dap_c"], "calibration": 0.0},
                "eszsl": {k: FALLBACK[k] for k in ("eszsl_gamma", "eszsl_lambda")} | {"calibration": 0.0}}  # fmt: skip
    kept = [c for c in task.seen if c not in held]
    f_train, y_train = features["train"]
    train = (f_train[np.isin(y_train, kept)], y_train[np.isin(y_train, kept)])
    f_val, y_val = features["val"]
    grids = {"dap": [{"dap_c": c} for c in DAP_C_GRID],
             "eszsl": [{"eszsl_gamma": g, "eszsl_lambda": lam} for g in ESZSL_GAMMA_GRID for lam in ESZSL_LAMBDA_GRID]}  # fmt: skip
    seen_mask = np.isin(np.arange(task.dataset.num_classes), kept)
    chosen = {"pseudo_unseen": task.names(held)}
    for method, grid in grids.items():
        best, best_accuracy, best_scores = None, -1.0, None
        for params in grid:
            scores = method_scores(method, params, train, kept, task.table)[0](f_val)
            accuracy = zsl_accuracy(scores, y_val, held)
            if accuracy > best_accuracy:
                best, best_accuracy, best_scores = params, accuracy, scores
        # GZSL on the validation images: candidates are the seen classes, the held-out ones as "unseen".
        columns = task.seen
        mask = seen_mask[columns]
        gamma = zs.choose_calibration(best_scores[:, columns], local(y_val, columns), mask)
        report = zs.gzsl_report(best_scores[:, columns], local(y_val, columns), mask, gamma)
        chosen[method] = best | {"calibration": gamma, "validation_zsl_accuracy": best_accuracy,
                                 "validation_harmonic_mean": report["harmonic_mean"]}  # fmt: skip
        print(f"  {method}: {best} (pseudo-unseen {task.names(held)}: ZSL {100 * best_accuracy:.1f}%), "
              f"calibration {gamma:.3g} (validation H {100 * report['harmonic_mean']:.1f}%)")  # fmt: skip
    return chosen


def evaluate(scores: np.ndarray, labels: np.ndarray, task: Task, calibration: float) -> dict:
    """ZSL accuracy and confusion matrix among the unseen classes; GZSL raw and calibrated."""
    keep = np.isin(labels, task.unseen)
    predicted = np.argmax(scores[keep][:, task.unseen], axis=1)
    truth = local(labels[keep], task.unseen)
    raw = zs.gzsl_report(scores, labels, task.seen_mask)
    calibrated = zs.gzsl_report(scores, labels, task.seen_mask, calibration)
    return {
        "unseen_accuracy": zs.mean_class_accuracy(truth, predicted),
        "per_class_accuracy": evaluation.per_class_accuracy(truth, predicted, len(task.unseen)),
        "confusion_matrix": evaluation.confusion_matrix(truth, predicted, len(task.unseen)).tolist(),
        "gzsl_harmonic_mean": raw["harmonic_mean"],
        "gzsl_harmonic_mean_calibrated": calibrated["harmonic_mean"],
        "gzsl": {"uncalibrated": raw, "calibrated": calibrated},
    }


def per_attribute_accuracy(dap: zs.DAP, features: np.ndarray, labels: np.ndarray, task: Task) -> dict:
    """How often DAP's p(a | x) > 0.5 agrees with the image's class description, on unseen and seen test images."""
    predicted = dap.attribute_probabilities(features) > 0.5
    truth = task.table.binary()[labels].astype(bool)
    unseen = np.isin(labels, task.unseen)
    return {attribute: {"unseen": float(np.mean(predicted[unseen, a] == truth[unseen, a])),
                        "seen": float(np.mean(predicted[~unseen, a] == truth[~unseen, a]))}
            for a, attribute in enumerate(task.table.attributes)}  # fmt: skip


def ablation(method: str, params: dict, features: dict, task: Task, dap: zs.DAP | None = None) -> dict:
    """ZSL unseen accuracy with each attribute left out: DAP drops its factor, ESZSL is re-solved without it."""
    f_test, y_test = features["test"]
    out = {}
    for a, attribute in enumerate(task.table.attributes):
        if method == "dap":
            keep = [i for i in range(len(task.table.attributes)) if i != a]
            scores = dap.scores(f_test, task.table.binary(), keep)
        else:
            scores = method_scores("eszsl", params, features["train"], task.seen, task.table.without(attribute))[0](
                f_test
            )
        out[attribute] = zsl_accuracy(scores, y_test, task.unseen)
    return out


def train_oracle(features: dict, classes: list[int], sets: tuple[str, ...]):
    """The ceiling: logistic regression on labelled images of ``classes`` (sets ``train`` and/or ``oracle``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f = np.concatenate([features[s][0] for s in sets])
    y = np.concatenate([features[s][1] for s in sets])
    keep = np.isin(y, classes)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(f[keep], y[keep])


def oracle_report(features: dict, task: Task) -> dict:
    """ZSL ceiling (unseen classes, their labelled images) and GZSL ceiling (every class, every labelled image)."""
    f_test, y_test = features["test"]
    n = task.dataset.num_classes
    zsl = train_oracle(features, task.unseen, ("oracle",))
    scores = np.full((len(f_test), n), -np.inf)
    scores[:, zsl.classes_] = zsl.predict_log_proba(f_test)
    report = evaluate(scores, y_test, task, 0.0)
    everyone = train_oracle(features, list(range(n)), ("train", "oracle"))
    gzsl = zs.gzsl_report(everyone.predict_log_proba(f_test), y_test, task.seen_mask)
    return report | {"gzsl_harmonic_mean": gzsl["harmonic_mean"], "gzsl_harmonic_mean_calibrated": gzsl["harmonic_mean"],
                     "gzsl": {"uncalibrated": gzsl, "calibrated": gzsl}}  # fmt: skip


def chance_report(task: Task) -> dict:
    """Guessing uniformly: 1/U among the unseen classes; 1/C over all classes (seen, unseen and H alike)."""
    zsl, gzsl = 1.0 / len(task.unseen), 1.0 / task.dataset.num_classes
    report = {"seen_accuracy": gzsl, "unseen_accuracy": gzsl, "harmonic_mean": gzsl, "gamma": 0.0}
    return {"unseen_accuracy": zsl, "gzsl_harmonic_mean": gzsl, "gzsl_harmonic_mean_calibrated": gzsl,
            "gzsl": {"uncalibrated": report, "calibrated": report}}  # fmt: skip


def export_model(base: bases.Base, transform, v: np.ndarray, task: Task, calibration: float) -> keras.Model:
    """Images -> ESZSL's calibrated GZSL scores over every class, as one Keras model.

    Standardisation, PCA, V and the class descriptions are all linear: they fold into one Dense
    layer (``classifier``) whose bias also subtracts the calibration factor from the seen classes.
    """
    signatures = zs.eszsl_signatures(task.table.values)
    dims = bases.feature_extractor(base).output_shape[-1]
    eye = transform.transform(np.vstack([np.zeros(dims), np.eye(dims)]))
    kernel = (eye[1:] - eye[0]) @ v @ signatures.T  # (D, C)
    bias = eye[0] @ v @ signatures.T - calibration * task.seen_mask
    inputs = keras.Input(base.input_shape)
    x = bases.feature_extractor(base)(inputs)
    head = keras.layers.Dense(len(bias), name="classifier")
    outputs = head(x)
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(inputs, outputs, name="eszsl")


# --- The whole recipe -------------------------------------------------------------


def run(config: Config) -> dict:
    """Split, base, features, validation, DAP and ESZSL, baselines, ablation; returns metrics.json's content."""
    config = config.resolved()
    start = time.perf_counter()
    bases.check_base_args(config.base, config.weights, config.image_size, config.source_cut, config.base_layer)
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)
    task = load_task(config)
    picked = draw_images(task, config)
    print(f"{task.dataset}\nunseen classes: {task.names(task.unseen)}\nseen classes: {task.names(task.seen)}")

    base = bases.load_for_strategy(lambda: load_pretrained_base(config, task), strategy)
    set_seed(config.seed)  # the same results whether the base was pretrained now or loaded
    run_dir = evaluation.make_run_dir("zero_shot", config.out)  # after every input error
    print(f"base: {base}\nrun folder: {run_dir}")
    features, transform, embed_seconds = embed(base, task, picked, config)
    print(f"features {features['train'][0].shape[1]}-d of {sum(len(f) for f, _ in features.values())} images "
          f"in {embed_seconds:.1f} s\nchoosing hyperparameters on the seen classes:")  # fmt: skip
    chosen = select_hyperparameters(features, task, config)

    f_test, y_test = features["test"]
    variants, models = {"chance": chance_report(task)}, {}
    for method in ("dap", "eszsl"):
        params = {k: v for k, v in chosen[method].items() if k.startswith(("dap_", "eszsl_"))}
        score, models[method] = method_scores(method, params, features["train"], task.seen, task.table)
        variants[method] = evaluate(score(f_test), y_test, task, chosen[method]["calibration"]) | {
            "hyperparameters": params, "ablation": ablation(method, params, features, task, models.get("dap"))
        }  # fmt: skip
    variants["dap"]["per_attribute_accuracy"] = per_attribute_accuracy(models["dap"], f_test, y_test, task)
    variants["oracle"] = oracle_report(features, task)

    record = zs.strict_json(evaluation.metrics_record(
        "zero_shot", config.dataset, "unseen_accuracy", "chance", variants, time.perf_counter() - start,
        unseen_classes=task.names(task.unseen), seen_classes=task.names(task.seen), attributes=task.table.attributes,
        attribute_table=task.table.origin, validation=chosen, test_images=len(y_test), embed_seconds=embed_seconds,
        base={k: v for k, v in base.info.items() if k != "settings"} | {"spec": config.base},
    ))  # fmt: skip
    figures = {f"confusion_matrix_{m}": evaluation.plot_confusion_matrix(
        variants[m]["confusion_matrix"], task.names(task.unseen), f"{m}: unseen classes (ZSL)") for m in ("dap", "eszsl")}  # fmt: skip
    figures["attribute_ablation"] = evaluation.plot_attribute_ablation(task.table.attributes, {
        m: [variants[m]["ablation"][a] - variants[m]["unseen_accuracy"] for a in task.table.attributes]
        for m in ("dap", "eszsl")})  # fmt: skip
    per_attribute = variants["dap"]["per_attribute_accuracy"]
    figures["per_attribute_accuracy"] = evaluation.plot_per_class_accuracy(
        {where: [per_attribute[a][where] for a in task.table.attributes] for where in ("unseen", "seen")},
        task.table.attributes, "DAP: attribute predicted right, on unseen and seen test images")  # fmt: skip
    model = export_model(base, transform, models["eszsl"], task, chosen["eszsl"]["calibration"])
    evaluation.write_run(run_dir, config, record, {}, figures, model=model)
    zs.write_attribute_csv(task.table, run_dir / "attributes.csv")

    print(f"\nunseen classes {task.names(task.unseen)}, {len(y_test)} test images of all classes:")
    print(evaluation.comparison_table(record))
    rows = [("GZSL", "seen", "unseen", "H", "calibrated: seen", "unseen", "H")]
    for name, figures_ in record["variants"].items():
        raw, cal = figures_["gzsl"]["uncalibrated"], figures_["gzsl"]["calibrated"]
        rows.append((name, *(f"{100 * r[k]:.1f}%" for r in (raw, cal) for k in ("seen_accuracy", "unseen_accuracy",
                                                                                 "harmonic_mean"))))  # fmt: skip
    print("\n" + evaluation.text_table(rows))
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
