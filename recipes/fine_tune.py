"""Fine-tuning: train a new head on a frozen base, then unfreeze the top of the base.

Feature extraction keeps every pretrained weight. When the new task differs a little from
the base's, also adapting the top of the base helps; done naively it wrecks the base (a
new head sends large gradients down). So, as in the Keras guide "Transfer learning & fine-tuning":

1. Phase 1 trains the head on the frozen base until it has converged (early stopping on
   a validation split, best weights restored).
2. Phase 2 unfreezes the top of the base: its top N whole blocks (``--schedule blocks:N``,
   default 1: block2 of the source-cnn, the same 4 layers as ``top:4``; ``top_conv`` and
   ``top_bn`` of EfficientNet-Lite0), the top N layers with weights (``top:N``) or one more
   block every ``--unfreeze-every`` epochs from the top down (``--schedule gradual``), recompiles with a learning rate 10-100x lower and trains on.
   Every BatchNormalization layer stays frozen, in Keras 3 also in inference mode (moving
   statistics used, never updated: updating them on a few dozen images would undo pretraining).

When to use it: after feature extraction, with a few more minutes and a validation split to
tell whether it helped. With very few labels the gain over phase 1 is small, maybe negative.

The default run (``python -m recipes.fine_tune``): the base is a small BatchNorm CNN
pretrained on Fashion-MNIST classes 0-4 and cached on disk (``common/bases.py``); the target
task is classes 5-9 with 10 labelled images per class, plus 10 more per class as the
validation split (early stopping only, for every variant). Evaluated on the 5,000 test images
of classes 5-9: ``scratch`` (the same network from random weights on the same images, the
baseline), ``head_only`` (phase 1 alone) and ``fine_tune`` (phase 1 then phase 2).

``--tune`` first runs a keras-tuner search (``--tuner hyperband`` or ``random``) over the
phase-2 learning rate, the number of layers unfrozen and the head's dropout (``--max-trials``
trials of at most ``--tune-epochs`` phase-2 epochs), writes the best values to
``best_hyperparameters.json`` (the tuner's files to ``tuner/``) and trains with them.

``--budgets 10,50,200`` repeats phase 1, phase 2 and the baseline at each label budget, each from
the pretrained base, and plots accuracy against labels per class (the smallest is the headline).

``--strategy multi_worker`` (hosts from ``TF_CONFIG``, README "More than one machine") trains
phase 1, phase 2 and the baseline through ``common.distributed.train``, early stopping
included; ``--backup-dir DIR`` makes every phase resumable. ``--tune`` is not distributed
(keras-tuner's trials call ``fit``; see ``common.tuning.check_strategy``).

Measured over seeds 0-4 (``--seed S``, ``make results``, two CPU cores shared with other
jobs): fine-tuned 87.4-90.1%, phase 1 alone 86.9-90.2%, scratch 85.2-88.2%. The gain over
scratch averaged +2.4 points (+1.5 to +3.3; the early-stopped scratch baseline is strong on
these easy classes); phase 2 added only +0.1 over phase 1 on average: with 10 labels per class
the head on the frozen base does most of the work (regularisers did not change that:
docs/fine_tune_experiments.md). 20-36 s a run with the base cached. On the ImageNet base
(``--base efficientnet_lite0``, 96x96, seeds 0-2) phase 2 pays: fine-tuned 89.1% against
87.5% for the head alone and 75.1% from scratch, 147-298 s a run (docs/efficientnet_lite0.md);
every block unfrozen or layer decay 0.5 add +1.8-1.9 over the head, L2-SP and BSS +1.2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import keras
import numpy as np
import tensorflow as tf

from common import bases, data, distributed, evaluation, models, regularizers, tuning
from common.cli import InputError, RecipeConfig, knob, make_strategy, parse_budgets, run_cli, set_seed


@dataclass
class Config(RecipeConfig):
    """Train a head on a frozen pretrained base, then unfreeze its top layers at a low learning rate."""

    dataset: str = knob("fashion_mnist", "Dataset: fashion_mnist, digits, mnist, cifar10, tfds:<name>, folder:<path>.")
    image_size: int = knob(
        0, "Image side: resizes tfds:/folder: images and is a backbone's input (0: native; 96).", minimum=0
    )
    source_classes: str = knob("0-4", "Classes the source-cnn base is pretrained on, e.g. '0-4'.")
    target_classes: str = knob("5-9", "Classes of the target task; must not overlap the source classes.")
    labels_per_class: int = knob(10, "Target training images per class (the label budget).", minimum=1)
    budgets: str = knob("", "Sweep several label budgets, e.g. '10,50,200' (overrides --labels-per-class).")
    val_per_class: int = knob(
        10, "Extra labelled images per class for early stopping and tuning (the validation split).", minimum=1
    )
    base: str = knob("source-cnn", "Pretrained base: source-cnn, a keras.applications name, or a .keras path. A .keras file with custom layers: RECIPES_IMPORT=module1,module2 imports their modules first; one with Lambda layers needs RECIPES_SAFE_MODE=0 (runs the file's code: trusted files only).")  # fmt: skip
    weights: str = knob("", "keras.applications weights: imagenet (default, online), none, or a weights file.")
    base_layer: str = knob(
        "", "Layer of a keras.applications or .keras base whose output is the features (default: below its classifier)."
    )
    source_width: int = knob(16, "Width (first conv filters) of the source-cnn base.", minimum=1)
    source_epochs: int = knob(2, "Pretraining epochs of the source-cnn base.", minimum=1)
    source_images: int = knob(0, "Source training images for the source-cnn base (0: all).", minimum=0)
    source_cut: str = knob("block2", "Last block of the source-cnn kept as the base: block1 | block2 | block3.")
    head_epochs: int = knob(
        100, "Phase 1: most epochs of the head on the frozen base (early stopping ends it).", minimum=1
    )
    patience: int = knob(
        5, "Phase 1 (and the baseline): stop after this many epochs without a lower val loss.", minimum=0
    )
    scratch_warmup: int = knob(
        50,
        "Baseline: epochs before its early stopping watches (a deep net from random weights starts at chance).",
        minimum=0,
    )
    epochs: int = knob(20, "Phase 2: fine-tuning epochs.", minimum=1)
    fine_tune_patience: int = knob(
        0,
        "Phase 2: stop after this many epochs without a lower val loss, best weights kept (0: run every epoch).",
        minimum=0,
    )
    batch_size: int = knob(32, "Batch size (global, across replicas).", minimum=1)
    learning_rate: float = knob(1e-3, "Adam learning rate of phase 1 and of the from-scratch baseline.")
    fine_tune_learning_rate: float = knob(1e-4, "Adam learning rate of phase 2 (10-100x lower than phase 1's).")
    dropout: float = knob(0.2, "Dropout rate before the head's Dense layer.", minimum=0.0, maximum=1.0)
    schedule: str = knob("blocks:1", "Phase 2: 'blocks:N' unfreezes the top N whole blocks (bases.weight_blocks), 'top:N' the top N layers with weights (BatchNorm layers count but stay frozen); 'gradual' one block more every --unfreeze-every epochs.")  # fmt: skip
    unfreeze_every: int = knob(4, "Gradual schedule: epochs between unfreezing one more block.", minimum=1)
    regularizer: str = knob("none", "Phase 2: none | l2sp (pull the unfrozen weights to their pretrained values) | bss (shrink the smallest singular values of the batch's features).")  # fmt: skip
    l2sp_alpha: float = knob(0.01, "L2-SP strength: alpha * sum((w - w0)^2) over the unfrozen weights.", minimum=0.0)
    bss_eta: float = knob(1e-3, "BSS strength: eta * sum of the k smallest squared singular values.", minimum=0.0)
    bss_k: int = knob(1, "BSS: how many of the smallest singular values are shrunk.", minimum=1)
    layer_lr_decay: float = knob(
        1.0, "Phase 2: learning rate x D per block down from the head (1: one rate for all).", minimum=0.0, maximum=1.0
    )
    tune: bool = knob(False, "Search the phase-2 learning rate, layers unfrozen and dropout with keras-tuner first.")
    tuner: str = knob("hyperband", "Search algorithm: hyperband | random.")
    max_trials: int = knob(6, "Tuner: most hyperparameter combinations tried.", minimum=1)
    tune_epochs: int = knob(6, "Tuner: most phase-2 epochs per trial (Hyperband's max_epochs).", minimum=1)
    test_images: int = knob(0, "Evaluate on this many test images, stratified (0: all).", minimum=0)

    QUICK = dict(source_epochs=1, source_images=2000, head_epochs=3, epochs=2, unfreeze_every=1, max_trials=2,
                 tune_epochs=2, test_images=500)  # fmt: skip
    MULTI_WORKER = True  # every phase (early stopping included) through common.distributed.train; not --tune
    BACKUP = True


# --- Steps ------------------------------------------------------------------------


def load_tasks(config: Config) -> tuple[data.Dataset, data.Dataset]:
    """The source and target tasks, class lists checked, labels re-indexed from 0."""
    return data.load_tasks(config.dataset, config.source_classes, config.target_classes, config.image_size, config.seed)


def split_target(target: data.Dataset, config: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train`` (the label budget), ``val`` (disjoint, for early stopping) and ``test`` (maybe subsampled)."""
    return data.pick_budget_with_validation(target, config.labels_per_class, config.val_per_class, config.seed,
                                            config.test_images)  # fmt: skip


