"""Unit tests of common/transferability.py: each score against its definition, on problems small enough to check."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import optimize

from common import transferability as tr
from common.errors import InputError


def gaussian_log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, F F^T / alpha + I / beta) / N, straight from the definition (no SVD)."""
    n = len(y)
    covariance = features @ features.T / alpha + np.eye(n) / beta
    _, logdet = np.linalg.slogdet(covariance)
    return (-n / 2 * math.log(2 * math.pi) - 0.5 * logdet - 0.5 * y @ np.linalg.solve(covariance, y)) / n


def brute_force_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The evidence maximised over (log alpha, log beta) by a grid, then Nelder-Mead from its best point."""
    values = []
    for c in range(labels.max() + 1):
        y = (labels == c).astype(np.float64)

        def negative(p, y=y):
            return -gaussian_log_evidence(features, y, math.exp(p[0]), math.exp(p[1]))

        grid = [(a, b) for a in np.linspace(-8, 8, 17) for b in np.linspace(-8, 8, 17)]
        start = min(grid, key=negative)
        best = optimize.minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12})
        values.append(-best.fun)
    return float(np.mean(values))


@pytest.mark.parametrize("n, d", [(40, 6), (12, 30)])  # more images than features, and fewer (thuml/LogME #23)
def test_logme_fixed_point_reaches_the_maximum_evidence(n, d):
    rng = np.random.default_rng(n + d)
    labels = np.arange(n) % 3
    features = rng.normal(size=(n, d))
    features[:, 0] += 2.0 * labels  # some signal, some noise: the best alpha, beta are interior
    assert tr.logme(features, labels) == pytest.approx(brute_force_logme(features, labels), abs=1e-6)


def test_logme_with_labels_fitted_exactly_is_at_least_the_noise_free_limit():
    """With N <= D the evidence may be largest as beta -> infinity; LogME must not fall below that limit."""
    rng = np.random.default_rng(0)
    labels = np.arange(10) % 2
    features = rng.normal(size=(10, 40))
    gram = features @ features.T
    limits = []
    for c in range(2):  # beta -> infinity: log N(y; 0, F F^T / alpha), maximised at alpha = N / y^T (F F^T)^-1 y
        y = (labels == c).astype(np.float64)
        q = y @ np.linalg.solve(gram, y)
        alpha = 10 / q
        logdet = np.linalg.slogdet(gram)[1]
        limits.append((5 * math.log(alpha) - 0.5 * logdet - alpha / 2 * q - 5 * math.log(2 * math.pi)) / 10)
    score = tr.logme(features, labels)
    assert math.isfinite(score) and score >= np.mean(limits) - 1e-9


def test_logme_does_not_depend_on_the_scale_of_the_features():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(30, 8)), np.arange(30) % 3
    assert tr.logme(100 * features, labels) == pytest.approx(tr.logme(features, labels), abs=1e-6)


def eigen_brute_force_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The evidence maximised over (log alpha, log beta) by scipy, from the eigendecomposition of F F^T (no SVD).

    A grid over both, then Nelder-Mead from its best point; fast enough for N = 100 (O(N) per evaluation).
    """
    eigen, vectors = np.linalg.eigh(features @ features.T)
    eigen = np.clip(eigen, 0.0, None)
    n, values = len(labels), []
    for c in range(labels.max() + 1):
        z2 = (vectors.T @ (labels == c).astype(np.float64)) ** 2

        def negative(p, z2=z2):
            variance = eigen * math.exp(-p[0]) + math.exp(-p[1])  # F F^T / alpha + I / beta, diagonalised
            return (n * math.log(2 * math.pi) + np.sum(np.log(variance)) + np.sum(z2 / variance)) / (2 * n)

        grid = [(a, b) for a in np.linspace(-12, 12, 49) for b in np.linspace(-12, 12, 49)]
        start = min(grid, key=negative)
        best = optimize.minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14})
        values.append(-best.fun)
    return float(np.mean(values))


