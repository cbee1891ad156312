"""Choose what to transfer from, before training: transferability scores against the truth.

Which pretrained model, or which layer of it, should a new task start from, and will it help
at all? A source can also hurt (*negative transfer*: below training from scratch). LogME
(You et al. 2021), LEEP (Nguyen et al. 2020), NCE (Tran et al. 2019) and H-score (Bao et al.
2019), in ``common/transferability.py``, answer from one pass of the labelled target images,
without training. A score is worth what its ranking agrees with the accuracy actually
reached, so this recipe measures that too. Use it before fine-tuning several candidates, to
pick the layer to cut a network at, or to spot a source that will not help.

What the default run does (``python -m recipes.choose_source``):

1. Target: Fashion-MNIST classes 5-9, 20 labelled images per class (seeded); 5,000 test images.
2. Candidates (``--candidates``, built offline, cached in ``$RECIPES_CACHE_DIR``): the CNN
   pretrained on classes 0-4 cut after each block (``source-0-4-block1|2|3``); the same
   pretrained with the labels shuffled, cut after block 3 where it memorised noise
   (``source-0-4-shuffled-labels``; ``...-shuffled-labels-block1|2`` stay generic); the same
   pretrained on scikit-learn's digits at 28x28 (``digits``); the same untrained
   (``untrained``); EfficientNet-Lite0 with its ImageNet weights (``efficientnet_lite0``, offline,
   at ``--image-size``, default 96: the out-of-domain source). Add a ``keras.applications`` name
   (``--weights``) or a ``.keras`` path.
3. Scores: the features of the 100 labelled images once per candidate, then every score,
   timed. LEEP and NCE need the source classifier's predictions: a candidate without one
   (``untrained``, a backbone without its top) gets none (null), left out of their correlations.
4. Ground truth: a head trained on each candidate's cached features, as
   ``recipes.feature_extraction`` does (``--fine-tune``: then the top of the base unfrozen, as
   ``recipes.fine_tune``); ``scratch``, the same network trained end to end, is the baseline.
5. Judgement: each score's weighted Kendall tau (``scipy.stats.weightedtau``) and Spearman
   correlation with the accuracies, its pick and how far below the best that pick is; the
   time to score every candidate against the time to train their heads.

Measured over seeds 0-2 (``--seed S``, ``make results``, two CPU cores shared with other
jobs): scratch 88.5-90.9%; the best candidate is the real source cut at block 2 on seeds 0 and
1, EfficientNet-Lite0 (ImageNet) on seed 2, and LogME picks the best every time, weighted tau
0.49-0.76 (mean 0.65; H-score 0.32, LEEP and NCE 0.11: they pick Lite0, whose 1,000 confident
ImageNet classes give it the highest LEEP, every time). The shuffled-label source ends 10-14
points below scratch, ranked last by all four scores. Scoring all seven takes 0.9-1.6 s,
8-10% of training their heads; 60-89 s with the bases cached
(``docs/choose_source_experiments.md`` has every number and command).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from common import bases, data, efficientnet_lite, evaluation, models, transferability
from common.cli import InputError, MissingInputError, RecipeConfig, knob, make_strategy, run_cli, set_seed

SOURCE_CUT = "block2"  # the cut of the digits and untrained candidates, and of scratch
SHUFFLED_CUT = "block3"  # the cut of source-<classes>-shuffled-labels


@dataclass
class Config(RecipeConfig):
    """Score candidate bases (LogME, LEEP, NCE, H-score), then check the scores against the accuracy reached."""

    dataset: str = knob("fashion_mnist", "Dataset: fashion_mnist, digits, mnist, cifar10, tfds:<name>, folder:<path>.")
    image_size: int = knob(0, "Image side: resizes tfds:/folder: images and is a backbone's input (0: native; 96).")
    source_classes: str = knob("0-4", "Classes the source CNN candidates are pretrained on, e.g. '0-4'.")
    target_classes: str = knob("5-9", "Classes of the target task; must not overlap the source classes.")
    labels_per_class: int = knob(20, "Labelled target images per class, for the scores and the heads (at least 2).")
    candidates: str = knob("default", "Comma list: 'default' (the seven built-in candidates), source-<classes>-block1|2|3, source-<classes>-shuffled-labels[-block1|2|3], digits, untrained, a keras.applications name, a .keras path. A .keras file with custom layers: RECIPES_IMPORT=module1,module2 imports their modules first; one with Lambda layers needs RECIPES_SAFE_MODE=0 (runs the file's code: trusted files only).")  # fmt: skip
    scores: str = knob("logme,leep,nce,hscore", "Scores to compute: logme, leep, nce, hscore.")
    weights: str = knob("", "Weights of keras.applications candidates: imagenet (default, online), none, or a file.")
    source_width: int = knob(16, "Width (first conv filters) of the source CNNs.")
    source_epochs: int = knob(2, "Pretraining epochs of the source CNNs on the source classes (shuffled or not).")
    source_images: int = knob(0, "Source training images for the source CNNs (0: all).")
    digits_epochs: int = knob(
        15, "Pretraining epochs (batches of 32) of the CNN on scikit-learn's digits (1,437 images)."
    )
    epochs: int = knob(100, "Epochs of each head (and of the from-scratch baseline).")
    batch_size: int = knob(32, "Batch size.")
    learning_rate: float = knob(1e-3, "Adam learning rate of the heads and of the baseline.")
    dropout: float = knob(0.2, "Dropout rate before each head's Dense layer.")
    fine_tune: bool = knob(
        False, "Also fine-tune each candidate (top layers unfrozen, BatchNorm frozen) as ground truth."
    )
    fine_tune_layers: int = knob(4, "--fine-tune: layers with weights unfrozen at the top of each base.")
    fine_tune_epochs: int = knob(20, "--fine-tune: epochs after the head.")
    fine_tune_learning_rate: float = knob(1e-4, "--fine-tune: Adam learning rate (10-100x lower than the head's).")
    test_images: int = knob(0, "Evaluate on this many test images, stratified (0: all).")

    QUICK = dict(source_epochs=1, source_images=1000, digits_epochs=1, epochs=3, fine_tune_epochs=1, test_images=250)


@dataclass(eq=False)
class Candidate:
    """A named base to score: its features come from ``base``; ``classifier`` predicts the source classes."""

    name: str
    kind: str  # source | shuffled-labels | digits | untrained | backbone | keras-file
    spec: str = ""
    cut: str = SOURCE_CUT
    base: bases.Base | None = None
    classifier: keras.Model | None = None
    figures: dict = field(default_factory=dict)  # scores, accuracies and seconds, filled by the steps


# --- Steps ------------------------------------------------------------------------


def parse_candidates(config: Config) -> list[Candidate]:
    """``--candidates`` -> named candidates, checked (names, duplicates, backbone settings) before any work."""
    tag = config.source_classes.replace(" ", "").replace(",", "+")  # in candidate names: '0,2,4' -> '0+2+4'
    source_names = re.compile(rf"source-{re.escape(tag)}-(?:(shuffled-labels)(?:-(block[123]))?|(block[123]))")
    tokens = [t.strip() for t in config.candidates.split(",") if t.strip()]
    defaults = [f"source-{tag}-block1", f"source-{tag}-block2", f"source-{tag}-block3",
                f"source-{tag}-shuffled-labels", "digits", "untrained", efficientnet_lite.NAME]  # fmt: skip
    candidates, seen = [], {}
    for token in [name for t in tokens for name in (defaults if t == "default" else [t])]:
        match = source_names.fullmatch(token)
        if token == "scratch":
            raise InputError("'scratch' is the baseline, always trained; remove it from --candidates")
        if match:
            shuffled, shuffled_cut, cut = match.groups()
            # The shuffled-label source's top block holds what it learned; lower blocks stay generic.
            kind = "shuffled-labels" if shuffled else "source"
            candidate = Candidate(token, kind, cut=cut or shuffled_cut or SHUFFLED_CUT)
        elif token in ("digits", "untrained"):
            candidate = Candidate(token, token)
        elif token == efficientnet_lite.NAME:  # ImageNet, offline: the out-of-domain candidate
            bases.check_base_args(token, "", config.image_size)
            candidate = Candidate(token, "imagenet", spec=token)
        elif token in models.BACKBONES:
            bases.check_base_args(token, config.weights, config.image_size)
            candidate = Candidate(token, "backbone", spec=token)
        elif token.endswith(".keras") or Path(token).is_file():
            if not Path(token).is_file():
                raise MissingInputError(f"candidate {token!r}: no such .keras file")
            candidate = Candidate(Path(token).stem, "keras-file", spec=token)
        else:
            raise InputError(
                f"unknown candidate {token!r}; choose from default, {', '.join(defaults)}, "
                f"source-{tag}-shuffled-labels-block1|2|3 (for --source-classes {config.source_classes}), "
                f"a keras.applications name ({', '.join(models.BACKBONES)}) or a .keras path"
            )
        if candidate.name in seen:
            raise InputError(f"duplicate candidate name {candidate.name!r} ({seen[candidate.name]!r} and {token!r})")
        seen[candidate.name] = token
        candidates.append(candidate)
    if not candidates:
        raise InputError("--candidates names no candidate")
    return candidates


def check_config(config: Config) -> tuple[list[str], list[Candidate]]:
    """Every flag that can be checked without data: score names, label budget, candidates."""
    scores = transferability.parse_score_names(config.scores)
    if config.labels_per_class < 2:
        raise InputError(
            f"--labels-per-class {config.labels_per_class}: the scores need at least 2 labelled images per class"
        )
    return scores, parse_candidates(config)


def source_settings(config: Config, **changes) -> bases.SourceSettings:
    # Pretrained with seed 0 whatever --seed is, so that every seed reuses the cached bases.
    settings = bases.SourceSettings(width=config.source_width, epochs=config.source_epochs,
                                    max_images=config.source_images)  # fmt: skip
    return replace(settings, **changes)


def build_candidate(candidate: Candidate, config: Config, source: data.Dataset, target: data.Dataset) -> Candidate:
    """The candidate's base (pretrained and cached where it has to be) and its source classifier, if any."""
    if candidate.kind in ("source", "shuffled-labels"):
        settings = source_settings(config, shuffle_labels=candidate.kind == "shuffled-labels")
        base = bases.source_cnn_base(source, settings, cut=candidate.cut)
    elif candidate.kind == "digits":
        # Batches of 32: 675 steps, enough for the BatchNorm moving statistics to settle (10 epochs of 64: 20% test).
        settings = source_settings(config, epochs=config.digits_epochs, max_images=0, batch_size=32)
        digits = data.with_input_shape(data.load_dataset("digits", seed=0), target.input_shape)
        base = bases.source_cnn_base(digits, settings, cut=candidate.cut)
    elif candidate.kind == "untrained":
        base = bases.untrained_source_cnn(target.input_shape, source.num_classes, config.source_width, candidate.cut)
    else:
        try:
            weights = config.weights if candidate.kind == "backbone" else ""  # --weights is for backbones only
            base = bases.load_base(candidate.spec, weights, config.image_size, flag="--candidates")
        except InputError as error:
            raise InputError(f"candidate {candidate.name!r}: {error}") from error
    return replace(candidate, base=base, classifier=bases.source_classifier(base))


