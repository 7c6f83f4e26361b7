import math

import numpy as np
import pytest

from gatelab.edge.quality import (
    all_subsets,
    assign_folds,
    choose_estimator,
    crossfit_logits,
    estimate,
    shrink,
    subset_loglik,
)
from gatelab.edge.train import GateData, TrainConfig

NAMES = ["a", "b"]


def _toy():
    """Category a: 2 non-test questions, b: 8, one subset column; plus test rows holding NaN."""
    category = np.array(["a"] * 2 + ["b"] * 8 + ["a", "b"])
    split = np.array(["train", "val"] + ["train"] * 5 + ["val"] * 3 + ["test", "test"])
    ll = np.array([-1.0, -3.0] + [-0.5] * 8 + [math.nan, math.nan])[:, None]
    return ll, split, category


def test_shrinkage_closed_form_on_two_categories():
    ll, split, category = _toy()
    # by hand: mean a = -2, mean b = -0.5, pooled = (-4 - 4) / 10 = -0.8; lam = 3:
    # w_a = 2 / 5, w_b = 8 / 11
    got = estimate("shrunk", ll, ll, split, category, NAMES, lam=3.0)[:, 0]
    assert got[0] == pytest.approx(0.4 * -2 + 0.6 * -0.8)  # -1.28
    assert got[1] == pytest.approx(-6.4 / 11)
    raw = estimate("crossfit", ll, ll, split, category, NAMES)[:, 0]
    assert raw == pytest.approx([-2.0, -0.5])
    assert estimate("shrunk", ll, ll, split, category, NAMES, lam=0.0)[:, 0] == pytest.approx(raw)
    pooled = estimate("shrunk", ll, ll, split, category, NAMES, lam=math.inf)[:, 0]
    assert pooled == pytest.approx([-0.8, -0.8])
    assert estimate("holdout", ll, ll, split, category, NAMES)[:, 0] == pytest.approx([-3, -0.5])
    with pytest.raises(ValueError, match="lam"):
        shrink(np.zeros((2, 1)), np.array([1, 1]), np.zeros(1), -1.0)
    with pytest.raises(ValueError, match="unknown 'vibes'"):
        estimate("vibes", ll, ll, split, category, NAMES)


def test_subset_loglik_matches_a_naive_mixture():
    rng = np.random.default_rng(0)
    n, e = 7, 3
    logits = rng.normal(size=(n, e))
    probs = rng.dirichlet(np.ones(4), size=(n, e))
    available = rng.random((n, e)) < 0.8
    answer = rng.integers(0, 4, n)
    subsets = all_subsets(e)
    assert len(subsets) == 2**e - 1 and len(set(subsets)) == len(subsets)
    got = subset_loglik(logits, probs, available, answer, subsets, top_k=e)
    for i in range(n):
        for j, subset in enumerate(subsets):
            members = [m for m in sorted(subset) if available[i, m]]
            if not members:
                p = 0.25  # no member answered: uniform
            else:
                w = np.exp([logits[i, m] for m in members])
                w = w / w.sum()
                p = sum(w[r] * probs[i, m, answer[i]] for r, m in enumerate(members))
            assert got[i, j] == pytest.approx(math.log(max(p, 1e-12)), abs=1e-9)


