"""Domain adaptation: the same classes in a new domain, with no target labels (AdaBN, DANN).

The source and target tasks share their classes, but the target images look different
(another camera, another rendering) and carry no labels; a model trained on the source
loses much of its accuracy there. Two remedies that need only unlabelled target images:

- AdaBN (Li et al. 2016): keep the source network, recompute every BatchNorm layer's
  moving mean and variance on target images. No training.
- DANN (Ganin et al. 2016): a domain classifier behind a gradient reversal layer on the
  features; the reversed gradient makes the features hard to tell apart by domain while
  the label classifier learns the source labels. Reversal weight lambda_max *
  (2/(1+exp(-10p))-1) and learning rate lr/(1+10p)^0.75 over training progress p.

When to use it: labels in one domain, unlabelled images of the one you care about, the
same classes. Try AdaBN first (free); DANN when it is not enough.

What the default run does (``python -m recipes.domain_adaptation``): the source is 10,000
Fashion-MNIST training images with labels (grey, repeated to 3 channels, so one network
takes both domains); the target is 10,000 other training images of ``fashion_mnist_m``
(rendered over colour textures like MNIST-M, ``common/data.py``), labels unused. The
same small CNN (``models.build_dann_cnn``), 600 SGD steps of 32 images per domain, gives
``source_only`` (the baseline), ``adabn`` (its copy with target statistics), ``dann``
and ``target_oracle`` (trained on the target labels: the ceiling, a diagnostic), all
tested on the 10,000 rendered test images; plus the share of the source_only-to-oracle
gap each closes, the proxy A-distance 2(1-2err) of a linear SVM telling the domains'
features apart, and a PCA plot of those features.

DANN's details, chosen by measurement (docs/domain_adaptation_experiments.md): each
domain passes through the network on its own (``--dann-batchnorm per_domain``), so
BatchNorm normalises each with its own batch statistics, and the target's statistics are
used at test time; one pass over both (``shared``, as tllib does) gained less and less
reliably. The reversal acts on the 100-unit feature layer, with ``--lambda-max 0.3``.

Expect (seeds 0-2, 2 shared CPU cores, ~3.5 min a run): source_only 41-51% on the
target, adabn 55-62%, dann 64-68% (49-68% of the gap closed), oracle 80-81%.
``--dataset folder:SRC --target-dataset folder:TGT`` adapts between your own folders (the
same class sub-folder names). Saved ``model.keras``: DANN with both outputs ("class",
"domain"); ``import common.layers`` before loading it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from common import data, evaluation, models
from common.cli import InputError, RecipeConfig, knob, make_strategy, run_cli, set_seed
from common.domains import Domains, load_domain_pair
from common.layers import AnnealedLearningRate, GradientReversal

VARIANTS = ("source_only", "adabn", "dann", "target_oracle")


@dataclass
class Config(RecipeConfig):
    """Adapt a classifier from a labelled source domain to an unlabelled target domain (AdaBN, DANN)."""

    dataset: str = knob("fashion_mnist", "Source domain (labelled): fashion_mnist, digits, mnist, folder:<path>, ...")
    target_dataset: str = knob(
        "fashion_mnist_m", "Target domain (its labels unused): fashion_mnist_m, folder:<path>, ..."
    )
    image_size: int = knob(0, "Resize tfds:/folder: images to this side (0: native size, folders 64).")
    source_images: int = knob(10000, "Labelled source training images, drawn with the seed (0: all).", minimum=0)
    target_images: int = knob(10000, "Unlabelled target training images, drawn with the seed (0: all).", minimum=0)
    steps: int = knob(600, "Training steps of every trained variant (source_only, dann, target_oracle).", minimum=10)
    batch_size: int = knob(32, "Images per step from each domain (DANN's step sees twice as many).", minimum=1)
    learning_rate: float = knob(0.01, "Initial SGD learning rate (momentum 0.9), annealed as lr/(1+10p)^0.75.")
    domain_units: int = knob(100, "Hidden units of the domain classifier (Dense - ReLU - Dense logit).", minimum=1)
    dann_batchnorm: str = knob(
        "per_domain",
        "DANN's BatchNorm: per_domain (a pass per domain; target statistics "
        "at test) | shared (one pass over both, as tllib).",
    )
    lambda_max: float = knob(
        0.3, "Final weight of the reversed domain gradient (reached by 2/(1+exp(-10p))-1).", minimum=0
    )
    test_images: int = knob(0, "Evaluate on this many target test images (0: all).", minimum=0)
    projection: str = knob("pca", "2-D projection of the features in the plot: pca | tsne.")

    QUICK = dict(source_images=1500, target_images=1500, steps=100, test_images=1000)


# --- Steps ------------------------------------------------------------------------


def load_domains(config: Config) -> Domains:
    """Source and target (``common.domains``): the same classes, training images drawn with the seed, one shape.

    Both RGB at the target's size; with the default pair (the target renders the source's
    images) no image is drawn into both domains. Bad input is an ``InputError`` here.
    """
    return load_domain_pair(config.dataset, config.target_dataset, config.source_images, config.target_images,
                            config.test_images, image_size=config.image_size, seed=config.seed)  # fmt: skip


def optimizer(config: Config) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(AnnealedLearningRate(config.learning_rate, config.steps), momentum=0.9)


def build_classifier(shape: tuple[int, int, int], num_classes: int, name: str) -> keras.Model:
    """DANN's digit CNN with BatchNorm (``common.models.build_dann_cnn``): base (features) -> MLP head -> logits."""
    return models.build_dann_cnn(shape, num_classes, name=name)


