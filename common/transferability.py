"""Transferability scores: how well will a pretrained model transfer, before training on the target?

Each score looks at one forward pass of the *labelled target* images through a candidate
model and returns one number, higher meaning "should transfer better". None of them trains
anything; they only need to *rank* candidates the way the accuracy after transfer does
(check that with :func:`rank_correlations` against accuracies measured in the same run).

- :func:`logme` (You et al., ICML 2021): the log marginal evidence of a Bayesian linear
  model from the features to each one-hot label column, maximised over the prior and noise
  precisions by a fixed-point iteration on one SVD of the features. Needs features only.
- :func:`leep` (Nguyen et al., ICML 2020): the log-likelihood of the "expected empirical
  predictor", which turns the *source classifier's* soft predictions over source classes
  into target predictions through the empirical P(target | source). Needs a source classifier.
- :func:`nce` (Tran et al., ICCV 2019): the negative conditional entropy of the target label
  given the source classifier's hard prediction. Needs a source classifier.
- :func:`h_score` (Bao et al., ICIP 2019): tr(cov(f)^-1 cov(E[f | y])), how much of the
  features' variance lies between the classes; regularised with the Ledoit-Wolf shrinkage
  (Ibrahim et al., ECML-PKDD 2022), as the plain inverse is meaningless when there are
  fewer images than feature dimensions. Needs features only.

Everything is numpy/scipy, float64. The implementations were checked against the reference
code of thuml/LogME and thuml/Transfer-Learning-Library (``tllib/ranking``); differences are
noted in each docstring. Labels are integers 0..C-1, every class present.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from common.errors import InputError

# Score name -> what it needs: "features" (N, D) or "source_probs" (N, C_s); and the paper it follows.
SCORES = {"logme": "features", "leep": "source_probs", "nce": "source_probs", "hscore": "features"}
PAPERS = {
    "logme": "You et al. 2021, LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    "leep": "Nguyen et al. 2020, LEEP: A New Measure to Evaluate Transferability of Learned Representations",
    "nce": "Tran et al. 2019, Transferability and Hardness of Supervised Classification Tasks",
    "hscore": "Bao et al. 2019, An Information-Theoretic Approach to Transferability in Task Transfer Learning",
}


def parse_score_names(spec: str | Sequence[str]) -> list[str]:
    """``"logme,leep"`` (or a list) -> ``["logme", "leep"]``; an unknown or repeated name is an InputError."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise InputError(f"no score named; choose from {', '.join(SCORES)}")
    for name in names:
        if name not in SCORES:
            raise InputError(f"unknown score {name!r}; choose from {', '.join(SCORES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"score {repeated[0]!r} is named twice in the score list")
    return names


def _as_integer_labels(values, name: str, where: str, what: str) -> np.ndarray:
    """``values`` as a 1-D int64 array, or a ValueError naming the argument ``name`` of ``where``.

    (N,) or (N, 1); integer dtype or integral floats (0.0, 1.0, ...). ``what`` describes the
    expected labels in the message.
    """
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        hint = ""
        if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
            hint = " (a 2-D float array looks like per-class probabilities: take their argmax, or pass them as source_probs= to leep)"
        raise ValueError(
            f"{where}: {name} must be 1-D integer labels {what}, one per example; got shape {array.shape}{hint}"
        )
    if array.size == 0:
        raise ValueError(f"{where}: {name} is empty; it must hold one integer label {what} per example")
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array))
    )
    if not integral:
        raise ValueError(
            f"{where}: {name} must be integer labels {what}; got {array.dtype} values such as {array[0]!r}"
        )
    array = array.astype(np.int64)
    if array.min() < 0:
        raise ValueError(f"{where}: {name} must be integer labels {what}; got {int(array.min())}")
    return array


