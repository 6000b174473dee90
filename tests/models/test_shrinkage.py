"""Shrinkage toward the drug-blind answer: the anchor, the drug folds and the cross-validated weight."""
import numpy as np
import pytest

from scdca.models import make_model
from scdca.models.shrinkage import ScaledMeanBaseline, best_weight, cv_shrinkage, drug_folds

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
    return make_pb(delta, control={"L1": np.full(G, 5.0)}, smiles={d: "C" * (i + 1) for i, d in enumerate(effect)}), effect


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


def test_best_weight_is_least_squares_clipped_to_the_unit_interval():
    d = np.array([1.0, 2.0, -1.0])
    assert best_weight(d, 0.3 * d) == pytest.approx(0.3)
    assert best_weight(d, -d) == 0.0 and best_weight(d, 5 * d) == 1.0 and best_weight(np.zeros(3), d) == 0.0


def test_cv_weight_is_near_one_for_a_model_that_knows_and_near_zero_for_noise():
    data, effect = _screen()
    control = data.control_mean[0]

    def knows(inner, held):  # the true drug effect: what a perfect drug model predicts
        return data.subset(held.ids).mean

    def noise(inner, held):  # the anchor plus confident, drug-unrelated deviations
        rng = np.random.default_rng(len(held.ids))
        anchor = ScaledMeanBaseline().fit(inner).change(held)
        return control + anchor + 3 * rng.normal(size=anchor.shape)

    w_knows, info = cv_shrinkage(knows, data, n_folds=3)
    w_noise, _ = cv_shrinkage(noise, data, n_folds=3)
    assert w_knows > 0.95 and w_noise < 0.05
    assert info["sse_w"] <= info["sse_w0"]


def test_cv_never_shows_a_held_out_drug_to_its_fold_model():
    data, _ = _screen()
    seen_together = []

    def spy(inner, held):
        seen_together.append(set(inner.conditions["drug"]) & set(held.conditions["drug"]))
        assert held.mean is None  # held-out observations are withheld
        return np.tile(data.control_mean[0], (len(held.ids), 1))

    cv_shrinkage(spy, data, n_folds=4)
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