def train_classifier(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, config: Config, strategy):
    """``source_only`` on source labels, or ``target_oracle`` on target labels: same network and steps."""
    with strategy.scope():
        model = build_classifier(x.shape[1:], num_classes, name)
        model.compile(optimizer(config), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])  # fmt: skip
    print(f"[{name}] training on {len(x)} labelled images, {config.steps} steps")
    pipeline = data.make_pipeline(x, y, config.batch_size, shuffle=True, seed=config.seed)
    return model, models.fit_steps(model, pipeline, config.steps)


def build_dann(classifier: keras.Model, config: Config) -> keras.Model:
    """The classifier plus a domain classifier behind a gradient reversal layer, on the same features.

    ``dann``: images -> ``base`` (the classifier's features) -> ``heads``, a sub-model with
    two outputs: ``"class"``, the classifier's own head (logits, N x classes), and
    ``"domain"``, GradientReversal -> Dense(domain_units, ReLU) -> Dense(1) (a logit, > 0
    means target). Every weight of ``classifier`` is shared. This is the model saved as
    ``model.keras``.
    """
    base = classifier.get_layer("base")  # the features: (N, 100)
    features = keras.Input(base.output_shape[1:])
    class_logits = features
    for layer in classifier.layers[2:]:  # the class head: every layer after the input and the base, in order
        class_logits = layer(class_logits)
    reversed_features = GradientReversal(config.lambda_max, schedule_steps=config.steps, name="gradient_reversal")(
        features
    )
    hidden = layers.Dense(config.domain_units, activation="relu", name="domain_dense")(reversed_features)
    domain_logit = layers.Dense(1, name="domain_logit")(hidden)
    heads = keras.Model(features, {"class": class_logits, "domain": domain_logit}, name="heads")
    inputs = keras.Input(classifier.input_shape[1:])
    return keras.Model(inputs, heads(base(inputs)), name="dann")