def _check_labels(
    labels: np.ndarray, n: int, where: str = "score", rows: str = "rows of features"
) -> tuple[np.ndarray, int]:
    """Target ``labels`` as (N,) int64 covering 0..C-1, and C; errors name ``labels`` and the function ``where``."""
    labels = _as_integer_labels(labels, "labels", where, "0..C-1 (the target classes)")
    if len(labels) != n:
        raise ValueError(f"{where}: labels has {len(labels)} entries for {n} {rows}; both are one per target image")
    num_classes = int(labels.max()) + 1
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{where}: labels has no example of classes {shown}; the target labels must cover 0..C-1"
            + (" (source-classifier predictions go in source_labels=)" if where == "nce" else "")
        )
    return labels, num_classes


# --- LogME ----------------------------------------------------------------------------


def thin_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors (N, k) and singular values (k,) of ``matrix`` (N, D), k its numerical rank.

    Through the SVD of the smaller of the two Gram matrices (N x N or D x D), as thuml/LogME's
    ``truncated_svd``: with 100 images of 3,136 features that is a 100 x 100 SVD, tens of
    times faster than the SVD of the features. Squared singular values below ``max(N, D) *
    eps * s_max^2`` are rounding noise of the Gram matrix and dropped; for LogME and the
    H-score a direction with a vanishing singular value contributes nothing anyway.
    """
    m = np.asarray(matrix, dtype=np.float64)
    n, d = m.shape
    if n <= d:
        u, squared, _ = np.linalg.svd(m @ m.T, hermitian=True)
    else:
        v, squared, _ = np.linalg.svd(m.T @ m, hermitian=True)
    keep = squared > (squared[0] if squared.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
    singular = np.sqrt(squared[keep])
    u = u[:, keep] if n <= d else (m @ v[:, keep]) / singular
    return u, singular


class LogMEConvergenceWarning(ConvergenceWarning):
    """LogME's maximisation of the evidence did not reach its tolerance for some class (the score is a lower bound)."""


