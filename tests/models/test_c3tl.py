import numpy as np
import pytest
import torch

from scdca.data.keys import condition_id
from scdca.data.splits import make_splits
from scdca.errors import ScdcaInputError
from scdca.models import make_model
from scdca.models.c3tl import C3TLConfig, C3TLModel, C3TLNet

from ..conftest import make_pb

FAST = dict(encoder="morgan:bits=128", steps=150)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDCA_CACHE", str(tmp_path / "cache"))


def test_pooled_drug_code_ignores_the_order_and_number_of_copies_of_observations():
    torch.manual_seed(0)
    net = C3TLNet(C3TLConfig(n_components=4, hidden=8), mol_dim=5)
    mol, scores, t, ctx = torch.randn(2, 5), torch.randn(6, 4), torch.rand(6), torch.randn(6, 4)
    pool = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3, 0]])
    perm = torch.tensor([5, 3, 0, 4, 1, 2])
    a = net.drug_code(mol, pool, scores, t, ctx)
    b = net.drug_code(mol, pool[:, perm], scores[perm], t[perm], ctx[perm])
    torch.testing.assert_close(a, b)
    # a mean, not a sum: the same observation twice gives the same code as once
    twice = net.drug_code(mol[:1], torch.tensor([[0.5, 0.5]]), scores[[0, 0]], t[[0, 0]], ctx[[0, 0]])
    once = net.drug_code(mol[:1], torch.tensor([[1.0]]), scores[:1], t[:1], ctx[:1])
    torch.testing.assert_close(twice, once)
    # no observation: the molecule alone
    torch.testing.assert_close(net.drug_code(mol, torch.zeros(2, 6), scores, t, ctx), net.psi(mol))


def test_the_pool_averages_a_drug_s_observations_leaving_the_query_s_own_line_out():
    obs_drugs, obs_lines = ["a", "a", "a", "b", "b"], ["L1", "L2", "L3", "L1", "L1"]
    pool = C3TLModel._pool(["a", "b", "c"], ["L1", "L2", "L1"], obs_drugs, obs_lines, leave_line_out=True)
    dense = pool.to_dense().numpy()
    expected = np.array([[0, 0.5, 0.5, 0, 0], [0, 0, 0, 0.5, 0.5], [0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(dense, expected)  # "c" has no observation: an empty row
    kept = C3TLModel._pool(["b"], ["L1"], obs_drugs, obs_lines, leave_line_out=False).to_dense().numpy()
    np.testing.assert_array_equal(kept, [[0, 0, 0, 0.5, 0.5]])  # at prediction the query's line counts


def test_transfers_a_drugs_effect_to_a_line_where_it_was_never_seen():
    G = 10
    up, down = np.zeros(G), np.zeros(G)
    up[:3], down[5:8] = 1.0, -1.0
    effect = {"aspirin": up, "caffeine": down, "ibuprofen": up + down, "paracetamol": -up}
    delta = {
        (line, d, x): effect[d] * x * (1.5 if line == "L2" else 1.0)
        for line in ("L1", "L2")
        for d in effect
        for x in (0.5, 1.0)
    }
    data = make_pb(delta, control={"L1": np.full(G, 1.0), "L2": np.full(G, 2.0)})
    test = [("L2", "caffeine", 1.0), ("L2", "caffeine", 0.5), ("L1", "aspirin", 1.0), ("L1", "aspirin", 0.5)]
    train = [condition_id(*k) for k in delta if k not in test]
    model = make_model("c3tl", **FAST, n_components=4).fit(data.subset(train))
    pred = model.predict(data.subset([condition_id(*k) for k in test[::2]], observed=False))
    change = pred - data.control_for(["L2", "L1"])
    assert np.corrcoef(change[0], down)[0, 1] > 0.9 and np.corrcoef(change[1], up)[0, 1] > 0.9


def test_unseen_drug_and_unseen_line_get_predictions_and_save_load_round_trips(tiny_data, tmp_path):
    for task in ("unseen_drug", "unseen_cell_zeroshot"):
        split = make_splits(tiny_data, task, 0)[0]
        model = make_model("c3tl", **FAST).fit(tiny_data.subset(split.train))
        query = tiny_data.subset(split.test, observed=False)
        pred = model.predict(query)
        assert pred.shape == (len(split.test), tiny_data.n_genes) and np.isfinite(pred).all()
        assert np.abs(pred - query.control_for(query.conditions["cell_line"])).max() > 0  # not just 'no change'
    model.save(tmp_path / "m")
    again = C3TLModel.load(tmp_path / "m")
    np.testing.assert_array_equal(again.predict(query), pred)
    assert model.cost()["params_trainable"] > 0 and model.cost()["train_seconds"] > 0
    with pytest.raises(ScdcaInputError, match="no readable model.json"):
        C3TLModel.load(tmp_path)
    import json

    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == 2 and meta["settings"]["encoder"] == FAST.get("encoder", "morgan")
    del meta["format"]  # a folder of the first format: refused with what to do, not a KeyError
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ScdcaInputError, match="older scdca.*retrain"):
        C3TLModel.load(tmp_path / "m")


def test_same_seed_gives_the_same_model(tiny_data):
    split = make_splits(tiny_data, "unseen_pair", 0)[0]
    query = tiny_data.subset(split.test, observed=False)
    a, b = (make_model("c3tl", **FAST).fit(tiny_data.subset(split.train)).predict(query) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    c = make_model("c3tl", **FAST, seed=1).fit(tiny_data.subset(split.train)).predict(query)
    assert np.abs(a - c).max() > 0