class DomainAdversarialTrainer(keras.Model):
    """One DANN training step per batch of (source images, source labels) and target images.

    loss = cross-entropy of the class head on the source labels
         + binary cross-entropy of the domain head on all features (source 0, target 1),
    with the domain gradient reversed (times -lambda) where it enters the features. The
    target labels never enter. ``per_domain_batchnorm``: the features of each domain are
    computed in their own forward pass, so BatchNorm normalises each domain with its own
    batch statistics (as DANN implementations that call the network once per domain do);
    otherwise one pass over the concatenated batch (as tllib does). Only for training:
    the model to keep is ``dann`` (the functional model of ``build_dann``).
    """

    def __init__(self, dann: keras.Model, per_domain_batchnorm: bool, **kwargs):
        super().__init__(**kwargs)
        self.dann, self.per_domain_batchnorm = dann, per_domain_batchnorm
        self.features, self.heads = dann.get_layer("base"), dann.get_layer("heads")
        self.class_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.domain_loss = keras.losses.BinaryCrossentropy(from_logits=True)
        self.trackers = {name: keras.metrics.Mean(name) for name in ("class_loss", "domain_loss")}
        self.class_accuracy = keras.metrics.SparseCategoricalAccuracy("class_accuracy")
        self.domain_accuracy = keras.metrics.BinaryAccuracy("domain_accuracy", threshold=0.0)  # on logits

    @property
    def metrics(self):
        return [*self.trackers.values(), self.class_accuracy, self.domain_accuracy]

    def call(self, images, training=False):
        return self.dann(images, training=training)

    def train_step(self, batch):
        import tensorflow as tf

        (x_source, y_source), x_target = batch
        n_source = tf.shape(x_source)[0]
        domain = tf.concat([tf.zeros((n_source, 1)), tf.ones((tf.shape(x_target)[0], 1))], axis=0)
        with tf.GradientTape() as tape:
            if self.per_domain_batchnorm:
                features = tf.concat([self.features(x_source, training=True),
                                      self.features(x_target, training=True)], axis=0)  # fmt: skip
            else:
                features = self.features(tf.concat([x_source, x_target], axis=0), training=True)
            outputs = self.heads(features, training=True)
            class_logits = outputs["class"][:n_source]
            class_loss = self.class_loss(y_source, class_logits)
            domain_loss = self.domain_loss(domain, outputs["domain"])
            loss = class_loss + domain_loss
        variables = self.dann.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.trackers["class_loss"].update_state(class_loss)
        self.trackers["domain_loss"].update_state(domain_loss)
        self.class_accuracy.update_state(y_source, class_logits)
        self.domain_accuracy.update_state(domain, outputs["domain"])
        return {metric.name: metric.result() for metric in self.metrics}


def train_dann(domains: Domains, config: Config, strategy) -> tuple[keras.Model, keras.Model, dict]:
    """DANN: the class loss on source labels + the reversed domain loss, ``config.steps`` steps.

    With ``--dann-batchnorm per_domain`` (the default) the BatchNorm layers then get the
    target's statistics (``models.adapt_batchnorm``), the ones the target batches were
    normalised with during training. Returns the classifier (sharing its weights with the
    DANN model), the DANN model with both outputs, and the training history.
    """
    per_domain = config.dann_batchnorm == "per_domain"
    with strategy.scope():
        classifier = build_classifier(domains.shape, domains.num_classes, "dann_classifier")
        dann = build_dann(classifier, config)
        trainer = DomainAdversarialTrainer(dann, per_domain_batchnorm=per_domain)
        trainer.compile(optimizer(config))
    print(f"[dann] {len(domains.x_source)} labelled source + {len(domains.x_target)} unlabelled target images, "
          f"{config.steps} steps, BatchNorm {config.dann_batchnorm}")  # fmt: skip
    pipeline = data.paired_pipeline(
        domains.x_source, domains.y_source, domains.x_target, config.batch_size, config.seed
    )
    history = models.fit_steps(trainer, pipeline, config.steps)
    if per_domain:
        models.adapt_batchnorm(classifier, domains.x_target)
    return classifier, dann, history


def with_statistics_of(model: keras.Model, images: np.ndarray, config: Config, name: str) -> keras.Model:
    """A copy of ``model`` whose BatchNorm moving statistics are those of ``images`` (AdaBN's step)."""
    copy = build_classifier(images.shape[1:], model.output_shape[-1], name)
    copy.set_weights(model.get_weights())
    models.adapt_batchnorm(copy, images)
    return copy