def logme(features: np.ndarray, labels: np.ndarray, max_iterations: int = 200, tolerance: float = 1e-10) -> float:
    """LogME (You et al., ICML 2021): the maximum log evidence per example, averaged over classes.

    For each class c, the model is y_c = F w + noise, with a prior w ~ N(0, 1/alpha I_D) and
    noise N(0, 1/beta) on the one-hot column y_c; its evidence p(y_c | F, alpha, beta) is
    maximised over alpha, beta > 0. Shapes: ``features`` (N, D) real, ``labels`` (N,)
    integers 0..C-1. Returns a float (nats per example; higher is better). Warns
    :class:`LogMEConvergenceWarning` (a scikit-learn ``ConvergenceWarning``) naming the class
    if a root search stops at ``max_iterations`` before ``tolerance``; never stops silently.

    With one thin SVD of F (k non-zero squared singular values s_i, y's squared coordinates
    x_i along them, and |y|^2 outside their span) the best alpha for a given t = alpha / beta
    has a closed form, so the evidence is a function E(t) of t alone (:func:`_profile_evidence`).
    Its stationary points are the fixed points of the iteration of the LogME paper's second
    version ("Ranking and Tuning Pre-trained Models", arXiv:2110.10545; thuml/LogME
    ``_fit_fixed_point``):

        gamma = sum_i s_i / (s_i + t),  alpha <- gamma / |m|^2,  beta <- (N - gamma) / |F m - y|^2,

    i.e. the roots of dE/dlog t = N t (-q'(t)) / q(t) - (N - gamma), q(t) = y^T (F F^T + t I)^-1 y.
    Iterating that map creeps (over 40,000 steps on random features, where its rate is
    close to 1), and 100 steps from alpha = beta = 1 left the score depending on the scale of
    F; so here the equation is solved instead by bracketing: dE/dlog t on a grid of log t
    (step 0.05) over [s_min * tolerance, s_max / tolerance], then ``scipy.optimize.brentq``
    (to ``tolerance`` in log t, at most ``max_iterations`` steps) on every change of sign
    from + to - (a maximum). E is also evaluated at the two boundary limits in closed form,
    alpha -> infinity (the features explain nothing) and, when k = N, t -> 0 (y fitted
    exactly), which the grid's ends approach to O(tolerance); the largest value is returned.
    The singular values are divided by the largest first: E(t; c s) = E(t / c; s) exactly, so
    the result does not depend on the features' scale, and every quantity is a ratio in
    [0, 1] or a sum over bounded terms (no overflow; no ``(s + t)**2``).

    Differences from thuml, each checked by the tests against a direct maximisation:
    the D - k zero singular values of F add (D - k)/2 log alpha to the prior's normaliser and
    take as much from log det A, so they cancel; thuml's ``_fit_fixed_point`` keeps the first
    and drops the second, wrong when N < D (thuml/LogME issue #23), the usual case here (100
    images, up to 3,136 features); thuml stops after 11 steps at a relative change of 1e-3.
    """
    from scipy import optimize

    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {f.shape}")
    n, _ = f.shape
    labels, num_classes = _check_labels(labels, n, "logme")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or inf; LogME needs finite features")
    u, singular = thin_svd(f)
    if singular.size == 0:
        raise ValueError("the features are all zero; LogME needs features of rank at least 1")
    sigma = (singular / singular[0]) ** 2  # scale-free: the largest is 1
    k = len(sigma)
    grid = np.arange(math.log(sigma[-1] * tolerance), math.log(1 / tolerance) + 0.05, 0.05)
    evidences = []
    for c in range(num_classes):
        y = (labels == c).astype(np.float64)
        x2 = (u.T @ y) ** 2  # y's energy along each singular direction
        outside = max(float(y @ y - x2.sum()), 0.0) if k < n else 0.0  # and outside the span of F
        slope = _evidence_slope(np.exp(grid), sigma, x2, outside, n)
        values = [_profile_evidence(math.inf, sigma, x2, outside, n)]
        values += [_profile_evidence(math.exp(s), sigma, x2, outside, n) for s in (grid[0], grid[-1])]
        if k == n:
            values.append(_profile_evidence(0.0, sigma, x2, outside, n))
        for i in np.flatnonzero((slope[:-1] > 0) & (slope[1:] <= 0)):
            root, result = optimize.brentq(
                _slope_at, grid[i], grid[i + 1], args=(sigma, x2, outside, n), xtol=tolerance,
                rtol=4 * np.finfo(np.float64).eps, maxiter=max_iterations, full_output=True, disp=False,
            )  # fmt: skip
            if not result.converged:
                warnings.warn(
                    f"LogME: class {c}: the evidence's maximum near t = {math.exp(root):.3g} (relative to the largest "
                    f"squared singular value) was not located to {tolerance:g} in log t within {max_iterations} steps; "
                    "the score is a lower bound",
                    LogMEConvergenceWarning,
                    stacklevel=2,
                )
            values.append(_profile_evidence(math.exp(root), sigma, x2, outside, n))
        evidences.append(max(values))
    return float(np.mean(evidences))


def _slope_at(log_t: float, sigma: np.ndarray, x2: np.ndarray, outside: float, n: int) -> float:
    return float(_evidence_slope(np.array([math.exp(log_t)]), sigma, x2, outside, n)[0])


def _evidence_slope(t: np.ndarray, sigma: np.ndarray, x2: np.ndarray, outside: float, n: int) -> np.ndarray:
    """dE/dlog t times 2: N t (-q'(t)) / q(t) - (N - gamma), for each of the ``t`` (T,); its roots are LogME's fixed points.

    With r_i = t / (s_i + t) in [0, 1]: t (-q') = sum_i x_i r_i / (s_i + t) + |y_out|^2 / t and
    N - gamma = (N - k) + sum_i r_i, summed without cancellation.
    """
    t = t[:, None]
    r = t / (sigma + t)  # (T, k)
    inside = x2 / (sigma + t)  # (T, k)
    out = outside / t[:, 0] if outside else 0.0
    q = inside.sum(axis=1) + out
    return n * ((inside * r).sum(axis=1) + out) / q - ((n - len(sigma)) + r.sum(axis=1))


