"""MAML: learn an initialisation that adapts to a new task in a few gradient steps.

Model-Agnostic Meta-Learning (Finn, Abbeel, Levine 2017) trains on a whole *family* of
tasks so that, from the learned initial weights theta, a few SGD steps on a handful of
examples of a new task give a good model for it. Inner loop, per task: theta' = theta -
alpha * grad L_support(theta), ``inner_steps`` times. Outer loop: Adam on the query loss of
theta', averaged over a meta-batch of tasks. ``--algorithm maml`` differentiates through the
inner updates (second order: ``model.stateless_call`` inside nested ``tf.GradientTape``s);
``fomaml`` treats the inner gradients as constants; ``reptile`` (Nichol et al. 2018) moves
theta towards weights adapted on the whole task. The tasks of a meta-batch run inside one
compiled step (``tf.vectorized_map`` / ``tf.map_fn``); ``--strategy mirrored`` splits the
meta-batch across replicas and averages their meta-gradients (all-reduce), one Adam update.
``--backup-dir DIR`` checkpoints every phase after each compiled call (weights, Adam, step, task
generator); the same command resumes a killed run there and ends with the same metrics.

When to use it: many small related tasks (few labels each), and new ones to come. With one
big source task, pre-training and fine-tuning (the other recipes) is simpler and as good.

Default (``python -m recipes.maml``): the paper's sinusoid regression, y = A sin(x - phase),
K = 10 support and 10 query points, MLP 1-40-40-1, meta-batch 25, alpha 0.01, 20,000
iterations (``iterations // 100`` meta-steps per XLA-compiled call, tasks drawn in the graph).
The baseline, ``pretrained``, is the same MLP trained jointly on all tasks. Both are adapted
to 600 new tasks with 0, 1, 5 and 10 SGD steps; MSE on 100 fresh points (95% CI). Measured
(seed 0, ``make results``): MAML 0.35 / 0.20 / 0.13 after 1 / 5 / 10 steps, pretrained
2.30 / 1.70 / 1.61, in about 40 s. The paper shows these curves only as plots (Figure 3).

Images (``--dataset fashion_mnist``, ``tfds:omniglot``, ``folder:``): N-way K-shot episodes
from disjoint meta-train / meta-test classes, the paper's Conv4 (4 x 3x3 Conv64 stride 2,
BatchNorm, ReLU; 28x28 grey), one model per ``--shots`` entry (1 and 5), meta-batch 4, 600
iterations, scored on 600 meta-test episodes after 10 steps of 0.4. BatchNorm uses batch
statistics at meta-train and meta-test time, as the original MAML (query images of an
episode normalised together). Baseline: the same CNN trained as a classifier of the
meta-train classes (one epoch), frozen, a new linear head per support set. Fashion-MNIST
5-way, seed 0: MAML 51.5% (1-shot) and 74.7% (5-shot) against 45.8% and 66.1%
(chance 20%); 377 s on two busy CPU cores (phase times in metrics.json; docs/speed.md).
XLA made this CNN's steps 8-10x slower on the CPU, so the image path runs the plain graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from common import distributed, evaluation, loops, meta
from common.cli import InputError, RecipeConfig, knob, make_strategy, run_cli, set_seed
from common.meta import (  # the task families, models and losses of the MAML paper; the meta-training machinery
    EpisodeSampler,
    MetaTrainer,
    accuracy,
    build_conv4,
    build_sinusoid_model,
    cross_entropy,
    mse,
    parse_steps,
    sample_sinusoid_tasks,
    sinusoid_tasks_tf,
)

ALGORITHMS = ("maml", "fomaml", "reptile")
SINUSOID = "sinusoid"


@dataclass
class Config(RecipeConfig):
    """Meta-learn an initialisation (MAML, first-order MAML or Reptile) and compare it with plain pre-training."""

    dataset: str = knob(
        SINUSOID,
        "sinusoid (regression, generated) or an image dataset: fashion_mnist, tfds:omniglot, folder:<path>, ...",
    )
    algorithm: str = knob("maml", "maml (second-order) | fomaml (first-order) | reptile.")
    meta_lr: float = knob(1e-3, "Adam learning rate of the outer (meta) update.")
    inner_steps: int = knob(1, "SGD steps of the inner loop at meta-training time.")
    eval_steps: str = knob("0,1,5,10", "Adaptation steps after which new tasks are scored.")
    # Sinusoid regression (the default family).
    iterations: int = knob(20000, "Sinusoid: meta-training iterations (the paper: 70000).")
    batch_size: int = knob(25, "Sinusoid: tasks per meta-batch.")
    alpha: float = knob(0.01, "Sinusoid: inner-loop SGD step size, also used to fine-tune at test time.")
    k: int = knob(10, "Sinusoid: support points per task (K).")
    query_points: int = knob(10, "Sinusoid: query points per task at meta-training time.")
    pretrain_iterations: int = knob(10000, "Sinusoid: iterations of the pretrained baseline (joint training).")
    eval_tasks: int = knob(600, "New tasks (sinusoid) or episodes (images) to evaluate on.")
    # N-way K-shot image classification.
    train_classes: str = knob("0-4", "Images: meta-training classes, e.g. '0-4'.")
    test_classes: str = knob("5-9", "Images: meta-test classes, disjoint from the meta-training ones.")
    ways: int = knob(5, "Images: classes per episode (N).")
    shots: str = knob("1,5", "Images: support images per class (K); one model is meta-trained per value.")
    query: int = knob(5, "Images: query images per class in an episode.")
    image_iterations: int = knob(600, "Images: meta-training iterations per K (the paper, Omniglot: 40000).")
    image_batch_size: int = knob(4, "Images: episodes per meta-batch (paper: 32; 8: ~1 point more 1-shot, 2x time).")
    image_alpha: float = knob(0.4, "Images: inner-loop SGD step size (the paper, Omniglot: 0.4).")
    image_size: int = knob(28, "Images: side the episodes' images are resized to (and made greyscale, one channel).")
    filters: int = knob(64, "Images: filters of each of the four conv blocks (the paper: 64).", minimum=1)
    rotations: bool = knob(False, "Images: add each class rotated by 90/180/270 degrees as new classes (Omniglot).")
    jit_compile: bool = knob(True, "Compile the sinusoid meta-training loop with XLA (--no-jit-compile: plain graph).")
    epochs: int = knob(1, "Images: epochs of the pretrained baseline classifier on the meta-train classes.", minimum=1)
    pretrain_images: int = knob(0, "Images: meta-train images the baseline classifier trains on (0: all).", minimum=0)
    head_steps: int = knob(100, "Images: Adam steps fitting the baseline's new head on each support set.", minimum=1)

    MULTI_WORKER = True  # the meta-batch split across workers by the distributed meta-step
    BACKUP = True  # every phase checkpointed after each compiled call (or epoch), resumed by the same command

    QUICK = dict(
        iterations=300,
        pretrain_iterations=200,
        eval_tasks=50,
        eval_steps="0,1,5",
        image_iterations=20,
        image_batch_size=4,
        filters=16,
        epochs=1,
        pretrain_images=500,
        head_steps=20,
        shots="1",
    )


# --- Validation -------------------------------------------------------------------


def check_config(config: Config) -> None:
    """Every error a bad flag can cause, raised before any data is loaded or trained on."""
    if config.algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {config.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    image = config.dataset != SINUSOID
    alpha_name, alpha = ("image_alpha", config.image_alpha) if image else ("alpha", config.alpha)
    positive = {alpha_name: alpha, "meta_lr": config.meta_lr, "inner_steps": config.inner_steps}
    positive |= {"eval_tasks": config.eval_tasks}
    if image:
        positive |= {"ways": config.ways, "query": config.query, "image_iterations": config.image_iterations}
        positive |= {"image_batch_size": config.image_batch_size, "image_size": config.image_size}
    else:
        positive |= {"k": config.k, "query_points": config.query_points, "iterations": config.iterations}
        positive |= {"batch_size": config.batch_size, "pretrain_iterations": config.pretrain_iterations}
    for name, value in positive.items():
        if not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    parse_steps(config.eval_steps, "eval steps")
    if image and min(parse_steps(config.shots, "shots")) < 1:
        raise InputError(f"--shots {config.shots!r}: every K must be at least 1")


# --- The meta-learner ---------------------------------------------------------------


class MetaLearner(MetaTrainer):
    """MAML / first-order MAML / Reptile around any Keras model.

    A batch of tasks is a tuple ``(xs, ys, xq, yq)`` whose leading axis is the task.
    The model's weights are never assigned during the inner loop: ``stateless_call``
    runs the model on a list of adapted tensors instead, so gradients flow through the
    inner updates to the shared initialisation. ``common.meta.MetaTrainer`` runs the
    algorithm: compiled ``meta_step``, ``meta_train`` (many meta-steps per call), the tasks
    of a batch mapped inside the graph (``task_map``), the meta-batch split across the
    replicas of ``strategy``, and ``evaluate`` (scores after adaptation on new tasks).
    """

    def __init__(self, model: keras.Model, loss_fn, score_fn, algorithm: str = "maml", alpha: float = 0.01,
                 inner_steps: int = 1, meta_lr: float = 1e-3, task_map: str = "vectorized",
                 jit_compile: bool = False, strategy=None):  # fmt: skip
        if algorithm not in ALGORITHMS:
            raise InputError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if not alpha > 0 or not inner_steps > 0:
            raise InputError(f"alpha and inner_steps must be positive, got {alpha} and {inner_steps}")
        self.loss_fn, self.algorithm, self.alpha, self.inner_steps = loss_fn, algorithm, alpha, inner_steps
        super().__init__(model, score_fn, meta_lr, task_map, jit_compile, strategy)

    # The inner loop.

    def forward(self, params, x):
        # training=True: BatchNorm normalises with the batch's own statistics (original MAML).
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        outputs, _ = self.model.stateless_call(params, non_trainable, x, training=True)
        return outputs

    def task_loss(self, params, x, y):
        return self.loss_fn(y, self.forward(params, x))

    def adapt(self, params, x, y, steps: int, first_order: bool = False):
        """``steps`` SGD steps of size alpha on (x, y), differentiable unless ``first_order``."""
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = self.task_loss(params, x, y)
            grads = tape.gradient(loss, params)
            if first_order:
                grads = [tf.stop_gradient(g) for g in grads]
            params = [p - self.alpha * g for p, g in zip(params, grads)]
        return params

    # The outer loop.

    def meta_gradients(self, tasks):
        """Mean query loss after adaptation over the batch of tasks, and its gradient w.r.t. the initial weights."""
        params = [v.value for v in self.model.trainable_variables]
        if self.algorithm == "reptile":
            # Reptile: adapt on the whole task (support + query), move towards the adapted weights.
            def reptile_task(task):
                xs, ys, xq, yq = task
                x, y = tf.concat([xs, xq], 0), tf.concat([ys, yq], 0)
                adapted = self.adapt(params, x, y, self.inner_steps, first_order=True)
                return [p - a for p, a in zip(params, adapted)], self.task_loss(adapted, xq, yq)

            signature = ([tf.TensorSpec(p.shape, p.dtype) for p in params], tf.TensorSpec([], tf.float32))
            differences, losses = self.map_tasks(reptile_task, tasks, signature)
            return tf.reduce_mean(losses), [tf.reduce_mean(d, axis=0) / self.alpha for d in differences]

        first_order = self.algorithm == "fomaml"

        def task_gradient(task):
            # Each task's query loss after adaptation, and its gradient w.r.t. the initial weights.
            # The tape lives inside the mapped function (per-task gradients, then their mean): a tape
            # around tf.vectorized_map would differentiate the vectorised graph, whose reduction
            # gradients make XLA treat every input as a compile-time constant (a recompile per step).
            xs, ys, xq, yq = task
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = self.task_loss(self.adapt(params, xs, ys, self.inner_steps, first_order), xq, yq)
            grads = tape.gradient(loss, params)
            missing = [v.path for v, g in zip(self.model.trainable_variables, grads) if g is None]
            if missing:
                raise RuntimeError(f"no meta-gradient reaches {missing}; the inner loop is cut off from them")
            return loss, grads

        signature = (tf.TensorSpec([], tf.float32), [tf.TensorSpec(p.shape, p.dtype) for p in params])
        losses, grads = self.map_tasks(task_gradient, tasks, signature)
        return tf.reduce_mean(losses), [tf.reduce_mean(g, axis=0) for g in grads]

    def meta_update(self, grads):
        """The outer step: Adam (outer learning rate ``meta_lr``) on the meta-gradient."""
        self.optimizer.apply(grads, self.model.trainable_variables)


# --- Sinusoid: training and baseline --------------------------------------------------


def meta_train_sinusoid(learner: MetaLearner, config: Config, backup_dir=None) -> dict:
    """``iterations`` meta-steps on tasks drawn in the graph; returns the history (loss every 1%).

    ``backup_dir``: the weights, Adam, the step and the task generator checkpointed after every compiled call.
    """
    generator = tf.random.Generator.from_seed(config.seed)
    sample = lambda: sinusoid_tasks_tf(generator, config.batch_size, config.k, config.query_points)  # noqa: E731
    return learner.meta_train(sample, config.iterations, f"meta-train ({config.algorithm})", backup_dir=backup_dir,
                              generator=generator)  # fmt: skip


def sinusoid_test_tasks(config: Config, num_query: int = 100):
    """600 (``eval_tasks``) new tasks, the same for every model and every run with this seed."""
    rng = np.random.default_rng(config.seed + 10_000)
    x, y, params = sample_sinusoid_tasks(config.eval_tasks, config.k + num_query, rng)
    k = config.k
    return (x[:, :k], y[:, :k], x[:, k:], y[:, k:]), params


def run_sinusoid(config: Config, start: float, strategy=None) -> dict:
    """Meta-train on sine tasks, pretrain the baseline, score both on the same new tasks."""
    steps = parse_steps(config.eval_steps, "eval steps")
    run_dir = evaluation.make_run_dir("maml", config.out)
    print(f"sinusoid regression, {config.algorithm}; run folder: {run_dir}")
    with (strategy or tf.distribute.get_strategy()).scope():  # mirrored weights under --strategy mirrored
        model = build_sinusoid_model(config.algorithm)
    learner = MetaLearner(model, mse, mse, config.algorithm, config.alpha, config.inner_steps, config.meta_lr,
                          jit_compile=config.jit_compile, strategy=strategy)  # fmt: skip
    backup = distributed.Backup(config.backup_dir)  # --backup-dir: each phase resumes from its last compiled call
    meta_history = meta_train_sinusoid(learner, config, backup.phase("meta_train"))
    baseline_model = build_sinusoid_model("pretrained")
    pretrain_history = meta.pretrain_sinusoid(baseline_model, config.pretrain_iterations, config.batch_size,
                                              config.k + config.query_points, config.meta_lr, config.seed + 1,
                                              config.jit_compile, backup.phase("pretrain"))  # fmt: skip
    baseline = MetaLearner(baseline_model, mse, mse, "maml", config.alpha, config.inner_steps, config.meta_lr)

    tasks, params = sinusoid_test_tasks(config)
    print(f"evaluating on {config.eval_tasks} new tasks after {steps} SGD steps of {config.alpha}")
    variants = {
        "pretrained": meta.summarise(baseline.evaluate(tasks, steps), steps, "mse"),
        config.algorithm: meta.summarise(learner.evaluate(tasks, steps), steps, "mse"),
    }
    headline = "mse_after_1_step" if 1 in steps else next(iter(variants["pretrained"]))
    record = evaluation.metrics_record(
        "maml", SINUSOID, headline, "pretrained", variants, time.perf_counter() - start,
        algorithm=config.algorithm, eval_steps=steps,
    )  # fmt: skip
    histories = {"meta_train": meta_history, "pretrain": pretrain_history}
    figures = {
        "learning_curves": evaluation.plot_learning_curves(
            histories, metric="loss", title="training loss (every 1% of the iterations)"
        ),
        "test_tasks": meta.plot_sinusoid_tasks(
            {config.algorithm: learner, "pretrained": baseline}, tasks, params, max(steps)
        ),
    }
    evaluation.write_run(run_dir, config, record, histories, figures, model=model)
    meta.print_steps_table(record, steps, config.eval_tasks)
    print("(the MAML paper plots these curves in its Figure 3; it gives no table of them)\n")
    print(evaluation.comparison_table(record))
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    backup.finish()
    return record


# --- Images: training and baseline ----------------------------------------------------


def meta_train_images(learner: MetaLearner, sampler: EpisodeSampler, shots: int, config: Config,
                      backup_dir=None) -> dict:  # fmt: skip
    """``image_iterations`` meta-steps on episodes of the meta-train classes (drawn in numpy).

    ``backup_dir``: the weights, Adam, the step and the episodes' numpy generator checkpointed after every call.
    """
    rng = np.random.default_rng(config.seed)
    sample = lambda: sampler.sample(config.image_batch_size, config.ways, shots, config.query, rng)[:4]  # noqa: E731
    return learner.meta_train(sample, config.image_iterations, f"meta-train ({config.algorithm}, {shots}-shot)",
                              in_graph=False, backup_dir=backup_dir, rng=loops.NumpyRandomState(rng))  # fmt: skip


def run_images(config: Config, start: float, strategy=None) -> dict:
    """N-way K-shot: the pretrained baseline, then one meta-trained CNN per K; all scored on the same episodes."""
    steps, all_shots = parse_steps(config.eval_steps, "eval steps"), parse_steps(config.shots, "shots")
    train_sampler, test_sampler, dataset = meta.load_episode_pools(  # every data error before training
        config.dataset, config.image_size, config.seed, config.train_classes, config.test_classes,
        config.rotations, config.ways, all_shots, config.query,
    )  # fmt: skip
    run_dir = evaluation.make_run_dir("maml", config.out)
    print(f"{dataset}\nmeta-train classes {config.train_classes}, meta-test classes {config.test_classes}, "
          f"{config.ways}-way {all_shots}-shot, {config.algorithm}; run folder: {run_dir}")  # fmt: skip
    shape = train_sampler.images.shape[1:]

    timer = meta.PhaseTimer()  # wall seconds of each phase, also in metrics.json
    backup = distributed.Backup(config.backup_dir)  # --backup-dir: each phase resumes where it was stopped
    baseline_model, baseline_history = meta.pretrain_classifier(
        train_sampler, config.filters, config.epochs, config.meta_lr, config.seed, config.pretrain_images,
        backup_dir=backup.phase("pretrain"),
    )  # fmt: skip
    timer.lap("pretrain")
    histories = {"pretrain": baseline_history}
    variants = {"pretrained": {"ci95": {}}, config.algorithm: {"ci95": {}, "by_steps": {}}}
    test_rng = np.random.default_rng(config.seed + 10_000)
    model = None
    for shots in all_shots:
        key = f"accuracy_{shots}_shot"
        episodes = test_sampler.sample(config.eval_tasks, config.ways, shots, config.query, test_rng)[:4]
        timer.lap(f"sample_test_episodes_{shots}_shot")
        baseline_scores = meta.fit_linear_heads(baseline_model, episodes, config.head_steps)
        timer.lap(f"evaluate_pretrained_{shots}_shot")
        mean, half = evaluation.mean_confidence_interval(baseline_scores)
        variants["pretrained"][key], variants["pretrained"]["ci95"][key] = mean, half

        with (strategy or tf.distribute.get_strategy()).scope():
            model = build_conv4(shape, config.ways, config.filters, name=f"{config.algorithm}_{shots}_shot")
        learner = MetaLearner(model, cross_entropy, accuracy, config.algorithm, config.image_alpha,
                              config.inner_steps, config.meta_lr, task_map="map", strategy=strategy)  # fmt: skip
        histories[f"meta_train_{shots}_shot"] = meta_train_images(learner, train_sampler, shots, config,
                                                                  backup.phase(f"meta_train_{shots}_shot"))  # fmt: skip
        timer.lap(f"meta_train_{shots}_shot")
        scores = learner.evaluate(episodes, steps, chunk=100)
        timer.lap(f"evaluate_{config.algorithm}_{shots}_shot")
        by_steps = meta.summarise(scores, steps, key)
        mean, half = by_steps[f"{key}_after_{max(steps)}_steps"], by_steps["ci95"][f"{key}_after_{max(steps)}_steps"]
        variants[config.algorithm][key], variants[config.algorithm]["ci95"][key] = mean, half
        variants[config.algorithm]["by_steps"][key] = {s: float(scores[:, i].mean()) for i, s in enumerate(steps)}
        for name in ("pretrained", config.algorithm):
            mean, half = variants[name][key], variants[name]["ci95"][key]
            print(f"  {config.ways}-way {shots}-shot  {name:<10}  {100 * mean:.1f}% +- {100 * half:.1f}")

    headline = f"accuracy_{all_shots[0]}_shot"
    record = evaluation.metrics_record(
        "maml", config.dataset, headline, "pretrained", variants, time.perf_counter() - start,
        algorithm=config.algorithm, ways=config.ways, shots=all_shots, episodes=config.eval_tasks,
        adaptation_steps=max(steps), chance=1 / config.ways, phase_seconds=timer.seconds,
    )  # fmt: skip
    figures = {"learning_curves": evaluation.plot_learning_curves(histories, metric="loss", title="training loss")}
    evaluation.write_run(run_dir, config, record, histories, figures, model=model)
    print(f"\n{config.ways}-way accuracy on {config.eval_tasks} meta-test episodes (adapted with {max(steps)} steps):")
    print(evaluation.comparison_table(record))
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    backup.finish()
    return record


# --- The whole recipe -------------------------------------------------------------


def run(config: Config) -> dict:
    """Meta-train, train the baseline, evaluate both on new tasks; returns metrics.json's content."""
    config = config.resolved()
    check_config(config)
    start = time.perf_counter()
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)
    image = config.dataset != SINUSOID
    meta_batch, flag = (config.image_batch_size, "--image-batch-size") if image else (config.batch_size, "--batch-size")
    meta.check_meta_batch_split(meta_batch, strategy, flag, config.strategy)
    return (run_images if image else run_sinusoid)(config, start, strategy)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
