"""CNN weight transfer: train on a source task, copy the weights, fine-tune on the target.

The oldest transfer-learning trick. A network trained on a task with plenty of labels
(the *source*) has learned edge, texture and shape detectors that a related task (the
*target*) can reuse. Copy those layers into a new model of the same architecture, give it
a fresh top for the new classes, and train on the few target labels you have.

Which layers to copy? The convolutional layers hold the generic detectors; the dense
layer above them has learned to combine them into the *source* classes. Copying it too
helps less: over seeds 0-4 of the default run, re-initialising the dense layer gained
+2.7 points over scratch on average (+0.8 to +5.5), copying it as well only +1.5 (-2.3 to
+5.2), and with it frozen too the model fell 30 points below scratch: those features
only separate the source classes (``--fresh-layers classifier`` copies every layer but
the classifier).

When to use it: you own a model of the same architecture trained on related data, and
the target task has few labels. With many target labels the gain shrinks; with an
unrelated source it can turn negative, which this recipe would show.

What the default run does (``python -m recipes.weight_transfer``):

1. Fashion-MNIST classes 0-4 (T-shirt, trouser, pullover, dress, coat) are the source
   task: the seed recipe's CNN trains on all 30,000 of their training images.
2. Classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) are the target task, with a
   label budget of 10 images per class, drawn with the seed.
3. Three models of the same architecture train on the same 50 target images:
   ``scratch`` (random init, the baseline), ``transfer`` (conv layers copied, every
   layer fine-tuned) and ``frozen`` (conv layers copied and kept frozen; only the fresh
   dense layer and classifier train).
4. All three are evaluated on the 5,000 official test images of classes 5-9.

``--budgets 10,50,200`` repeats steps 2-4 for each budget and plots accuracy against
labels per class. The README's table gives the measured numbers and run time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np

from common import data, distributed, evaluation, models
from common.cli import InputError, RecipeConfig, knob, make_strategy, parse_budgets, run_cli, set_seed

VARIANTS = ("scratch", "transfer", "frozen")


@dataclass
class Config(RecipeConfig):
    """Train a CNN on source classes, copy its weights into a target model, fine-tune, compare with scratch."""

    dataset: str = knob("fashion_mnist", "Dataset: fashion_mnist, digits, mnist, cifar10, tfds:<name>, folder:<path>.")
    image_size: int = knob(0, "Resize tfds:/folder: images to this side (0: native size, folders 64).", minimum=0)
    source_classes: str = knob("0-4", "Classes of the source task, e.g. '0-4' or '0,2,4'.")
    target_classes: str = knob("5-9", "Classes of the target task; must not overlap the source classes.")
    labels_per_class: int = knob(10, "Target training images per class (the label budget).", minimum=1)
    budgets: str = knob("", "Sweep several label budgets, e.g. '10,50,200' (overrides --labels-per-class).")
    source_images: int = knob(
        0, "Source training images to use, drawn evenly per class (0, or more than there are: all).", minimum=0
    )
    source_epochs: int = knob(3, "Epochs on the source task.", minimum=1)
    source_batch_size: int = knob(64, "Batch size on the source task (global, across replicas).", minimum=1)
    epochs: int = knob(60, "Epochs of each target variant over its labeled images.", minimum=1)
    batch_size: int = knob(16, "Batch size on the target task (global, across replicas).", minimum=1)
    learning_rate: float = knob(1e-3, "Adam learning rate for the source model and the from-scratch baseline.")
    fine_tune_learning_rate: float = knob(1e-3, "Adam learning rate for the transferred models.")
    fresh_layers: str = knob("dense,classifier", "Layers re-initialised in the target model; all others are copied.")

    QUICK = dict(source_images=1000, source_epochs=1, epochs=2)
    MULTI_WORKER = True  # every phase trains through common.distributed.train
    BACKUP = True


# --- Steps ------------------------------------------------------------------------


def load_tasks(config: Config) -> tuple[data.Dataset, data.Dataset]:
    """The source and target tasks, class lists checked, labels re-indexed from 0."""
    return data.load_tasks(config.dataset, config.source_classes, config.target_classes, config.image_size, config.seed)


def label_budgets(config: Config) -> list[int]:
    return parse_budgets(config.budgets, config.labels_per_class)


def check_budgets(source: data.Dataset, target: data.Dataset, budgets: list[int], config: Config) -> None:
    """Fail before any training if a budget asks for more images than a class has; the error names the flag."""
    flag = f"--budgets {config.budgets}" if config.budgets else f"--labels-per-class {config.labels_per_class}"
    data.check_per_class(target.y_train, min(budgets), target.class_names, what=flag)
    data.check_per_class(target.y_train, max(budgets), target.class_names, what=flag)
    if 0 < config.source_images < len(source.y_train):
        per_class = config.source_images // source.num_classes
        data.check_per_class(
            source.y_train, per_class, source.class_names, what=f"--source-images {config.source_images}"
        )


def fresh_layer_names(config: Config, model: keras.Model) -> tuple[str, ...]:
    """The ``--fresh-layers`` names, each checked against ``model``'s layers (a typo would copy everything)."""
    fresh = tuple(name.strip() for name in config.fresh_layers.split(",") if name.strip())
    weighted = [layer.name for layer in model.layers if layer.weights]
    unknown = [name for name in fresh if name not in weighted]
    if unknown:
        raise InputError(
            f"--fresh-layers {config.fresh_layers!r}: {unknown} are not layers of the CNN; its layers with weights "
            f"are {', '.join(weighted)}"
        )
    return fresh


