"""Few-shot and meta-learning infrastructure: task families, episodes, models, scoring over many tasks, plots.

What a meta-learning recipe needs around its algorithm (the algorithm itself, inner and
outer loop, stays in the recipe, e.g. ``recipes/maml.py``):

- the machinery around a gradient-based meta-learner: :class:`MetaTrainer` (many meta-steps
  per compiled call, the meta-batch split across replicas, the tasks of a batch mapped inside
  the graph, scoring after adaptation), :func:`check_meta_batch_split`, :func:`parse_steps`;
- task families: :func:`sample_sinusoid_tasks` (numpy) and :func:`sinusoid_tasks_tf`
  (inside the graph) for the sinusoid regression of Finn et al. 2017 (MAML, section 5.1);
  :class:`EpisodeSampler` for N-way K-shot episodes of an image dataset (Vinyals et al.
  2016's protocol, as in MAML's Omniglot and MiniImagenet experiments);
- the models of the MAML paper: :func:`build_sinusoid_model` (MLP 1-40-40-1) and
  :func:`build_conv4` (four 3x3 Conv64 blocks, stride 2);
- per-task losses and scores (:func:`mse`, :func:`cross_entropy`, :func:`accuracy`);
- scoring adapted models over many tasks: :func:`evaluate_in_chunks`, :func:`summarise`
  (mean and 95% confidence interval, as few-shot papers report), and the transfer
  baseline :func:`fit_linear_heads` (a new linear head per episode on frozen features,
  Chen et al. 2019, "A Closer Look at Few-shot Classification", the "Baseline");
- the plain pre-training baselines (:func:`pretrain_sinusoid`, :func:`pretrain_classifier`);
- reporting: :func:`plot_sinusoid_tasks`, :func:`print_steps_table`, :class:`PhaseTimer`.

A batch of tasks is a tuple ``(xs, ys, xq, yq)`` whose leading axis is the task: support
inputs and targets, query inputs and targets.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import data, evaluation, loops
from common.errors import InputError

AMPLITUDE, PHASE, X_RANGE = (0.1, 5.0), (0.0, np.pi), (-5.0, 5.0)


# --- The machinery around a meta-learning algorithm ------------------------------------

TASK_MAPS = ("vectorized", "map")


def parse_steps(spec: str, what: str) -> list[int]:
    """Sorted distinct non-negative integers from a comma list such as ``"0,1,5,10"`` (adaptation steps, shots).

    Raises ``InputError`` naming ``what`` if an entry is not an integer, a value is negative or
    the list is empty.
    """
    try:
        values = sorted({int(s) for s in str(spec).split(",") if s.strip()})
    except ValueError:
        raise InputError(f"cannot read {what} {spec!r}; write e.g. '0,1,5,10'") from None
    if not values or min(values) < 0:
        raise InputError(f"{what} {spec!r} must list non-negative integers")
    return values


def check_meta_batch_split(meta_batch: int, strategy, flag: str, strategy_name: str) -> None:
    """Raise ``InputError`` unless ``meta_batch`` tasks split evenly across ``strategy``'s replicas.

    :class:`MetaTrainer`'s distributed meta-step gives each replica an equal contiguous share;
    ``flag`` and ``strategy_name`` (e.g. ``"--batch-size"``, ``"mirrored"``) name the cause.
    """
    replicas = strategy.num_replicas_in_sync
    if meta_batch % replicas:
        raise InputError(f"{flag} {meta_batch}: under --strategy {strategy_name} the meta-batch is split across "
                         f"{replicas} replicas and must be a multiple of that")  # fmt: skip


class MetaTrainer:
    """The machinery around a gradient-based meta-learner (MAML, Finn et al. 2017; Reptile, Nichol et al. 2018).

    The algorithm lives in a subclass (``recipes/maml.py``'s ``MetaLearner``), which defines
    ``meta_gradients(tasks) -> (loss, grads)`` (mean query loss of a meta-batch, a scalar, and
    one gradient per ``model.trainable_variables`` entry, of its shape), ``meta_update(grads)``
    (the outer step, with ``self.optimizer``), and, for :meth:`evaluate`, ``forward(params, x)``
    and ``adapt(params, x, y, steps, first_order)`` (the inner loop on a list of weight tensors).
    A batch of tasks is a tuple ``(xs, ys, xq, yq)`` whose leading axis is the task.

    This class provides ``self.optimizer`` (Adam with the outer learning rate ``meta_lr``,
    built under the strategy's scope), ``meta_step(tasks)`` (one compiled meta-step, XLA if
    ``jit_compile``), :meth:`meta_train_loop` / :meth:`meta_train` (many meta-steps per call,
    resumable), :meth:`map_tasks` and :meth:`evaluate`.

    ``task_map``: how the tasks of a batch run inside the graph: ``"vectorized"``
    (``tf.vectorized_map``: one batched op per layer, fastest for small MLPs) or ``"map"``
    (``tf.map_fn``: a graph loop, faster to trace and to run for CNNs, whose per-task
    convolution filters ``vectorized_map`` cannot batch); another value is an ``InputError``.

    ``strategy`` (a ``tf.distribute`` strategy whose scope built ``model``): the meta-batch is
    split across the replicas, each computes the meta-gradient of its share of tasks, the
    meta-gradients are averaged over replicas (all-reduce) and one Adam update is applied to
    the mirrored weights, as learn2learn's distributed MAML averages them over workers. With
    one replica only the optimizer is built in its scope and the step is the plain one. XLA is
    not used under a strategy (it does not span the replicas' devices).
    """

    def __init__(self, model: keras.Model, score_fn, meta_lr: float = 1e-3, task_map: str = "vectorized",
                 jit_compile: bool = False, strategy=None):  # fmt: skip
        if task_map not in TASK_MAPS:
            raise InputError(f"unknown task_map {task_map!r}; choose vectorized or map")
        self.model, self.score_fn, self.task_map = model, score_fn, task_map
        self.strategy = strategy if strategy is not None and strategy.num_replicas_in_sync > 1 else None
        with (strategy or tf.distribute.get_strategy()).scope():  # where the model's variables live
            self.optimizer = keras.optimizers.Adam(meta_lr)
            self.optimizer.build(model.trainable_variables)
        self.jit_compile = jit_compile and self.strategy is None  # XLA does not span the replicas' devices
        self.meta_step = tf.function(self._step(), jit_compile=self.jit_compile)
        self.evaluate_batch = tf.function(self._evaluate_batch)

    def meta_gradients(self, tasks):
        raise NotImplementedError("a MetaTrainer subclass defines its algorithm's meta_gradients(tasks)")

    def meta_update(self, grads):
        raise NotImplementedError("a MetaTrainer subclass defines its algorithm's meta_update(grads)")

    def map_tasks(self, fn, tasks, output_signature):
        """``fn(task)`` on every task of the batch inside the graph (no Python loop at run time), stacked on axis 0.

        ``output_signature`` (``tf.TensorSpec`` structure of one task's result) is used by ``tf.map_fn``.
        """
        if self.task_map == "vectorized":
            return tf.vectorized_map(fn, tasks)
        return tf.map_fn(fn, tasks, fn_output_signature=output_signature)

    def _step(self):
        return self._meta_step if self.strategy is None else self._distributed_meta_step

    def _meta_step(self, tasks):
        loss, grads = self.meta_gradients(tasks)
        self.meta_update(grads)
        return loss

    def _distributed_meta_step(self, tasks):
        """One meta-step with the meta-batch split across the strategy's replicas (every replica gets the
        whole batch and takes its own contiguous share, so all workers must draw the same batches)."""

        def replica_step(tasks):
            context = tf.distribute.get_replica_context()
            replicas = context.num_replicas_in_sync
            share = tf.shape(tasks[0])[0] // replicas
            start = tf.cast(context.replica_id_in_sync_group, tf.int32) * share
            loss, grads = self.meta_gradients(tuple(t[start : start + share] for t in tasks))
            # Keras' optimizer all-reduces the gradients with a SUM over replicas (as fit does with
            # per-replica losses scaled by 1/replicas): each replica passes its share of the mean.
            self.meta_update([g / replicas for g in grads])
            return loss

        losses = self.strategy.run(replica_step, args=(tasks,))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    def meta_train_loop(self, sample_tasks, in_graph: bool = True):
        """``run(n)``: n meta-steps per call, returning their mean loss (a scalar tensor).

        ``in_graph``: ``sample_tasks()`` returns a batch of tasks from inside the graph
        (:func:`sinusoid_tasks_tf`) and the n steps run in one (XLA-compiled if ``jit_compile``)
        graph: Python is entered once per call, not once per meta-iteration
        (``loops.compiled_loop``). Otherwise ``sample_tasks()`` draws the batch in Python
        (e.g. numpy episodes) and each step is one call of the compiled ``meta_step``.
        """
        if in_graph:
            step = self._step()
            return loops.compiled_loop(lambda: step(sample_tasks()), self.jit_compile)

        def run(n):
            return tf.reduce_mean([self.meta_step(sample_tasks()) for _ in range(n)])

        return run

    def meta_train(self, sample_tasks, iterations: int, label: str, in_graph: bool = True, backup_dir=None,
                   **state) -> dict:  # fmt: skip
        """``iterations`` meta-steps (:meth:`meta_train_loop`) with progress; returns the loss history.

        ``backup_dir``: after every call, a checkpoint of the weights, the optimizer, the step and
        ``state`` (e.g. the task generator, ``generator=tf.random.Generator``); a rerun resumes
        there (``loops.run_with_progress``, which also raises its errors).
        """
        track = dict(model=self.model, optimizer=self.optimizer, **state)
        return loops.run_with_progress(self.meta_train_loop(sample_tasks, in_graph), iterations, label,
                                       backup_dir=backup_dir, track=track)  # fmt: skip

    def _evaluate_batch(self, tasks, steps: tuple[int, ...]):
        """Score on the query set after each number of SGD steps in ``steps``: shape (tasks, len(steps))."""
        params = [v.value for v in self.model.trainable_variables]

        def one_task(task):
            xs, ys, xq, yq = task
            scores, adapted = [], params
            for step in range(max(steps) + 1):
                if step in steps:
                    scores.append(self.score_fn(yq, self.forward(adapted, xq)))
                if step < max(steps):
                    adapted = self.adapt(adapted, xs, ys, 1, first_order=True)
            return tf.stack(scores)

        return self.map_tasks(one_task, tasks, tf.TensorSpec([len(steps)], tf.float32))

    def evaluate(self, tasks, steps: list[int], chunk: int = 100) -> np.ndarray:
        """Meta-test: per-task ``score_fn`` on the query set after each number of adaptation steps in ``steps``.

        Each task adapts alone from the current weights with one-step ``adapt`` calls on its support
        set; returns shape (n_tasks, len(steps)), float32, computed ``chunk`` tasks per compiled call.
        """
        return evaluate_in_chunks(self.evaluate_batch, tasks, steps, chunk)


# --- Task families --------------------------------------------------------------------


def sample_sinusoid_tasks(num_tasks: int, num_points: int, rng: np.random.Generator):
    """``num_tasks`` sine tasks y = A sin(x - phase) with ``num_points`` points each.

    A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5] (MAML, section 5.1). Returns x, y of
    shape (T, P, 1) float32 and the parameters (A, phase), each of shape (T,).
    """
    amplitude = rng.uniform(*AMPLITUDE, size=(num_tasks, 1, 1))
    phase = rng.uniform(*PHASE, size=(num_tasks, 1, 1))
    x = rng.uniform(*X_RANGE, size=(num_tasks, num_points, 1))
    y = amplitude * np.sin(x - phase)
    return x.astype(np.float32), y.astype(np.float32), (amplitude[:, 0, 0], phase[:, 0, 0])


def sinusoid_tasks_tf(generator: tf.random.Generator, num_tasks: int, support: int, query: int):
    """The same task family drawn inside the graph (no Python in a training loop).

    Returns (xs, ys, xq, yq): support of shape (T, support, 1), query of shape (T, query, 1).
    """
    amplitude = generator.uniform([num_tasks, 1, 1], *AMPLITUDE)
    phase = generator.uniform([num_tasks, 1, 1], *PHASE)
    x = generator.uniform([num_tasks, support + query, 1], *X_RANGE)
    y = amplitude * tf.sin(x - phase)
    return x[:, :support], y[:, :support], x[:, support:], y[:, support:]


class EpisodeSampler:
    """N-way K-shot episodes drawn from a pool of classes (one side of a class split).

    ``images`` (n, H, W, C) and ``labels`` (n,) hold the whole pool; only ``classes`` are
    drawn from. Labels inside an episode are 0..N-1 in a random order of the N drawn
    classes. With ``rotations``, every (class, quarter turn) pair is a class of its own
    (the Omniglot augmentation of Santoro et al. 2016, used by MAML).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[int], rotations: bool = False,
                 class_names: list[str] | None = None):  # fmt: skip
        self.images = images
        self.members = {c: np.flatnonzero(labels == c) for c in classes}
        self.classes = [(c, r) for c in classes for r in (range(4) if rotations else [0])]
        self.class_names = class_names

    def smallest_class(self) -> int:
        return min(len(m) for m in self.members.values())

    def check(self, ways: int, shots: int, query: int, side: str) -> None:
        """Raise ``InputError`` naming the flags if an episode cannot be drawn from these classes."""
        if ways > len(self.classes):
            raise InputError(
                f"--ways {ways}: {ways}-way episodes need {ways} {side} classes, but there are only {len(self.classes)}"
            )
        for c, members in self.members.items():
            if shots + query > len(members):
                name = f" ({self.class_names[c]!r})" if self.class_names else ""
                raise InputError(
                    f"--shots {shots} + --query {query} need {shots + query} images per class, but {side} class "
                    f"{c}{name} has only {len(members)}"
                )

    def sample(self, num_episodes: int, ways: int, shots: int, query: int, rng: np.random.Generator):
        """(xs, ys, xq, yq, classes): support (E, N*K, H, W, C), query (E, N*Q, H, W, C), labels (E, N*K) and
        (E, N*Q) int, and the drawn (class, rotation) pairs of each episode."""
        xs, ys, xq, yq, drawn = [], [], [], [], []
        for _ in range(num_episodes):
            picked = rng.choice(len(self.classes), ways, replace=False)
            support, query_images = [], []
            for c, r in (self.classes[i] for i in picked):
                index = rng.choice(self.members[c], shots + query, replace=False)
                images = np.rot90(self.images[index], r, axes=(1, 2)) if r else self.images[index]
                support.append(images[:shots])
                query_images.append(images[shots:])
            xs.append(np.concatenate(support))
            xq.append(np.concatenate(query_images))
            ys.append(np.repeat(np.arange(ways), shots))
            yq.append(np.repeat(np.arange(ways), query))
            drawn.append([self.classes[i] for i in picked])
        as_arrays = (np.stack(xs), np.stack(ys), np.stack(xq), np.stack(yq))
        return (*as_arrays, drawn)


