"""Two image domains with the same classes, for domain adaptation: loaded, checked, drawn, one input shape.

``load_domain_pair`` is the whole step: it loads a labelled source and a target dataset
(``data.load_dataset``), checks that they name the same classes and hold training and
test images, draws the training images with the seed (``draw_training_images``) and
converts everything to the target's size in RGB (``prepare_domains``), so one network
takes both domains. The result is a ``Domains``: the arrays every variant uses, with the
target's training labels kept apart (``y_target_hidden``) for a target-labels diagnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import data
from common.errors import InputError

# Target datasets that render a source's own images, in the same order: fashion_mnist_m
# is fashion_mnist over colour textures (``data.make_fashion_mnist_m``).
RENDERINGS = {("fashion_mnist", "fashion_mnist_m")}


@dataclass
class Domains:
    """The arrays every variant uses, all RGB at the target's image size (float32 in [0, 1])."""

    x_source: np.ndarray  # labelled source training images
    y_source: np.ndarray
    x_target: np.ndarray  # unlabelled target training images
    y_target_hidden: np.ndarray  # their labels: read by a target-labels diagnostic only
    x_test: np.ndarray  # target test images: every variant's accuracy
    y_test: np.ndarray
    x_source_test: np.ndarray  # source test images: the A-distance and the source accuracy
    y_source_test: np.ndarray
    class_names: list[str]
    indices: dict[str, np.ndarray]  # {"source", "target"}: the drawn training images' indices

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_target.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_domain_pair(source_name: str, target_name: str, source_images: int = 0, target_images: int = 0,
                     test_images: int = 0, image_size: int | None = None, seed: int = 0) -> Domains:  # fmt: skip
    """Load, check, draw and shape a source and a target domain (``data.load_dataset`` names).

    ``source_images`` / ``target_images``: training images drawn from each, with ``seed``
    (0: all); disjoint when the pair is in ``RENDERINGS``. ``test_images``: target test
    images kept (0: all). ``image_size`` resizes tfds:/folder: images (0 or None: native
    size, folders 64). Raises ``InputError`` (``MissingInputError`` for a missing folder) for an
    unknown name, an unreadable folder, different class names, or a domain without
    training or test images; all before any training.
    """
    source = data.load_dataset(source_name, image_size=image_size or None, seed=seed)
    target = data.load_dataset(target_name, image_size=image_size or None, seed=seed)
    data.check_same_classes(source, target)
    for role, dataset in (("source", source), ("target", target)):
        if len(dataset.x_train) == 0 or len(dataset.x_test) == 0:
            raise InputError(f"{role} dataset {dataset.name!r} has {len(dataset.x_train)} training and "
                             f"{len(dataset.x_test)} test images; it needs both")  # fmt: skip
    disjoint = (source_name, target_name) in RENDERINGS
    return prepare_domains(source, target, source_images, target_images, test_images, seed, disjoint=disjoint)


def draw_training_images(source: data.Dataset, target: data.Dataset, source_images: int, target_images: int,
                         seed: int, disjoint: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Sorted indices into ``source.x_train`` and ``target.x_train``: ``{"source": ..., "target": ...}``.

    Up to ``source_images`` / ``target_images`` of each (0: all), drawn with ``seed``.
    ``disjoint``: the target renders the source's own images in the same order
    (``RENDERINGS``), so the two draws come from one permutation and share no index: no
    image appears in both domains (each gets at most half when both cannot fit).
    """
    rng = np.random.default_rng(seed)
    n_source, n_target = len(source.x_train), len(target.x_train)
    want_source = min(source_images or n_source, n_source)
    want_target = min(target_images or n_target, n_target)
    if disjoint:
        order = rng.permutation(n_source)
        want_source = min(want_source, n_source // 2) if want_source + want_target > n_source else want_source
        return {"source": np.sort(order[:want_source]),
                "target": np.sort(order[want_source : want_source + want_target])}  # fmt: skip
    return {"source": np.sort(rng.choice(n_source, want_source, replace=False)),
            "target": np.sort(rng.choice(n_target, want_target, replace=False))}  # fmt: skip


def prepare_domains(source: data.Dataset, target: data.Dataset, source_images: int = 0, target_images: int = 0,
                    test_images: int = 0, seed: int = 0, disjoint: bool = False) -> Domains:  # fmt: skip
    """Draw the training images (``draw_training_images``) and put both domains into one input shape.

    One network takes both domains: RGB at the target's size; grey images (Fashion-MNIST)
    get three equal channels, as DANN implementations feed MNIST next to MNIST-M
    (``data.to_input_shape``). ``test_images`` target test images are kept, drawn with
    ``seed`` (0: all); up to 2,000 source test images (``test_images`` if fewer) measure
    the A-distance and the accuracy left on the source.
    """
    shape = (*target.input_shape[:2], 3)
    drawn = draw_training_images(source, target, source_images, target_images, seed, disjoint)
    rng = np.random.default_rng(seed)
    test = np.arange(len(target.x_test))
    if test_images:
        test = np.sort(rng.permutation(len(test))[:test_images])
    source_test = np.sort(rng.permutation(len(source.x_test))[: min(test_images or 2000, 2000)])
    return Domains(
        x_source=data.to_input_shape(source.x_train[drawn["source"]], shape),
        y_source=source.y_train[drawn["source"]],
        x_target=data.to_input_shape(target.x_train[drawn["target"]], shape),
        y_target_hidden=target.y_train[drawn["target"]],
        x_test=data.to_input_shape(target.x_test[test], shape),
        y_test=target.y_test[test],
        x_source_test=data.to_input_shape(source.x_test[source_test], shape),
        y_source_test=source.y_test[source_test],
        class_names=list(target.class_names),
        indices=drawn,
    )