def train_source_model(source: data.Dataset, config: Config, strategy, backup=None) -> tuple[keras.Model, dict]:
    """Train the CNN on the training images of the source classes (all, unless ``source_images`` is fewer)."""
    x, y = source.x_train, source.y_train
    if 0 < config.source_images < len(y):
        per_class = config.source_images // source.num_classes
        picked = data.sample_per_class(
            y, per_class, config.seed, source.class_names, f"--source-images {config.source_images}"
        )
        x, y = x[picked], y[picked]
    with strategy.scope():
        model = models.compile_classifier(
            models.build_cnn(source.input_shape, source.num_classes, name="source"), config.learning_rate
        )
    train = data.make_pipeline(x, y, config.source_batch_size, shuffle=True, seed=config.seed)
    test = data.make_pipeline(source.x_test, source.y_test, 512)
    backup_dir = backup.phase("source") if backup else None
    history = distributed.train(
        model, train, config.source_epochs, strategy, validation_data=test, backup_dir=backup_dir
    )
    return model, history


def build_target_model(variant: str, source_model: keras.Model, target: data.Dataset, config: Config, strategy):
    """A model of the source's architecture for the target task, initialised per variant.

    ``scratch``: random weights. ``transfer``: every layer but the fresh ones copied from
    the source, all trainable. ``frozen``: the same copy kept frozen; only the fresh top trains.
    """
    with strategy.scope():
        model = models.build_cnn(target.input_shape, target.num_classes, name=variant)
        fresh_layers = fresh_layer_names(config, model)
        learning_rate = config.learning_rate
        if variant in ("transfer", "frozen"):
            copied = models.copy_weights(source_model, model, exclude=fresh_layers)
            print(f"[{variant}] {copied}")
            learning_rate = config.fine_tune_learning_rate
        if variant == "frozen":
            for layer in model.layers:
                layer.trainable = layer.name not in copied.copied
        # Compile after setting `trainable`, or the change is ignored.
        models.compile_classifier(model, learning_rate)
    return model


def train_target_model(model: keras.Model, x: np.ndarray, y: np.ndarray, config: Config, strategy=None,
                       backup_dir=None) -> dict:  # fmt: skip
    """``fit`` (or, under ``multi_worker``, the shared distributed step) on the budget's images."""
    import tensorflow as tf

    train = data.make_pipeline(x, y, config.batch_size, shuffle=True, seed=config.seed)
    strategy = strategy or tf.distribute.get_strategy()
    return distributed.train(model, train, config.epochs, strategy, backup_dir=backup_dir, verbose=0)


