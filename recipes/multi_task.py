"""Multi-task learning: one shared network, several tasks trained together, against training them apart.

Weight transfer trains a data-rich *source* task first and fine-tunes on the label-poor
*target*. Multi-task learning trains them at once: one shared trunk, one head per task, and
every step a mini-batch of each task, so the target's few images (repeated) weigh as much
per step as the source's thousands. An auxiliary task whose labels are free can join: here
4-way rotation prediction (Gidaris et al. 2018) on every training image, target images
included. The trunk's update combines the tasks' gradients: summed (``multi_task``, equal
weights), weighted by learned task uncertainties (``uncertainty``, Kendall, Gal & Cipolla
2018), or with conflicting components projected away (``pcgrad``, Yu et al. 2020);
``common/multi_task.py`` holds all three and the gradient cosines.

When to use it: a label-poor task beside related data-rich (or self-supervised) tasks that
you can train on too. When tasks conflict, joint training can hurt (negative transfer):
``--conflict`` adds a harmful task, ``shuffled``: the 50 labelled target images again, with
random labels that contradict the target's (``--conflict-images`` picks other images).

What the default run does (``python -m recipes.multi_task``), all on Fashion-MNIST:

- task ``source``: classes 0-4, all 30,000 training images labelled;
- task ``target``: classes 5-9, 10 labelled images per class (its test accuracy on the
  5,000 test images of 5-9 is the headline);
- task ``rotation``: every training image of 0-9 turned by 0/90/180/270 degrees, predict which.

Variants, each ``--steps`` steps of ``--batch-size`` images per task, trunk initialised
alike: ``single_task`` (target alone: the baseline; source alone for reference),
``sequential`` (the source network's trunk fine-tuned on the target with a fresh head, as
weight_transfer does), ``multi_task``, ``uncertainty`` and ``pcgrad`` (all three tasks).
Reported per task and variant: test accuracy, the task weights and the cosine between the
tasks' trunk gradients over training (plots), time.

Measured over seeds 0-2 (``make results``, 2 shared CPU cores, 2-3.5 min a run): target
accuracy single_task 83.9%, sequential 86.1%, multi_task 86.5%, uncertainty 86.7%, pcgrad
87.0% (+3.1, +1.2 to +6.3); the source task 89.0-89.5% jointly against 90.6% alone. Under
``--conflict`` equal weights kept 86.3%, uncertainty fell to 85.0% (its learned weight on the
memorised random labels rises), pcgrad kept 87.0% (docs/multi_task_experiments.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from common import data, distributed, evaluation
from common import multi_task as mt
from common.cli import InputError, RecipeConfig, knob, run_cli, set_seed

TASKS = ("source", "target", "rotation", "shuffled")
VARIANTS = ("single_task", "sequential", "multi_task", "uncertainty", "pcgrad")
WEIGHTING = {"multi_task": "equal", "uncertainty": "uncertainty", "pcgrad": "pcgrad"}
HEADLINE = "target"


@dataclass
class Config(RecipeConfig):
    """Train a shared trunk on several tasks at once (equal, uncertainty or PCGrad weighting) against one at a time."""

    dataset: str = knob("fashion_mnist", "Dataset: fashion_mnist, digits, mnist, cifar10, tfds:<name>, folder:<path>.")
    image_size: int = knob(0, "Resize tfds:/folder: images to this side (0: native size, folders 64).", minimum=0)
    source_classes: str = knob("0-4", "Classes of the data-rich source task, e.g. '0-4' or '0,2,4'.")
    target_classes: str = knob("5-9", "Classes of the label-poor target task; must not overlap the source classes.")
    labels_per_class: int = knob(10, "Labelled target training images per class.", minimum=1)
    source_images: int = knob(0, "Source training images, drawn evenly per class (0, or more than there are: all).",
                              minimum=0)  # fmt: skip
    tasks: str = knob("source,target,rotation", f"Tasks trained together, from {', '.join(TASKS)}; target required.")
    variants: str = knob(",".join(VARIANTS), f"Variants to run, from {', '.join(VARIANTS)}; single_task required.")
    conflict: bool = knob(False, "Add the harmful task 'shuffled' (images with shuffled labels): negative transfer.")
    conflict_images: str = knob(
        "target",
        "Images of the 'shuffled' task (random labels): target (the labelled target images) | target_all (every "
        "target training image) | source (the source images).",
    )
    conflict_count: int = knob(
        0, "Images of the 'shuffled' task, drawn with the seed from --conflict-images (0: all).", minimum=0
    )
    steps: int = knob(1000, "Training steps of every network (each step: one batch of each of its tasks).", minimum=1)
    batch_size: int = knob(32, "Images per task per step (the 50 target images repeat).", minimum=1)
    learning_rate: float = knob(1e-3, "Adam learning rate of every variant (and of the learned log-variances).")
    log_every: int = knob(0, "Log losses, task weights and gradient cosines every N steps (0: steps // 50).", minimum=0)
    test_images: int = knob(0, "Score each task on this many of its test images (0: all).", minimum=0)

    QUICK = dict(steps=150, source_images=3000, test_images=1000)
    MULTI_WORKER = False  # the per-task gradient step runs on one device; see run()
    BACKUP = True  # every network's training checkpointed after each compiled call


# --- Steps ------------------------------------------------------------------------


def parse_names(spec: str, choices: tuple[str, ...], flag: str, required: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each checked against ``choices``; ``required`` must be among them."""
    names = list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise InputError(f"{flag} {spec!r}: unknown name {unknown[0]!r}; choose from {', '.join(choices)}")
    if required not in names:
        raise InputError(f"{flag} {spec!r} must include {required!r} (the headline / the baseline)")
    return names