def _profile_evidence(t: float, sigma: np.ndarray, x2: np.ndarray, outside: float, n: int) -> float:
    """max over alpha of log N(y; 0, (F F^T + t I) / alpha), divided by N (alpha = N / y^T (F F^T + t I)^-1 y).

    ``sigma``: the k non-zero squared singular values of F; ``x2``: y's squared coordinates along
    the matching left singular vectors; ``outside``: |y|^2 outside their span. ``t`` = inf is
    the limit alpha -> infinity (y pure noise), ``t`` = 0 the limit beta -> infinity (k = N).
    """
    k = len(sigma)
    if math.isinf(t):
        q_over_n = (float(x2.sum()) + outside) / n  # t * y^T (F F^T + t I)^-1 y / N -> |y|^2 / N
        return -0.5 * (math.log(2 * math.pi * q_over_n) + 1.0)
    q = float(np.sum(x2 / (sigma + t))) + (outside / t if outside else 0.0)
    logdet = float(np.sum(np.log(sigma + t))) + ((n - k) * math.log(t) if n > k else 0.0)
    return (n / 2 * math.log(n / q) - n / 2 - 0.5 * logdet - n / 2 * math.log(2 * math.pi)) / n


# --- LEEP and NCE: from the source classifier's predictions ----------------------------------