def check_schedule(config: Config, source: data.Dataset, base: bases.Base | None = None) -> None:
    """Fail before any training if ``top:N`` or ``blocks:N`` asks for more layers or blocks than the base has."""
    kind, n = bases.parse_schedule(config.schedule)
    if kind == "gradual":
        return
    if base is None:  # the source-cnn's architecture, without pretraining it
        model = models.build_bn_cnn(source.input_shape, source.num_classes, width=config.source_width)
        base_model = bases.spatial_base(model.get_layer("base"), config.source_cut)
    else:
        base_model = base.model
    available = models.count_weighted_layers(base_model) if kind == "top" else len(bases.weight_blocks(base_model))
    if n > available:
        what = "layers with weights" if kind == "top" else "blocks"
        raise InputError(f"--schedule {config.schedule}: the base {config.base!r} has only {available} {what}")


def load_pretrained_base(config: Config, source: data.Dataset) -> bases.Base:
    """The ``--base``: pretrained on the source classes and cached, or a backbone, or a .keras model."""
    # Pretrained with seed 0 whatever --seed is, so that every seed reuses the cached base.
    settings = bases.SourceSettings(
        width=config.source_width, epochs=config.source_epochs, max_images=config.source_images
    )
    return bases.load_base(
        config.base, config.weights, config.image_size, source=source, settings=settings, cut=config.source_cut,
        layer=config.base_layer,
    )  # fmt: skip