def task_names(config: Config) -> list[str]:
    names = parse_names(config.tasks, TASKS, "--tasks", HEADLINE)
    return names + ["shuffled"] if config.conflict and "shuffled" not in names else names


def check_config(config: Config) -> tuple[list[str], list[str]]:
    """The task and variant lists, checked before any data is loaded."""
    if config.strategy != "default":
        raise InputError(
            f"multi_task does not support --strategy {config.strategy} yet: its step needs every task's gradient on the "
            "trunk before one update (PCGrad, the cosines), written for one device; use --strategy default"
        )
    tasks, variants = task_names(config), parse_names(config.variants, VARIANTS, "--variants", "single_task")
    needs_source = [v for v in variants if v == "sequential"]
    if needs_source and "source" not in tasks:
        raise InputError("--variants sequential trains the source task first; add source to --tasks")
    if not [v for v in variants if v in WEIGHTING] or len(tasks) < 2:
        raise InputError("nothing trains together: give --tasks two or more tasks and --variants a multi-task one")
    return tasks, variants


def load_tasks(config: Config, names: list[str]) -> dict[str, mt.Task]:
    """The tasks by name: class lists checked (each at least two classes), budgets drawn with the seed."""
    source, target = data.load_tasks(config.dataset, config.source_classes, config.target_classes,
                                     config.image_size, config.seed)  # fmt: skip
    for flag, task in (("--source-classes", source), ("--target-classes", target)):
        if task.num_classes < 2:
            raise InputError(f"{flag} gives one class ({task.class_names[0]!r}); a task needs at least two to learn")
    flag = f"--labels-per-class {config.labels_per_class}"
    picked = data.sample_per_class(target.y_train, config.labels_per_class, config.seed, target.class_names, flag)
    x_source, y_source = source.x_train, source.y_train
    if 0 < config.source_images < len(y_source):
        keep = data.sample_per_class(y_source, config.source_images // source.num_classes, config.seed,
                                     source.class_names, f"--source-images {config.source_images}")  # fmt: skip
        x_source, y_source = x_source[keep], y_source[keep]
    source_test = data.subsample_test(source, config.test_images, config.seed)
    target_test = data.subsample_test(target, config.test_images, config.seed)
    bs = config.batch_size
    tasks = {
        "source": mt.Task("source", "classification", x_source, y_source, source.num_classes, *source_test, bs,
                          source.class_names),
        "target": mt.Task("target", "classification", target.x_train[picked], target.y_train[picked],
                          target.num_classes, *target_test, bs, target.class_names),
    }  # fmt: skip
    if "rotation" in names:  # every training image of both tasks, labels unused
        pool = np.concatenate([x_source, target.x_train])
        x_test, y_test = mt.rotation_test_set(np.concatenate([source_test[0], target_test[0]]))
        tasks["rotation"] = mt.Task("rotation", "rotation", pool, None, mt.ROTATIONS, x_test, y_test, bs)
    if "shuffled" in names:  # images with their labels shuffled: learnable only by memorising
        rng = np.random.default_rng(config.seed + 1)
        x_shuffled = {"source": x_source, "target": target.x_train[picked], "target_all": target.x_train}
        if config.conflict_images not in x_shuffled:
            raise InputError(f"--conflict-images {config.conflict_images!r}: choose one of {', '.join(x_shuffled)}")
        x = x_shuffled[config.conflict_images]
        if 0 < config.conflict_count < len(x):
            x = x[rng.choice(len(x), config.conflict_count, replace=False)]
        y = rng.integers(0, source.num_classes, len(x))
        x_test = target_test[0] if config.conflict_images.startswith("target") else source_test[0]
        tasks["shuffled"] = mt.Task("shuffled", "classification", x, y, source.num_classes, x_test,
                                    rng.integers(0, source.num_classes, len(x_test)), bs)  # fmt: skip
    return {name: tasks[name] for name in names}


