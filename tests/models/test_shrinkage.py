"""Shrinkage toward the drug-blind answer: the anchor, the drug folds and the cross-validated weight."""

import numpy as np

from scdca.models import make_model
from scdca.models.shrinkage import (
    ScaledMeanBaseline,
    best_weights,
    cv_weights,
    drug_folds,
    trust_or_stack,
    worse_than_anchor,
)

from ..conftest import make_pb


def _screen(seed=0, n_drugs=12, signal=1.0, noise=0.0):
    """Changes = a(dose) * m + signal * drug effect (+ noise); the drug effect is a fixed random vector per drug."""
    rng = np.random.default_rng(seed)
    G = 30
    m = rng.normal(size=G)
    effect = {f"d{i}": rng.normal(size=G) for i in range(n_drugs)}
    delta = {}
    for d, e in effect.items():
        for dose, a in ((0.1, 0.5), (1.0, 2.0)):
            delta[("L1", d, dose)] = a * m + signal * a * e + noise * rng.normal(size=G)
    return make_pb(
        delta, control={"L1": np.full(G, 5.0)}, smiles={d: "C" * (i + 1) for i, d in enumerate(effect)}
    ), effect


def test_scaled_mean_recovers_a_dose_scaled_common_response():
    data, _ = _screen(signal=0.0)
    model = ScaledMeanBaseline().fit(data)
    np.testing.assert_allclose(model.predict(data), data.mean, atol=1e-4)
    # its change has train_mean's direction, so change correlations are train_mean's
    tm = make_model("train_mean").fit(data).predict(data) - data.control_mean[0]
    ch = model.change(data)
    assert np.allclose(np.corrcoef(ch[0], tm[0])[0, 1], 1.0)
    assert np.linalg.norm(ch[data.conditions["dose"].to_numpy() == 1.0][0]) > 3 * np.linalg.norm(ch[0])


def test_drug_folds_keep_every_dose_of_a_drug_together_and_use_every_fold():
    drugs = np.repeat([f"d{i}" for i in range(9)], 4)
    fold = drug_folds(drugs, 3, seed=1)
    for d in np.unique(drugs):
        assert len(set(fold[drugs == d])) == 1
    assert sorted(np.bincount(fold)) == [12, 12, 12]


def test_best_weights_are_non_negative_least_squares_capped_at_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 40, 5))
    np.testing.assert_allclose(best_weights(np.stack([a, b]), 0.3 * a + 0.6 * b), [0.3, 0.6], atol=1e-6)
    np.testing.assert_allclose(
        best_weights(np.stack([a, b]), 0.5 * a - 0.7 * b), [best_weights(a[None], 0.5 * a - 0.7 * b)[0], 0.0], atol=1e-6
    )
    assert best_weights(a[None], 5 * a)[0] == 1.0 and best_weights(np.zeros((1, 40, 5)), a)[0] == 0.0


def test_cv_weight_is_near_one_for_a_model_that_knows_and_near_zero_for_noise():
    data, effect = _screen()
    control = data.control_mean[0]

    def knows(inner, held):  # the true drug effect: what a perfect drug model predicts
        return data.subset(held.ids).mean

    def noise(inner, held):  # the anchor plus confident, drug-unrelated deviations
        rng = np.random.default_rng(len(held.ids))
        anchor = ScaledMeanBaseline().fit(inner).change(held)
        return control + anchor + 3 * rng.normal(size=anchor.shape)

    w, info = cv_weights({"knows": knows, "noise": noise}, data, n_folds=3)
    assert w["knows"] > 0.95 and w["noise"] < 0.05
    assert info["sse_blend"] <= min(info["sse_anchor"], info["sse_knows"], info["sse_noise"]) + 1e-9
    alone, _ = cv_weights({"noise": noise}, data, n_folds=3)
    assert alone["noise"] < 0.05


def test_cv_never_shows_a_held_out_drug_to_its_fold_model():
    data, _ = _screen()
    seen_together = []

    def spy(inner, held):
        seen_together.append(set(inner.conditions["drug"]) & set(held.conditions["drug"]))
        assert held.mean is None  # held-out observations are withheld
        return np.tile(data.control_mean[0], (len(held.ids), 1))

    cv_weights({"spy": spy}, data, n_folds=4)
    assert len(seen_together) == 4 and all(not s for s in seen_together)


def test_ridge_shrunk_lies_between_the_anchor_and_ridge():
    data, _ = _screen(noise=0.5)
    test_ids = [i for i in data.ids if i.split("_")[1] in ("d0", "d1")]
    train = data.subset([i for i in data.ids if i not in test_ids])
    q = data.subset(test_ids, observed=False)
    shrunk = make_model("ridge_shrunk").fit(train)
    anchor = ScaledMeanBaseline().fit(train).predict(q)
    ridge = make_model("ridge").fit(train).predict(q)
    w = shrunk.shrinkage_
    assert 0 <= w <= 1
    np.testing.assert_allclose(shrunk.predict(q), anchor + w * (ridge - anchor), atol=1e-6)


def test_a_model_that_beats_the_anchor_out_of_fold_is_kept_unshrunk_else_stacked():
    stacked = {"scdca": 0.4, "ridge": 0.3}
    assert trust_or_stack(stacked, {"p_worse_scdca": 0.3}, "scdca") == {"scdca": 1.0}
    assert trust_or_stack(stacked, {"p_worse_scdca": 0.01}, "scdca") == stacked


def test_worse_than_anchor_is_small_only_for_a_model_that_adds_error_on_most_drugs():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(40, 10))
    drugs = np.repeat(np.arange(20), 2)
    assert worse_than_anchor(rng.normal(size=target.shape), target, drugs) < 0.01  # a deviation of pure noise
    assert worse_than_anchor(0.8 * target, target, drugs) > 0.99  # most of the truth
