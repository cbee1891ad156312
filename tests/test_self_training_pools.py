"""Self-training on pools that are not like the default: a skewed class mix, foreign images.

The pools are Fashion-MNIST images of classes 5-7 (sandal, shirt, sneaker; 10 labels per
class) mixed 70 / 25 / 5, the same plus 20% bags (class 8, a class the labels never show), and
a clean balanced pool. Features come from the cached default source-cnn base, so the accuracy
checks run the recipe's feature-space steps (foreign count, guard, curriculum) directly.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from common import semi
from recipes import self_training as st
from tests.test_self_training import save_images

MIXES = {
    "clean": ((0, 400), (1, 400), (2, 400)),
    "skewed": ((0, 840), (1, 300), (2, 60)),
    "contaminated": ((0, 840), (1, 300), (2, 60), (3, 300)),  # class 3 (bags): 20% of the pool
}


@pytest.fixture(scope="module")
def fashion_features():
    """Features of Fashion-MNIST classes 5-8 (re-indexed 0-3) through the cached default base."""
    config = st.Config().resolved()
    source, target = st.load_tasks(config)
    base = st.load_pretrained_base(config, source, target)
    train, test = target.y_train < 4, target.y_test < 3
    return {
        "train": st.extract_features(base, target.x_train[train]), "y_train": target.y_train[train],
        "test": st.extract_features(base, target.x_test[test]), "y_test": target.y_test[test],
    }  # fmt: skip


def make_pool(y: np.ndarray, mix, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 labeled indices per class 0-2 and a pool of ``mix`` ((class, count), ...) drawn from the rest."""
    rng = np.random.default_rng(seed)
    labeled = np.concatenate([rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(3)])
    rest = np.setdiff1d(np.arange(len(y)), labeled)
    return labeled, np.concatenate([rng.choice(rest[y[rest] == c], n, replace=False) for c, n in mix])


RUNS: dict = {}  # the tests share runs with the same pool, seed and options (the suite's time)


def self_train(features: dict, mix, seed: int, **options) -> dict:
    """transfer's and the guarded self-training's test accuracy and minority (class 2) recall."""
    key = (id(features), mix, repr(st.Config(seed=seed, **options)))
    if key not in RUNS:
        RUNS[key] = _self_train(features, mix, seed, **options)
    return RUNS[key]


def _self_train(features: dict, mix, seed: int, **options) -> dict:
    config = st.Config(seed=seed, **options)
    labeled, pool = make_pool(features["y_train"], mix, seed)
    y_labeled, hidden = features["y_train"][labeled], features["y_train"][pool]
    split = semi.Split(None, y_labeled, np.zeros(len(pool)), np.where(hidden < 3, hidden, -1), None,
                       features["y_test"], labeled, np.arange(len(pool)))  # fmt: skip
    feats = {"labeled": features["train"][labeled], "pool": features["train"][pool], "test": features["test"]}
    transfer = st.fit_head(feats["labeled"], y_labeled, config)
    with contextlib.redirect_stdout(io.StringIO()):
        head, rounds, *_ = st.guarded_curriculum(feats, split, 3, config)
    kept = transfer if head is None else head
    x, y = features["test"], features["y_test"]
    return {"transfer": transfer.score(x, y), "self_training": kept.score(x, y), "rounds": rounds,
            "minority_transfer": np.mean(transfer.predict(x[y == 2]) == 2),
            "minority": np.mean(kept.predict(x[y == 2]) == 2)}  # fmt: skip


@pytest.mark.parametrize("labeler", st.LABELERS)
@pytest.mark.parametrize("pool", ["skewed", "contaminated"])
def test_a_skewed_or_contaminated_pool_costs_at_most_one_point_on_average(fashion_features, pool, labeler):
    runs = [self_train(fashion_features, MIXES[pool], seed, labeler=labeler) for seed in range(3)]
    gains = [100 * (r["self_training"] - r["transfer"]) for r in runs]
    print(pool, labeler, "gains over transfer:", [f"{g:+.1f}" for g in gains])
    # measured (propagation / confidence): skewed +0.96 / +0.10, contaminated +0.07 / -0.10; one seed -2.0
    # (before --skewed-max-share 0.8: skewed -0.96 / -0.66, contaminated -0.03 / 0.0; one seed -3.4)
    assert np.mean(gains) >= -1.0


def test_the_estimated_class_mix_follows_a_skewed_pool_and_propagation_gains_on_a_clean_one(fashion_features):
    skewed = self_train(fashion_features, MIXES["skewed"], 0)
    first = skewed["rounds"][0]
    assert first["prior_estimate"][0] > 0.5 and first["prior_estimate"][2] < 0.15  # true mix 0.70 / 0.25 / 0.05
    assert first["prior_error"] < 0.15 and first["balanced_to"] == first["prior_estimate"]  # auto: skewed, so used
    clean = [self_train(fashion_features, MIXES["clean"], seed) for seed in range(3)]
    assert clean[0]["rounds"][0]["balanced_to"] == pytest.approx([1 / 3] * 3)  # auto: near the labels' mix, kept
    assert np.mean([r["self_training"] - r["transfer"] for r in clean]) > 0.01