def load_episode_pools(dataset: str, image_size: int, seed: int, train_classes: str, test_classes: str,
                       rotations: bool, ways: int, all_shots: list[int], query: int):  # fmt: skip
    """Meta-train and meta-test :class:`EpisodeSampler` over disjoint classes, and the ``data.Dataset``.

    ``dataset`` is any ``data.load_dataset`` name; its train and test images are pooled,
    greyscale at ``image_size`` (shape (n, image_size, image_size, 1)). ``train_classes`` /
    ``test_classes`` are class lists such as ``"0-4"``. Every ``InputError`` (overlapping
    classes, too few classes for ``ways``, too few images for ``shots + query``) is raised here.
    """
    loaded = data.load_dataset(dataset, image_size=image_size, seed=seed)
    train_classes, test_classes = data.parse_classes(train_classes), data.parse_classes(test_classes)
    data.check_class_split(loaded, train_classes, test_classes, flags=("--train-classes", "--test-classes"))
    images = data.to_input_shape(np.concatenate([loaded.x_train, loaded.x_test]), (image_size, image_size, 1))
    labels = np.concatenate([loaded.y_train, loaded.y_test])
    train = EpisodeSampler(images, labels, train_classes, rotations, loaded.class_names)
    test = EpisodeSampler(images, labels, test_classes, rotations, loaded.class_names)
    for k in all_shots:
        train.check(ways, k, query, "meta-train")
        test.check(ways, k, query, "meta-test")
    return train, test, loaded