def score_candidate(candidate: Candidate, features: np.ndarray, x: np.ndarray, y: np.ndarray,
                    score_names: list[str]) -> tuple[dict, dict]:  # fmt: skip
    """Every score of one candidate, each timed; returns ({score: value}, {step: seconds}).

    LEEP and NCE first need the source classifier's predictions on the labelled images
    (``source_predictions`` seconds, counted in the scoring time).
    """
    probs, start = None, time.perf_counter()
    if candidate.classifier is not None and any(transferability.SCORES[s] == "source_probs" for s in score_names):
        probs = bases.source_probabilities(candidate.classifier, candidate.base.prepare(x))
    predictions = {"source_predictions": time.perf_counter() - start} if probs is not None else {}
    values, seconds = transferability.compute_timed(score_names, y, features=features, source_probs=probs)
    return values, predictions | seconds


def assemble(base: bases.Base, head: keras.Model, num_classes: int, config: Config) -> keras.Model:
    """The frozen base (a copy) and its trained head as one model taking (prepared) images."""
    return models.head_on_base(bases.fresh_copy(base).model, head, num_classes, config.dropout, config.learning_rate,
                               name="choose_source")  # fmt: skip


def fine_tune(base: bases.Base, head: keras.Model, x: np.ndarray, y: np.ndarray, x_test: np.ndarray,
              y_test: np.ndarray, num_classes: int, config: Config) -> tuple[float, dict, float]:  # fmt: skip
    """``--fine-tune``: after the head, the top layers of the base unfrozen (BatchNorm frozen) at a low rate."""
    set_seed(config.seed)
    model = assemble(base, head, num_classes, config)
    available = models.count_weighted_layers(models.inner_base(model))
    models.unfreeze_base_top(model, min(config.fine_tune_layers, available), config.fine_tune_learning_rate)
    history, seconds = models.fit_timed(model, base.prepare(x), y, config.fine_tune_epochs, config.batch_size,
                                        config.seed)  # fmt: skip
    accuracy = evaluation.accuracy(y_test, evaluation.predict_labels(model, base.prepare(x_test)))
    return accuracy, history, seconds


