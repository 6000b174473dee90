import numpy as np
import pytest
from sklearn.metrics import r2_score

from scdca.errors import ScdcaInputError
from scdca.eval.metrics import METRICS, ScoringInput, pearson, r2, score


def inp(pred, obs, ctrl, degs, groups=None, k=3):
    pred, obs, ctrl = (np.atleast_2d(np.asarray(a, dtype=float)) for a in (pred, obs, ctrl))
    groups = np.zeros(len(pred)) if groups is None else np.asarray(groups)
    return ScoringInput(pred, obs, ctrl, [np.asarray(d) for d in degs], groups, k=k)


def test_r2_matches_sklearn_and_is_not_clipped():
    y, yhat = np.array([1.0, 2.0, 4.0]), np.array([3.0, 0.0, 1.0])
    assert r2(y, yhat) == pytest.approx(r2_score(y, yhat))
    assert r2(y, yhat) < 0


def test_r2_deg_uses_only_top_k_degs():
    # genes 0,1,2 are the top DEGs; gene 3 is badly predicted but not scored
    obs, pred, ctrl = [1.0, 2.0, 4.0, 0.0], [1.0, 2.0, 3.0, 100.0], [0, 0, 0, 0]
    # hand: mean 7/3; SS_tot = (4/3)^2+(1/3)^2+(5/3)^2 = 42/9; SS_res = 1 -> 1 - 9/42
    v = score(inp(pred, obs, ctrl, [[2, 1, 0, 3]]), ["r2_deg"])["r2_deg"][0]
    assert v == pytest.approx(1 - 9 / 42)


def test_deg_sweep_metrics_score_the_top_n_degs_and_nan_where_fewer_genes_are_ranked():
    rng = np.random.default_rng(0)
    obs, pred = rng.normal(size=(3, 30)), rng.normal(size=(3, 30))
    degs = [rng.permutation(30) for _ in range(2)] + [np.arange(8)]  # the third ranks only 8 genes
    s = score(inp(pred, obs, np.zeros((3, 30)), degs, k=10), ["r2_deg", "r2_deg_10", "r2_deg_20", "r2_all"])
    np.testing.assert_allclose(s["r2_deg_10"][:2], s["r2_deg"][:2])  # k = 10: the paper's metric at that size
    top20 = degs[1][:20]
    assert s["r2_deg_20"][1] == pytest.approx(r2_score(obs[1, top20], pred[1, top20]))
    assert np.isnan(s["r2_deg_10"][2]) and np.isnan(s["r2_deg_20"][2])
    assert s["r2_all"][0] == pytest.approx(r2_score(obs[0], pred[0]))


def test_delta_metrics_subtract_control():
    ctrl = [1.0, 1.0, 1.0, 1.0]
    obs = [2.0, 0.0, 3.0, 1.0]  # change +1, -1, +2, 0
    pred = [2.0, 1.0, 2.0, 1.5]  # change +1,  0, +1, 0.5
    s = score(inp(pred, obs, ctrl, [[0, 1, 2]]), ["r2_delta_deg", "pearson_delta_deg", "pearson_delta"])
    assert s["r2_delta_deg"][0] == pytest.approx(r2_score([1, -1, 2], [1, 0, 1]))
    assert s["pearson_delta_deg"][0] == pytest.approx(np.corrcoef([1, -1, 2], [1, 0, 1])[0, 1])
    assert s["pearson_delta"][0] == pytest.approx(np.corrcoef([1, -1, 2, 0], [1, 0, 1, 0.5])[0, 1])


def test_constant_change_has_zero_correlation():
    s = score(inp([1, 1, 1], [2, 0, 3], [1, 1, 1], [[0, 1, 2]]), ["pearson_delta_deg"])
    assert s["pearson_delta_deg"][0] == 0.0
    assert pearson(np.ones(3), np.arange(3.0)) == 0.0


def test_mse_by_hand():
    s = score(inp([[1, 2], [0, 0]], [[1, 4], [1, 1]], [[0, 0], [0, 0]], [[0, 1], [0, 1]], k=2), ["mse"])
    np.testing.assert_allclose(s["mse"], [2.0, 1.0])


def test_rank_perfect_random_and_collapsed():
    obs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    degs = [[0, 1]] * 4
    perfect = score(inp(obs, obs, np.zeros_like(obs), degs, k=2), ["rank"])["rank"]
    np.testing.assert_allclose(perfect, 0.0)
    # one prediction for every drug: closest to obs[0]; ranks 0, 1/3, 1/3, 1 (with ties at 0.5)
    collapsed = np.tile([0.1, 0.1], (4, 1))
    r = score(inp(collapsed, obs, np.zeros_like(obs), degs, k=2), ["rank"])["rank"]
    np.testing.assert_allclose(r, [0.0, 0.5, 0.5, 1.0])
    assert r.mean() == pytest.approx(0.5)