def build_network(tasks: list[mt.Task], config: Config, trunk_weights=None):
    """A trunk (seeded: every variant starts from the same trunk) and one fresh head per task."""
    set_seed(config.seed)
    shape = tasks[0].x.shape[1:]
    trunk = mt.build_trunk(shape)
    if trunk_weights is not None:
        trunk.set_weights(trunk_weights)
    features = trunk.output_shape[-1]
    heads = {task.name: mt.build_head(features, task.num_classes, task.name) for task in tasks}
    return trunk, heads


def train_network(name: str, tasks: list[mt.Task], weighting: str, config: Config, backup,
                  trunk_weights=None) -> tuple[mt.MultiTaskTrainer, dict]:  # fmt: skip
    """``config.steps`` steps of ``tasks`` together; returns the trainer and the figures of every task."""
    start = time.perf_counter()
    trunk, heads = build_network(tasks, config, trunk_weights)
    trainer = mt.MultiTaskTrainer(trunk, heads, tasks, weighting, config.learning_rate, config.seed)
    label = f"[{name}] {' + '.join(t.name for t in tasks)}, {weighting}, {config.steps} steps"
    trainer.train(config.steps, label, config.log_every, backup.phase(name))
    figures = {"task_accuracy": trainer.test_accuracy(), "train_seconds": round(time.perf_counter() - start, 1)}
    if len(tasks) > 1:
        figures["task_weights"] = dict(zip(trainer.names, trainer.weights().numpy().tolist()))
        figures["gradient_cosine"] = mt.mean_cosines(trainer.history)
        figures["conflict_share"] = {k.removeprefix("conflict_"): float(np.mean(v))
                                     for k, v in trainer.history.items() if k.startswith("conflict_")}  # fmt: skip
    return trainer, figures


def run_single_task(tasks: dict[str, mt.Task], config: Config, backup) -> dict:
    """``single_task``: the target alone, and the source alone (the reference for the source's accuracy)."""
    runs = {name: train_network(f"single_task_{name}", [tasks[name]], "equal", config, backup)
            for name in ("source", "target") if name in tasks}  # fmt: skip
    accuracy = {name: figures["task_accuracy"][name] for name, (_, figures) in runs.items()}
    seconds = sum(figures["train_seconds"] for _, figures in runs.values())
    return {"runs": runs, "figures": {"task_accuracy": accuracy, "train_seconds": round(seconds, 1)}}


def run_sequential(source_trainer: mt.MultiTaskTrainer, tasks: dict[str, mt.Task], config: Config, backup) -> dict:
    """``sequential``: the source network's trunk, a fresh target head, every layer fine-tuned on the target.

    Its ``source`` accuracy is the source head on the fine-tuned trunk: what is left of the source task.
    """
    trainer, figures = train_network("sequential", [tasks["target"]], "equal", config, backup,
                                     trunk_weights=source_trainer.trunk.get_weights())  # fmt: skip
    left = float(np.mean(source_trainer.heads["source"](trainer.trunk(tasks["source"].x_test)).numpy().argmax(-1)
                         == tasks["source"].y_test))  # fmt: skip
    figures["task_accuracy"]["source"] = left
    return {"trainer": trainer, "figures": figures}