def train_scratch(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, source: data.Dataset,
                  target: data.Dataset, config: Config) -> tuple[float, dict, float]:  # fmt: skip
    """The baseline: the source CNN's architecture (cut at block 2), random weights, trained end to end."""
    architecture = bases.untrained_source_cnn(target.input_shape, source.num_classes, config.source_width, SOURCE_CUT)
    set_seed(config.seed)
    model = models.compile_classifier(bases.scratch_twin(architecture, target.num_classes, config.dropout),
                                      config.learning_rate)  # fmt: skip
    history, seconds = models.fit_timed(model, x, y, config.epochs, config.batch_size, config.seed)
    return evaluation.accuracy(y_test, evaluation.predict_labels(model, x_test)), history, seconds


def judge(candidates: list[Candidate], score_names: list[str], truth: str = "test_accuracy") -> dict:
    """Per score: rank correlations with the ``truth`` accuracies, its pick and its gap to the best (None: undefined)."""
    values = {score: [c.figures[score] for c in candidates] for score in score_names}
    return transferability.judge([c.name for c in candidates], values, [c.figures[truth] for c in candidates])


def plot_scores(candidates: list[Candidate], score_names: list[str], scratch_accuracy: float,
                verdicts: dict | None = None) -> dict:  # fmt: skip
    """One scatter plot per score: score against test accuracy (%), one labelled point per scored candidate."""
    scores = {score: [c.figures[score] for c in candidates] for score in score_names}
    accuracies = [100 * c.figures["test_accuracy"] for c in candidates]
    return transferability.plot_against_truth([c.name for c in candidates], scores, accuracies, verdicts,
                                              reference=("scratch", 100 * scratch_accuracy))  # fmt: skip


