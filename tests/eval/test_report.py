import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scdca.eval.report import build, summary_text
from scdca.eval.stats import holm, paired_tests
from scdca.eval.tables import main_table, per_held_out


def tiny_results():
    """3 seeds; model 'a' beats 'b' by a known margin; two held-out lines in a cell task."""
    rows = []
    a = {0: 0.50, 1: 0.60, 2: 0.55}
    b = {0: 0.40, 1: 0.45, 2: 0.50}
    for seed in range(3):
        for model, vals in (("a", a), ("additive", b)):
            for drug, shift in (("d1", -0.1), ("d2", 0.1)):  # per-condition values average to vals[seed]
                rows.append((model, "unseen_drug", seed, "", "L1", drug, 1.0, "pearson_delta_deg", vals[seed] + shift))
                for line in ("L1", "L2"):
                    rows.append(
                        (
                            model,
                            "unseen_cell_zeroshot",
                            seed,
                            line,
                            line,
                            drug,
                            1.0,
                            "pearson_delta_deg",
                            vals[seed] + (0.05 if line == "L1" else -0.05),
                        )
                    )
    cols = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric", "value"]
    return pd.DataFrame(rows, columns=cols)


def test_paired_t_test_matches_scipy_by_hand():
    t = paired_tests(tiny_results(), "a", "pearson_delta_deg")
    row = t[(t.task == "unseen_drug") & (t.versus == "additive")].iloc[0]
    expected = stats.ttest_rel([0.50, 0.60, 0.55], [0.40, 0.45, 0.50])
    assert row["t"] == pytest.approx(expected.statistic)
    assert row["p"] == pytest.approx(expected.pvalue)
    assert row["mean_difference"] == pytest.approx(0.1)
    assert row["n_seeds"] == 3


def test_paired_tests_keep_tasks_without_held_out_lines_after_a_plain_csv_round_trip(tmp_path):
    tiny_results().to_csv(tmp_path / "r.csv", index=False)
    read = pd.read_csv(tmp_path / "r.csv")  # pandas' defaults turn held_out '' into NaN
    assert read["held_out"].isna().any()
    t = paired_tests(read, "a", "pearson_delta_deg")
    assert set(t["task"]) == {"unseen_drug", "unseen_cell_zeroshot"}
    assert t[t.task == "unseen_drug"]["mean_difference"].iloc[0] == pytest.approx(0.1)


def test_holm_correction_by_hand():
    p = pd.Series([0.01, 0.04, 0.03])
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06])


def test_main_table_marks_the_best_model_and_reports_se():
    table = main_table(tiny_results(), metrics=["pearson_delta_deg"])
    cell = table.loc[("unseen_drug", "a"), "pearson_delta_deg"]
    se = np.std([0.50, 0.60, 0.55], ddof=1) / np.sqrt(3)
    assert cell == f"0.550 ± {se:.3f} *"
    assert not table.loc[("unseen_drug", "additive"), "pearson_delta_deg"].endswith("*")


def test_per_held_out_table():
    t = per_held_out(tiny_results())
    assert t.loc[("unseen_cell_zeroshot", "a"), "L1"] == pytest.approx(0.60)
    assert t.loc[("unseen_cell_zeroshot", "a"), "L2"] == pytest.approx(0.50)


def test_summary_names_winner_and_test():
    text = summary_text(tiny_results())
    assert "On unseen_drug, a scores best (0.550), +0.100 over the best simple baseline additive" in text
    assert "paired t-test p =" in text


def test_report_builds_from_results_csv_alone(tmp_path):
    tiny_results().to_csv(tmp_path / "results.csv", index=False)
    path = build(tmp_path)
    page = path.read_text()
    assert "Paired t-tests" in page and "data:image/png;base64," in page
    assert (tmp_path / "report.md").exists() and (tmp_path / "fig_main.png").exists()


def test_group_table_pools_conditions_per_group():
    from scdca.eval.tables import group_table

    r = tiny_results()
    g = group_table(r, pd.Series({"d1": "HDAC", "d2": "kinase"}))
    # d1 is 0.1 below each seed's mean: mean over seeds 0.55 - 0.1 for model a
    assert g.loc[("unseen_drug", "HDAC"), "a"] == pytest.approx(0.45)
    assert g.loc[("unseen_drug", "kinase"), "n_drugs"] == 1