def adabn(source_only: keras.Model, x_target: np.ndarray, config: Config) -> keras.Model:
    """AdaBN: the source-only network with its BatchNorm statistics recomputed on the target images."""
    model = with_statistics_of(source_only, x_target, config, "adabn")
    print(f"[adabn] recomputed the BatchNorm statistics on {len(x_target)} target images; no training")
    return model


def source_views(trained: dict[str, keras.Model], domains: Domains, config: Config) -> dict[str, keras.Model]:
    """The model each variant applies to *source* images, when that differs from its target model.

    AdaBN and per-domain DANN normalise each domain with its own statistics, so their source
    features (for the A-distance) and source accuracy come from the same weights with the
    source's BatchNorm statistics: the source-only network itself for AdaBN, a copy for DANN.
    """
    views = {"adabn": trained["source_only"]}
    if config.dann_batchnorm == "per_domain":
        views["dann"] = with_statistics_of(trained["dann"], domains.x_source, config, "dann_source_view")
    return views


def evaluate(trained: dict[str, keras.Model], domains: Domains, config: Config) -> tuple[dict, dict]:
    """Every variant's target test accuracy, gap closed and proxy A-distance; and the features behind it.

    The A-distance uses up to 2,000 test images of each domain, features from the ``base`` sub-model
    (source images through ``source_views``). Returns (variants, features): features maps a
    variant to (source features, target features).
    """
    variants, feature_sets = {}, {}
    k = domains.num_classes
    on_source = source_views(trained, domains, config)
    for name, model in trained.items():
        target_features, target_logits = models.features_and_logits(model, domains.x_test)
        source_features, source_logits = models.features_and_logits(on_source.get(name, model), domains.x_source_test)
        predicted = target_logits.argmax(axis=1)
        report = {
            "test_accuracy": evaluation.accuracy(domains.y_test, predicted),
            "per_class_accuracy": evaluation.per_class_accuracy(domains.y_test, predicted, k),
            "confusion_matrix": evaluation.confusion_matrix(domains.y_test, predicted, k).tolist(),
            "source_test_accuracy": evaluation.accuracy(domains.y_source_test, source_logits.argmax(axis=1)),
        }
        feature_sets[name] = (source_features, target_features[:2000])
        report.update(evaluation.proxy_a_distance(*feature_sets[name], seed=config.seed))
        variants[name] = report
    base, ceiling = variants["source_only"]["test_accuracy"], variants["target_oracle"]["test_accuracy"]
    for report in variants.values():
        report["gap_closed"] = evaluation.gap_closed(report["test_accuracy"], base, ceiling)
    return variants, feature_sets


def make_figures(variants: dict, feature_sets: dict, histories: dict, domains: Domains, config: Config) -> dict:
    """Learning curves, the 2-D projection of both domains' features before/after, accuracy per class."""
    return {
        "learning_curves": evaluation.plot_learning_curves(
            {name: {"accuracy": h.get("accuracy", h.get("class_accuracy"))} for name, h in histories.items()},
            title="training accuracy (source labels; target labels for the oracle)",
        ),
        "feature_projection": evaluation.plot_feature_projection(
            {
                f"{name} (A-distance {variants[name]['proxy_a_distance']:.2f})": feature_sets[name]
                for name in ("source_only", "adabn", "dann")
            },
            method=config.projection,
            seed=config.seed,
        ),
        "per_class_accuracy": evaluation.plot_per_class_accuracy(
            {name: variants[name]["per_class_accuracy"] for name in VARIANTS},
            domains.class_names,
            title="target test accuracy per class",
        ),
    }


def check_config(config: Config) -> None:
    if config.dann_batchnorm not in ("per_domain", "shared"):
        raise InputError(f"unknown --dann-batchnorm {config.dann_batchnorm!r}; choose per_domain or shared")
    if config.projection not in ("pca", "tsne"):
        raise InputError(f"unknown --projection {config.projection!r}; choose pca or tsne")