def score_table(candidates: list[Candidate], score_names: list[str], scratch_accuracy: float) -> str:
    """Candidate, each score, test accuracy and gain over scratch (points), one row each."""
    rows = [("candidate", *score_names, "test acc", "vs scratch")]
    for c in candidates:
        shown = [f"{c.figures[s]:.3f}" if math.isfinite(c.figures[s]) else "n/a" for s in score_names]
        accuracy = c.figures["test_accuracy"]
        rows.append((c.name, *shown, f"{100 * accuracy:.1f}%", f"{100 * (accuracy - scratch_accuracy):+.1f}"))
    rows.append(("scratch", *["-"] * len(score_names), f"{100 * scratch_accuracy:.1f}%", "(baseline)"))
    return evaluation.text_table(rows)


def score_all(candidates: list[Candidate], x: np.ndarray, y: np.ndarray, score_names: list[str]) -> None:
    """Step 1: the features of the labelled images once per candidate (kept for its head), then every score."""
    for c in candidates:
        features, feature_seconds = bases.extract_features(c.base, x)
        values, seconds = score_candidate(c, features, x, y, score_names)
        c.figures = dict(values, features=features, feature_seconds=feature_seconds, score_seconds=seconds)
        shown = ", ".join(f"{s} {v:.3f}" for s, v in values.items())
        print(f"  {c.name}: {features.shape[1]} features; {shown}")