def test_dose_table_pools_conditions_per_dose_and_the_report_shows_rank_per_dose(tmp_path):
    from scdca.eval.tables import dose_table

    r = tiny_results()
    r.loc[r["drug"] == "d2", "dose"] = 10.0  # d1 (0.1 below each seed's mean) at dose 1, d2 at dose 10
    rank = r[r["metric"] == "pearson_delta_deg"].assign(metric="rank", value=0.3)
    r = pd.concat([r, rank])
    t = dose_table(r)
    assert t.loc[("unseen_drug", 1.0), "a"] == pytest.approx(0.45)
    assert t.loc[("unseen_drug", 10.0), "a"] == pytest.approx(0.65)
    assert t.loc[("unseen_cell_zeroshot", 1.0), "n_conditions"] == 2  # d1 in lines L1 and L2
    r.to_csv(tmp_path / "results.csv", index=False)
    page = build(tmp_path).read_text()
    assert "Per dose (pearson_delta_deg" in page and "Per dose (rank" in page


def test_novelty_reads_the_split_from_the_results():
    from scdca.eval.tables import novelty

    smiles = {"d1": "CC(=O)Oc1ccccc1C(=O)O", "d2": "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "d3": "CC(=O)Oc1ccccc1C(=O)O"}
    nov = novelty(tiny_results(), smiles)  # d1, d2 tested; d3 (= aspirin) is the only training drug
    d1 = nov[(nov.model == "a") & (nov.drug == "d1") & (nov.seed == 0)].iloc[0]
    assert d1["max_tanimoto"] == pytest.approx(1.0) and d1["value"] == pytest.approx(0.40)
    assert nov[nov.drug == "d2"]["max_tanimoto"].max() < 0.3


def test_annotation_table_from_the_sciplex_drug_properties(tmp_path):
    """Uses the real sci-Plex drugProperties_short.tsv from ../shared when it is present."""
    import os

    from scdca.eval.report import read_annotations

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "drugProperties_short.tsv")
    if not os.path.exists(path):
        pytest.skip("../shared/data/drugProperties_short.tsv not beside the project")
    ann = read_annotations(path, drug_column="Product.Name", group_column="Target")
    assert ann["Veliparib"] == "PARP" and ann["Veliparib (ABT-888)"] == "PARP"
    r = tiny_results().replace({"drug": {"d1": "Veliparib", "d2": "Roxadustat"}})
    r.to_csv(tmp_path / "results.csv", index=False)
    page = build(tmp_path, annotations=ann, annotation_name="Target").read_text()
    assert "Per drug group: Target" in page and "2 of 2 drugs annotated" in page and "PARP" in page


def test_annotation_file_with_a_missing_column_is_refused(tmp_path):
    from scdca.errors import ScdcaInputError
    from scdca.eval.report import read_annotations

    (tmp_path / "a.csv").write_text("name,target\nx,y\n")
    with pytest.raises(ScdcaInputError, match="column 'Target' not in"):
        read_annotations(tmp_path / "a.csv", drug_column="name", group_column="Target")


def test_peer_section_says_whether_each_peer_ran(monkeypatch):
    from scdca.eval import report

    r = tiny_results()
    monkeypatch.setattr(report, "peer_status", lambda: {"biolord": None})
    assert "biolord: installed but not in this run" in report.peers_text(r)
    monkeypatch.setattr(report, "peer_status", lambda: {"biolord": "pip install biolord==0.0.3"})
    assert "biolord: not run, its package is not installed here (pip install biolord==0.0.3)" in report.peers_text(r)
    r.loc[r["model"] == "a", "model"] = "biolord"
    assert "biolord: in this report" in report.peers_text(r)


def test_summary_reports_the_best_learned_model_when_a_baseline_wins():
    r = tiny_results()
    r.loc[r["model"] == "a", "value"] -= 0.2  # a: 0.30, 0.40, 0.35 vs additive 0.40, 0.45, 0.50
    text = summary_text(r)
    assert "On unseen_drug, additive scores best (0.450), a simple baseline" in text
    assert "the best learned model, a, scores 0.350 (-0.100, paired t-test p = " in text


def test_deg_sweep_table_orders_k_numerically_with_all_last():
    from scdca.eval.tables import sweep_table

    sweep = pd.DataFrame({"task": "t", "model": "m", "k": ["10", "100", "20", "all", "50"], "value": [1, 2, 3, 4, 5]})
    assert list(sweep_table(sweep).columns) == ["10", "20", "50", "100", "all"]


