import numpy as np
import pytest

from scdca.data.keys import condition_id
from scdca.errors import ScdcaInputError
from scdca.models import MODELS, make_model

from ..conftest import make_pb

CTRL = {"L1": np.array([1.0, 1.0, 1.0]), "L2": np.array([2.0, 2.0, 2.0])}


def predict(model, data, train_keys, query_keys):
    ids = [condition_id(*k) for k in train_keys], [condition_id(*k) for k in query_keys]
    model.fit(data.subset(ids[0]))
    return model.predict(data.subset(ids[1], observed=False))


def test_predict_never_sees_observations():
    data = make_pb({("L1", "aspirin", 1.0): [1, 0, 0]}, control=CTRL)
    q = data.subset(data.ids, observed=False)
    assert q.mean is None and q.truth is None and q.degs == {}


def test_control_predicts_the_line_control():
    data = make_pb({("L1", "aspirin", 1.0): [1, 0, 0], ("L2", "aspirin", 1.0): [3, 0, 0]}, control=CTRL)
    p = predict(make_model("control"), data, [("L1", "aspirin", 1.0)], [("L2", "aspirin", 1.0)])
    np.testing.assert_allclose(p, [[2, 2, 2]])


def test_train_mean_averages_the_lines_training_changes():
    delta = {
        ("L1", "aspirin", 1.0): [1, 0, 0],
        ("L1", "caffeine", 1.0): [3, 2, 0],
        ("L2", "aspirin", 1.0): [9, 9, 9],
        ("L1", "ibuprofen", 1.0): [0, 0, 0],
    }
    data = make_pb(delta, control=CTRL)
    p = predict(make_model("train_mean"), data, list(delta)[:3], [("L1", "ibuprofen", 1.0)])
    np.testing.assert_allclose(p, [[1 + 2, 1 + 1, 1 + 0]])
    # an unseen line falls back to the mean change over all training conditions
    data3 = make_pb({**delta, ("L3", "aspirin", 1.0): [0, 0, 0]}, control={**CTRL, "L3": np.zeros(3)})
    p3 = predict(make_model("train_mean"), data3, list(delta)[:3], [("L3", "aspirin", 1.0)])
    np.testing.assert_allclose(p3, [[13 / 3, 11 / 3, 3]])


def test_additive_transfers_the_drugs_change_from_other_lines():
    delta = {
        ("L1", "aspirin", 1.0): [1, -1, 0],
        ("L2", "aspirin", 1.0): [5, 5, 5],
        ("L1", "caffeine", 1.0): [0, 2, 0],
        ("L2", "caffeine", 1.0): [0, 0, 0],
    }
    data = make_pb(delta, control=CTRL)
    p = predict(
        make_model("additive"),
        data,
        [("L1", "aspirin", 1.0), ("L1", "caffeine", 1.0)],
        [("L2", "aspirin", 1.0), ("L2", "caffeine", 1.0)],
    )
    np.testing.assert_allclose(p, [[3, 1, 2], [2, 4, 2]])


def test_additive_falls_back_to_the_mean_change_for_unseen_drugs():
    delta = {("L1", "aspirin", 1.0): [2, 0, 0], ("L1", "caffeine", 1.0): [0, 2, 0], ("L1", "ibuprofen", 1.0): [7, 7, 7]}
    data = make_pb(delta, control=CTRL)
    p = predict(make_model("additive"), data, list(delta)[:2], [("L1", "ibuprofen", 1.0)])
    np.testing.assert_allclose(p, [[2, 2, 1]])


def test_knn_uses_the_identical_molecule_first():
    # paracetamol is given aspirin's SMILES, so its nearest neighbour is aspirin (similarity 1)
    delta = {
        ("L1", "aspirin", 1.0): [4, 0, 0],
        ("L1", "caffeine", 1.0): [0, 4, 0],
        ("L1", "paracetamol", 1.0): [0, 0, 0],
    }
    smiles = {"paracetamol": "CC(=O)Oc1ccccc1C(=O)O"}
    data = make_pb(delta, control=CTRL, smiles=smiles)
    p = predict(make_model("knn", k=1), data, list(delta)[:2], [("L1", "paracetamol", 1.0)])
    np.testing.assert_allclose(p, [[5, 1, 1]])
    # with k=2 the result is the similarity-weighted mean of both neighbours
    p2 = predict(make_model("knn", k=2), data, list(delta)[:2], [("L1", "paracetamol", 1.0)])
    assert p2[0, 0] > p2[0, 1] > 1.0