def ground_truth(candidates: list[Candidate], x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int, config: Config) -> dict:  # fmt: skip
    """Step 2: each candidate used for real: a head on its cached features (and ``--fine-tune``); histories."""
    histories = {}
    for c in candidates:
        set_seed(config.seed)  # each head's initialisation does not depend on the candidates before it
        head, histories[c.name], head_seconds = models.train_head_on_features(
            c.figures["features"], y, num_classes, config.dropout, config.learning_rate, config.epochs,
            config.batch_size, config.seed)  # fmt: skip
        test_features, _ = bases.extract_features(c.base, x_test)
        logits = head(test_features, training=False)  # one call: no predict function traced per head
        accuracy = evaluation.accuracy(y_test, np.argmax(logits, axis=1))
        c.figures |= {"head": head, "test_accuracy": accuracy, "head_seconds": head_seconds}
        shown = f"  {c.name}: test accuracy {100 * c.figures['test_accuracy']:.1f}% (head {head_seconds:.1f} s)"
        if config.fine_tune:
            tuned, histories[f"{c.name}-fine-tune"], seconds = fine_tune(
                c.base, head, x, y, x_test, y_test, num_classes, config
            )
            c.figures |= {"fine_tune_accuracy": tuned, "fine_tune_seconds": seconds}
            shown += f", fine-tuned {100 * tuned:.1f}% ({seconds:.1f} s)"
        print(shown)
    return histories


def negative_transfer(candidates: list[Candidate], scratch_accuracy: float, verdicts: dict) -> list[str]:
    """In words: every candidate below scratch, and where each score ranked it among the candidates."""
    lines = []
    by_name = {c.name: c for c in candidates}
    for c in candidates:
        gain = round(100 * (c.figures["test_accuracy"] - scratch_accuracy), 1)
        related = by_name.get(f"{c.name.split('-shuffled-labels')[0]}-{c.cut}")  # the same source, true labels
        if c.kind == "shuffled-labels" and related is not None:
            below = 100 * (related.figures["test_accuracy"] - c.figures["test_accuracy"])
            lines.append(f"{c.name} ends {below:.1f} points below {related.name}, the same network trained on the "
                         "true labels")  # fmt: skip
        if gain >= 0:
            continue
        ranks = []
        for score in verdicts:
            scored = [d for d in candidates if math.isfinite(d.figures[score])]
            if any(d is c for d in scored):
                place = 1 + sum(d.figures[score] > c.figures[score] for d in scored)
                ranks.append(f"{score} {place}/{len(scored)}")
        ranked = f"; ranked {', '.join(ranks)}" if ranks else ""
        lines.append(f"negative transfer: {c.name} ends {-gain:.1f} points below training from scratch{ranked}")
    return lines


def build_record(config: Config, candidates: list[Candidate], score_names: list[str], scratch: dict, verdicts: dict,
                 fine_tune_verdicts: dict | None, seconds: float, test_images: int) -> dict:  # fmt: skip
    """metrics.json: variants = scratch and the candidates, each with its scores, accuracy and times."""
    variants = {"scratch": {**{s: None for s in score_names}, **scratch}}
    for c in candidates:
        f = c.figures
        variants[c.name] = {
            **{s: (f[s] if math.isfinite(f[s]) else None) for s in score_names},
            "test_accuracy": f["test_accuracy"],
            **({"fine_tune_accuracy": f["fine_tune_accuracy"]} if config.fine_tune else {}),
            "kind": c.kind, "base": c.base.spec, "cut": c.base.info.get("cut"),
            "feature_dim": int(f["features"].shape[1]), "source_classifier": c.classifier is not None,
            "source_test_accuracy": c.base.info.get("source_test_accuracy"),
            "feature_seconds": round(f["feature_seconds"], 4),
            "score_seconds": {k: round(v, 4) for k, v in f["score_seconds"].items()},
            "head_seconds": round(f["head_seconds"], 2),
        }  # fmt: skip
    scoring = sum(sum(c.figures["score_seconds"].values()) for c in candidates)
    heads = sum(c.figures["head_seconds"] for c in candidates)
    return evaluation.metrics_record(
        "choose_source", config.dataset, "test_accuracy", "scratch", variants, seconds,
        scores={s: transferability.PAPERS[s] for s in score_names},
        correlations=verdicts, fine_tune_correlations=fine_tune_verdicts,
        seconds_scoring=round(scoring, 3), seconds_heads=round(heads, 2), scoring_over_heads=round(scoring / heads, 4),
        seconds_features=round(sum(c.figures["feature_seconds"] for c in candidates), 3),
        labels_per_class=config.labels_per_class, test_images=test_images,
    )  # fmt: skip