@pytest.mark.parametrize("n, d", [(40, 256), (100, 12)])  # N < D (issue 44: 100 steps stopped short) and N > D
def test_logme_on_random_features_is_the_maximum_evidence_at_every_scale(n, d):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    features = rng.normal(size=(n, d))  # no signal: maxima on the boundary and in the interior, slow to iterate to
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (overflow), no LogMEConvergenceWarning
        scores = {scale: tr.logme(scale * features, labels) for scale in (1e-3, 1.0, 1e3)}
    assert scores[1e-3] == pytest.approx(scores[1.0], abs=1e-6)
    assert scores[1e3] == pytest.approx(scores[1.0], abs=1e-6)
    assert scores[1.0] == pytest.approx(eigen_brute_force_logme(features, labels), abs=1e-6)


def test_logme_warns_when_its_search_stops_before_the_tolerance():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(40, 6)), np.arange(40) % 3
    features[:, 0] += 2.0 * labels  # an interior maximum to search for
    with pytest.warns(tr.LogMEConvergenceWarning, match=r"class \d+: .* within 1 steps; the score is a lower bound"):
        tr.logme(features, labels, max_iterations=1)


def test_leep_by_hand_on_three_examples():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    labels = np.array([0, 1, 1])
    # P(y, z) * 3 = [[0.8, 0.2], [0.8, 1.2]]; P(y | z=0) = (1/2, 1/2), P(y | z=1) = (1/7, 6/7).
    # Expected empirical predictions of the true labels: 0.8/2 + 0.2/7 = 3/7, 0.3/2 + 0.7 * 6/7 = 3/4,
    # 0.5/2 + 0.5 * 6/7 = 19/28.
    expected = (math.log(3 / 7) + math.log(3 / 4) + math.log(19 / 28)) / 3
    assert tr.leep(source_probs=probs, labels=labels) == pytest.approx(expected, abs=1e-12)


def test_nce_by_hand_on_three_examples():
    # z = (0, 0, 1), y = (0, 1, 1): given z = 0 (2 of 3 examples) y is a coin flip, given z = 1 it is certain.
    assert tr.nce(source_labels=np.array([0, 0, 1]), labels=np.array([0, 1, 1])) == pytest.approx(
        -2 / 3 * math.log(2), abs=1e-12
    )
    assert tr.nce(source_labels=np.array([1, 0, 0]), labels=np.array([0, 1, 1])) == pytest.approx(
        0.0, abs=1e-12
    )  # z determines y


def test_leep_and_nce_reject_bad_inputs():
    with pytest.raises(ValueError, match="softmax"):
        tr.leep(source_probs=np.array([[2.0, -1.0], [0.5, 0.5]]), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="no example"):
        tr.nce(source_labels=np.array([0, 1]), labels=np.array([0, 2]))


def test_leep_and_nce_take_keyword_arguments_only():
    probs, labels = np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1])
    with pytest.raises(TypeError):
        tr.leep(probs, labels)
    with pytest.raises(TypeError):
        tr.nce(np.array([1, 0]), labels)