def task_table(variants: dict, names: list[str]) -> str:
    rows = [("variant", *[f"{n} acc" for n in names], "seconds")]
    for variant, figures in variants.items():
        accuracy = figures["task_accuracy"]
        cells = [f"{100 * accuracy[n]:.1f}%" if n in accuracy else "-" for n in names]
        rows.append((variant, *cells, f"{figures['train_seconds']:.0f}"))
    return evaluation.text_table(rows)


# --- The whole recipe -------------------------------------------------------------


def run(config: Config) -> dict:
    """Every variant on the same images; returns metrics.json's content (baseline ``single_task``)."""
    config = config.resolved()
    start = time.perf_counter()
    names, wanted = check_config(config)
    set_seed(config.seed)
    tasks = load_tasks(config, names)
    run_dir = evaluation.make_run_dir("multi_task", config.out)
    for task in tasks.values():
        print(f"task {task.name}: {len(task.x)} training images, {task.num_classes} classes, {len(task.x_test)} test")
    print(f"run folder: {run_dir}")

    backup = distributed.Backup(config.backup_dir)  # each network resumes from its last compiled call
    single = run_single_task(tasks, config, backup)
    variants = {"single_task": single["figures"]}
    trainers = {name: trainer for name, (trainer, _) in single["runs"].items()}
    if "sequential" in wanted:
        sequential = run_sequential(trainers["source"], tasks, config, backup)
        variants["sequential"] = sequential["figures"]
    together = {}
    for variant in (v for v in wanted if v in WEIGHTING):
        together[variant], variants[variant] = train_network(variant, list(tasks.values()), WEIGHTING[variant],
                                                             config, backup)  # fmt: skip
    for figures in variants.values():  # the headline, and each task's accuracy as a top-level figure for tables
        figures["test_accuracy"] = figures["task_accuracy"][HEADLINE]
        figures.update({f"{task}_accuracy": value for task, value in figures["task_accuracy"].items()})

    best = max(together, key=lambda v: variants[v]["test_accuracy"])
    reference = variants["single_task"]["task_accuracy"]
    record = evaluation.metrics_record(
        "multi_task",
        config.dataset,
        "test_accuracy",
        "single_task",
        variants,
        time.perf_counter() - start,
        headline_task=HEADLINE,
        tasks=names,
        best_multi_task=best,
        gain_over_single_task=variants[best]["test_accuracy"] - reference[HEADLINE],
        gap_to_sequential=(
            variants[best]["test_accuracy"] - variants["sequential"]["test_accuracy"]
            if "sequential" in variants
            else None
        ),  # fmt: skip
        source_change_vs_alone=(
            variants[best]["task_accuracy"]["source"] - reference["source"]
            if "source" in reference and "source" in names
            else None
        ),  # fmt: skip
        target_labels=len(tasks[HEADLINE].x),
    )

    histories = {name: trainer.history for name, trainer in {**trainers, **together}.items()}
    figures = {
        "task_weights": mt.plot_over_training(  # equal and pcgrad keep weights of 1
            {v: together[v].history for v in together if v == "uncertainty"} or {v: together[v].history for v in together},
            "weight_", "task weight", "learned task weights exp(-s) (equal, pcgrad: 1)", 1.0,
        ),
        "gradient_cosine": mt.plot_over_training(
            {v: together[v].history for v in together}, "cosine_", "cosine",
            "cosine between the tasks' trunk gradients (below 0: conflict)", 0.0,
        ),
        "task_accuracy": evaluation.plot_per_class_accuracy(
            {v: [f["task_accuracy"].get(n, np.nan) for n in names] for v, f in variants.items()}, names,
            "test accuracy per task",
        ),
    }  # fmt: skip
    evaluation.write_run(run_dir, config, record, histories, figures, model=together[best].model)
    backup.finish()

    print(f"\ntest accuracy per task ({config.steps} steps each, {config.batch_size} images per task per step):")
    print(task_table(variants, names))
    print(f"\nheadline: task {HEADLINE}, {config.labels_per_class} labels per class:")
    print(evaluation.comparison_table(record))
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