def test_deg_sweep_figure_keeps_a_collapsed_model_from_flattening_the_others():
    from scdca.eval.figures import sweep_figure

    rows = [
        ("t", m, k, v) for k in ("10", "20", "all") for m, v in (("control", 0.80), ("ridge", 0.85), ("broken", -3.0))
    ]
    fig = sweep_figure(pd.DataFrame(rows, columns=["task", "model", "k", "value"]))
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == pytest.approx(0.70)
    assert "broken below axis (min -3.00)" in ax.get_xlabel()


def test_cost_table_shows_whole_parameter_counts_and_dashes_for_closed_form_models(tmp_path):
    from scdca.eval.report import _cost_text, cost_table

    (tmp_path / "costs").mkdir()
    pd.DataFrame(
        {
            "model": ["ridge", "scdca", "scdca"],
            "seconds": [1.0, 30.0, 32.0],
            "params_trainable": [np.nan, 60160, 60160],
            "params_total": [np.nan, 637313, 637313],
        }
    ).to_csv(tmp_path / "costs" / "x.csv", index=False)
    table = cost_table(tmp_path)
    assert table.loc["scdca", "seconds"] == 31.0
    text = _cost_text(table)
    assert "60,160" in text and "637,313" in text and "nan" not in text.lower()
    assert text.splitlines()[2].split()[0] == "ridge" and text.splitlines()[2].split()[2] == "-"


def test_models_with_rank_near_one_half_are_flagged_as_not_distinguishing_drugs():
    from scdca.eval.stats import drug_blind

    rows = []
    for seed in range(2):
        for model, rank in (("blind", 0.5 + 0.015 * (-1) ** seed), ("sees", 0.35), ("edge", 0.479), ("control", 0.5)):
            rows.append((model, "unseen_drug", seed, "", "L1", "d1", 1.0, "rank", rank))
            rows.append((model, "unseen_drug", seed, "", "L1", "d1", 1.0, "pearson_delta_deg", 0.3))
    res = pd.DataFrame(
        rows, columns=["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric", "value"]
    )
    assert list(drug_blind(res)["model"]) == ["blind"]  # 0.479 is 0.021 from 0.5; control is not a model
    table = main_table(res, metrics=["rank"])
    assert table.loc[("unseen_drug", "blind"), "rank"].endswith("(does not distinguish drugs)")
    assert "distinguish" not in table.loc[("unseen_drug", "sees"), "rank"]
    assert "blind does not distinguish drugs" in summary_text(res)


def test_groups_stored_with_the_data_get_their_tables(tmp_path):
    """The simulator's hidden mechanism and activity flag, read from the benchmark's data file."""
    import json

    import anndata as ad

    from scdca.eval.tables import group_table

    obs = pd.DataFrame({"condition": ["d1", "d2"], "SMILES": ["CCO", "CCN"]}, index=["c0", "c1"])
    data = ad.AnnData(X=np.zeros((2, 3), np.float32), obs=obs)
    data.uns["drug_annotations"] = {
        "drug": np.array(["d1", "d2"]),
        "mechanism": np.array(["hdac_like", "none"]),
        "active": np.array([1, 0]),
    }
    data.write_h5ad(tmp_path / "data.h5ad")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": str(tmp_path / "data.h5ad")}))
    tiny_results().to_csv(tmp_path / "run" / "results.csv", index=False)
    page = build(tmp_path / "run").read_text()
    assert "Per drug group: mechanism (pearson_delta_deg" in page and "hdac_like" in page
    assert "Per drug group: active (pearson_delta_deg" in page and "inactive" in page
    table = group_table(tiny_results(), pd.Series({"d1": "active", "d2": "inactive"}))
    # d1 is 0.1 below its seed's value and d2 0.1 above, pooled over seeds 0.55 / 0.45 / 0.50 for 'a'
    assert table.loc[("unseen_drug", "active"), "a"] == pytest.approx(0.55 - 0.1)
    assert table.loc[("unseen_drug", "inactive"), "a"] == pytest.approx(0.55 + 0.1)


def test_figures_draw_on_the_callers_axes_and_return_their_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scdca.eval.figures import bars_figure

    rows = [
        ("m", t, s, "", "A", "d", 1.0, "rank", 0.4 + 0.01 * s) for t in ("unseen_drug", "unseen_pair") for s in (0, 1)
    ]
    results = pd.DataFrame(rows, columns=["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric",
                                          "value"])  # fmt: skip
    fig, axes = plt.subplots(1, 2)
    assert bars_figure(results, "rank", axes=axes) is fig
    assert [ax.get_title() for ax in axes] == ["unseen drug", "unseen pair"]
    with pytest.raises(ValueError, match="axes: 1 given, this figure draws 2 panels"):
        bars_figure(results, "rank", axes=[axes[0]])
    plt.close("all")


