import numpy as np
import pandas as pd
import pytest

from scdca.cli import main
from scdca.data.screen import read
from scdca.errors import ScdcaInputError
from scdca.eval.export import PERT_COL, cell_eval_pair, export
from scdca.eval.grid import BenchmarkConfig, run
from scdca.eval.runs import CONTROL, read_predictions


@pytest.fixture(scope="module")
def ridge_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = BenchmarkConfig(
        data="tiny.h5ad", out=str(out), models=["ridge"], tasks=["unseen_drug", "unseen_cell_zeroshot"], seeds=1, k=5
    )
    return out, run(cfg, data=tiny_data, progress=False)


def test_pair_has_one_control_row_per_line_and_the_same_rows_on_both_sides(ridge_run, tmp_path):
    out, _ = ridge_run
    real_path, pred_path = export(out, "ridge", "unseen_drug", 0, tmp_path)
    real, pred = read(real_path), read(pred_path)
    preds = read_predictions(out / "predictions" / "ridge__unseen_drug__seed0.h5ad")
    assert list(real.obs_names) == list(pred.obs_names) and real.shape == pred.shape
    ctrl = real.obs[PERT_COL] == CONTROL
    assert sorted(real.obs.loc[ctrl, "cell_line"]) == sorted(preds.obs["cell_line"].unique())
    np.testing.assert_array_equal(real.X[~ctrl.to_numpy()], preds.layers["observed"])
    np.testing.assert_array_equal(pred.X[~ctrl.to_numpy()], preds.X)
    np.testing.assert_array_equal(real.X[ctrl.to_numpy()], pred.X[ctrl.to_numpy()])  # the same control
    assert pred.X.min() >= 0


def test_cell_eval_scores_the_exported_pair_as_we_do(ridge_run, tmp_path):
    cell_eval = pytest.importorskip("cell_eval")
    out, results = ridge_run
    real, pred = (read(p) for p in export(out, "ridge", "unseen_cell_zeroshot", 0, tmp_path))
    ours = results[
        (results["model"] == "ridge")
        & (results["task"] == "unseen_cell_zeroshot")
        & results["metric"].isin(["pearson_delta", "mse"])
    ]
    checked = 0
    for line in real.obs["cell_line"].unique():
        r, p = real[real.obs["cell_line"] == line].copy(), pred[pred.obs["cell_line"] == line].copy()
        ev = cell_eval.MetricsEvaluator(
            adata_pred=p,
            adata_real=r,
            control_pert=CONTROL,
            pert_col=PERT_COL,
            skip_de=True,
            num_threads=1,
            outdir=str(tmp_path / "ce"),
        )
        theirs, _ = ev.compute(profile="anndata", write_csv=False)
        theirs = theirs.to_pandas().set_index("perturbation")
        mine = ours[ours["cell_line"] == line]
        for _, row in mine.iterrows():
            label = f"{row['drug']}@{float(row['dose']):g}"
            assert theirs.loc[label, row["metric"]] == pytest.approx(row["value"], abs=1e-6)
            checked += 1
    assert checked == len(ours) > 0


def test_export_names_what_the_run_holds_when_the_cell_is_missing(ridge_run, tmp_path):
    out, _ = ridge_run
    with pytest.raises(ScdcaInputError, match="ridge__unseen_drug__seed0"):
        export(out, "ridge", "unseen_drug", 3, tmp_path)
    assert main(["export", str(out), "--model", "knn", "--task", "unseen_drug", "--out", str(tmp_path)]) == 2