# --- The whole recipe -------------------------------------------------------------


def run(config: Config) -> dict:
    """Train source_only, adapt (adabn, dann), train the oracle; evaluate all on the target test images."""
    config = config.resolved()
    check_config(config)
    start = time.perf_counter()
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)

    domains = load_domains(config)
    run_dir = evaluation.make_run_dir("domain_adaptation", config.out)
    print(f"{len(domains.x_source)} labelled source + {len(domains.x_target)} unlabelled target training images, "
          f"{len(domains.x_test)} target test images, input {domains.shape}\nrun folder: {run_dir}")  # fmt: skip

    trained, histories, seconds = {}, {}, {}
    clock = time.perf_counter()
    trained["source_only"], histories["source_only"] = train_classifier(
        "source_only", domains.x_source, domains.y_source, domains.num_classes, config, strategy
    )
    seconds["source_only"] = time.perf_counter() - clock
    clock = time.perf_counter()
    trained["adabn"] = adabn(trained["source_only"], domains.x_target, config)
    seconds["adabn"] = time.perf_counter() - clock
    clock = time.perf_counter()
    trained["dann"], dann_model, histories["dann"] = train_dann(domains, config, strategy)
    seconds["dann"] = time.perf_counter() - clock
    clock = time.perf_counter()
    trained["target_oracle"], histories["target_oracle"] = train_classifier(
        "target_oracle", domains.x_target, domains.y_target_hidden, domains.num_classes, config, strategy
    )
    seconds["target_oracle"] = time.perf_counter() - clock

    variants, feature_sets = evaluate(trained, domains, config)
    for name, report in variants.items():
        report["train_seconds"] = round(seconds[name], 1)
    record = evaluation.metrics_record(
        "domain_adaptation", f"{config.dataset} -> {config.target_dataset}", "test_accuracy", "source_only", variants,
        time.perf_counter() - start, source_dataset=config.dataset, target_dataset=config.target_dataset,
        source_indices=domains.indices["source"].tolist(), target_indices=domains.indices["target"].tolist(),
    )  # fmt: skip
    figures = make_figures(variants, feature_sets, histories, domains, config)
    # The saved model: DANN with both outputs (``import common.layers`` before loading it).
    evaluation.write_run(run_dir, config, record, histories, figures, model=dann_model)
    print_summary(record)
    print(f"\nwrote {run_dir} in {record['seconds']:.0f} s")
    return record


def print_summary(record: dict) -> None:
    variants = record["variants"]
    print(f"\n{record['dataset']}: accuracy on the target test images")
    print(evaluation.comparison_table(record))
    print("\nvariant         gap closed  proxy A-distance  source test acc")
    for name, report in variants.items():
        print(f"{name:<15} {100 * report['gap_closed']:>9.0f}%  {report['proxy_a_distance']:>16.2f}  "
              f"{100 * report['source_test_accuracy']:>14.1f}%")  # fmt: skip
    dann, adabn_ = variants["dann"], variants["adabn"]
    before, after = variants["source_only"]["proxy_a_distance"], dann["proxy_a_distance"]
    gain = 100 * (dann["test_accuracy"] - variants["source_only"]["test_accuracy"])
    if gain > 0:
        verdict = (
            f"dann gains {gain:.1f} points over source_only, {100 * dann['gap_closed']:.0f}% of the gap to the oracle"
        )
    else:
        verdict = f"dann is {-gain:.1f} points BELOW source_only: adaptation hurt"
    versus = "above" if dann["test_accuracy"] > adabn_["test_accuracy"] else "NOT above"
    print(f"\n{verdict}; {versus} adabn ({100 * (dann['test_accuracy'] - adabn_['test_accuracy']):+.1f} points); "
          f"proxy A-distance {before:.2f} -> {after:.2f}.")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
