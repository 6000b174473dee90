"""The STATE peer (scdca.models.arc_state): both modes, unseen drugs and lines, save/load, guards.

`make test` installs the opt-in arc-state lock, so these run in CI; elsewhere they skip.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from scdca.data.screen import load
from scdca.data.splits import make_splits
from scdca.errors import ScdcaInputError
from scdca.eval.report import peers_text
from scdca.models import arc_state, load_model, make_model
from scdca.models.peers import installed

needs_state = pytest.mark.skipif(
    not (installed("state.tx") and installed("geomloss")),
    reason="arc-state not installed (pip install -r requirements-state.lock; make test does)",
)
TINY = dict(set_size=4, hidden=16, layers=1, heads=2, batch_size=4, pseudobulk_batch=16, lr=3e-3, encoder="morgan")


@pytest.fixture(scope="module")
def cells_data(tiny_sim):
    return load(tiny_sim, cells_per_condition=8)


def split(data, task):
    s = make_splits(data, task, seed=0)[0]
    return data.subset(s.train), data.subset(s.test, observed=False), data.subset(s.test)


def mse(pred, data):
    return float(np.mean((pred - data.mean) ** 2))


@needs_state
@pytest.mark.parametrize("mode", ["set", "pseudobulk"])
def test_state_trains_in_both_modes_and_predicts_new_drugs_and_new_lines(cells_data, tiny_data, mode):
    data = cells_data if mode == "set" else tiny_data  # tiny_data was loaded without cells
    for task in ("unseen_drug", "unseen_cell_zeroshot"):
        train, query, test = split(data, task)
        untrained = make_model("state", max_steps=0, **TINY).fit(train)
        model = make_model("state", max_steps=60, eval_every=20, patience=10, **TINY).fit(train)
        cost = model.cost()
        assert cost["mode"] == mode and cost["set_size"] == (4 if mode == "set" else 1)
        assert cost["steps_run"] == 60 and cost["val_mse"] is not None  # 10 drugs: one held out for validation
        pred = model.predict(query)
        assert pred.shape == test.mean.shape and np.isfinite(pred).all()
        # STATE's own training moved it toward the training data, and it kept its best validation weights
        assert mse(model.predict(train), train) < 0.5 * mse(untrained.predict(train), train)
        val = cost["val_mse"]
        assert val <= mse(untrained.predict(train), train)


@needs_state
def test_set_size_one_runs_pseudobulk_mode_even_with_cells(cells_data):
    train, _, _ = split(cells_data, "unseen_drug")
    assert make_model("state", max_steps=2, **{**TINY, "set_size": 1}).fit(train).cost()["mode"] == "pseudobulk"
    options = {k: v for k, v in TINY.items() if k != "set_size"}
    assert make_model("state_pseudobulk", max_steps=2, **options).fit(train).cost()["mode"] == "pseudobulk"


@needs_state
def test_a_new_line_is_predicted_from_its_own_control_cells(cells_data):
    train, query, _ = split(cells_data, "unseen_cell_zeroshot")
    model = make_model("state", max_steps=30, **TINY).fit(train)
    new_line = sorted(set(query.conditions["cell_line"]) - set(train.conditions["cell_line"]))
    assert new_line, "zero-shot split holds out a line"
    before = model.predict(query)
    shifted = query.cells.X.copy()
    rows = np.isin(query.cells.cell_line, new_line)
    shifted[rows] += 1.0
    moved = model.predict(replace(query, cells=replace(query.cells, X=shifted)))
    assert np.abs(moved - before).mean() > 1e-3
    # a set-mode model that never saw the line's control cells refuses a query without them
    c = train.cells
    seen = ~np.isin(c.cell_line, new_line)
    blind = make_model("state", max_steps=2, **TINY).fit(
        replace(train, cells=replace(c, X=c.X[seen], condition=c.condition[seen], cell_line=c.cell_line[seen]))
    )
    with pytest.raises(ScdcaInputError, match=f"no control cells of line '{new_line[0]}'"):
        blind.predict(replace(query, cells=None))
    assert blind.predict(query).shape == before.shape  # given them, it predicts


@needs_state
def test_a_prediction_does_not_depend_on_the_rest_of_the_query(cells_data):
    train, query, _ = split(cells_data, "unseen_cell_zeroshot")
    model = make_model("state", max_steps=10, **TINY).fit(train)
    full = model.predict(query)
    picked = [query.ids[-1], query.ids[2]]
    np.testing.assert_allclose(model.predict(query.subset(picked, observed=False)), full[[len(full) - 1, 2]], atol=1e-5)


@needs_state
def test_state_survives_save_and_load(cells_data, tmp_path):
    train, query, _ = split(cells_data, "unseen_drug")
    model = make_model("state", max_steps=20, **TINY).fit(train)
    model.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.mode == "set" and back.cost()["steps_run"] == 20
    np.testing.assert_allclose(back.predict(query), model.predict(query), atol=1e-5)
    # a saved model predicts a training line without the data's cells (it keeps each line's set)
    bare = replace(query, cells=None)
    np.testing.assert_allclose(back.predict(bare), model.predict(query), atol=1e-5)


@needs_state
def test_a_drug_without_an_embedding_is_refused_not_read_as_no_drug(tiny_data, tmp_path):
    drugs = tiny_data.drug_smiles()
    table = pd.DataFrame({"drug": list(drugs), "e0": 1.0, "e1": np.arange(len(drugs), dtype=float)})
    table.loc[3, ["e0", "e1"]] = 0.0  # no features for this drug
    table.to_csv(tmp_path / "emb.csv", index=False)
    model = make_model("state", max_steps=2, **{**TINY, "encoder": f"table:{tmp_path / 'emb.csv'}"})
    with pytest.raises(ScdcaInputError, match=f"{table.loc[3, 'drug']}.*no usable embedding"):
        model.fit(tiny_data)


def test_without_the_package_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(arc_state, "installed", lambda module: False)
    with pytest.raises(ScdcaInputError, match=r"requirements-state\.lock.*CC BY-NC-SA|CC BY-NC-SA.*requirements-state"):
        make_model("state")


def test_the_report_says_which_mode_state_ran_in():
    results = pd.DataFrame({"model": ["state", "ridge"]})
    costs = pd.DataFrame({"model": ["state"] * 3, "mode": ["set", "set", "pseudobulk"], "set_size": [32, 32, 1]})
    text = peers_text(results, costs)
    line = next(x for x in text.splitlines() if x.startswith("state:"))
    assert "set mode in 2 of 3 cells" in line and "sets of 32 sampled cells" in line
    assert "pseudobulk mode in 1 of 3" in line
    absent = next(x for x in peers_text(pd.DataFrame({"model": ["ridge"]})).splitlines() if x.startswith("state:"))
    assert "in this report" not in absent and "set mode" not in absent
