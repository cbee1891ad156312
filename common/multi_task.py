"""Multi-task learning: one shared trunk, one head per task, and the ways to weigh the tasks' gradients.

A multi-task network (Caruana 1997, "Multitask learning") shares a trunk between tasks and
gives each task its own head; every training step draws a mini-batch *per task*, so a task
with 50 labelled images weighs as much per step as one with 30,000 (its images repeat).
The trunk's update combines the tasks' gradients, and how it does is the whole question:

- ``equal``: the sum of the task losses (fixed weights of 1).
- ``uncertainty``: learned weights from each task's homoscedastic uncertainty (Kendall, Gal
  & Cipolla 2018, "Multi-task learning using uncertainty to weigh losses for scene geometry
  and semantics", eq. 10 for a classification loss): loss = sum_i exp(-s_i) L_i + s_i / 2
  with a learned log-variance s_i = log sigma_i^2 per task; its stationary point is
  exp(-s_i) = 1 / (2 L_i): a task whose loss stays high is weighed down.
- ``pcgrad``: projecting conflicting gradients (Yu et al. 2020, "Gradient surgery for
  multi-task learning", Algorithm 1): each task's trunk gradient, in turn, loses its
  component along every other task's gradient it conflicts with (negative dot product),
  the other tasks taken in a random order; the projected gradients are summed.

:class:`MultiTaskTrainer` runs one compiled step for all of them: it computes every task's
gradient on the trunk (each task's loss reaches the trunk only through its own batch, so
this costs no more than one backward pass of the summed loss), logs their pairwise cosines
(where tasks conflict) and combines them by the weighting. A self-supervised auxiliary
task comes for free: :func:`rotate` builds the 4-way rotation prediction of Gidaris, Singh
& Komodakis 2018 ("Unsupervised representation learning by predicting image rotations").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import loops
from common.errors import InputError

WEIGHTINGS = ("equal", "uncertainty", "pcgrad")
ROTATIONS = 4  # 0, 90, 180 and 270 degrees


# --- Gradient surgery and task weights -------------------------------------------------


def project_conflicting(grads: tf.Tensor, orders: tf.Tensor | None = None, generator=None) -> tf.Tensor:
    """PCGrad's projection (Yu et al. 2020, Algorithm 1) of every task's gradient; returns a (T, P) tensor.

    ``grads``: (T, P), one flattened gradient per task over the shared parameters. For task
    i, g_i^PC starts as g_i; for each other task j, in the order ``orders[i]`` (a (T, T-1)
    int tensor listing the other tasks), if g_i^PC . g_j < 0 it becomes
    g_i^PC - (g_i^PC . g_j) / |g_j|^2 g_j: the conflicting component is removed and g_i^PC
    is then orthogonal to g_j. Non-conflicting pairs are left as they are. The update is the
    sum over tasks of the returned rows. Without ``orders`` each task's order is drawn with
    ``generator`` (a ``tf.random.Generator``; the global one if None), as the paper's random
    task order. A zero g_j projects nothing. Raises ``ValueError`` unless ``grads`` is 2-D
    with at least one task, or if ``orders`` does not have shape (T, T-1).
    """
    grads = tf.convert_to_tensor(grads)
    if grads.shape.rank != 2 or grads.shape[0] is None or grads.shape[0] < 1:
        raise ValueError(f"project_conflicting needs a (tasks, parameters) tensor, got shape {grads.shape}")
    tasks = grads.shape[0]
    if orders is None:
        generator = generator or tf.random.get_global_generator()
        orders = tf.stack([random_order(tasks, i, generator) for i in range(tasks)]) if tasks > 1 else None
    elif tuple(orders.shape) != (tasks, tasks - 1):
        raise ValueError(f"orders must have shape ({tasks}, {tasks - 1}), got {tuple(orders.shape)}")
    squared_norms = tf.reduce_sum(grads * grads, axis=1)
    projected = []
    for i in range(tasks):
        g = grads[i]
        for k in range(tasks - 1):
            j = orders[i, k]
            other = tf.gather(grads, j)
            dot = tf.reduce_sum(g * other)
            g = g - tf.minimum(dot, 0.0) * tf.math.divide_no_nan(1.0, tf.gather(squared_norms, j)) * other
        projected.append(g)
    return tf.stack(projected)


def random_order(tasks: int, task: int, generator) -> tf.Tensor:
    """The other ``tasks - 1`` task indices (all but ``task``) in a random order drawn with ``generator``."""
    others = tf.constant([j for j in range(tasks) if j != task], tf.int32)
    return tf.gather(others, tf.argsort(generator.uniform([tasks - 1])))


def gradient_cosines(grads: tf.Tensor) -> tf.Tensor:
    """Pairwise cosine similarity of the rows of ``grads`` (T, P): a (T, T) tensor, 0 where a row is zero.

    Negative entries are conflicting tasks (Yu et al. 2020 call them conflicting gradients).
    """
    norms = tf.norm(grads, axis=1)
    return tf.math.divide_no_nan(tf.matmul(grads, grads, transpose_b=True), norms[:, None] * norms[None, :])


def uncertainty_loss(losses: tf.Tensor, log_variances: tf.Tensor) -> tf.Tensor:
    """Kendall, Gal & Cipolla (2018) eq. 10 for classification losses: sum_i exp(-s_i) L_i + s_i / 2.

    ``losses``, ``log_variances``: (T,) tensors, s_i = log sigma_i^2. Minimised over s_i
    for fixed losses it gives task weights exp(-s_i) = 1 / (2 L_i) (:func:`uncertainty_weights`).
    Raises ``ValueError`` if the shapes differ.
    """
    losses, log_variances = tf.convert_to_tensor(losses), tf.convert_to_tensor(log_variances)
    if losses.shape != log_variances.shape:
        raise ValueError(f"one log-variance per loss: shapes {losses.shape} and {log_variances.shape}")
    return tf.reduce_sum(tf.exp(-log_variances) * losses + 0.5 * log_variances)


def uncertainty_weights(log_variances) -> np.ndarray:
    """The task weights exp(-s_i) that the learned log-variances ``s`` (T,) put on the losses."""
    return np.exp(-np.asarray(log_variances, dtype=np.float64))


# --- Tasks and the shared network --------------------------------------------------------


@dataclass
class Task:
    """One task of a multi-task network: its training pool, its test set, and its mini-batch size.

    ``kind``: ``"classification"`` (labels ``y``, (N,) ints in [0, num_classes)) or
    ``"rotation"`` (no labels: each image is rotated by a random multiple of 90 degrees and
    the task predicts which, :func:`rotate`). ``x``: (N, H, W, C) float32 images;
    ``x_test``/``y_test`` the images and labels it is scored on (a rotation task's test labels
    are fixed rotations, ``i % 4`` for test image i).
    """

    name: str
    kind: str
    x: np.ndarray
    y: np.ndarray | None
    num_classes: int
    x_test: np.ndarray
    y_test: np.ndarray
    batch_size: int
    class_names: list[str] = field(default_factory=list)

    def tensors(self) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The training pool as tensors, converted once and shared by every trainer of this task."""
        if not hasattr(self, "_tensors"):
            self._tensors = (tf.constant(self.x), None if self.y is None else tf.constant(self.y, tf.int32))
        return self._tensors

    def __post_init__(self):
        if self.kind not in ("classification", "rotation"):
            raise ValueError(f"task {self.name!r}: kind must be classification or rotation, not {self.kind!r}")
        if self.num_classes < 2:
            raise InputError(f"task {self.name!r} has {self.num_classes} class(es); a task needs at least 2 to learn")
        if len(self.x) == 0:
            raise InputError(f"task {self.name!r} has no training images")