def run_budget(budget: int, source_model, target: data.Dataset, config: Config, strategy, backup=None) -> dict:
    """Train the three variants on the same ``budget`` images per class; evaluate each."""
    picked = data.sample_per_class(target.y_train, budget, config.seed, target.class_names)
    x, y = target.x_train[picked], target.y_train[picked]
    results = {"labeled_indices": picked.tolist()}
    for variant in VARIANTS:
        start = time.perf_counter()
        model = build_target_model(variant, source_model, target, config, strategy)
        backup_dir = backup.phase(f"{budget}-{variant}") if backup else None
        history = train_target_model(model, x, y, config, strategy, backup_dir)
        report = evaluation.classification_report(model, target.x_test, target.y_test, target.num_classes)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        print(f"  {budget:>4} labels/class  {variant:<8}  test accuracy {report['test_accuracy']:.3f}")
        results[variant] = {"model": model, "history": history, "report": report}
    return results


# --- The whole recipe -------------------------------------------------------------


def run(config: Config) -> dict:
    """Source training, then the three target variants at every budget; returns metrics.json's content."""
    config = config.resolved()
    start = time.perf_counter()
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)

    source, target = load_tasks(config)
    budgets = label_budgets(config)
    check_budgets(source, target, budgets, config)
    # A throwaway CNN checks the image size and --fresh-layers before any training; it drew
    # from the random state, so reseed: training starts from the seed's state all the same.
    fresh_layer_names(config, models.build_cnn(target.input_shape, target.num_classes))
    set_seed(config.seed)
    run_dir = evaluation.make_run_dir("weight_transfer", config.out)
    print(f"source task: {source}\ntarget task: {target}\nrun folder: {run_dir}")

    # --backup-dir: each phase resumes from its last epoch when the same command runs again.
    backup = distributed.Backup(config.backup_dir)
    source_model, source_history = train_source_model(source, config, strategy, backup)
    source_accuracy = source_history["val_accuracy"][-1]

    by_budget = {budget: run_budget(budget, source_model, target, config, strategy, backup) for budget in budgets}

    # The headline is the first (smallest) budget; every budget's numbers are kept.
    headline = by_budget[budgets[0]]
    variants = {name: dict(headline[name]["report"], labels_per_class=budgets[0]) for name in VARIANTS}
    sweep = {name: [by_budget[b][name]["report"]["test_accuracy"] for b in budgets] for name in VARIANTS}
    record = evaluation.metrics_record(
        "weight_transfer",
        config.dataset,
        "test_accuracy",
        "scratch",
        variants,
        time.perf_counter() - start,
        source_test_accuracy=source_accuracy,
        budgets=budgets,
        test_accuracy_by_budget=sweep,
        labeled_indices=headline["labeled_indices"],  # which target training images the budget drew
    )

    histories = {"source": source_history} | {name: headline[name]["history"] for name in VARIANTS}
    figures = {
        "learning_curves": evaluation.plot_learning_curves(
            histories, metric="loss", title=f"training loss ({budgets[0]} target labels per class)"
        ),
        "confusion_matrix": evaluation.plot_confusion_matrix(
            headline["transfer"]["report"]["confusion_matrix"], target.class_names, "transfer: confusion matrix"
        ),
        "accuracy_vs_budget": evaluation.plot_budget_curve(budgets, sweep),
        "per_class_accuracy": evaluation.plot_per_class_accuracy(
            {name: variants[name]["per_class_accuracy"] for name in VARIANTS}, target.class_names
        ),
    }
    evaluation.write_run(run_dir, config, record, histories, figures, model=headline["transfer"]["model"])
    backup.finish()

    print(f"\nsource model: {100 * source_accuracy:.1f}% on the source test images")
    print(f"target task, {budgets[0]} labels per class, {len(target.x_test)} test images:")
    print(evaluation.comparison_table(record))
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
