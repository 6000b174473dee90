import importlib.util

import numpy as np
import pytest

from scdca.errors import ScdcaInputError
from scdca.models import make_model, peers

from ..conftest import SMILES, make_pb

needs_biolord = pytest.mark.skipif(
    importlib.util.find_spec("biolord") is None, reason="biolord not installed (pip install -r requirements-peers.lock)"
)


def exact_data(n_drugs: int):
    """Noise-free changes: each drug has its own effect vector, halved in line L2."""
    rng = np.random.default_rng(0)
    names = [f"d{i}" for i in range(n_drugs)]
    effects = {d: rng.normal(0, 1.0, 8) for d in names}
    control = {"L1": rng.normal(3, 0.5, 8), "L2": rng.normal(3, 0.5, 8)}
    delta = {(c, d, 1.0): effects[d] * (1.0 if c == "L1" else 0.5) for c in control for d in names}
    return make_pb(delta, control=control, smiles=dict(zip(names, SMILES)))


@pytest.fixture(scope="module")
def fitted():
    """biolord trained on 4 drugs x 2 lines (fewer than 5 drugs: no validation split)."""
    data = exact_data(4)
    return make_model("biolord", epochs=150, batch_size=4, encoder="morgan").fit(data), data


@needs_biolord
@pytest.mark.slow  # over 20 s; `make test` runs it
def test_biolord_learns_the_training_changes(fitted):
    model, data = fitted
    pred = model.predict(data.subset(data.ids, observed=False))
    control = data.control_for(data.conditions["cell_line"])
    assert pred.shape == data.mean.shape
    # much closer to the observations than "no change" (measured 0.035 vs 0.41)
    assert np.mean((pred - data.mean) ** 2) < 0.5 * np.mean((control - data.mean) ** 2)
    # and different for different drugs in the same line
    rows = (data.conditions["cell_line"] == "L1").to_numpy()
    assert pred[rows].std(0).mean() > 0.1


@needs_biolord
def test_biolord_keeps_the_weights_with_the_best_validation_score():
    data = exact_data(8)  # 8 drugs: one is held out for validation
    model = make_model("biolord", epochs=30, patience=5, encoder="morgan", seed=1).fit(data)
    cost = model.cost()
    assert 1 <= cost["epochs_run"] < 30  # stopped early: the last weights are not the best ones
    assert cost["val_mse"] is not None
    # the restored weights reproduce the best validation MSE on some training drug's conditions
    per_drug = []
    for d in data.drugs:
        sub = data.subset([i for i, x in zip(data.ids, data.conditions["drug"]) if x == d])
        per_drug.append(float(np.mean((model.predict(sub) - sub.mean) ** 2)))
    assert min(abs(v - cost["val_mse"]) for v in per_drug) < 1e-5


@needs_biolord
@pytest.mark.slow  # shares a fixture that takes over 20 s; `make test` runs it
def test_biolord_prediction_of_a_condition_does_not_depend_on_the_rest_of_the_query(fitted):
    model, data = fitted
    ids = data.ids
    full = model.predict(data.subset(ids, observed=False))
    picked = [ids[5], ids[0], ids[-1]]
    part = model.predict(data.subset(picked, observed=False))
    np.testing.assert_allclose(part, full[[5, 0, len(ids) - 1]], rtol=1e-5, atol=1e-6)


@needs_biolord
@pytest.mark.slow  # shares a fixture that takes over 20 s; `make test` runs it
def test_biolord_records_its_cost(fitted):
    model, _ = fitted
    c = model.cost()
    assert (
        c["params_trainable"] == c["params_total"] > 0
        and c["epochs_run"] == 150
        and c["val_mse"] is None
        and c["fit_seconds"] > 0
    )


@needs_biolord
@pytest.mark.slow  # shares a fixture that takes over 20 s; `make test` runs it
def test_biolord_refuses_a_line_without_a_control_sample(fitted):
    model, data = fitted
    q = data.subset(data.ids[:1], observed=False)
    q.conditions["cell_line"] = "nowhere"
    with pytest.raises(ScdcaInputError, match="nowhere"):
        model.predict(q)


def test_missing_peer_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ScdcaInputError, match=r"pip install biolord==0\.0\.3"):
        make_model("biolord")
    state = "pip install -r requirements-state.lock"  # the opt-in lock, not a bare package
    assert peers.peer_status() == {"biolord": "pip install biolord==0.0.3", "state": state, "state_pseudobulk": state}


def test_dose_scaling_is_unit_free_and_never_zero():
    nM = np.array([10.0, 100.0, 1000.0, 10000.0])
    t_nM = peers.scaled_log_dose(nM, np.log10(10.0), 3.0)
    t_uM = peers.scaled_log_dose(nM / 1000, np.log10(0.01), 3.0)
    np.testing.assert_allclose(t_nM, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(t_uM, t_nM)


def test_benchmark_refuses_a_missing_peer_before_running_anything(monkeypatch, tmp_path, tiny_sim):
    from scdca.eval.grid import BenchmarkConfig, run

    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    cfg = BenchmarkConfig(data="unused.h5ad", out=str(tmp_path / "b"), models=["control", "biolord"], seeds=[0])
    with pytest.raises(ScdcaInputError, match="pip install biolord"):
        run(cfg, progress=False)
    assert not (tmp_path / "b").exists()