def test_cli_export_prints_the_cell_eval_command(ridge_run, tmp_path, capsys):
    out, _ = ridge_run
    assert main(["export", str(out), "--model", "ridge", "--task", "unseen_drug", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "cell-eval run" in text and "--celltype-col cell_line" in text
    assert (tmp_path / "ridge__unseen_drug__seed0_pred.h5ad").is_file()


def test_a_drug_named_like_the_control_label_is_refused():
    import anndata as ad

    a = ad.AnnData(
        np.ones((1, 2), np.float32), obs=pd.DataFrame({"cell_line": ["L1"], "drug": [CONTROL], "dose": [1.0]})
    )
    a.layers["observed"] = a.X.copy()
    a.layers["control"] = a.X.copy()
    with pytest.raises(ScdcaInputError, match="rename that drug"):
        cell_eval_pair(a)


def _de_tables(real, pred, preds, k):
    """cell-eval DE tables whose definitions coincide with ours: the real side's significant genes are
    our top-k DEGs (in our order), the predicted side ranks every gene by |predicted change|."""
    import polars as pl

    genes = np.asarray(real.var_names)
    rows_real, rows_pred = [], []
    for i, label in enumerate(preds.obs["perturbation"]):
        ctrl = preds.layers["control"][i]
        top = [list(genes).index(g) for g in preds.uns["degs"].loc[preds.obs_names[i]].iloc[:k]]
        score = np.zeros(len(genes))
        score[top] = k - np.arange(k)  # our order
        fdr = np.where(score > 0, 0.0, 1.0)
        observed, change = preds.layers["observed"][i] - ctrl, preds.X[i] - ctrl
        rows_real.append(
            pl.DataFrame(
                {
                    "target": label,
                    "feature": genes,
                    "log2_fold_change": observed,
                    "abs_log2_fold_change": score,
                    "p_value": fdr,
                    "fdr": fdr,
                }  # fmt: skip
            )
        )
        rows_pred.append(
            pl.DataFrame(
                {
                    "target": label,
                    "feature": genes,
                    "log2_fold_change": change,
                    "abs_log2_fold_change": np.abs(change),
                    "p_value": 0.0,
                    "fdr": 0.0,
                }  # fmt: skip
            )
        )
    return pl.concat(rows_real), pl.concat(rows_pred)


def test_deg_precision_direction_and_rank_agree_with_cell_eval(ridge_run, tmp_path):
    """cell-eval's overlap_at_N and de_direction_match equal our deg_precision and deg_direction when its DE
    tables rank genes as we do (its own DE ranks by |log fold change| of a Wilcoxon test on cells, ours by
    |Welch t|). Its discrimination_score_l2 is 1 - (our rank) x (n - 1) / n: it divides by all n conditions,
    itself included, and scores 1 for the best; we divide by the n - 1 others and score 0 for the best."""
    cell_eval = pytest.importorskip("cell_eval")
    out, results = ridge_run
    k = 5
    real, pred = (read(p) for p in export(out, "ridge", "unseen_cell_zeroshot", 0, tmp_path))
    preds = read_predictions(out / "predictions" / "ridge__unseen_cell_zeroshot__seed0.h5ad")
    ours = results[(results["model"] == "ridge") & (results["task"] == "unseen_cell_zeroshot")]
    checked = 0
    for line in preds.obs["cell_line"].unique():
        keep = preds.obs["cell_line"] == line
        r, p = real[real.obs["cell_line"] == line].copy(), pred[pred.obs["cell_line"] == line].copy()
        de_real, de_pred = _de_tables(r, p, preds[keep.to_numpy()], k)
        ev = cell_eval.MetricsEvaluator(adata_pred=p, adata_real=r, de_real=de_real, de_pred=de_pred,
                                        control_pert=CONTROL, pert_col=PERT_COL, num_threads=1,
                                        outdir=str(tmp_path / "ce"))  # fmt: skip
        theirs, _ = ev.compute(profile="full", write_csv=False)
        theirs = theirs.to_pandas().set_index("perturbation")
        n = int(keep.sum())
        mine = ours[ours["cell_line"] == line].pivot_table(index=["drug", "dose"], columns="metric", values="value")
        for (drug, dose), row in mine.iterrows():
            label = f"{drug}@{float(dose):g}"
            assert theirs.loc[label, "overlap_at_N"] == pytest.approx(row["deg_precision"], abs=1e-6)
            assert theirs.loc[label, "de_direction_match"] == pytest.approx(row["deg_direction"], abs=1e-6)
            expected = 1 - row["rank"] * (n - 1) / n
            assert theirs.loc[label, "discrimination_score_l2"] == pytest.approx(expected, abs=1e-6)
            checked += 1
    assert checked == len(ours[ours["metric"] == "rank"]) > 0