def build_model(base_model: keras.Model, num_classes: int, dropout: float, learning_rate: float) -> keras.Model:
    """The frozen base (BatchNorm in inference mode) and a new head, compiled for phase 1."""
    model = models.add_head(models.freeze(base_model), num_classes, dropout, name="fine_tune")
    return models.compile_classifier(model, learning_rate)  # compile after freezing


def pipelines(splits: dict, base: bases.Base, config: Config) -> dict:
    """tf.data pipelines of the prepared (resized, preprocessed) images of every split."""
    x, y = splits["train"]
    x_val, y_val = splits["val"]
    return {
        "train": data.make_pipeline(base.prepare(x), y, config.batch_size, shuffle=True, seed=config.seed),
        "val": data.make_pipeline(base.prepare(x_val), y_val, 256),
    }


def train_head(model: keras.Model, train, val, config: Config, strategy=None, backup_dir=None) -> dict:
    """Phase 1: the head alone, until the validation loss stops falling (best weights kept).

    Through ``distributed.train``: ``fit`` with ``keras.callbacks.EarlyStopping``, or under
    ``multi_worker`` the shared distributed step with the same early stopping.
    """
    strategy = strategy or tf.distribute.get_strategy()
    return distributed.train(model, train, config.head_epochs, strategy, validation_data=val, backup_dir=backup_dir,
                             verbose=0, patience=config.patience)  # fmt: skip


def unfreeze(model: keras.Model, num_layers: int, learning_rate: float, config: Config | None = None) -> list[str]:
    """Unfreeze the top ``num_layers`` layers with weights of the base (BatchNorm stays frozen); recompile.

    With ``config``: its ``--regularizer`` on what is unfrozen (L2-SP towards the pretrained
    values, or BSS on the head's input features) and its ``--layer-lr-decay`` (the top block at
    lr x D, the next at lr x D^2, ...; the head at lr), through ``regularizers.phase2_optimizer``.
    """
    base = models.inner_base(model)
    unfrozen = models.unfreeze_top(base, num_layers)
    optimizer = None
    if config is not None:
        optimizer = regularizers.phase2_optimizer(
            model, base, unfrozen, bases.weight_blocks(base), learning_rate, config.regularizer,
            l2sp_alpha=config.l2sp_alpha, bss_eta=config.bss_eta, bss_k=config.bss_k,
            layer_lr_decay=config.layer_lr_decay,
        )  # fmt: skip
    models.compile_classifier(model, learning_rate, optimizer=optimizer)  # recompile, or the change is ignored
    return unfrozen


