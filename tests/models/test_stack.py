import numpy as np
import pandas as pd
import pytest

from scdca.data.keys import condition_id
from scdca.data.screen import PerturbationData
from scdca.data.splits import make_splits
from scdca.errors import ScdcaInputError
from scdca.models import load_model, make_model
from scdca.models.shrinkage import ScaledMeanBaseline

CHEAP = "ridge,knn,additive"  # closed-form experts: no torch in most of these tests


def screen(kind: str, *, n_drugs: int = 24, genes: int = 20, seed: int = 0) -> PerturbationData:
    """Three lines x n_drugs x doses 1 and 10. 'noise': each condition's change is the common response
    plus noise no drug explains; 'drug': each drug has its own pattern (unrelated to its structure),
    the same in every line."""
    rng = np.random.default_rng(seed)
    smiles = [f"{'C' * (1 + i % 8)}{('O', 'N', 'Cl')[i // 8 % 3]}" for i in range(n_drugs)]
    common = rng.normal(0, 0.5, genes)
    pattern = rng.normal(0, 1.0, (n_drugs, genes))
    lines = ["L1", "L2", "L3"]
    control = rng.normal(8, 0.5, (3, genes)).astype(np.float32)  # high enough that no value nears 0
    rows, mean = [], []
    for li, line in enumerate(lines):
        for d in range(n_drugs):
            for dose in (1.0, 10.0):
                change = common * np.log10(10 * dose) + rng.normal(0, 0.3, genes)
                if kind == "drug":
                    change += pattern[d] * np.log10(10 * dose)
                rows.append((condition_id(line, f"D{d}", dose), line, f"D{d}", dose, smiles[d]))
                mean.append(control[li] + change)
    cond = pd.DataFrame(rows, columns=["id", "cell_line", "drug", "dose", "smiles"]).set_index("id")
    cond["n_cells"] = 1
    mean = np.asarray(mean, np.float32)
    return PerturbationData(
        genes=np.array([f"G{i}" for i in range(genes)], dtype=object),
        conditions=cond,
        mean=mean,
        std=np.full_like(mean, np.nan),
        controls=pd.DataFrame({"n_cells": 10}, index=pd.Index(lines)),
        control_mean=control,
        control_std=np.ones_like(control),
        degs={i: np.arange(genes) for i in cond.index},
    )


def fit(data, task, split=0, **kw):
    s = make_splits(data, task, 0)[split]
    kw = {"experts": CHEAP, **kw}
    model = make_model("scdca_stack", task=task, held_out=s.held_out, **kw).fit(data.subset(s.train))
    return model, s


def test_where_no_expert_beats_the_anchor_out_of_fold_the_prediction_is_the_anchor():
    data = screen("noise")
    model, split = fit(data, "unseen_drug")
    assert model.evidence_["used"] is False
    assert all(w == 0.0 for w in model.weights_.values()) and model._fitted == {}
    query = data.subset(split.test, observed=False)
    anchor = ScaledMeanBaseline().fit(data.subset(split.train)).predict(query)
    np.testing.assert_allclose(model.predict(query), anchor, atol=1e-5)
    assert "no committee of experts beats it" in model.describe()


def test_where_an_expert_predicts_held_out_units_the_stack_follows_it():
    data = screen("drug")
    model, split = fit(data, "unseen_pair")
    e = model.evidence_
    assert e["used"] is True and e["p_worse"] >= 0.05
    assert "additive" in e["committee"].split("+")  # a pair's drug, seen in the other lines
    assert sum(model.weights_.values()) == pytest.approx(1.0)
    assert e["oof_mse_stack"] < e["oof_mse_anchor"] and e["oof_rank_stack"] < e["oof_rank_anchor"]
    query = data.subset(split.test, observed=False)
    observed = data.subset(split.test).mean
    anchor = ScaledMeanBaseline().fit(data.subset(split.train)).predict(query)
    assert ((model.predict(query) - observed) ** 2).mean() < 0.5 * ((anchor - observed) ** 2).mean()
    assert set(model._fitted) == {name for name, w in model.weights_.items() if w > 0}  # weight 0: never fitted