# --- The whole recipe -------------------------------------------------------------


def run(config: Config) -> dict:
    """Candidates, their scores, their ground-truth accuracies, and how well each score ranked them."""
    config = config.resolved()
    start = time.perf_counter()
    score_names, candidates = check_config(config)
    set_seed(config.seed)
    strategy = make_strategy(config.strategy)

    source, target = data.load_tasks(config.dataset, config.source_classes, config.target_classes, config.image_size,
                                     config.seed)  # fmt: skip
    x, y, x_test, y_test = data.label_budget(target, config.labels_per_class, config.seed, config.test_images)
    # Candidates the user brought first: one that cannot take the images fails before any pretraining.
    for i in sorted(range(len(candidates)), key=lambda i: candidates[i].kind not in ("backbone", "keras-file")):
        candidates[i] = build_candidate(candidates[i], config, source, target)
        bases.check_takes_images(candidates[i].base, x, f"candidate {candidates[i].name!r}")
    run_dir = evaluation.make_run_dir("choose_source", config.out)
    print(f"source task: {source}\ntarget task: {target}\nrun folder: {run_dir}")

    print("scores (one pass of the labelled images through each candidate):")
    score_all(candidates, x, y, score_names)
    print("ground truth (each candidate used for real):")
    with strategy.scope():
        histories = ground_truth(candidates, x, y, x_test, y_test, target.num_classes, config)
        scratch_accuracy, histories["scratch"], scratch_seconds = train_scratch(
            x, y, x_test, y_test, source, target, config
        )
    print(f"  scratch: test accuracy {100 * scratch_accuracy:.1f}% ({scratch_seconds:.1f} s)")

    verdicts = judge(candidates, score_names)
    fine_tune_verdicts = judge(candidates, score_names, "fine_tune_accuracy") if config.fine_tune else None
    scratch = {"test_accuracy": scratch_accuracy, "train_seconds": round(scratch_seconds, 2)}
    record = build_record(config, candidates, score_names, scratch, verdicts, fine_tune_verdicts,
                          time.perf_counter() - start, len(x_test))  # fmt: skip

    # The model to keep: the first score's pick (of tied picks, the first), its base and head.
    pick = (verdicts[score_names[0]]["pick"] or candidates[0].name).split("=")[0]
    kept = next(c for c in candidates if c.name == pick)
    model = assemble(kept.base, kept.figures["head"], target.num_classes, config)
    figures = plot_scores(candidates, score_names, scratch_accuracy, verdicts)
    evaluation.write_run(run_dir, config, record, histories, figures, model=model)

    print(f"\ntarget task, {config.labels_per_class} labels per class, {len(x_test)} test images:")
    print(score_table(candidates, score_names, scratch_accuracy))
    print("\nhow well each score ranks the candidates (test accuracy of a head on their features):")
    print(transferability.verdict_table(verdicts))
    if fine_tune_verdicts:
        print("\nthe same against the accuracy after fine-tuning:")
        print(transferability.verdict_table(fine_tune_verdicts))
    print(f"\nscoring every candidate took {record['seconds_scoring']:.2f} s, training their heads "
          f"{record['seconds_heads']:.1f} s ({record['scoring_over_heads']:.3f} of it); the features of the "
          f"labelled images, which both use, {record['seconds_features']:.2f} s")  # fmt: skip
    print("\n".join(negative_transfer(candidates, scratch_accuracy, verdicts)))
    print(f"model.keras: {kept.name} (the pick of {score_names[0]}) with its head")
    print(f"wrote {run_dir} in {record['seconds']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_cli(Config, run, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