def fine_tune(model: keras.Model, train, val, config: Config, initial_epoch: int = 0, strategy=None,
              backup=None, tag: str = "") -> tuple[dict, dict]:  # fmt: skip
    """Phase 2 by ``config.schedule``; returns its history and {label: epoch} of each unfreezing.

    ``initial_epoch`` (phase 1's length) only numbers the epochs of the boundaries. Each
    stage trains through ``distributed.train`` (``backup``: a ``distributed.Backup``, one
    phase folder per stage). Call it in ``strategy.scope()``: unfreezing recompiles.
    """
    kind, n = bases.parse_schedule(config.schedule)
    lr = config.fine_tune_learning_rate
    strategy = strategy or tf.distribute.get_strategy()

    def stage(epochs: int, index: int) -> dict:
        backup_dir = backup.phase(f"{tag}fine_tune-{index}") if backup else None
        patience = config.fine_tune_patience or None
        return distributed.train(model, train, epochs, strategy, validation_data=val, backup_dir=backup_dir, verbose=0,
                                 patience=patience)  # fmt: skip

    if kind in ("top", "blocks"):
        num_layers = n if kind == "top" else bases.layers_in_top_blocks(models.inner_base(model), n)
        unfrozen = unfreeze(model, num_layers, lr, config)
        print(f"  phase 2: unfroze {len(unfrozen)} layers ({', '.join(unfrozen)}) at learning rate {lr:g}")
        return stage(config.epochs, 0), {f"unfreeze top {n} {'layers' if kind == 'top' else 'blocks'}": initial_epoch}
    # Gradual: one more block (from the top) every `unfreeze_every` epochs.
    blocks = bases.weight_blocks(models.inner_base(model))
    history: dict[str, list] = {}
    boundaries = {}
    epoch, depth, layers_open = initial_epoch, 0, 0
    end = initial_epoch + config.epochs
    while epoch < end:
        if depth < len(blocks):
            depth += 1
            layers_open += len(blocks[-depth])
            unfrozen = unfreeze(model, layers_open, lr, config)
            boundaries[f"unfreeze {blocks[-depth][0]}..."] = epoch
            print(f"  phase 2, epoch {epoch + 1}: {len(unfrozen)} layers trainable ({', '.join(unfrozen)})")
        stage_end = min(end, epoch + config.unfreeze_every) if depth < len(blocks) else end
        for key, values in stage(stage_end - epoch, depth).items():
            history.setdefault(key, []).extend(values)
        epoch = stage_end
    return history, boundaries


def train_scratch(base: bases.Base, train, val, num_classes: int, config: Config, strategy,
                  backup_dir=None) -> tuple[keras.Model, dict]:  # fmt: skip
    """The baseline: the same network from random weights, end to end, same images and early stopping.

    Early stopping watches only after ``scratch_warmup`` epochs: EfficientNet-Lite0 from random
    weights on 50 images stays at chance on validation for its first ~30 epochs (its val loss
    rising from the first), so watching from epoch 0 stopped it at chance (20%, seed 0); with
    the warm-up it reached 79% on seed 0 (docs/efficientnet_lite0.md).
    """
    with strategy.scope():
        model = models.compile_classifier(bases.scratch_twin(base, num_classes, config.dropout), config.learning_rate)
    history = distributed.train(model, train, config.head_epochs + config.epochs, strategy, validation_data=val,
                                backup_dir=backup_dir, verbose=0, patience=2 * config.patience,
                                start_from_epoch=config.scratch_warmup)  # fmt: skip
    return model, history


# --- keras-tuner ----------------------------------------------------------------------