def test_rank_is_within_group():
    obs = np.array([[0.0], [5.0], [0.0], [5.0]])
    pred = np.array([[5.0], [0.0], [0.0], [5.0]])
    r = score(inp(pred, obs, np.zeros_like(obs), [[0]] * 4, groups=["a", "a", "b", "b"], k=2), ["rank"])["rank"]
    np.testing.assert_allclose(r, [1.0, 1.0, 0.0, 0.0])


def test_unknown_metric_lists_choices():
    with pytest.raises(ScdcaInputError, match="unknown metric 'r3'.*r2_deg"):
        METRICS.get("r3")


def test_nan_prediction_is_refused():
    with pytest.raises(ScdcaInputError, match="NaN"):
        inp([np.nan, 1, 1], [1, 1, 1], [1, 1, 1], [[0, 1, 2]])


def test_metrics_against_the_average_perturbed_response_by_hand():
    ctrl, ref = [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, -1.0, 0.0]  # reference change: the average response
    obs = [3.0, 1.0, -2.0, 0.0]  # deviation from the reference: +2, 0, -1
    pred = [2.0, 2.0, -1.0, 5.0]  # deviation: +1, +1, 0 (gene 3 is not a top DEG)
    i = inp(pred, obs, ctrl, [[0, 1, 2]])
    i = ScoringInput(i.pred, i.observed, i.control, i.degs, i.groups, k=3, reference=np.atleast_2d(ref))
    s = score(i, ["pearson_vs_mean_deg", "r2_vs_mean_deg"])
    assert s["pearson_vs_mean_deg"][0] == pytest.approx(np.corrcoef([2, 0, -1], [1, 1, 0])[0, 1])
    # skill: 1 - SS(obs - pred) / SS(obs - reference) = 1 - (1 + 1 + 1) / (4 + 0 + 1)
    assert s["r2_vs_mean_deg"][0] == pytest.approx(1 - 3 / 5)
    # the reference itself scores exactly 0 on both; the truth scores 1 on the skill
    at_ref = ScoringInput(np.atleast_2d(ref), i.observed, i.control, i.degs, i.groups, k=3, reference=i.reference)
    assert score(at_ref, ["pearson_vs_mean_deg", "r2_vs_mean_deg"]) == {
        "pearson_vs_mean_deg": pytest.approx([0.0]),
        "r2_vs_mean_deg": pytest.approx([0.0]),
    }
    exact = ScoringInput(i.observed, i.observed, i.control, i.degs, i.groups, k=3, reference=i.reference)
    assert score(exact, ["r2_vs_mean_deg"])["r2_vs_mean_deg"][0] == pytest.approx(1.0)
    assert "pearson_vs_mean_deg" not in score(inp(pred, obs, ctrl, [[0, 1, 2]]))  # no reference: not scored


def test_deg_precision_and_direction_by_hand():
    ctrl = [0.0] * 5
    obs = [3.0, -2.0, 1.0, 0.1, 0.0]  # observed top-3 DEGs: 0, 1, 2
    pred = [1.0, 0.5, 0.0, -4.0, 0.2]  # predicted top-3 by |change|: 3, 0, 1
    s = score(inp(pred, obs, ctrl, [[0, 1, 2, 3, 4]]), ["deg_precision", "deg_direction"])
    assert s["deg_precision"][0] == pytest.approx(2 / 3)  # genes 0 and 1 shared
    assert s["deg_direction"][0] == pytest.approx(1 / 3)  # gene 0 right (+); gene 1 wrong (+ vs -); gene 2 no change


def test_rank_dose_ranks_only_among_conditions_at_the_same_dose():
    # two drugs x two doses; the prediction is dose-aware but drug-blind (the dose's mean)
    obs = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 4.0], [4.0, 5.0]])
    pred = np.array([[0.5, 0.5], [0.5, 0.5], [4.5, 4.5], [4.5, 4.5]])
    base = dict(control=np.zeros_like(obs), degs=[np.array([0, 1])] * 4, groups=np.zeros(4), k=2)
    i = ScoringInput(pred, obs, doses=np.array([1.0, 1.0, 10.0, 10.0]), **base)
    s = score(i, ["rank", "rank_dose"])
    assert np.allclose(s["rank_dose"], 0.5)  # cannot tell the drugs of a dose apart
    # pooled over doses, the same drug-blind model looks informative: own observation tied first of 3 others
    assert np.allclose(s["rank"], 0.5 / 3)