def test_calibration_table_averages_seeds_and_flags_narrow_intervals():
    from scdca.eval.report import calibration_text
    from scdca.eval.tables import calibration_table

    rows = []
    for model, cov in (("good", 0.9), ("narrow", 0.6)):
        for seed in (0, 1):
            for i in range(4):  # expected_mse sorts mse perfectly for "good", reversed for "narrow"
                base = {"model": model, "task": "unseen_drug", "seed": seed, "held_out": np.nan,
                        "cell_line": "L", "drug": f"d{i}", "dose": 1.0}  # fmt: skip
                rows += [
                    {**base, "metric": "coverage_90", "value": cov + (0.02 if seed else -0.02)},
                    {**base, "metric": "interval_width_90", "value": 1.0},
                    {**base, "metric": "mse", "value": float(i)},
                    {**base, "metric": "expected_mse", "value": float(i if model == "good" else -i)},
                ]
    table = calibration_table(pd.DataFrame(rows))
    assert table.loc[("unseen_drug", "good"), "coverage_90"] == pytest.approx(0.9)
    assert table.loc[("unseen_drug", "good"), "error_spearman"] == pytest.approx(1.0)
    assert table.loc[("unseen_drug", "narrow"), "error_spearman"] == pytest.approx(-1.0)
    assert list(table["verdict"]) == ["ok", "too narrow"]
    assert "narrow on unseen_drug (0.60)" in calibration_text(table)


def test_the_summary_names_the_recommended_model_next_to_the_best_baseline_on_each_metric(tmp_path):
    from scdca.eval.report import recommended_text
    from scdca.eval.stats import split_means

    rows = []
    means = {  # model -> (change score, rank, mse): ridge best on rank, dominant on change and mse
        "scdca_stack": (0.30, 0.46, 0.040),
        "ridge": (0.25, 0.47, 0.045),
        "dominant": (0.28, 0.50, 0.044),
    }
    for model, values in means.items():
        for seed in range(2):
            for metric, value in zip(("pearson_delta_deg", "rank", "mse"), values):
                for drug, shift in (("d1", -0.01), ("d2", 0.01)):
                    rows.append((model, "unseen_drug", seed, "", "L1", drug, 1.0, metric, value + shift))
    cols = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric", "value"]
    results = pd.DataFrame(rows, columns=cols)
    text = recommended_text(results)
    line = "- unseen_drug: change score 0.300 (dominant 0.280), rank 0.460 (ridge 0.470), mse 0.040 (dominant 0.044)"
    assert line in text
    assert recommended_text(split_means(results)) == text  # the report passes split means
    assert recommended_text(results[results["model"] != "scdca_stack"]) == ""
    results.to_csv(tmp_path / "results.csv", index=False)
    assert "The recommended model, scdca_stack" in build(tmp_path).read_text()


def test_split_means_equal_pandas_groupby_with_nan_skipped_for_text_or_categorical_columns():
    from scdca.eval.stats import per_seed, split_means

    results = tiny_results()
    results.loc[0, "value"] = np.nan  # one NaN condition: skipped, as pandas' mean skips it
    results.loc[len(results)] = ("a", "unseen_drug", 9, "", "L1", "d1", 1.0, "rank", np.nan)  # an all-NaN split
    keys = ["model", "task", "seed", "held_out", "metric"]
    expected = results.groupby(keys)["value"].mean().reset_index().sort_values(keys, ignore_index=True)
    for frame in (results, results.astype({c: "category" for c in ("model", "task", "held_out", "metric")})):
        got = split_means(frame).sort_values(keys, ignore_index=True)
        assert got[keys].astype(str).equals(expected[keys].astype(str))
        np.testing.assert_allclose(got["value"], expected["value"], equal_nan=True)
        pd.testing.assert_frame_equal(per_seed(got, "pearson_delta_deg"), per_seed(results, "pearson_delta_deg"))


def test_cost_table_takes_the_median_peak_memory_over_a_models_cells(tmp_path):
    from scdca.eval.report import cost_table

    (tmp_path / "costs").mkdir()
    peaks = [2500.0, 1040.0, 1042.0, 1044.0]  # one cell ran in a worker still holding another model's memory
    pd.DataFrame({"model": "state", "seconds": 1.0, "peak_rss_mb": peaks}).to_csv(
        tmp_path / "costs" / "x.csv", index=False
    )
    assert cost_table(tmp_path).loc["state", "peak_rss_mb"] == 1043.0