def tune(base: bases.Base, train, val, num_classes: int, config: Config, run_dir) -> dict:
    """Search phase-2 learning rate, layers unfrozen, head dropout (and the regulariser's strength).

    Every trial starts from a fresh copy of the pretrained base, runs phase 1, then phase 2 for
    the epochs the tuner gives it (``common.tuning.fine_tune_hypermodel``); the objective is the
    best validation accuracy. Returns ``tuning.best_trial``'s summary.
    """
    hypermodel = tuning.fine_tune_hypermodel(
        build=lambda dropout: build_model(bases.fresh_copy(base).model, num_classes, dropout, config.learning_rate),
        train_head=lambda model: train_head(model, train, val, config),
        unfreeze=lambda model, n, lr, strengths: unfreeze(model, n, lr, replace(config, **strengths)),
        max_layers=models.count_weighted_layers(base.model),
        regularizer=config.regularizer,
    )
    return tuning.search(hypermodel, config.tuner, run_dir, train, val, config.max_trials, config.tune_epochs,
                         config.seed)  # fmt: skip


def apply_tuned(config: Config, best: dict) -> Config:
    """``config`` with the tuned dropout, phase-2 learning rate, ``top:N`` schedule and regulariser strength."""
    strengths = {key: float(best[key]) for key in ("l2sp_alpha", "bss_eta") if key in best}
    return replace(
        config,
        **strengths,
        dropout=float(best["dropout"]),
        fine_tune_learning_rate=float(best["fine_tune_learning_rate"]),
        schedule=f"top:{int(best['unfreeze_layers'])}",
    )


# --- The whole recipe -------------------------------------------------------------


def run_budget(budget: int, base: bases.Base, target: data.Dataset, config: Config, strategy,
               backup: distributed.Backup, run_dir) -> dict:  # fmt: skip
    """Tuning (optional), phase 1, phase 2 and the scratch baseline on ``budget`` labels per class.

    Returns ``{"variants": {name: report}, "model", "histories", "boundaries", "config", "tuned",
    "test_images"}``; with several budgets every phase backs up under a ``<budget>-`` prefix.
    """
    config = replace(config, labels_per_class=budget)
    tag = f"{budget}-" if config.budgets else ""
    set_seed(config.seed)
    splits = split_target(target, config)
    n = target.num_classes
    ds = pipelines(splits, base, config)
    x_test, y_test = base.prepare(splits["test"][0]), splits["test"][1]

    budget_info = {"labels_per_class": budget, "val_per_class": config.val_per_class}

    def report(model: keras.Model, **extra) -> dict:  # test accuracy, per class, confusion matrix
        return evaluation.classification_report(model, x_test, y_test, n) | extra | budget_info

    tuned = None
    if config.tune:
        tuned = tune(base, ds["train"], ds["val"], n, config, run_dir)
        config = apply_tuned(config, tuned["best"])
        set_seed(config.seed)

    with strategy.scope():
        model = build_model(base.model, n, config.dropout, config.learning_rate)
    phase1 = train_head(model, ds["train"], ds["val"], config, strategy, backup.phase(f"{tag}head"))
    head_report = report(model, epochs=len(phase1["loss"]))
    print(f"  {budget:>3} labels/class  phase 1 (head only, {len(phase1['loss'])} epochs): "
          f"test accuracy {head_report['test_accuracy']:.3f}")  # fmt: skip

    with strategy.scope():
        phase2, boundaries = fine_tune(model, ds["train"], ds["val"], config, len(phase1["loss"]), strategy,
                                       backup, tag)  # fmt: skip
    regularizers.detach_bss(model)  # the saved model needs nothing from common.regularizers
    tuned_report = report(model, epochs=len(phase2["loss"]), schedule=config.schedule,
                          regularizer=config.regularizer, layer_lr_decay=config.layer_lr_decay)  # fmt: skip
    print(f"  {budget:>3} labels/class  phase 2 (fine-tuned): test accuracy {tuned_report['test_accuracy']:.3f}")

    set_seed(config.seed)  # the baseline's initialisation does not depend on what ran before it
    # Fresh pipelines: a reshuffling pipeline's batch order depends on how many epochs it has served.
    fresh = pipelines(splits, base, config)
    scratch, scratch_history = train_scratch(base, fresh["train"], fresh["val"], n, config, strategy,
                                             backup.phase(f"{tag}scratch"))  # fmt: skip
    scratch_report = report(scratch, epochs=len(scratch_history["loss"]))
    print(f"  {budget:>3} labels/class  scratch: test accuracy {scratch_report['test_accuracy']:.3f}")
    return {
        "variants": dict(scratch=scratch_report, head_only=head_report, fine_tune=tuned_report),
        "model": model,
        "histories": {"phase1": phase1, "phase2": phase2, "scratch": scratch_history},
        "boundaries": boundaries,
        "config": config,
        "tuned": tuned,
        "test_images": len(y_test),
    }