# --- Models, losses, scores -------------------------------------------------------------


def build_sinusoid_model(name: str = "sine_mlp") -> keras.Model:
    """MAML's regressor: 1 -> 40 -> 40 -> 1, ReLU; input and output of shape (batch, 1)."""
    return keras.Sequential(
        [
            keras.Input((1,)),
            layers.Dense(40, activation="relu", name="hidden1"),
            layers.Dense(40, activation="relu", name="hidden2"),
            layers.Dense(1, name="output"),
        ],
        name=name,
    )


def build_conv4(input_shape: tuple[int, int, int], num_classes: int, filters: int = 64, name: str = "conv4"):
    """MAML's Omniglot CNN: 4 x (3x3 conv, stride 2, BatchNorm, ReLU), average pooling ("pool"), linear logits."""
    inputs = keras.Input(input_shape)
    x = inputs
    for block in range(1, 5):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"conv{block}")(x)
        x = layers.BatchNormalization(name=f"bn{block}")(x)
        x = layers.ReLU(name=f"relu{block}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def mse(y_true, y_pred):
    """Mean squared error of one task, a scalar."""
    return tf.reduce_mean(tf.square(y_pred - y_true))


def cross_entropy(y_true, logits):
    """Mean cross-entropy of one task: integer labels (n,), logits (n, classes); a scalar."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y_true, tf.int32), logits))


def accuracy(y_true, logits):
    """Accuracy of one task in [0, 1]: integer labels (n,), logits (n, classes)."""
    return tf.reduce_mean(
        tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y_true, tf.int32)), tf.float32)
    )


# --- Scoring over many tasks -------------------------------------------------------------


def evaluate_in_chunks(evaluate_batch, tasks, steps: list[int], chunk: int = 100) -> np.ndarray:
    """Per-task scores of shape (n_tasks, len(steps)), from ``evaluate_batch(part, tuple(steps))`` on ``chunk``
    tasks at a time (``evaluate_batch`` returns a (chunk, len(steps)) tensor)."""
    steps = tuple(steps)
    out = []
    for start in range(0, len(tasks[0]), chunk):
        part = tuple(t[start : start + chunk] for t in tasks)
        out.append(evaluate_batch(part, steps).numpy())
    return np.concatenate(out)


def summarise(scores: np.ndarray, steps: list[int], name: str) -> dict:
    """``{name_after_1_step: mean, ..., "ci95": {...}}`` from per-task scores (n_tasks, len(steps)).

    The 95% confidence interval half-width is ``evaluation.mean_confidence_interval``'s (normal).
    """
    figures, intervals = {}, {}
    for column, step in enumerate(steps):
        key = f"{name}_after_{step}_step" + ("" if step == 1 else "s")
        figures[key], intervals[key] = evaluation.mean_confidence_interval(scores[:, column])
    return figures | {"ci95": intervals}


def fit_linear_heads(model: keras.Model, episodes, steps: int, learning_rate: float = 0.01, chunk: int = 100,
                     feature_layer: str = "pool") -> np.ndarray:  # fmt: skip
    """Transfer baseline: frozen features, a new linear head fitted on each support set; query accuracy per episode.

    ``episodes`` is (xs, ys, xq, yq) with images (E, n, H, W, C) and integer labels (E, n).
    The features are ``model``'s ``feature_layer`` activations in inference mode (BatchNorm
    with its running averages, as any pretrained network is used); the heads of all
    episodes of a chunk are fitted at once with ``steps`` Adam steps (zero initialisation)
    on the support cross-entropy. Returns the query accuracy of each episode, shape (E,).
    """
    features = keras.Model(model.inputs, model.get_layer(feature_layer).output)
    xs, ys, xq, yq = episodes
    n_way = int(ys.max()) + 1

    def embed(x):
        flat = x.reshape(-1, *x.shape[2:])
        return features.predict(flat, batch_size=512, verbose=0).reshape(x.shape[0], x.shape[1], -1)

    @tf.function
    def fit_and_score(fs, ys, fq, yq):
        weights = [tf.zeros([tf.shape(fs)[0], fs.shape[-1], n_way]), tf.zeros([tf.shape(fs)[0], 1, n_way])]
        moments = [tf.zeros_like(w) for w in weights] + [tf.zeros_like(w) for w in weights]
        for t in tf.range(1, steps + 1):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                logits = tf.matmul(fs, weights[0]) + weights[1]
                # Sum over episodes of each episode's mean loss: the heads are independent.
                loss = tf.reduce_sum(tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(ys, tf.int32), logits), axis=1))  # fmt: skip
            grads = tape.gradient(loss, weights)
            t = tf.cast(t, tf.float32)
            new_weights, new_moments = [], [None] * 4
            for i, (w, g) in enumerate(zip(weights, grads)):  # Adam
                m = 0.9 * moments[i] + 0.1 * g
                v = 0.999 * moments[2 + i] + 0.001 * tf.square(g)
                step = learning_rate * (m / (1 - 0.9**t)) / (tf.sqrt(v / (1 - 0.999**t)) + 1e-7)
                new_weights.append(w - step)
                new_moments[i], new_moments[2 + i] = m, v
            weights, moments = new_weights, new_moments
        predicted = tf.argmax(tf.matmul(fq, weights[0]) + weights[1], -1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(yq, tf.int32)), tf.float32), axis=1)

    scores = []
    for start in range(0, len(xs), chunk):
        part = slice(start, start + chunk)
        scores.append(fit_and_score(embed(xs[part]), ys[part], embed(xq[part]), yq[part]).numpy())
    return np.concatenate(scores)


# --- Plots --------------------------------------------------------------------------------


def plot_sinusoid_tasks(learners: dict, tasks, params, steps: int, count: int = 4):
    """True curve, support points, and each learner's prediction before and after ``steps`` SGD steps.

    ``learners`` maps a name to an object with ``model``, ``forward(params, x)`` and
    ``adapt(params, x, y, steps, first_order)`` (``recipes.maml.MetaLearner``); ``tasks`` is
    (xs, ys, xq, yq) and ``params`` the (A, phase) arrays of :func:`sample_sinusoid_tasks`.
    """
    plt = evaluation._pyplot()
    fig, axes = plt.subplots(1, count, figsize=(4 * count, 3.4), sharey=True)
    grid = np.linspace(*X_RANGE, 200, dtype=np.float32)[:, None]
    colors = {"pretrained": "tab:orange"}
    for i, ax in enumerate(np.atleast_1d(axes)):
        amplitude, phase = params[0][i], params[1][i]
        xs, ys = tasks[0][i], tasks[1][i]
        ax.plot(grid, amplitude * np.sin(grid - phase), "k-", lw=2, label="true function")
        ax.plot(xs, ys, "k^", ms=7, label=f"{len(xs)} support points")
        for name, learner in learners.items():
            color = colors.get(name, "tab:blue")
            params0 = [v.value for v in learner.model.trainable_variables]
            adapted = learner.adapt(params0, tf.constant(xs), tf.constant(ys), steps, first_order=True)
            ax.plot(grid, learner.forward(params0, grid).numpy(), ":", color=color, label=f"{name}, before")
            ax.plot(grid, learner.forward(adapted, grid).numpy(), "-", color=color, label=f"{name}, {steps} steps")
        ax.set(title=f"test task {i + 1}", xlabel="x")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


# --- Baselines: plain pre-training on the same tasks ---------------------------------------


def pretrain_sinusoid(model: keras.Model, iterations: int, tasks_per_batch: int, points: int, learning_rate: float,
                      seed: int, jit_compile: bool = True, backup_dir=None) -> dict:  # fmt: skip
    """MAML's sinusoid baseline: one regressor trained with Adam on points of many tasks at once (no adaptation).

    Each iteration draws ``tasks_per_batch`` tasks of ``points`` points inside the graph and
    takes one step on their MSE; returns the loss history (``loops.run_with_progress``).
    ``backup_dir``: resumable (``loops.run_with_progress``: model, Adam, task generator and
    step counter checkpointed after every call).
    """
    generator = tf.random.Generator.from_seed(seed)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.trainable_variables)

    def step():
        x, y, _, _ = sinusoid_tasks_tf(generator, tasks_per_batch, points, 0)
        x, y = tf.reshape(x, [-1, 1]), tf.reshape(y, [-1, 1])
        with tf.GradientTape() as tape:
            loss = mse(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    track = dict(model=model, optimizer=optimizer, generator=generator)
    return loops.run_with_progress(loops.compiled_loop(step, jit_compile), iterations, "pretrain (joint)",
                                   backup_dir=backup_dir, track=track)  # fmt: skip


def pretrain_classifier(sampler: EpisodeSampler, filters: int, epochs: int, learning_rate: float, seed: int,
                        max_images: int = 0, batch_size: int = 64, backup_dir=None) -> tuple[keras.Model, dict]:  # fmt: skip
    """The few-shot transfer baseline's source model: :func:`build_conv4` trained as a plain classifier of the
    sampler's classes (all their images, or about ``max_images`` balanced over the classes); returns
    the model and its ``fit`` history.

    ``backup_dir`` (a ``Path``): ``keras.callbacks.BackupAndRestore`` there after every epoch and the
    history in ``history.json``; a finished phase is restored from ``finished-<epochs>.weights.h5``
    without training. A run killed mid-phase restarts at its next epoch with ``fit``'s own shuffle
    of the remaining epochs (not replayed: with the default single epoch, the phase is either
    redone whole or restored)."""
    picked = np.concatenate(list(sampler.members.values()))
    labels = np.concatenate([np.full(len(m), i) for i, m in enumerate(sampler.members.values())])
    if max_images:
        per_class = min(max(1, max_images // len(sampler.members)), sampler.smallest_class())
        keep = data.sample_per_class(labels, per_class, seed)
        picked, labels = picked[keep], labels[keep]
    model = build_conv4(sampler.images.shape[1:], len(sampler.members), filters, name="pretrained")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    order = np.random.default_rng(seed).permutation(len(picked))
    print(f"pretrain the baseline classifier on {len(picked)} images of the meta-train classes")
    if backup_dir is None:
        history = model.fit(sampler.images[picked[order]], labels[order], batch_size=batch_size, epochs=epochs,
                            verbose=2)  # fmt: skip
        return model, history.history
    finished, saved = backup_dir / f"finished-{epochs}.weights.h5", backup_dir / "history.json"
    if finished.exists():
        model.optimizer.build(model.trainable_variables)
        model.load_weights(finished)
        print(f"restored the finished baseline classifier from {finished}")
        return model, json.loads(saved.read_text())
    history = json.loads(saved.read_text()) if saved.exists() else {}

    def record(epoch, logs):  # every finished epoch's figures, before BackupAndRestore saves its weights
        history.update({key: history.get(key, [])[:epoch] + [float(value)] for key, value in logs.items()})
        saved.with_suffix(".tmp").write_text(json.dumps(history))
        os.replace(saved.with_suffix(".tmp"), saved)

    callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=record),
                 keras.callbacks.BackupAndRestore(str(backup_dir / "fit"), delete_checkpoint=False)]  # fmt: skip
    model.fit(sampler.images[picked[order]], labels[order], batch_size=batch_size, epochs=epochs, verbose=2,
              callbacks=callbacks)  # fmt: skip
    model._initial_epoch = None  # set by a restoring BackupAndRestore (as in common.distributed.train)
    tmp = backup_dir / "finished.tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, finished)  # the marker, written last
    return model, history


# --- Reporting ------------------------------------------------------------------------------


class PhaseTimer:
    """Wall seconds of consecutive phases: ``timer.lap("pretrain")`` closes the phase begun at the last lap
    (or at construction), prints it and keeps it in ``timer.seconds`` (a dict, for metrics.json)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 2)
        self._clock = now
        print(f"  [{name}: {self.seconds[name]:.1f} s]")


def print_steps_table(record: dict, steps: list[int], tasks: int, name: str = "mse") -> None:
    """Each variant's ``name`` after each number of adaptation steps, mean +- 95% CI (keys of :func:`summarise`)."""
    print(f"\n{name.upper()} on {tasks} new tasks after k SGD steps (mean +- 95% CI):")
    print("variant      " + "".join(f"{f'k={s}':>16}" for s in steps))
    for variant, figures in record["variants"].items():
        cells = []
        for s in steps:
            key = f"{name}_after_{s}_step" + ("" if s == 1 else "s")
            cells.append(f"{figures[key]:.3f} +- {figures['ci95'][key]:.3f}".rjust(16))
        print(f"{variant:<13}" + "".join(cells))