def test_ridge_learns_a_line_specific_shift():
    drugs = ["aspirin", "caffeine", "ibuprofen", "paracetamol"]
    delta = {(c, d, x): ([1.0, 0, 0] if c == "L1" else [0, -1.0, 0]) for c in CTRL for d in drugs for x in (0.1, 1.0)}
    data = make_pb(delta, control=CTRL)
    train = [k for k in delta if k[1] != "paracetamol"]
    p = predict(
        make_model("ridge", alphas=(1e-3,)), data, train, [("L1", "paracetamol", 1.0), ("L2", "paracetamol", 0.1)]
    )
    np.testing.assert_allclose(p, [[2, 1, 1], [2, 1, 2]], atol=0.05)


def test_registry_lists_baselines_and_rejects_unknown_names():
    assert {"control", "train_mean", "additive", "ridge", "knn"} <= set(MODELS.names())
    with pytest.raises(ScdcaInputError, match="unknown model 'gpt'.*additive"):
        make_model("gpt")


def test_dominant_ignores_the_drug_and_adds_a_dose_scaled_direction_to_the_lines_mean():
    m, v = np.array([0.5, 0.5, 0.0]), np.array([1.0, -2.0, 2.0]) / 3.0  # v has unit length
    delta = {
        ("L1", d, x): m + (x - 0.55) * 2 * v * (1.2 if d == "aspirin" else 0.8)
        for d in ("aspirin", "caffeine")
        for x in (0.1, 1.0)
    }
    delta[("L1", "ibuprofen", 1.0)] = [9.0, 9.0, 9.0]  # the query's real change is never used
    delta[("L1", "ibuprofen", 0.1)] = [-9.0, 9.0, 9.0]
    data = make_pb(delta, control=CTRL)
    train = [k for k in delta if k[1] != "ibuprofen"]
    p = predict(make_model("dominant"), data, train, [("L1", "ibuprofen", 1.0), ("L1", "ibuprofen", 0.1)])
    # the training changes average to m; at dose 1.0 they sit +0.9 along v on average, at 0.1 -0.9
    np.testing.assert_allclose(p[0], CTRL["L1"] + m + 0.9 * v, atol=1e-9)
    np.testing.assert_allclose(p[1], CTRL["L1"] + m - 0.9 * v, atol=1e-9)
    # every drug of a line gets the same prediction: it cannot rank drugs
    q = predict(make_model("dominant"), data, train, [("L1", "aspirin", 1.0), ("L1", "caffeine", 1.0)])
    np.testing.assert_allclose(q[0], q[1])


def test_a_predicted_decrease_below_zero_is_clipped_to_zero_for_every_model():
    # train_mean adds the line's mean change (-3 on gene 0) to a control of 1: raw 1 - 3 = -2
    delta = {("L1", "aspirin", 1.0): [-3, 0, 1], ("L1", "caffeine", 1.0): [-3, 0, 1]}
    data = make_pb(delta, control=CTRL)
    model = make_model("train_mean")
    p = predict(model, data, [("L1", "aspirin", 1.0)], [("L1", "caffeine", 1.0)])
    np.testing.assert_allclose(p, [[0, 1, 2]])
    assert model.n_clipped_ == 1


@pytest.mark.parametrize("name", ["additive", "ridge", "knn", "dominant"])
def test_predict_is_the_raw_prediction_clipped_at_zero(name, tiny_data):
    from scdca.data.splits import make_splits

    split = make_splits(tiny_data, "unseen_cell_zeroshot", seed=0)[0]
    model = make_model(name).fit(tiny_data.subset(split.train))
    query = tiny_data.subset(split.test, observed=False)
    raw, pred = model._predict(query), model.predict(query)
    np.testing.assert_array_equal(pred, np.maximum(raw, 0))
    assert pred.min() >= 0 and model.n_clipped_ == int((raw < 0).sum())