@pytest.mark.parametrize("task", ["unseen_drug", "unseen_pair", "unseen_cell_fewshot", "unseen_cell_zeroshot"])
def test_permuting_the_test_conditions_observations_leaves_the_weights_unchanged(task):
    data = screen("drug")
    split = make_splits(data, task, 0)[0]
    test = data.conditions.index.get_indexer(list(split.test))
    shuffled = PerturbationData(**{**data.__dict__, "mean": data.mean.copy()})
    shuffled.mean[test] = data.mean[np.random.default_rng(1).permutation(test)]
    a, _ = fit(data, task)
    b, _ = fit(shuffled, task)
    scores = lambda m: {k: v for k, v in m.evidence_.items() if k != "seconds"}  # noqa: E731
    assert a.evidence_["n_units"] > 0 and a.weights_ == b.weights_ and scores(a) == scores(b)
    train = data.conditions.index.get_indexer(list(split.train))  # the check can see a change where one is made
    moved = PerturbationData(**{**data.__dict__, "mean": data.mean.copy()})
    moved.mean[train] = data.mean[np.random.default_rng(1).permutation(train)]
    assert scores(fit(moved, task)[0]) != scores(a)


def test_the_intervals_calibrate_on_the_stacks_own_folds_without_a_refit():
    from scdca.intervals import calibrate

    data = screen("drug")
    model, split = fit(data, "unseen_pair")
    train = data.subset(split.train)

    def refit():
        raise AssertionError("calibration refitted although the stack's folds were at hand")

    cal = calibrate(refit, train, "unseen_pair", 0, k=5, fitted=model)
    held = sum(len(s.test) for s, _ in model.out_of_fold("unseen_pair"))
    assert len(cal.calibration_mse) == held == model.evidence_["n_conditions"]
    assert model.out_of_fold("unseen_drug") is None  # folds of another task calibrate nothing


def test_a_saved_stack_loads_and_predicts_the_same(tmp_path):
    data = screen("drug")
    model, split = fit(data, "unseen_pair", experts=f"{CHEAP},c3tl", encoder="morgan:bits=64")
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.weights_ == model.weights_ and again.task == "unseen_pair"
    query = data.subset(split.test, observed=False)
    np.testing.assert_allclose(again.predict(query), model.predict(query), atol=1e-6)
    assert list(again.genes) == list(data.genes) and set(again.control_lines) == {"L1", "L2", "L3"}


def test_too_few_training_units_give_the_anchor_and_say_why(caplog):
    data = screen("drug", n_drugs=2)
    model = make_model("scdca_stack", experts=CHEAP, task="unseen_drug").fit(data)
    assert model.evidence_["n_units"] == 0 and all(w == 0 for w in model.weights_.values())
    assert "too few" in model.describe() and "no out-of-fold evidence" in caplog.text


def test_unknown_experts_are_refused_naming_them():
    with pytest.raises(ScdcaInputError, match=r"experts: \['ridgee'\] are not models"):
        make_model("scdca_stack", experts="ridgee,knn")


def test_ridge_chooses_a_stronger_penalty_by_drug_folds_than_by_leaving_one_condition_out():
    data = screen("drug")  # a drug's doses share its pattern, which its structure does not predict
    loo = make_model("ridge").fit(data)
    folds = make_model("ridge", penalty_folds=3).fit(data)
    assert folds.alpha_ > loo.alpha_


def test_the_default_experts_run_in_the_grid_and_record_their_weights(tiny_data, tmp_path):
    from scdca.eval.grid import BenchmarkConfig, run

    cfg = BenchmarkConfig(
        data="tiny.h5ad",
        out=str(tmp_path / "run"),
        models=["scdca_stack"],
        tasks=["unseen_pair"],
        seeds=1,
        k=5,
        report=False,
        model_options={"backbone": "random:2x16", "encoder": "morgan:bits=64", "epochs": 2},
    )
    run(cfg, data=tiny_data, progress=False)
    costs = pd.read_csv(tmp_path / "run" / "costs.csv")
    row = costs[costs["model"] == "scdca_stack"].iloc[0]
    weights = [row[f"w_{e}"] for e in ("scdca_head", "ridge", "c3tl", "knn", "additive")]
    assert all(0.0 <= w <= 1.0 for w in weights) and row["n_units"] > 0
    assert row["oof_mse_anchor"] > 0 and 0.0 <= row["oof_rank_scdca_head"] <= 1.0