def run(config: Config) -> dict:
    """Phase 1, phase 2 (optionally tuned), the scratch baseline, per budget; returns metrics.json's content."""
    config = config.resolved()
    start = time.perf_counter()
    bases.check_base_args(config.base, config.weights, config.image_size, config.source_cut, config.base_layer)
    bases.parse_schedule(config.schedule)
    regularizers.check(config.regularizer, config.layer_lr_decay)
    tuning.check_tuner(config.tuner)
    budgets = parse_budgets(config.budgets, config.labels_per_class)
    if config.tune:
        tuning.check_strategy(config.strategy, "phase 1, phase 2 and the scratch baseline",
                              "--dropout, --fine-tune-learning-rate, --schedule top:N")  # fmt: skip
        if len(budgets) > 1:
            raise InputError(f"--tune with --budgets {config.budgets}: search one budget at a time "
                             "(--labels-per-class N --tune), then sweep with the best values")  # fmt: skip
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)

    source, target = load_tasks(config)
    flag = f"--budgets {config.budgets}" if config.budgets else f"--labels-per-class {config.labels_per_class}"
    data.check_per_class(target.y_train, budgets[-1] + config.val_per_class, target.class_names,
                         what=f"{flag} + --val-per-class {config.val_per_class}")  # fmt: skip
    if config.base == bases.SOURCE_CNN:
        check_schedule(config, source)
    print(f"source task: {source}\ntarget task: {target}")

    # Under multi_worker: pretrained (or loaded) outside the strategy, then copied into its scope for phase 2.
    base = bases.load_for_strategy(lambda: load_pretrained_base(config, source), strategy, trainable=True)
    check_schedule(config, source, base)
    backup = distributed.Backup(config.backup_dir)
    run_dir = evaluation.make_run_dir("fine_tune", config.out)  # after every input error
    print(f"base: {base}\nrun folder: {run_dir}")
    # Each budget starts from the pretrained weights (phase 2 changes the base's layers in place).
    by_budget = {}
    for budget in budgets:
        with strategy.scope():
            budget_base = base if budget == budgets[-1] else bases.fresh_copy(base)
        by_budget[budget] = run_budget(budget, budget_base, target, config, strategy, backup, run_dir)

    # The headline is the smallest budget; every budget's accuracy is kept (and plotted when there are several).
    headline = by_budget[budgets[0]]
    variants, histories, config = headline["variants"], headline["histories"], headline["config"]
    sweep = {name: [by_budget[b]["variants"][name]["test_accuracy"] for b in budgets] for name in variants}
    base_info = {k: v for k, v in base.info.items() if k != "settings"} | {"spec": config.base}
    record = evaluation.metrics_record("fine_tune", config.dataset, "test_accuracy", "scratch", variants,
                                       time.perf_counter() - start, base=base_info,
                                       test_images=headline["test_images"], tuned=headline["tuned"],
                                       budgets=budgets, test_accuracy_by_budget=sweep)  # fmt: skip
    phase1, phase2 = histories["phase1"], histories["phase2"]
    both = {key: phase1[key] + phase2.get(key, []) for key in phase1}
    figures = {
        "learning_curves": evaluation.plot_learning_curves(
            {"fine_tune": both, "scratch": histories["scratch"]},
            "accuracy",
            boundaries={"start fine-tuning": len(phase1["loss"])} | dict(list(headline["boundaries"].items())[1:]),
            title=f"accuracy across both phases ({budgets[0]} labels per class)",
        ),
        "confusion_matrix": evaluation.plot_confusion_matrix(
            variants["fine_tune"]["confusion_matrix"], target.class_names, "fine-tuned: confusion matrix"
        ),
    }
    if len(budgets) > 1:
        figures["accuracy_vs_budget"] = evaluation.plot_budget_curve(budgets, sweep)
    evaluation.write_run(run_dir, config, record, histories, figures, model=headline["model"])
    backup.finish()

    if len(budgets) > 1:
        print("\ntest accuracy by label budget (labels per class):")
        print(evaluation.budget_table(budgets, sweep, "scratch"))
    print(f"\ntarget task, {budgets[0]} labels per class, {headline['test_images']} test images:")
    print(evaluation.comparison_table(record))
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
