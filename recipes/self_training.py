"""Self-training on a pretrained base: label the unlabeled pool in rounds, learn from it, beat transfer.

You have a pretrained model, a few labeled images of your classes and many unlabeled ones.
Transfer alone (a head on the base's features) uses only the labels. Self-training also uses
the pool: a model trained on the labels labels the pool, keeps the labels it is surest of
(*pseudo-labels*), and is retrained on labels plus pseudo-labels. On a pretrained base this is
cheap and strong: the base's features are good, what is missing is labels.

When to use it: unlabeled images of the same classes are cheap and labels are not. It can hurt
when confident mistakes feed back into training (confirmation bias), so the recipe always
measures the labels-only baseline and reports the pseudo-labels' precision.

What the default run does (``python -m recipes.self_training``): the ``source-cnn`` base
(pretrained on Fashion-MNIST classes 0-4 and cached, cut after block 2: 1,568 features); the
target task is classes 5-9 with 10 labels per class; every other training image of classes
5-9 is the pool, its labels hidden (read only to report precision); every variant is tested on
the 5,000 test images of classes 5-9:

- ``scratch``: the base's architecture, random weights, trained on the 50 labels;
- ``transfer`` (the baseline): a logistic-regression head on the base's cached features;
- ``self_training``: Curriculum Labeling (Cascante-Bonilla et al. 2021) in feature space. Labels
  spread from the labeled images along a k-nearest-neighbour graph of the features (label
  spreading, Zhou et al. 2004), balanced to the pool's class mix (Sinkhorn-Knopp; the mix
  estimated by EM, Saerens et al. 2002, when it is skewed); the surest 20% of each class join the
  labels, a new head is fit; then 40/60/80/100%. A guard first self-trains on folds of the
  labels: if that loses to transfer on the held-out labels, the run keeps transfer's model.

Other methods: ``--labeler confidence`` (the head labels the pool), ``--method noisy_student``
(then students in image space from the base), ``--method consistency`` (FixMatch from the
transfer model, an EMA teacher). ``--base`` also takes a keras.applications name or a
``.keras`` file; ``--pool folder:<path>`` your own unlabeled images (skewed and dirty pools:
``docs/self_training_pools.md``); ``--base none --method consistency`` the from-scratch
setting. ``--strategy multi_worker`` trains scratch and the students distributed;
``--backup-dir`` makes them resumable.

What to expect (seeds 0-2, base cached): transfer 88.9-90.4%, self-training 94.1-94.9% (+4.6
points on average, +4.2 at least; the guard passed on every seed); 47-50 s alone on 2 cores.
Every measured setting, with its command: ``docs/self_training_experiments.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import bases, data, distributed, evaluation, models, semi
from common.cli import InputError, RecipeConfig, knob, make_strategy, run_cli, set_seed

METHODS = ("curriculum", "noisy_student", "consistency")
LABELERS = ("propagation", "confidence")
BALANCES = ("auto", "estimated", "uniform", "none")
# Options that only some methods read: set under another method, they are refused (check_config).
FEATURE_SPACE = (
    "labeler",
    "fractions",
    "balance",
    "skew",
    "skewed_max_share",
    "foreign",
    "guard",
    "guard_folds",
    "guard_pool",
    "head_c",
)
STUDENT = ("student_rounds", "student_epochs", "student_view", "labeled_repeat")
CONSISTENCY = ("steps", "teacher_steps", "threshold", "flexmatch", "unlabeled_ratio", "ema")
READS = {"curriculum": FEATURE_SPACE, "noisy_student": FEATURE_SPACE + STUDENT + ("learning_rate", "batch_size"),
         "consistency": CONSISTENCY + ("learning_rate", "batch_size")}  # fmt: skip


@dataclass
class Config(RecipeConfig):
    """Self-training on a pretrained base (curriculum pseudo-labels, a noised student) against transfer alone."""

    dataset: str = knob("fashion_mnist", "Dataset: fashion_mnist, digits, mnist, cifar10, tfds:<name>, folder:<path>.")
    image_size: int = knob(0, "Image side: resizes tfds:/folder: images; a backbone's input (0: native).", minimum=0)
    source_classes: str = knob("0-4", "Classes the source-cnn base is pretrained on (ignored with --base none).")
    target_classes: str = knob("5-9", "Classes of the target task; must not overlap the source classes.")
    labels_per_class: int = knob(10, "Labeled target training images per class (the label budget).", minimum=1)
    pool: str = knob("", "Unlabeled pool: '' = the other target training images (labels hidden); folder:<path>.")
    unlabeled: int = knob(0, "Use this many pool images, drawn with the seed (0: all).", minimum=0)
    test_images: int = knob(0, "Evaluate on this many test images, stratified (0: all).", minimum=0)
    base: str = knob("source-cnn", "Pretrained base: source-cnn, a keras.applications name, a .keras path, or none. A .keras file with custom layers: RECIPES_IMPORT=module1,module2 imports their modules first; one with Lambda layers needs RECIPES_SAFE_MODE=0 (runs the file's code: trusted files only).")  # fmt: skip
    weights: str = knob("", "keras.applications weights: imagenet (default, online), none, or a weights file.")
    base_layer: str = knob("", "Layer of a keras.applications/.keras base giving the features (default: bases.py).")
    source_width: int = knob(16, "Width of the source-cnn base (and of the --base none network).", minimum=1)
    source_epochs: int = knob(2, "Pretraining epochs of the source-cnn base.", minimum=1)
    source_images: int = knob(0, "Source training images for the source-cnn base (0: all).", minimum=0)
    source_cut: str = knob("block2", "Last block of the source-cnn kept as the base: block1 | block2 | block3.")
    method: str = knob("curriculum", "curriculum (feature space) | noisy_student (then image space) | consistency.")
    labeler: str = knob("propagation", "Pseudo-labels spread along a k-NN graph | from the head's confidence.")
    fractions: str = knob("0.2,0.4,0.6,0.8,1.0", "Curriculum: share of each class's pool predictions kept, per round.")
    balance: str = knob("auto", "Rescale pool predictions to a class mix (Sinkhorn-Knopp): the pool's, estimated by EM from transfer's head (Saerens et al. 2002) | uniform | none | auto (the estimate if it departs from the labels' mix by more than --skew, else the labels' mix).")  # fmt: skip
    skewed_max_share: float = knob(0.8, "On a pool balanced to a skewed estimate of its mix: the curriculum's largest share (its least confident images are where the estimate's error lands).", minimum=0.01, maximum=1.0)  # fmt: skip
    skew: float = knob(0.15, "--balance auto: total variation between the estimated pool mix and the labels' mix above which the estimate is used.", minimum=0.0, maximum=1.0)  # fmt: skip
    foreign: float = knob(0.0, "Leave out pool images less like the labeled classes than this quantile of the labeled images (cosine to the nearest class mean), e.g. 1.0; 0 keeps all (and only counts them).", minimum=0.0, maximum=1.0)  # fmt: skip
    guard: bool = knob(True, "Cross-validate on the labels (--guard-folds) whether self-training beats transfer (on a skewed pool: without costing a class more than one held-out image); keep transfer's model if not.")  # fmt: skip
    guard_folds: int = knob(0, "Folds of the labels the guard holds out in turn (at most the labels per class); 0: 5 when the pool's mix is balanced to a skewed estimate, else 2.", minimum=0)  # fmt: skip
    guard_pool: int = knob(
        5000, "Pool images the guard's folds self-train on, drawn with the seed (0: all).", minimum=0
    )
    head_c: float = knob(1.0, "Inverse L2 strength (scikit-learn's C) of the logistic-regression heads.", minimum=1e-6)
    student_rounds: int = knob(2, "noisy_student: students in turn, each labeling the pool for the next.", minimum=1)
    student_epochs: int = knob(2, "noisy_student: epochs over labels + pseudo-labels per student.", minimum=1)
    student_view: str = knob("weak", f"The student's augmentation: {' | '.join(semi.VIEWS)} (common/semi.py).")
    labeled_repeat: int = knob(20, "noisy_student: times each labeled image appears per student epoch.", minimum=1)
    learning_rate: float = knob(1e-3, "Adam peak learning rate of the student (cosine decay to 0).", minimum=0.0)
    dropout: float = knob(0.3, "Dropout before the student's classifier (part of its noise).", minimum=0.0, maximum=1.0)
    batch_size: int = knob(128, "Student batch size (consistency: labeled images per step, at most all).", minimum=1)
    steps: int = knob(1000, "consistency: student steps (as many for the --base none baseline).", minimum=1)
    teacher_steps: int = knob(3000, "consistency with --base none: labels-only steps before the student.", minimum=1)
    threshold: float = knob(0.95, "consistency: keep pseudo-labels this confident.", minimum=0.0, maximum=1.0)
    flexmatch: bool = knob(False, "consistency: FlexMatch's per-class thresholds instead of one threshold.")
    unlabeled_ratio: int = knob(3, "consistency: unlabeled images per step, per labeled image in the step.", minimum=1)
    ema: float = knob(0.99, "consistency: decay of the EMA of the weights (the teacher).", minimum=0.0, maximum=1.0)
    scratch_epochs: int = knob(100, "Epochs of the from-scratch reference on the labels.", minimum=1)

    QUICK = dict(unlabeled=2000, test_images=500, source_epochs=1, source_images=2000, fractions="0.5,1.0",
                 student_rounds=1, student_epochs=1, labeled_repeat=2, steps=20, teacher_steps=20, scratch_epochs=3,
                 guard_pool=500)  # fmt: skip
    MULTI_WORKER = True  # scratch and students through common.distributed.train; see run()
    BACKUP = True


# --- Data and checks --------------------------------------------------------------------


def load_tasks(config: Config) -> tuple[data.Dataset | None, data.Dataset]:
    """The source task (None with --base none) and the target task, labels re-indexed from 0."""
    if config.base != "none":
        return data.load_tasks(config.dataset, config.source_classes, config.target_classes, config.image_size,
                               config.seed)  # fmt: skip
    dataset = data.load_dataset(config.dataset, image_size=config.image_size or None, seed=config.seed)
    target_classes = data.parse_classes(config.target_classes)
    data.check_class_split(dataset, target_classes, flags=("--target-classes",))
    return None, data.select_classes(dataset, target_classes)


def check_config(config: Config, target: data.Dataset) -> None:
    """Every bad value gets a clear error here, before any training starts (numbers out of
    their knob's bounds are caught earlier, by ``Config.resolved``)."""
    for name, value, choices in (("method", config.method, METHODS), ("labeler", config.labeler, LABELERS),
                                 ("student-view", config.student_view, semi.VIEWS)):  # fmt: skip
        if value not in choices:
            raise InputError(f"unknown --{name} {value!r}; choose one of {', '.join(choices)}")
    if config.base == "none" and config.method != "consistency":
        raise InputError(f"--base none trains from scratch: only --method consistency applies, not {config.method!r}")
    if config.base != "none":
        bases.check_base_args(config.base, config.weights, config.image_size, config.source_cut, config.base_layer)
    if config.method == "consistency" and config.strategy != "default":
        raise InputError(f"--method consistency trains on one device with its own EMA loop, not under --strategy "
                         f"{config.strategy}; use --method curriculum or noisy_student")  # fmt: skip
    if config.method == "consistency" and config.backup_dir:
        raise InputError("--method consistency keeps no checkpoints for --backup-dir; run it without the flag")
    if config.guard_folds == 1:
        raise InputError("--guard-folds 1 holds nothing out; give 2 or more (0: the default choice)")
    if config.balance not in BALANCES:
        raise InputError(f"unknown --balance {config.balance!r}; choose one of {', '.join(BALANCES)}")
    config.refuse_unread("method", config.method, READS)
    semi.parse_fractions(config.fractions)


def split_target(target: data.Dataset, config: Config) -> semi.Split:
    """Seeded labels per class; the pool is the rest of the target training split, or --pool's folder."""
    return semi.split_labeled_pool(target, config.labels_per_class, config.seed, config.pool, config.unlabeled,
                                   config.test_images)  # fmt: skip


def load_pretrained_base(config: Config, source: data.Dataset, target: data.Dataset) -> bases.Base:
    """The ``--base`` (pretrained on the source classes with seed 0 and cached, for every --seed),
    checked on two target images: a base whose input cannot take them fails here."""
    settings = bases.SourceSettings(config.source_width, config.source_epochs, max_images=config.source_images)
    base = bases.load_base(config.base, config.weights, config.image_size, source, settings, config.source_cut,
                           layer=config.base_layer)  # fmt: skip
    bases.check_takes_images(base, target.x_train, f"--base {config.base!r}")
    return base


# --- Transfer: a head on cached features ------------------------------------------------------


def extract_features(base: bases.Base, images: np.ndarray, strategy=None) -> np.ndarray:
    """The frozen base's features (N, D); under multi_worker each worker extracts a shard, all get all.

    The images stream through the base (``bases.extract_features``): no prepared float32 copy of
    the pool is held (at 96x96 RGB, 3.3 GB for 30,000 images).
    """
    return distributed.predict_in_shards(lambda x: bases.extract_features(base, x)[0], images, strategy)


def fit_head(features: np.ndarray, labels: np.ndarray, config: Config):
    """A logistic-regression head; classes weighed to equal shares, so that the pool's class mix
    (70/25/5 pseudo-labels, say) does not become the head's prior: it predicts with the prior of
    transfer's head, which the per-class label budget makes uniform."""
    # scikit-learn's L-BFGS on features every worker holds: under multi_worker each fits the same head.
    return models.logistic_regression_head(features, labels, config.head_c, class_weight="balanced")


def transfer_model(base: bases.Base, head, num_classes: int) -> keras.Model:
    """The frozen base and the head as one Keras model taking prepared images."""
    model = models.add_head(models.freeze(bases.fresh_copy(base).model), num_classes, 0.0, name="transfer")
    model.get_layer("classifier").set_weights(models.linear_head_weights(head, num_classes))
    return model


def leave_out_foreign(features: dict, split: semi.Split, config: Config) -> tuple[dict, semi.Split, dict]:
    """Count the pool images that look unlike every labeled class (``semi.foreign_mask``: beyond
    the least typical labeled image) and, with --foreign q > 0, leave out those beyond the
    labeled images' q-quantile. Returns the features, the split and the counts (printed)."""
    scores, own = semi.foreign_scores(features["labeled"], split.y_labeled, features["pool"])  # as semi.foreign_mask
    counts = {"foreign_looking": int(np.sum(scores > own.max()))}
    foreign = scores > np.quantile(own, config.foreign) if config.foreign > 0 else np.zeros(len(scores), bool)
    if foreign.all():
        raise InputError(f"--foreign {config.foreign}: every pool image looks unlike the labeled classes; "
                         "check that the pool holds images of these classes, or lower --foreign (0 keeps all)")  # fmt: skip
    counts["foreign_left_out"] = int(foreign.sum())
    print(f"  pool: {counts['foreign_looking']} of {len(foreign)} images look unlike every labeled class (less alike "
          f"than the least typical labeled image); " + (f"left out {counts['foreign_left_out']} (--foreign "
          f"{config.foreign})" if config.foreign else "all kept (--foreign 1.0 would leave them out)"), flush=True)  # fmt: skip
    keep = ~foreign
    hidden = None if split.hidden_labels is None else split.hidden_labels[keep]
    split = dataclasses.replace(split, x_pool=split.x_pool[keep], hidden_labels=hidden, pool_index=split.pool_index[keep])  # fmt: skip
    return {**features, "pool": features["pool"][keep]}, split, counts


def choose_class_mix(head, pool: np.ndarray, y_labeled: np.ndarray, num_classes: int, config: Config):
    """The class mix the pseudo-labels are balanced to, and the pool's estimated mix.

    The estimate is EM on transfer's head (``semi.estimate_prior``; trained on the labels' mix),
    made once, before any pseudo-label can bias it. ``--balance estimated`` uses it, ``uniform``
    the labels' mix, ``none`` nothing (None), ``auto`` the estimate only when it departs from the
    labels' mix by more than ``--skew`` (total variation): on a balanced pool the head's
    calibration error alone puts the estimate 0.04-0.08 away, and balancing to it costs points
    (docs/self_training_pools.md). Returns (target mix (K,) or None, estimate (K,), whether the
    target is a skewed estimate)."""
    labels_mix = np.bincount(y_labeled, minlength=num_classes) / len(y_labeled)
    estimate = semi.estimate_prior(head.predict_proba(pool), labels_mix)
    skewed = 0.5 * np.abs(estimate - labels_mix).sum() > config.skew
    target = {"estimated": estimate, "uniform": labels_mix, "none": None}.get(config.balance)
    if config.balance == "auto":
        target = estimate if skewed else labels_mix
    return target, estimate, target is not None and not np.allclose(target, labels_mix)


def curriculum(labeled: np.ndarray, y_labeled: np.ndarray, pool: np.ndarray, num_classes: int, config: Config,
               evaluate: tuple, hidden: np.ndarray | None = None, log: bool = True, class_mix=None):  # fmt: skip
    """Curriculum Labeling in feature space: label the pool, balance it to the class mix that
    ``choose_class_mix`` gives, keep each class's most confident share, refit the head on labels + pseudo-labels,
    raise the share. Labels come from the head (``confidence``) or spread along a k-NN graph of
    the features from the labels and the last round's pseudo-labels (``propagation``).

    ``labeled`` (n, D) / ``y_labeled``, ``pool`` (N, D) features; ``evaluate`` = (features, labels)
    scored after each round (the test set; the held-out fold in ``guard``); ``hidden`` the pool's
    labels, for precision only; ``class_mix`` ``choose_class_mix``'s result if already computed
    on these labels and pool. Returns the last head, the rounds (printed when ``log``) and the
    pool's last class probabilities. Under multi_worker every worker runs these scikit-learn steps
    on the same features and gets the same result: nothing here is distributed."""
    head, rounds, n = fit_head(labeled, y_labeled, config), [], len(y_labeled)
    kept, pseudo = np.empty(0, np.int64), np.empty(0, np.int64)
    graph = semi.knn_graph(np.concatenate([labeled, pool]), seed=config.seed) if config.labeler == "propagation" else None  # fmt: skip
    prior, estimate, skewed = class_mix or choose_class_mix(head, pool, y_labeled, num_classes, config)
    fractions = semi.parse_fractions(config.fractions)
    if skewed:  # the estimate's error lands on the least confident images: they stay unlabeled
        fractions = sorted({min(f, config.skewed_max_share) for f in fractions})
    for fraction in fractions:
        start = time.perf_counter()
        if graph is not None:
            seeds = np.full(graph.shape[0], -1)
            seeds[:n], seeds[n + kept] = y_labeled, pseudo
            probabilities = semi.label_spreading(graph, seeds, num_classes)[n:]
        else:
            probabilities = head.predict_proba(pool)
        if prior is not None:
            probabilities = semi.balance_classes(probabilities, prior)
        kept, pseudo = semi.select_top_fraction(probabilities, fraction)
        head = fit_head(np.concatenate([labeled, pool[kept]]), np.concatenate([y_labeled, pseudo]), config)
        stats = semi.pseudo_label_stats(pseudo, None if hidden is None else hidden[kept], num_classes, len(pool))
        stats["prior_estimate"], stats["balanced_to"] = estimate.tolist(), None if prior is None else prior.tolist()
        stats["prior_error"] = None if hidden is None else semi.total_variation(estimate, hidden, num_classes)
        accuracy = head.score(*evaluate)
        rounds.append(semi.log_round(f"curriculum {fraction:.0%}", accuracy, stats, start) if log else {"test_accuracy": accuracy})  # fmt: skip
    if graph is None:
        probabilities = head.predict_proba(pool)
    return head, rounds, probabilities


def guard(features: dict, y_labeled: np.ndarray, num_classes: int, config: Config) -> dict | None:
    """Does self-training beat transfer on images neither saw? --guard-folds stratified folds of
    the labels: for each, transfer (a head on the other folds) and the curriculum (the other folds
    + the pool, at most --guard-pool images) predict the held-out fold. Returns both accuracies over all labeled
    images and per class, and the most held-out images of one class that self-training gets
    wrong and transfer right, net (``worst_class_loss``); None when a class has fewer than 2
    labels (nothing to hold out)."""
    from sklearn.model_selection import StratifiedKFold

    if np.bincount(y_labeled).min() < 2:
        return None
    pool = features["pool"]
    if 0 < config.guard_pool < len(pool):
        pool = pool[np.random.default_rng(config.seed + 2).choice(len(pool), config.guard_pool, replace=False)]
    right = {"transfer": np.zeros(num_classes, int), "self_training": np.zeros(num_classes, int)}
    folds = StratifiedKFold(min(config.guard_folds, int(np.bincount(y_labeled).min())), shuffle=True, random_state=config.seed)  # fmt: skip
    for train, held in folds.split(features["labeled"], y_labeled):
        x, y, (x_held, y_held) = features["labeled"][train], y_labeled[train], (features["labeled"][held], y_labeled[held])  # fmt: skip
        head, *_ = curriculum(x, y, pool, num_classes, config, (x_held, y_held), log=False)
        for name, model in (("transfer", fit_head(x, y, config)), ("self_training", head)):
            right[name] += np.bincount(y_held[model.predict(x_held) == y_held], minlength=num_classes)
    counts = np.bincount(y_labeled, minlength=num_classes)
    return {**{name: int(r.sum()) / len(y_labeled) for name, r in right.items()},
            **{f"{name}_per_class": (r / np.maximum(counts, 1)).tolist() for name, r in right.items()},
            "worst_class_loss": int((right["transfer"] - right["self_training"]).max())}  # fmt: skip


# --- The noised student in image space ---------------------------------------------------------


def noisy_students(base: bases.Base, head, probabilities: np.ndarray, prior, split: semi.Split, num_classes: int,
                   config: Config, strategy=None, backup=None, share: float = 1.0):  # fmt: skip
    """Students in turn, each from the base and the curriculum head, trained on the labels
    (repeated) plus the pool labeled by ``probabilities`` (then by the previous student, each
    worker predicting a shard of the pool under multi_worker), balanced to ``prior`` (the
    curriculum's last class mix; None: not balanced); of each class, the most confident ``share``."""
    strategy = strategy or tf.distribute.get_strategy()
    x_pool, x_labeled = data.to_input_shape(split.x_pool, base.input_shape), data.to_input_shape(split.x_labeled, base.input_shape)  # fmt: skip
    rounds, history, student = [], {}, None
    for number in range(1, config.student_rounds + 1):
        start = time.perf_counter()
        kept, pseudo = semi.select_top_fraction(probabilities if prior is None else semi.balance_classes(probabilities, prior), share)  # fmt: skip
        x = np.concatenate([np.repeat(x_labeled, config.labeled_repeat, axis=0), x_pool[kept]])
        y = np.concatenate([np.repeat(split.y_labeled, config.labeled_repeat), pseudo])
        with strategy.scope():
            student = semi.build_student(base, head, num_classes, config.dropout)
        logs = semi.train_on_view(student, base, x, y, config.student_view, config.student_epochs, config.batch_size,
                                  config.learning_rate, config.seed + number, strategy,
                                  backup.phase(f"student-{number}") if backup else None)  # fmt: skip
        for key, values in logs.items():
            history.setdefault(key, []).extend(values)
        probabilities = semi.predict_probabilities(student, split.x_pool, strategy, base=base)  # streamed
        accuracy = evaluation.accuracy(
            split.y_test, semi.predict_probabilities(student, split.x_test, base=base).argmax(axis=1)
        )
        rounds.append(semi.log_round(f"student {number}", accuracy,
                                     semi.pseudo_label_stats(pseudo, None if split.hidden_labels is None else split.hidden_labels[kept], num_classes, len(x_pool)), start))  # fmt: skip
    return student, rounds, history


# --- FixMatch-style consistency, online -------------------------------------------------------


def consistency(model: keras.Model, split: semi.Split, base: bases.Base | None, num_classes: int, config: Config,
                teacher_steps: int = 0) -> tuple[keras.Model, list[dict], keras.Model | None]:  # fmt: skip
    """``teacher_steps`` labels-only steps (--base none), then --steps FixMatch steps in four
    reporting chunks. Returns the EMA student, the chunks, and (with ``teacher_steps``) a
    labels-only twin trained for as many steps: the from-scratch baseline."""
    if base is not None:  # BatchNorm of the pretrained base in inference mode (frozen): its statistics stay the
        # ones the transfer head was fit on, not those of each mixed labeled + strong-view batch
        for layer in model.get_layer("base").layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
    preprocess = base.preprocess if base else (lambda images: images)
    shape = base.input_shape if base else split.x_labeled.shape[1:]
    x_labeled, x_pool, x_test = (data.to_input_shape(x, shape) for x in (split.x_labeled, split.x_pool, split.x_test))
    weak = semi.view_then("weak", config.seed, preprocess)
    strong = semi.view_then("erasing", config.seed + 10, preprocess)

    def new_trainer(network, steps, warmup=True):
        return semi.EMATrainer(network, semi.copy_model(network), steps, config.learning_rate, config.ema, weak, strong,
                               config.threshold, len(split.x_pool), config.flexmatch, warmup)  # fmt: skip

    rng, baseline = np.random.default_rng(config.seed + 10), None
    batch = min(config.batch_size, len(split.x_labeled))
    labeled = semi.index_batches(len(split.x_labeled), batch, rng)
    if teacher_steps:
        teacher = new_trainer(model, teacher_steps)
        for idx in itertools.islice(labeled, teacher_steps):
            teacher.labels_step(x_labeled[idx], split.y_labeled[idx])
        model = teacher.ema_model
        baseline = new_trainer(semi.copy_model(model), config.steps)
    # From the transfer model the EMA teacher starts as that model, with no warm-up: with it the
    # teacher followed the student's first steps and the pool's pseudo-labels collapsed
    # (docs/self_training_consistency.md). --base none keeps the warm-up (not re-measured).
    trainer = new_trainer(model, config.steps, warmup=base is None)
    pool = semi.index_batches(len(split.x_pool), batch * config.unlabeled_ratio, rng)
    rounds = []
    for chunk in np.array_split(np.arange(config.steps), min(4, config.steps)):
        start, pseudo, hidden = time.perf_counter(), [], []
        for _ in chunk:
            idx, uidx = next(labeled), next(pool)
            *_, labels, mask = trainer.consistency_step(x_labeled[idx], split.y_labeled[idx], x_pool[uidx], uidx)
            if baseline:
                baseline.labels_step(x_labeled[idx], split.y_labeled[idx])
            keep = mask.numpy() > 0  # bookkeeping only: hidden labels are read after the step
            pseudo.append(labels.numpy()[keep])
            hidden.append(None if split.hidden_labels is None else split.hidden_labels[uidx][keep])
        accuracy = evaluation.accuracy(split.y_test, semi.predict_probabilities(trainer.ema_model, preprocess(x_test)).argmax(axis=1))  # fmt: skip
        hidden = None if split.hidden_labels is None else np.concatenate(hidden)
        stats = semi.pseudo_label_stats(np.concatenate(pseudo), hidden, num_classes, len(chunk) * batch * config.unlabeled_ratio)  # fmt: skip
        rounds.append(semi.log_round(f"steps {chunk[-1] + 1}", accuracy, stats, start))
    return trainer.ema_model, rounds, baseline.ema_model if baseline else None


def guarded_curriculum(features: dict, split: semi.Split, num_classes: int, config: Config):
    """The curriculum on the pool, after the checks: foreign-looking images counted (or left out)
    and the guard asked. Returns (the curriculum's head, or None when the guard keeps transfer;
    the rounds; the pool's last probabilities; the features and split actually used; the checks,
    for metrics.json)."""
    features, split, checks = leave_out_foreign(features, split, config)
    checks["pool_used"] = len(split.x_pool)
    # A pool balanced to a skewed estimate is the riskier case, for its minority class above all:
    # there the guard holds out 5 folds (unless --guard-folds says) and no class may lose more than
    # one held-out image; elsewhere 2 folds and the overall accuracy decide.
    class_mix = choose_class_mix(fit_head(features["labeled"], split.y_labeled, config), features["pool"],
                                 split.y_labeled, num_classes, config)  # fmt: skip
    skewed = checks["skewed_estimate"] = bool(class_mix[2])
    if not config.guard_folds:
        config = dataclasses.replace(config, guard_folds=5 if skewed else 2)
    verdict = guard(features, split.y_labeled, num_classes, config) if config.guard else None
    head, rounds, probabilities = curriculum(features["labeled"], split.y_labeled, features["pool"], num_classes, config,
                                             (features["test"], split.y_test), split.hidden_labels, class_mix=class_mix)  # fmt: skip
    if not config.guard:
        return head, rounds, probabilities, features, split, {**checks, "kept": "self_training"}
    if verdict is None:
        print("  guard: skipped (a class has fewer than 2 labels to hold out)", flush=True)
        return head, rounds, probabilities, features, split, {**checks, "kept": "self_training"}
    checks["guard"] = verdict
    beaten = verdict["self_training"] > verdict["transfer"] and (not skewed or verdict["worst_class_loss"] <= 1)
    print(f"  guard: on held-out labels ({config.guard_folds} folds) self-training {verdict['self_training']:.3f}, transfer "
          f"{verdict['transfer']:.3f}, one class at most {verdict['worst_class_loss']} image(s) worse"
          + (" (skewed pool: at most 1 allowed): " if skewed else ": ")
          + ("self-training kept" if beaten else "keeping transfer's model"), flush=True)  # fmt: skip
    return head if beaten else None, rounds, probabilities, features, split, {**checks, "kept": "self_training" if beaten else "transfer"}  # fmt: skip


def self_train_in_feature_space(base: bases.Base, transfer_head, features: dict, split: semi.Split,
                                num_classes: int, config: Config, strategy, backup, histories: dict):  # fmt: skip
    """``guarded_curriculum``, then with noisy_student the students. Returns the model kept (transfer's
    if the guard says so), the rounds and the checks."""
    head, rounds, probabilities, features, split, checks = guarded_curriculum(features, split, num_classes, config)
    if head is None:
        return transfer_model(base, transfer_head, num_classes), rounds, checks
    student = transfer_model(base, head, num_classes)
    if config.method == "noisy_student":
        prior = rounds[-1]["balanced_to"]
        share = config.skewed_max_share if checks["skewed_estimate"] else 1.0
        student, more, histories["self_training"] = noisy_students(base, head, probabilities, prior, split,
                                                                   num_classes, config, strategy, backup, share)  # fmt: skip
        rounds += more
    return student, rounds, checks


# --- Baseline from scratch, the whole recipe -----------------------------------------------


def train_scratch(base: bases.Base, split: semi.Split, num_classes: int, config: Config, strategy=None,
                  backup_dir=None) -> tuple[keras.Model, dict]:  # fmt: skip
    """The reference: the base's architecture, fresh weights, trained end to end on the labels alone."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = models.compile_classifier(bases.scratch_twin(base, num_classes, config.dropout), 1e-3)
    history, _ = models.fit_timed(model, base.prepare(split.x_labeled), split.y_labeled, config.scratch_epochs, 32,
                                  config.seed, strategy=strategy, backup_dir=backup_dir)  # fmt: skip
    return model, history


def run(config: Config) -> dict:
    """scratch, transfer and self_training on the same labels; returns metrics.json's content."""
    config = config.resolved()
    start = time.perf_counter()
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)
    source, target = load_tasks(config)
    check_config(config, target)
    split = split_target(target, config)
    # Under multi_worker every worker loads (or pretrains) the same frozen base, outside the strategy.
    base = None if config.base == "none" else load_pretrained_base(config, source, target)
    backup = distributed.Backup(config.backup_dir)  # --backup-dir: each phase resumes from its last epoch
    run_dir = evaluation.make_run_dir("self_training", config.out)
    print(f"target task: {target}\n{split}, method {config.method}\nrun folder: {run_dir}", flush=True)
    n, histories, seconds, phase, checks = target.num_classes, {}, {}, time.perf_counter(), {}

    def report(model, x_test, **extra):
        return dict(evaluation.classification_report(model, x_test, split.y_test, n), **extra)

    if config.base == "none":  # the from-scratch setting: the network's own labels-only training is the baseline
        network = models.build_bn_cnn(target.input_shape, n, config.source_width, config.dropout, name="student")
        for layer in network.get_layer("base").layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = 0.9  # Keras' 0.99 lags behind on short runs
        student, rounds, labels_only = consistency(network, split, None, n, config, config.teacher_steps)
        baseline, x_test = "scratch", split.x_test
        variants = {"scratch": report(labels_only, x_test, steps=config.teacher_steps + config.steps)}
    else:
        print(f"base: {base}", flush=True)
        scratch, histories["scratch"] = train_scratch(base, split, n, config, strategy, backup.phase("scratch"))
        seconds["scratch"], phase = round(time.perf_counter() - phase, 1), time.perf_counter()
        x_test = base.prepare(split.x_test)
        features = {"labeled": extract_features(base, split.x_labeled), "test": extract_features(base, split.x_test),
                    "pool": extract_features(base, split.x_pool, strategy)}  # fmt: skip
        head = fit_head(features["labeled"], split.y_labeled, config)
        seconds["transfer"], phase = round(time.perf_counter() - phase, 1), time.perf_counter()
        baseline = "transfer"
        variants = {"scratch": report(scratch, x_test), "transfer": report(transfer_model(base, head, n), x_test)}
        print(f"  scratch {variants['scratch']['test_accuracy']:.3f}, transfer {variants['transfer']['test_accuracy']:.3f}")  # fmt: skip
        if config.method == "consistency":
            student, rounds, _ = consistency(semi.build_student(base, head, n, config.dropout), split, base, n, config)
        else:
            student, rounds, checks = self_train_in_feature_space(base, head, features, split, n, config, strategy,
                                                                  backup, histories)  # fmt: skip
    seconds["self_training"] = round(time.perf_counter() - phase, 1)
    variants["self_training"] = report(student, x_test, rounds=rounds)
    for name, value in seconds.items():
        variants[name]["train_seconds"] = value
    gains = {f"gain_over_{name}": variants["self_training"]["test_accuracy"] - variants[name]["test_accuracy"]
             for name in variants if name != "self_training"}  # fmt: skip
    record = evaluation.metrics_record(
        "self_training", config.dataset, "test_accuracy", baseline, variants, time.perf_counter() - start,
        method=config.method, base=config.base, labels_per_class=config.labels_per_class,
        labeled_images=len(split.x_labeled), unlabeled_images=len(split.x_pool), test_images=len(split.y_test), **gains,
        checks=checks,
    )  # fmt: skip
    figures = {
        "rounds": semi.plot_rounds(rounds, variants[baseline]["test_accuracy"], baseline),
        "per_class_accuracy": evaluation.plot_per_class_accuracy(
            {name: figures["per_class_accuracy"] for name, figures in variants.items()}, target.class_names,
            "test accuracy per class: where self-training gains and loses"),
        "confusion_matrix": evaluation.plot_confusion_matrix(
            variants["self_training"]["confusion_matrix"], target.class_names, "self-training: confusion matrix"),
    }  # fmt: skip
    evaluation.write_run(run_dir, config, record, histories, figures, model=student)
    backup.finish()

    print(f"\n{config.labels_per_class} labels per class, {len(split.x_pool)} unlabeled, {n} classes:")
    print(evaluation.comparison_table(record))
    gain = 100 * gains[f"gain_over_{baseline}"]
    verdict = "beat" if gain > 0 else "did not beat" if gain == 0 else "ended BELOW"
    print(f"self-training {verdict} its baseline {baseline} ({gain:+.1f} points)"
          + ("" if gain > 0 else ": the pseudo-labels taught the student nothing the labels did not"))  # fmt: skip
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