def _pool(n_per_category=20, seed=0):
    rng = np.random.default_rng(seed)
    category = np.repeat(["x", "y", "z"], n_per_category)
    n = len(category)
    split = np.array(["train", "train", "val", "test", "train"] * (n // 5))
    qids = [f"{c}/{i}" for i, c in enumerate(category)]
    data = GateData(
        rng.normal(size=(n, 8)),
        rng.dirichlet(np.ones(4), size=(n, 3)),
        np.ones((n, 3), dtype=bool),
        rng.integers(0, 4, n),
    )
    return data, split, category, qids


TRAIN = TrainConfig(max_steps=15, patience=15, d_hidden=4, lr=1e-2)


def test_crossfit_uses_no_test_question():
    data, split, category, qids = _pool()
    fit = crossfit_logits(data, split, category, qids, TRAIN, k=4, seed=1)
    test_ids = {q for q, s in zip(qids, split, strict=True) if s == "test"}
    assert all(not set(seen) & test_ids for seen in fit.trained_on)
    assert ((fit.fold == -1) == (split == "test")).all()
    assert np.isnan(fit.logits[split == "test"]).all()
    assert np.isfinite(fit.logits[split != "test"]).all()
    for f, seen in enumerate(fit.trained_on):  # out of fold: a gate never saw what it scores
        scored = {qids[i] for i in np.flatnonzero(fit.fold == f)}
        assert scored and not scored & set(seen)
    # changing every test question (embedding, answers, gold) changes no non-test logit
    rng = np.random.default_rng(9)
    test = split == "test"
    x, probs, answer = data.x.copy(), data.probs.copy(), data.answer.copy()
    x[test] = rng.normal(size=x[test].shape)
    probs[test] = rng.dirichlet(np.ones(4), size=(int(test.sum()), 3))
    answer[test] = (answer[test] + 1) % 4
    other = crossfit_logits(
        GateData(x, probs, data.available, answer), split, category, qids, TRAIN, k=4, seed=1
    )
    np.testing.assert_array_equal(other.logits[~test], fit.logits[~test])


def test_folds_are_stratified_and_independent_of_question_order():
    _, split, category, qids = _pool(n_per_category=23)
    split = split.tolist() + ["train"] * (len(category) - len(split))
    split = np.array(split)
    fold = assign_folds(category, split, qids, k=5, seed=3)
    for c in "xyz":
        sizes = np.bincount(fold[(category == c) & (split != "test")], minlength=5)
        assert sizes.max() - sizes.min() <= 1
    order = np.random.default_rng(0).permutation(len(qids))
    again = assign_folds(category[order], split[order], [qids[i] for i in order], k=5, seed=3)
    moved = dict(zip([qids[i] for i in order], again, strict=True))
    assert moved == dict(zip(qids, fold, strict=True))
    with pytest.raises(ValueError, match="n_folds"):
        assign_folds(category, split, qids, k=1, seed=0)


def _lls(n_per_category, spread, seed):
    """Per-question ℓ(S) for 4 categories and 7 subsets: true means differ by ``spread``."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=7) + spread * rng.normal(size=(4, 7))  # (C, S)
    category = np.repeat(list("pqrs"), n_per_category)
    noise = rng.normal(scale=1.0, size=(len(category), 7))
    ll = truth[np.searchsorted(list("pqrs"), category)] + noise
    split = np.resize(np.array(["train", "train", "train", "val", "test"]), len(category))
    fold = assign_folds(category, split, [f"{i:04d}" for i in range(len(category))], 5, 0)
    ll[split == "test"] = np.nan
    return ll, split, category, fold


def test_choice_reads_no_test_row_and_follows_the_data():
    ll, split, category, fold = _lls(40, spread=0.0, seed=0)
    choice = choose_estimator(ll, ll, split, category, fold)
    poisoned = ll.copy()
    poisoned[split == "test"] = 1e6  # were test rows read, every error would change
    same = choose_estimator(poisoned, poisoned, split, category, fold)
    assert same == choice
    assert np.isfinite(list(choice.errors.values())).all()
    # identical categories: pooling wins; holdout, with a fifth of the questions, loses
    assert choice.chosen == "shrunk" and choice.lam >= 50
    assert choice.errors["holdout"] > choice.errors["crossfit"] > choice.errors["shrunk"]
    # very different categories with many questions each: little or no pooling
    ll, split, category, fold = _lls(400, spread=3.0, seed=1)
    choice = choose_estimator(ll, ll, split, category, fold)
    assert choice.chosen in ("crossfit", "shrunk") and choice.lam <= 10