def test_principal_directions_have_a_fixed_sign_and_span_the_changes():
    from scdca.models.base import principal_directions

    rng = np.random.default_rng(0)
    delta = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 12))  # rank 3
    mean, basis = principal_directions(delta, 3)
    flipped_mean, flipped = principal_directions(delta[::-1].copy(), 3)  # another row order: same directions
    np.testing.assert_allclose(basis, flipped, atol=1e-8)
    rows = np.arange(3)
    assert (basis[rows, np.abs(basis).argmax(1)] > 0).all()
    np.testing.assert_allclose((delta - mean) @ basis.T @ basis, delta - mean, atol=1e-8)  # nothing lost


def test_dose_mean_is_the_lines_mean_change_at_that_dose_with_fallbacks():
    from scdca.models.baselines import DoseMeanBaseline, PooledMeanBaseline

    delta = {
        ("L1", "aspirin", 1.0): [1.0, 0.0],
        ("L1", "caffeine", 1.0): [3.0, 0.0],
        ("L1", "aspirin", 10.0): [0.0, 4.0],
        ("L2", "aspirin", 1.0): [-1.0, 0.0],
    }
    data = make_pb(delta, control={"L1": [5.0, 5.0], "L2": [5.0, 5.0], "L3": [2.0, 2.0]})
    model = DoseMeanBaseline().fit(data)
    query = make_pb(
        {("L1", "ibuprofen", 1.0): [0, 0], ("L2", "ibuprofen", 10.0): [0, 0], ("L3", "ibuprofen", 3.0): [0, 0]},
        control={"L1": [5.0, 5.0], "L2": [5.0, 5.0], "L3": [2.0, 2.0]},
    )
    np.testing.assert_allclose(model.change(query)[0], [2.0, 0.0])  # L1 at 1.0: mean of aspirin, caffeine
    np.testing.assert_allclose(model.change(query)[1], [0.0, 4.0])  # L2 never at 10: all lines at 10
    np.testing.assert_allclose(model.change(query)[2], [1.0, 0.0])  # new line, dose 3 -> nearest (log) 1.0, pooled
    np.testing.assert_allclose(model.predict(query)[2], [3.0, 2.0])  # + the line's control
    np.testing.assert_allclose(PooledMeanBaseline().fit(data).change(query)[0], [1.0, 0.0])  # all lines at 1.0


@pytest.mark.parametrize("name", [n for n in MODELS.names() if MODELS.get(n).baseline])
def test_every_fitted_baseline_knows_its_genes_control_lines_and_training_molecules(name, tiny_data):
    """The contract every model keeps (`PerturbationModel.fit`): a fitted baseline answers
    genes, control_lines and training_molecules as a trained scDCA model does."""
    model = make_model(name).fit(tiny_data)
    assert list(model.genes) == list(tiny_data.genes)
    assert sorted(model.control_lines) == sorted(tiny_data.cell_lines)
    line = tiny_data.cell_lines[0]
    np.testing.assert_array_equal(model.control_lines[line], tiny_data.control_mean[0])
    assert model.training_molecules == {str(d): str(s) for d, s in tiny_data.drug_smiles().items()}
    assert model.calibration is None and model.out_of_fold("unseen_drug") is None


def test_the_reports_baseline_and_drug_blind_lists_come_from_the_model_classes():
    from scdca.eval.tables import BASELINES, MEAN_BASELINES

    # the flags give exactly the lists eval/tables.py used to keep by hand
    assert set(BASELINES) == {"control", "train_mean", "dose_mean", "pooled_mean", "additive", "ridge", "knn",
                              "dominant", "scaled_mean", "ridge_shrunk"}  # fmt: skip
    assert set(MEAN_BASELINES) == {"dose_mean", "pooled_mean", "train_mean", "scaled_mean"}
    assert all(MODELS.get(n).drug_blind for n in MEAN_BASELINES)  # a mean of training changes ignores the drug
    assert {"control", "dose_mean", "scaled_mean", "dominant"} <= {
        n for n in MODELS.names() if MODELS.get(n).drug_blind
    }
    assert not MODELS.get("ridge").drug_blind and not MODELS.get("scdca_stack").baseline