def rotate(images: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """Each image (N, H, W, C), H == W, rotated counter-clockwise by ``k[n]`` x 90 degrees (``k``: (N,) ints 0-3).

    The pretext task of RotNet (Gidaris et al. 2018): predicting ``k`` needs the network to
    recognise the object's shape and orientation, and it needs no label. Raises
    ``InputError`` for images that are not square.
    """
    images = tf.convert_to_tensor(images)
    if images.shape[1] != images.shape[2]:
        raise InputError(f"the rotation task needs square images, got {images.shape[1]}x{images.shape[2]}")
    turned = tf.stack([tf.image.rot90(images, r) for r in range(ROTATIONS)])  # (4, N, H, W, C)
    k = tf.cast(k, tf.int32)
    return tf.gather_nd(turned, tf.stack([k, tf.range(tf.shape(images)[0])], axis=1))


def rotation_test_set(images: np.ndarray, batch_size: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Test images rotated by ``i % 4`` quarter turns (image i) and those labels: a fixed, balanced test set."""
    labels = np.arange(len(images)) % ROTATIONS
    rotated = [rotate(images[s : s + batch_size], labels[s : s + batch_size]).numpy()
               for s in range(0, len(images), batch_size)]  # fmt: skip
    return np.concatenate(rotated), labels


def build_trunk(input_shape: tuple[int, int, int], name: str = "trunk") -> keras.Model:
    """The shared part: the convolutions of ``common.models.build_cnn`` (Conv32-Pool-Conv64-Pool-Conv64), flattened.

    Output (N, features): 576 for 28x28 images. Raises ``InputError`` below 18x18 pixels.
    """
    from common.models import check_image_side, cnn_convolutions

    check_image_side(input_shape, 18, "the CNN trunk (three 3x3 convolutions, two 2x2 poolings)")
    return keras.Sequential([keras.Input(input_shape), *cnn_convolutions()], name=name)


def build_head(features: int, num_classes: int, name: str, units: int = 64) -> keras.Model:
    """A task's own head: Dense(units, ReLU) then Dense(num_classes) logits, on (N, features) trunk outputs."""
    return keras.Sequential(
        [keras.Input((features,)), layers.Dense(units, activation="relu", name="dense"),
         layers.Dense(num_classes, name="classifier")],
        name=name,
    )  # fmt: skip


def as_model(trunk: keras.Model, heads: dict[str, keras.Model], name: str = "multi_task") -> keras.Model:
    """One functional model: images -> trunk -> ``{task: logits}`` (the model saved as ``model.keras``)."""
    inputs = keras.Input(trunk.input_shape[1:])
    features = trunk(inputs)
    return keras.Model(inputs, {task: head(features) for task, head in heads.items()}, name=name)


def _pair_names(names: list[str]) -> list[tuple[int, int, str]]:
    return [(i, j, f"{names[i]}/{names[j]}") for i in range(len(names)) for j in range(i + 1, len(names))]


# --- The trainer ---------------------------------------------------------------------------


class MultiTaskTrainer:
    """Train a shared trunk and one head per task, every step on a mini-batch of each task.

    ``tasks``: the :class:`Task` list (one task trains a single-task network with the same
    code). ``weighting``: one of ``WEIGHTINGS`` (module docstring). ``seed`` seeds the
    ``tf.random.Generator`` that draws every batch (with replacement, ``task.batch_size``
    images of each task per step), the rotations and PCGrad's task orders, so a run is
    reproducible and resumable. Adam updates the trunk, the heads and, for ``uncertainty``,
    the log-variances (initialised at 0: weights 1).

    :meth:`train` logs, every ``log_every`` steps, each task's mean loss, each task's weight,
    the mean cosine between every two tasks' trunk gradients (``cosine_<a>/<b>``) and the
    share of steps they conflicted (negative cosine, ``conflict_<a>/<b>``). Raises
    ``InputError`` for an unknown weighting or no tasks.
    """

    def __init__(self, trunk: keras.Model, heads: dict[str, keras.Model], tasks: list[Task], weighting: str,
                 learning_rate: float = 1e-3, seed: int = 0):  # fmt: skip
        if weighting not in WEIGHTINGS:
            raise InputError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if not tasks:
            raise InputError("a multi-task network needs at least one task")
        self.trunk, self.heads, self.tasks, self.weighting = trunk, heads, tasks, weighting
        self.names = [task.name for task in tasks]
        count = len(tasks)
        self.generator = tf.random.Generator.from_seed(seed)  # batches and rotations: the same for every weighting
        self.order_generator = tf.random.Generator.from_seed(seed + 1)  # PCGrad's task orders
        self.log_variances = tf.Variable(tf.zeros(count), name="log_variances", trainable=weighting == "uncertainty")
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self._pools = [t.tensors() for t in tasks]
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._sums = {
            "loss": tf.Variable(tf.zeros(count), trainable=False),
            "cosine": tf.Variable(tf.zeros((count, count)), trainable=False),
            "conflict": tf.Variable(tf.zeros((count, count)), trainable=False),
            "steps": tf.Variable(0.0, trainable=False),
        }
        self.history: dict[str, list[float]] = {}
        self._loop = loops.compiled_loop(self.step)
        self.model = as_model(trunk, {t.name: heads[t.name] for t in tasks})
        self._variables = self.trunk.trainable_variables + [v for t in tasks for v in heads[t.name].trainable_variables]
        if weighting == "uncertainty":
            self._variables = self._variables + [self.log_variances]
        self.optimizer.build(self._variables)

    # One step --------------------------------------------------------------------------------

    def _batch(self, index: int):
        task, (x, y) = self.tasks[index], self._pools[index]
        picked = self.generator.uniform([task.batch_size], 0, tf.shape(x, out_type=tf.int64)[0], dtype=tf.int64)
        images = tf.gather(x, picked)
        if task.kind == "rotation":
            labels = self.generator.uniform([task.batch_size], 0, ROTATIONS, dtype=tf.int32)
            return rotate(images, labels), labels
        return images, tf.gather(y, picked)

    def weights(self) -> tf.Tensor:
        """The current task weights (T,): exp(-s) under ``uncertainty``, else ones."""
        if self.weighting == "uncertainty":
            return tf.exp(-self.log_variances)
        return tf.ones(len(self.tasks))

    def step(self) -> tf.Tensor:
        """One update from a batch of every task; returns the weighted total loss (a scalar)."""
        shared = self.trunk.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            losses = []
            for i, task in enumerate(self.tasks):
                x, y = self._batch(i)
                logits = self.heads[task.name](self.trunk(x, training=True), training=True)
                losses.append(self._loss(y, logits))
        per_task = [tape.gradient(loss, shared) for loss in losses]
        head_grads = [
            tape.gradient(loss, self.heads[t.name].trainable_variables) for loss, t in zip(losses, self.tasks)
        ]
        del tape
        flat = tf.stack([tf.concat([tf.reshape(g, [-1]) for g in grads], 0) for grads in per_task])  # (T, P)
        losses = tf.stack(losses)
        weights = self.weights()
        if self.weighting == "pcgrad" and len(self.tasks) > 1:
            combined = tf.reduce_sum(project_conflicting(flat, generator=self.order_generator), axis=0)
        else:
            combined = tf.tensordot(weights, flat, axes=1)
        sizes = [int(np.prod(v.shape)) for v in shared]
        trunk_grads = [tf.reshape(g, v.shape) for g, v in zip(tf.split(combined, sizes), shared)]
        grads = trunk_grads + [weights[i] * g for i, grads in enumerate(head_grads) for g in grads]
        if self.weighting == "uncertainty":  # d/ds_i of exp(-s_i) L_i + s_i / 2
            grads.append(-weights * tf.stop_gradient(losses) + 0.5)
        self.optimizer.apply_gradients(zip(grads, self._variables))
        cosines = gradient_cosines(flat)
        self._sums["loss"].assign_add(losses)
        self._sums["cosine"].assign_add(cosines)
        self._sums["conflict"].assign_add(tf.cast(cosines < 0.0, tf.float32))
        self._sums["steps"].assign_add(1.0)
        if self.weighting == "uncertainty":
            return uncertainty_loss(losses, self.log_variances)
        return tf.reduce_sum(losses)

    # Training --------------------------------------------------------------------------------

    def _log(self, steps_done: int) -> None:
        steps = float(self._sums["steps"].numpy())
        if steps == 0:
            return
        loss, cosine, conflict = (self._sums[k].numpy() / steps for k in ("loss", "cosine", "conflict"))
        weights = self.weights().numpy()
        logs = {"step": steps_done}
        for i, name in enumerate(self.names):
            logs[f"loss_{name}"] = loss[i]
            logs[f"weight_{name}"] = weights[i]
        for i, j, pair in _pair_names(self.names):
            logs[f"cosine_{pair}"] = cosine[i, j]
            logs[f"conflict_{pair}"] = conflict[i, j]
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        for variable in self._sums.values():
            variable.assign(tf.zeros_like(variable))

    def train(self, steps: int, label: str, log_every: int = 0, backup_dir=None) -> dict:
        """``steps`` steps, compiled ``log_every`` at a time (default: steps // 50); returns the history.

        ``backup_dir``: resumable (``common.loops.run_with_progress``): the network, Adam, the
        log-variances, the batch generator and the history are checkpointed after every call.
        """
        every = log_every or max(1, steps // 50)
        done = [0]

        def run(n):
            loss = self._loop(n)
            done[0] += n
            self._log(done[0])
            return loss

        def put(saved):
            self.history.clear()
            self.history.update(saved)
            done[0] = int(saved["step"][-1]) if saved.get("step") else 0

        track = {"model": self.model, "optimizer": self.optimizer, "generator": self.generator,
                 "order_generator": self.order_generator, "log_variances": self.log_variances, "logs": loops.JSONState(lambda: self.history, put)}  # fmt: skip
        loops.run_with_progress(
            run, steps, label, reports=max(1, -(-steps // every)), backup_dir=backup_dir, track=track
        )
        return self.history

    # Evaluation ------------------------------------------------------------------------------

    def predict(self, task: Task, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class of every image (N,) by ``task``'s head on the trunk."""
        head = self.heads[task.name]
        labels = [np.argmax(head(self.trunk(x[s : s + batch_size])).numpy(), axis=-1)
                  for s in range(0, len(x), batch_size)]  # fmt: skip
        return np.concatenate(labels)

    def test_accuracy(self) -> dict[str, float]:
        """Each task's accuracy on its own test set (``Task.x_test``/``y_test``)."""
        return {t.name: float(np.mean(self.predict(t, t.x_test) == t.y_test)) for t in self.tasks}


def mean_cosines(history: dict[str, list[float]]) -> dict[str, float]:
    """Each task pair's cosine between trunk gradients, averaged over the logged intervals."""
    return {key.removeprefix("cosine_"): float(np.mean(v)) for key, v in history.items() if key.startswith("cosine_")}


def plot_over_training(
    histories: dict[str, dict], prefix: str, ylabel: str, title: str, reference: float | None = None
):
    """One panel per variant, one line per logged series starting with ``prefix``, against training step.

    ``histories``: {variant: ``MultiTaskTrainer.history``}. Used for the task weights
    (``prefix="weight_"``) and the gradient cosines (``prefix="cosine_"``); ``reference``
    draws a dashed horizontal line (weight 1, cosine 0).
    """
    from common.evaluation import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(histories)), figsize=(3.6 * max(1, len(histories)), 3.4), squeeze=False,
                             sharey=True)  # fmt: skip
    for ax, (variant, history) in zip(axes[0], histories.items()):
        for key, values in history.items():
            if key.startswith(prefix):
                ax.plot(history["step"], values, label=key.removeprefix(prefix))
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="training step", title=variant)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