def test_swapped_or_wrong_arguments_name_the_argument_at_fault():
    """Issue 44: 500 probabilities for 100 labels passed to nce got "100 labels for 500 examples"."""
    rng = np.random.default_rng(0)
    labels = np.arange(100) % 5  # every target class present
    probs = rng.dirichlet(np.ones(8), size=100)  # (N, C_s) source-classifier probabilities
    predictions = np.array([3, 6] * 50)  # the source classifier's argmax: only some source classes occur
    cases = [
        (
            lambda: tr.nce(source_labels=probs, labels=labels),
            r"nce: source_labels must be 1-D integer labels .*\(100, 8\).*probabilities",
        ),
        (
            lambda: tr.nce(source_labels=predictions, labels=probs),
            r"nce: labels must be 1-D integer labels .*\(100, 8\)",
        ),
        (
            lambda: tr.nce(source_labels=labels, labels=predictions),
            r"nce: labels has no example of classes 0, 1, 2, 4, 5\b.*source_labels=",
        ),
        (
            lambda: tr.nce(source_labels=probs[:, 0], labels=labels),
            r"nce: source_labels must be integer labels .*float64",
        ),
        (
            lambda: tr.nce(source_labels=predictions[:40], labels=labels),
            r"nce: labels has 100 entries for 40 entries of source_labels",
        ),
        (
            lambda: tr.leep(source_probs=labels, labels=probs),
            r"leep: source_probs must be 2-D .*shape \(100,\).*labels=",
        ),
        (lambda: tr.leep(source_probs=probs, labels=probs), r"leep: labels must be 1-D integer labels .*\(100, 8\)"),
        (
            lambda: tr.leep(source_probs=probs, labels=labels[:50]),
            r"leep: labels has 50 entries for 100 rows of source_probs",
        ),
        (lambda: tr.leep(source_probs=np.log(probs), labels=labels), r"leep: source_probs must be .* rows sum to 1"),
        (lambda: tr.logme(probs, labels[:50]), r"logme: labels has 50 entries for 100 rows of features"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # Column vectors and integral floats are labels too.
    assert tr.nce(source_labels=predictions[:, None].astype(float), labels=labels) == tr.nce(
        source_labels=predictions, labels=labels
    )


def test_h_score_matches_its_definition_and_the_regularised_reference():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(2)
    for n, d in ((200, 6), (30, 80)):
        labels = np.arange(n) % 3
        features = rng.normal(size=(n, d))
        features[:, 0] += labels
        centred = features - features.mean(axis=0)
        class_means = np.zeros_like(centred)
        for c in range(3):
            class_means[labels == c] = centred[labels == c].mean(axis=0)
        between = class_means.T @ class_means / n
        plain = np.trace(np.linalg.pinv(centred.T @ centred / n, rcond=1e-10) @ between)
        assert tr.h_score(features, labels, shrinkage=False) == pytest.approx(plain, rel=1e-6)
        lw = LedoitWolf().fit(features)
        regularised = np.trace(np.linalg.inv(lw.covariance_) @ ((1 - lw.shrinkage_) * between))
        assert tr.h_score(features, labels) == pytest.approx(regularised, rel=1e-6)
        assert tr.ledoit_wolf_shrinkage(features) == pytest.approx(lw.shrinkage_, rel=1e-9)
    # Fewer images than features: the plain score is C - 1 whatever the features are.
    noise = rng.normal(size=(30, 80))
    assert tr.h_score(noise, np.arange(30) % 3, shrinkage=False) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("dim", [20, 300])
def test_feature_scores_rank_label_features_above_random_ones(dim):
    rng = np.random.default_rng(dim)
    labels = np.arange(100) % 5
    centres = rng.normal(size=(5, dim))
    informative = centres[labels] + rng.normal(size=(100, dim))
    random = rng.normal(size=(100, dim)) * np.sqrt(2.0)  # the same overall scale, no label
    for score in ("logme", "hscore"):
        good = tr.compute(score, labels, features=informative)
        bad = tr.compute(score, labels, features=random)
        assert good > bad, f"{score}: {good} <= {bad}"


def test_source_scores_rank_label_predictions_above_random_ones():
    rng = np.random.default_rng(3)
    labels = np.arange(100) % 5
    # A source classifier over 8 classes whose prediction follows the target class (70% of the time)...
    source_class = np.where(rng.random(100) < 0.7, labels + 2, rng.integers(0, 8, 100))
    informative = np.full((100, 8), 0.05)
    informative[np.arange(100), source_class] += 0.6
    informative /= informative.sum(axis=1, keepdims=True)
    # ...against one whose predictions ignore the image.
    random = rng.dirichlet(np.ones(8), size=100)
    for score in ("leep", "nce"):
        good = tr.compute(score, labels, source_probs=informative)
        bad = tr.compute(score, labels, source_probs=random)
        assert good > bad, f"{score}: {good} <= {bad}"


def test_scores_without_their_input_are_nan():
    labels = np.arange(10) % 2
    assert math.isnan(tr.compute("leep", labels, features=np.ones((10, 3))))
    assert math.isnan(tr.compute("logme", labels, source_probs=np.full((10, 2), 0.5)))


def test_rank_correlations_and_picks():
    names = ["a", "b", "c", "d"]
    accuracy = [0.9, 0.8, 0.7, 0.6]
    same = tr.rank_correlations([4.0, 3.0, 2.0, 1.0], accuracy)
    assert same["weighted_tau"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    reversed_ = tr.rank_correlations([1.0, 2.0, 3.0, 4.0], accuracy)
    assert reversed_["weighted_tau"] == pytest.approx(-1.0)
    unscored = tr.rank_correlations([4.0, math.nan, 2.0, 1.0], accuracy)
    assert unscored["candidates"] == 3 and unscored["spearman"] == pytest.approx(1.0)
    assert math.isnan(tr.rank_correlations([1.0, math.nan, math.nan, 2.0], accuracy)["weighted_tau"])

    chosen = tr.pick(names, [1.0, 3.0, 2.0, math.nan], accuracy)
    assert chosen["pick"] == "b" and chosen["best"] == "a" and chosen["regret"] == pytest.approx(0.1)
    tied = tr.pick(names, [5.0, 1.0, 5.0, 0.0], accuracy)
    assert tied["pick"] == "a=c" and tied["regret"] == pytest.approx(0.1)  # the mean gap of a random tie-break
    assert tr.pick(names, [math.nan] * 4, accuracy)["pick"] is None


def test_judge_merges_correlations_and_pick_per_score_with_none_for_undefined():
    names, accuracy = ["a", "b", "c"], [0.9, 0.8, 0.7]
    verdicts = tr.judge(names, {"good": [3.0, 2.0, 1.0], "unscored": [math.nan] * 3}, accuracy)
    assert list(verdicts) == ["good", "unscored"]
    assert verdicts["good"]["weighted_tau"] == pytest.approx(1.0) and verdicts["good"]["pick"] == "a"
    assert verdicts["good"]["regret"] == pytest.approx(0.0) and verdicts["good"]["candidates"] == 3
    unscored = verdicts["unscored"]
    assert unscored["pick"] is None and unscored["weighted_tau"] is None and unscored["regret"] is None
    assert unscored["best"] == "a" and unscored["candidates"] == 0
    json.dumps(verdicts, allow_nan=False)  # no NaN left


def test_score_names_are_checked():
    assert tr.parse_score_names("LogME, hscore") == ["logme", "hscore"]
    with pytest.raises(InputError, match="unknown score 'leap'; choose from logme, leep, nce, hscore"):
        tr.parse_score_names("logme,leap")
    with pytest.raises(InputError, match="named twice"):
        tr.parse_score_names("nce,nce")


def test_compute_timed_gives_the_scores_of_compute_with_their_seconds():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    features = rng.standard_normal((30, 6)) + labels[:, None]
    values, seconds = tr.compute_timed(["logme", "leep", "hscore"], labels, features=features)
    assert values["logme"] == pytest.approx(tr.logme(features, labels)) and math.isnan(values["leep"])
    assert values["hscore"] == pytest.approx(tr.h_score(features, labels))
    assert set(seconds) == {"logme", "leep", "hscore"} and all(s >= 0 for s in seconds.values())


def test_verdict_table_and_plots_against_the_truth():
    names, accuracy = ["a", "b", "c"], [0.9, 0.8, 0.7]
    scores = {"good": [3.0, 2.0, 1.0], "unscored": [math.nan] * 3, "partial": [1.0, math.nan, 2.0]}
    table = tr.verdict_table(tr.judge(names, scores, accuracy)).splitlines()
    assert table[0].split() == ["score", "weighted", "tau", "spearman", "pick", "pick", "acc", "below", "best"]
    assert table[2].split() == ["good", "+1.00", "+1.00", "a", "90.0%", "0.0", "pts"]
    assert table[3].split() == ["unscored", "n/a", "n/a", "none", "n/a", "n/a"]
    assert table[4].split()[:4] == ["partial", "n/a", "n/a", "c"]  # two scored: no correlation, still a pick
    figures = tr.plot_against_truth(names, scores, [90, 80, 70], tr.judge(names, scores, accuracy), ("scratch", 85))
    assert list(figures) == ["scatter_good", "scatter_unscored", "scatter_partial"]
    ax = figures["scatter_partial"].axes[0]
    assert len(ax.collections) == 2 and "weighted tau" not in ax.get_title()  # the NaN point left out
    assert "weighted tau +1.00" in figures["scatter_good"].axes[0].get_title()
