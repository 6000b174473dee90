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