def _joint(source_probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Empirical joint P(y, z), shape (C_t, C_s), from soft source predictions (rows sum to 1)."""
    joint = np.zeros((num_classes, source_probs.shape[1]))
    np.add.at(joint, labels, source_probs)
    return joint / len(labels)


def leep(*, source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al., ICML 2020): log expected empirical prediction, higher is better.

    Keyword-only: ``leep(source_probs=..., labels=...)``. ``source_probs`` (N, C_s): the
    source classifier's softmax over its C_s source classes for each target image (rows sum
    to 1); ``labels`` (N,) target classes 0..C_t-1, every class present. With the empirical
    joint P(y, z) = 1/N sum_{i: y_i = y} p_i(z) and P(y | z) = P(y, z) / P(z),

        LEEP = 1/N sum_i log sum_z P(y_i | z) p_i(z)      (<= 0; 0 is perfect).

    As thuml/LogME ``LEEP.py`` and tllib ``log_expected_empirical_prediction``; a source
    class that gets no probability mass at all (P(z) = 0) is left out of the sum. A
    ValueError names the argument at fault (a 1-D label array as ``source_probs``, logits
    instead of probabilities, 2-D ``labels``, lengths that differ).
    """
    probs = np.asarray(source_probs, dtype=np.float64)
    if probs.ndim != 2:
        hint = " (1-D labels go in labels=)" if probs.ndim == 1 else ""
        raise ValueError(
            f"leep: source_probs must be 2-D (N, C_s) source-class probabilities, one row per target image; "
            f"got shape {probs.shape}{hint}"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("leep: source_probs must be (N, C_s) probabilities whose rows sum to 1 (apply a softmax)")
    labels, num_classes = _check_labels(labels, len(probs), "leep", "rows of source_probs")
    joint = _joint(probs, labels, num_classes)
    p_z = joint.sum(axis=0)
    used = p_z > 0
    p_y_given_z = joint[:, used] / p_z[used]  # (C_t, C_s used)
    expected = probs[:, used] @ p_y_given_z.T  # (N, C_t): the expected empirical predictor
    return float(np.mean(np.log(expected[np.arange(len(labels)), labels])))


def nce(*, source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al., ICCV 2019): the negative conditional entropy -H(Y | Z), higher is better.

    Keyword-only: ``nce(source_labels=..., labels=...)``. ``source_labels`` (N,): the source
    classifier's hard prediction (argmax over its source classes, integers 0..C_s-1) for each
    target image; ``labels`` (N,) target classes 0..C_t-1, every class present. With the
    empirical joint P(y, z) of the two label sequences,

        NCE = sum_{y, z} P(y, z) log P(y | z)             (<= 0; 0: z determines y).

    As tllib ``negative_conditional_entropy`` (which, like this, skips unused source classes).
    A ValueError names the argument at fault: a 2-D array (probabilities) for either, non-integer
    values, lengths that differ, or ``labels`` that miss a class (as source predictions given
    as ``labels`` usually do).
    """
    z = _as_integer_labels(source_labels, "source_labels", "nce", "0..C_s-1 (the source classifier's argmax)")
    labels, num_classes = _check_labels(labels, len(z), "nce", "entries of source_labels")
    joint = np.zeros((num_classes, int(z.max()) + 1))
    np.add.at(joint, (labels, z), 1.0 / len(z))
    p_z = joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log((joint / np.where(p_z > 0, p_z, 1.0))[nonzero])))


# --- H-score ---------------------------------------------------------------------------


def ledoit_wolf_shrinkage(features: np.ndarray) -> float:
    """The Ledoit-Wolf shrinkage coefficient of ``features`` (N, D), in [0, 1].

    The same value as ``sklearn.covariance.ledoit_wolf_shrinkage`` (tested), computed from the
    N x N Gram matrix when N <= D: O(N^2 D) instead of scikit-learn's O(N D^2), ten times
    faster with 100 images of 3,136 features; scikit-learn's own function otherwise.
    """
    x = np.asarray(features, dtype=np.float64)
    n, p = x.shape
    if n > p:  # the D x D route is the cheaper one
        from sklearn.covariance import ledoit_wolf_shrinkage as sklearn_shrinkage

        return float(sklearn_shrinkage(x))
    x = x - x.mean(axis=0)
    gram = x @ x.T
    trace = np.trace(gram) / n  # trace of the empirical covariance
    mu = trace / p
    delta_ = np.sum(gram**2) / n**2  # |S|_F^2
    beta_ = np.sum(np.diag(gram) ** 2)  # sum_i |x_i|^4
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def h_score(features: np.ndarray, labels: np.ndarray, shrinkage: bool | float = True) -> float:
    """H-score (Bao et al., ICIP 2019): tr(cov(f)^-1 cov(E[f | y])), higher is better.

    ``features`` (N, D), ``labels`` (N,) classes 0..C-1. cov(E[f | y]) is the covariance of
    the features with each replaced by its class mean; the score lies in [0, C - 1] (a sum of
    squared canonical correlations between f and the one-hot y).

    ``shrinkage``: ``False`` gives the original score with the pseudo-inverse of the sample
    covariance (as tllib ``h_score``). It is useless when N <= D + 1, the usual case here:
    any labelling of N points is then linearly separable, and every candidate scores C - 1.
    ``True`` (the default) gives the regularised H-score of Ibrahim, Ponomareva and Mazumder
    ("Newer is not always better: rethinking transferability metrics", ECML-PKDD 2022; tllib
    ``regularized_h_score``): tr(cov_a(f)^-1 (1 - a) cov(E[f | y])), with cov_a(f) = (1 - a)
    cov(f) + a mu I the Ledoit-Wolf estimate, ``a`` its coefficient, mu the mean variance. It
    tends to the original score as N grows; a float in [0, 1] fixes ``a``. Both covariances
    are normalised by N here (the reference normalises the second by N - 1). Computed in the
    span of the centred features through one :func:`thin_svd`.
    """
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    labels, num_classes = _check_labels(labels, n, "h_score")
    centred = f - f.mean(axis=0)
    u, singular = thin_svd(centred)  # centred = U S V^T
    if singular.size == 0:
        raise ValueError("the features are constant; the H-score needs some variance")
    # cov(f) = V diag(s^2 / N) V^T. Replacing each row of the centred features by its class
    # mean is a left product with the class-averaging matrix M, so in the basis V the class
    # means are M U S, and tr(cov(f)^-1 cov(E[f | y])) = sum_i s_i^2 |M u_i|^2 / (N lambda_i).
    eigen = singular**2 / n
    kept = 1.0
    if shrinkage is not False:
        coefficient = ledoit_wolf_shrinkage(f) if shrinkage is True else float(shrinkage)
        eigen = (1 - coefficient) * eigen + coefficient * np.sum(singular**2) / (n * d)
        kept = 1 - coefficient
    class_means = np.stack([u[labels == c].mean(axis=0) for c in range(num_classes)])  # (C, k)
    between = np.sum(class_means[labels] ** 2, axis=0)  # |M u_i|^2, shape (k,)
    return float(kept * np.sum(singular**2 * between / (n * eigen)))


# --- Computing a score, and judging scores against the truth -------------------------------


def compute(name: str, labels: np.ndarray, features: np.ndarray | None = None,
            source_probs: np.ndarray | None = None) -> float:  # fmt: skip
    """Score ``name`` (see :data:`SCORES`) from what it needs; NaN when that input is missing.

    ``features`` (N, D) for logme and hscore; ``source_probs`` (N, C_s) for leep and nce
    (nce takes their argmax). A candidate without a source classifier (an untrained network,
    a keras.applications backbone without its top) has no ``source_probs``: its LEEP and NCE
    are not defined and come back as NaN.
    """
    needs = SCORES[name]
    if needs == "features":
        if features is None:
            return math.nan
        return logme(features, labels) if name == "logme" else h_score(features, labels)
    if source_probs is None:
        return math.nan
    if name == "leep":
        return leep(source_probs=source_probs, labels=labels)
    return nce(source_labels=np.argmax(source_probs, axis=1), labels=labels)


def compute_timed(names: Sequence[str], labels: np.ndarray, features: np.ndarray | None = None,
                  source_probs: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """Every score in ``names`` (``compute``), each timed: ``({name: value}, {name: seconds})``.

    The scores run with one BLAS thread (``threadpoolctl``): their problems are small and
    dense (100 x 100 SVDs), where more threads on shared cores cost 0.1-5 s instead of 10 ms,
    and one thread keeps clear of TensorFlow's.
    """
    from threadpoolctl import threadpool_limits

    values, seconds = {}, {}
    with threadpool_limits(1, user_api="blas"):
        for name in names:
            start = time.perf_counter()
            values[name] = compute(name, labels, features=features, source_probs=source_probs)
            seconds[name] = time.perf_counter() - start
    return values, seconds


def rank_correlations(scores: Sequence[float], truth: Sequence[float]) -> dict:
    """How well ``scores`` rank candidates the way ``truth`` (e.g. test accuracy) does.

    Both of shape (K,), one entry per candidate; candidates with a NaN score are left out.
    Returns ``weighted_tau`` (``scipy.stats.weightedtau``: Kendall's tau with hyperbolic
    weights, so swaps among the top candidates cost more, as in the LogME paper),
    ``spearman`` (``scipy.stats.spearmanr``) and ``candidates`` (how many were ranked);
    both correlations are NaN with fewer than 3 candidates or a constant score.
    """
    from scipy import stats

    s, t = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    keep = np.isfinite(s) & np.isfinite(t)
    s, t = s[keep], t[keep]
    if len(s) < 3 or np.ptp(s) == 0 or np.ptp(t) == 0:
        return {"weighted_tau": math.nan, "spearman": math.nan, "candidates": int(len(s))}
    return {
        "weighted_tau": float(stats.weightedtau(s, t).statistic),
        "spearman": float(stats.spearmanr(s, t).statistic),
        "candidates": int(len(s)),
    }


def pick(names: Sequence[str], scores: Sequence[float], truth: Sequence[float]) -> dict:
    """The candidate a score would choose, and how far its ``truth`` is from the best candidate's.

    ``names``, ``scores``, ``truth``: one entry per candidate (K,). The best is over every
    candidate, scored or not. Tied top scores (LEEP and NCE give every cut of one source
    model the same score) all count as picked: ``pick`` joins their names with ``=`` and
    ``regret`` is the mean gap, what a random tie-break costs on average. Returns
    ``{"pick", "pick_truth", "best", "best_truth", "regret"}``; ``pick`` is None when no
    candidate has a score.
    """
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    best = int(np.nanargmax(t))
    result = {"pick": None, "pick_truth": math.nan, "best": names[best], "best_truth": float(t[best]),
              "regret": math.nan}  # fmt: skip
    if not np.any(np.isfinite(s)):
        return result
    top = np.flatnonzero(s == np.nanmax(s))
    result["pick"] = "=".join(names[i] for i in top)
    result["pick_truth"] = float(np.mean(t[top]))
    result["regret"] = float(t[best] - np.mean(t[top]))
    return result


def judge(names: Sequence[str], scores: dict[str, Sequence[float]], truth: Sequence[float]) -> dict:
    """Every score judged against the truth: ``rank_correlations`` and ``pick``, merged, per score.

    ``names`` and ``truth`` (K,): one entry per candidate; ``scores`` maps a score name to its
    (K,) values (NaN where a candidate has none). Returns ``{score: {"weighted_tau", "spearman",
    "candidates", "pick", "pick_truth", "best", "best_truth", "regret"}}`` with every undefined
    figure (NaN) as None, ready for JSON.
    """
    verdicts = {}
    for score, values in scores.items():
        verdict = rank_correlations(values, truth) | pick(names, values, truth)
        verdicts[score] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in verdict.items()}
    return verdicts


def verdict_table(verdicts: dict) -> str:
    """``judge``'s verdicts as a text table: score, weighted tau, Spearman, pick, its truth (%) and gap (points)."""
    from common.evaluation import text_table

    rows = [("score", "weighted tau", "spearman", "pick", "pick acc", "below best")]
    for score, v in verdicts.items():
        shown = [f"{v[k]:+.2f}" if v[k] is not None else "n/a" for k in ("weighted_tau", "spearman")]
        if v["pick"] is None:
            rows.append((score, *shown, "none", "n/a", "n/a"))
        else:
            rows.append((score, *shown, v["pick"], f"{100 * v['pick_truth']:.1f}%", f"{100 * v['regret']:.1f} pts"))
    return text_table(rows)


def plot_against_truth(names: Sequence[str], scores: dict[str, Sequence[float]], truth: Sequence[float],
                       verdicts: dict | None = None, reference: tuple[str, float] | None = None) -> dict:  # fmt: skip
    """One scatter plot per score: its values against the ``truth`` (e.g. test accuracy in %), a labelled point each.

    ``names`` and ``truth`` (K,), ``scores`` maps a score name to (K,) values; candidates with
    a NaN score are left out. ``verdicts`` (``judge``) puts each score's weighted tau in its
    title; ``reference`` = (label, truth) draws a dashed line (e.g. the from-scratch baseline).
    Returns ``{"scatter_<score>": matplotlib Figure}``.
    """
    from common.evaluation import plot_labelled_scatter

    figures = {}
    for score, values in scores.items():
        tau = (verdicts or {}).get(score, {}).get("weighted_tau")
        points = {n: (v, t) for n, v, t in zip(names, values, truth) if math.isfinite(v)}
        title = f"{score} against the accuracy reached" + (f" (weighted tau {tau:+.2f})" if tau is not None else "")
        figures[f"scatter_{score}"] = plot_labelled_scatter(
            points, f"{score} (higher: should transfer better)", "test accuracy (%)", title, reference=reference
        )
    return figures