def test_uniform_balancing_is_what_breaks_on_a_skewed_pool(fashion_features):
    """The failure the estimated mix fixes, measured: balancing to thirds loses many points."""
    run = self_train(fashion_features, MIXES["skewed"], 0, balance="uniform", guard=False)
    assert run["rounds"][-1]["test_accuracy"] < run["transfer"] - 0.05


def test_a_user_folder_pool_gives_strict_json_and_prints_the_checks(tmp_path, capsys):
    """A skewed, contaminated pool of PNG files (no labels): the run warns, guards, writes strict JSON."""
    _, target = st.load_tasks(st.Config(target_classes="5-8").resolved())
    config = st.Config(target_classes="5-7").resolved()
    labeled = st.split_target(st.load_tasks(config)[1], config).x_labeled  # the run's own labels stay out
    candidates = ~np.isin(target.x_train.reshape(len(target.x_train), -1).sum(1), labeled.reshape(30, -1).sum(1))
    _, pool = make_pool(np.where(candidates, target.y_train, -1), ((0, 140), (1, 50), (2, 10), (3, 50)), 0)
    save_images(tmp_path / "pool", target.x_train[pool])
    record = st.main(["--target-classes", "5-7", "--pool", f"folder:{tmp_path / 'pool'}", "--fractions", "0.5,1.0",
                      "--test-images", "600", "--scratch-epochs", "5", "--out", str(tmp_path / "run")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "look unlike every labeled class" in printed and "guard: on held-out labels" in printed
    assert "kept per class:" in printed and "precision unknown" in printed
    text = (tmp_path / "run" / "metrics.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads(text, parse_constant=refuse)
    rounds = written["variants"]["self_training"]["rounds"]
    assert rounds[0]["pseudo_label_precision"] is None and "no labels" in rounds[0]["precision_unknown"]
    assert written["checks"]["kept"] in ("transfer", "self_training") and written["checks"]["pool_used"] == 250
    guard = written["checks"]["guard"]  # what the guard promises: self-training kept only if it won the check
    won = guard["self_training"] > guard["transfer"] and guard["worst_class_loss"] <= 1  # a skewed pool's rule
    assert written["checks"]["skewed_estimate"] and (written["checks"]["kept"] == "self_training") == won, printed
    gain = record["variants"]["self_training"]["test_accuracy"] - record["variants"]["transfer"]["test_accuracy"]
    # One seed of 250 pool images: measured -2.2 (13 of 600 test images; guard 0.933 vs 0.867), and at
    # least -1 with --skewed-max-share 1.0; the 3-seed pools above are the accuracy check.
    assert gain >= -0.03, printed


def test_em_recovers_a_shifted_class_mix():
    """Three 1-D Gaussian classes; posteriors of the Bayes classifier for equal priors; a 70/25/5 pool."""
    rng = np.random.default_rng(0)
    true_prior, means = np.array([0.7, 0.25, 0.05]), np.array([-2.0, 0.0, 2.0])
    x = rng.normal(means[rng.choice(3, 20000, p=true_prior)], 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - means) ** 2)
    posteriors = likelihood / likelihood.sum(axis=1, keepdims=True)
    assert np.abs(posteriors.mean(axis=0) - true_prior).max() > 0.1  # the plain mean is biased
    assert np.abs(semi.estimate_prior(posteriors) - true_prior).max() < 0.02
    assert semi.total_variation(true_prior, np.array([0] * 7 + [1] * 2 + [2] + [-1] * 5), 3) == pytest.approx(0.05)


def test_foreign_mask_flags_a_far_cluster_and_keeps_the_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32)) * 3
    labels = np.repeat(np.arange(3), 10)
    labeled = centers[labels] + rng.normal(size=(30, 32))
    pool_labels = rng.choice(4, 400)
    pool = centers[pool_labels] + rng.normal(size=(400, 32))
    foreign = semi.foreign_mask(labeled, labels, pool, 1.0)
    assert foreign[pool_labels == 3].mean() > 0.9 and foreign[pool_labels < 3].mean() < 0.1


def test_pseudo_label_stats_per_class_and_without_hidden_labels():
    stats = semi.pseudo_label_stats(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3, 8)
    assert stats["precision_per_class"] == [0.5, 1.0, None] and stats["pseudo_label_precision"] == 0.75
    unknown = semi.pseudo_label_stats(np.array([0, 1]), None, 3, 8)
    assert unknown["pseudo_label_precision"] is None and "no labels" in unknown["precision_unknown"]
    assert semi.pseudo_label_stats(np.array([], int), np.array([], int), 3, 8)["precision_unknown"] == "no pseudo-label was kept"  # fmt: skip
