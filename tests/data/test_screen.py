import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdca.data.keys import DataKeys, condition_id
from scdca.data.screen import load
from scdca.errors import ScdcaInputError
from tests.conftest import make_cells, make_pb


def test_condition_id_matches_chemcpa_cov_drug_dose_name():
    assert condition_id("A549", "Dacinostat", 0.1) == "A549_Dacinostat_0.1"
    assert condition_id("K562", "x", 1) == "K562_x_1.0"


def test_pseudobulk_mean_std_count_match_pandas_groupby():
    adata = make_cells(n_per=4, counts=False)
    data = load(adata, normalize="log")
    df = pd.DataFrame(adata.X, index=adata.obs_names)
    key = adata.obs["cell_type"].astype(str) + "|" + adata.obs["condition"].astype(str)
    g = df.groupby(key.values)
    cid = condition_id("L2", "caffeine", 1.0)
    row = data.ids.index(cid)
    np.testing.assert_allclose(data.mean[row], g.mean().loc["L2|caffeine"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(data.std[row], g.std(ddof=1).loc["L2|caffeine"].to_numpy(), rtol=1e-4)
    assert data.conditions.loc[cid, "n_cells"] == 4
    np.testing.assert_allclose(data.control_for(["L1"])[0], g.mean().loc["L1|control"].to_numpy(), rtol=1e-5)
    assert data.controls.loc["L1", "n_cells"] == 8


def test_counts_are_detected_and_log_normalised():
    adata = make_cells(counts=True)
    data = load(adata)
    x = adata.X[adata.obs["condition"].eq("aspirin").to_numpy() & adata.obs["cell_type"].eq("L1").to_numpy()]
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4).mean(0)
    np.testing.assert_allclose(data.mean[data.ids.index("L1_aspirin_1.0")], expected, rtol=1e-5)


def test_log_data_is_used_as_given_and_sparse_input_works():
    adata = make_cells(counts=False)
    dense = load(adata)
    adata.X = sp.csr_matrix(adata.X)
    sparse = load(adata)
    np.testing.assert_allclose(dense.mean, sparse.mean, rtol=1e-6)
    assert dense.mean.max() <= 1.0  # values in [0, 1): not treated as counts


def test_split_halves_partition_each_condition():
    adata = make_cells(n_per=6, counts=False)
    data = load(adata)
    # the mean of two equal halves is the full mean
    np.testing.assert_allclose((data.half_a + data.half_b) / 2, data.mean, rtol=1e-5)
    assert not np.allclose(data.half_a, data.half_b)


def test_pseudobulk_input_has_one_row_per_condition_and_ranks_degs_by_change():
    obs = pd.DataFrame(
        {
            "cell_type": ["L1", "L1"],
            "condition": ["control", "aspirin"],
            "dose_val": [0.0, 1.0],
            "SMILES": ["", "CC(=O)Oc1ccccc1C(=O)O"],
            "control": [1, 0],
        },
        index=["ctrl", "asp"],
    )
    X = np.array([[1.0, 1.0, 1.0], [1.5, 0.2, 1.1]], dtype=np.float32)
    data = load(ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["a", "b", "c"])))
    assert data.conditions["n_cells"].tolist() == [1]
    assert np.isnan(data.std).all()
    assert data.degs["L1_aspirin_1.0"].tolist() == [1, 0, 2]  # |-0.8| > |0.5| > |0.1|
    assert data.half_a is None


def test_rank_degs_matches_scanpy_t_test():
    import scanpy as sc

    adata = make_cells(n_per=30, genes=40, counts=False, seed=3)
    adata.X[adata.obs["condition"].eq("aspirin").to_numpy()] *= np.linspace(0.5, 1.5, 40).astype(np.float32)
    data = load(adata)
    sub = adata[adata.obs["cell_type"] == "L1"].copy()
    sc.tl.rank_genes_groups(
        sub, "condition", groups=["aspirin"], reference="control", method="t-test", rankby_abs=True, n_genes=40
    )
    expected = [str(g) for g in sub.uns["rank_genes_groups"]["names"]["aspirin"][:10]]
    ours = [str(data.genes[i]) for i in data.degs["L1_aspirin_1.0"][:10]]
    assert ours == expected


def test_degs_from_uns_are_used_when_present():
    adata = make_cells(counts=False)
    adata.uns["rank_genes_groups_cov"] = {"L1_aspirin_1.0": np.array(["G3", "G0", "NOT_A_GENE"])}
    data = load(adata)
    assert data.degs["L1_aspirin_1.0"].tolist() == [3, 0]
    assert len(data.degs["L2_aspirin_1.0"]) == 5  # computed for the others


def test_gene_selection_by_list_and_by_hvg():
    adata = make_cells(counts=False, genes=30)
    data = load(adata, genes=["G5", "G2"])
    assert data.genes.tolist() == ["G5", "G2"]
    assert load(adata, n_top_genes=10).n_genes == 10
    with pytest.raises(ScdcaInputError, match="not in the data.*NOPE"):
        load(adata, genes=["G1", "NOPE"])


def test_custom_keys_and_control_by_drug_name():
    adata = make_cells(counts=False)
    adata.obs = adata.obs.rename(
        columns={"cell_type": "line", "condition": "drug", "dose_val": "uM", "SMILES": "smi"}
    ).drop(columns="control")
    data = load(adata, keys=DataKeys(cell_line="line", drug="drug", dose="uM", smiles="smi"))
    assert len(data.ids) == 4 and data.cell_lines == ["L1", "L2"]


def test_simulated_truth_is_loaded_and_close_to_observations(tiny_data):
    assert tiny_data.truth is not None and tiny_data.truth.shape == tiny_data.mean.shape
    # 6 cells per condition: the truth is near, not equal to, the observation
    err = np.abs(tiny_data.truth - tiny_data.mean).mean()
    assert 0.0 < err < 0.3
    # and it is the expectation of what load() computes: no systematic offset (a naive
    # log1p(expected count) truth would sit ~0.1 above the observed pseudobulk)
    assert abs(float((tiny_data.mean - tiny_data.truth).mean())) < 0.01


# --- bad input: one test per kind ---------------------------------------------------------


def test_error_missing_obs_column_lists_available():
    adata = make_cells()
    del adata.obs["dose_val"]
    with pytest.raises(ScdcaInputError, match=r"dose='dose_val'.*Available obs columns.*cell_type"):
        load(adata)


def test_error_cell_line_without_controls():
    adata = make_cells()
    keep = ~((adata.obs["cell_type"] == "L2") & (adata.obs["control"] == 1)).to_numpy()
    with pytest.raises(ScdcaInputError, match=r"\['L2'\] have no control cells"):
        load(adata[keep].copy())


def test_error_drug_without_smiles():
    adata = make_cells()
    adata.obs["SMILES"] = adata.obs["SMILES"].astype(object)
    adata.obs.loc[adata.obs["condition"] == "caffeine", "SMILES"] = np.nan
    with pytest.raises(ScdcaInputError, match=r"have no SMILES: \['caffeine'\]"):
        load(adata)


def test_error_unparseable_smiles_lists_drugs():
    adata = make_cells()
    adata.obs["SMILES"] = adata.obs["SMILES"].astype(object)
    adata.obs.loc[adata.obs["condition"] == "caffeine", "SMILES"] = "C1CC(("
    adata.obs.loc[adata.obs["condition"] == "aspirin", "SMILES"] = "not a smiles"
    with pytest.raises(ScdcaInputError, match=r"cannot parse the SMILES of 2 drug\(s\): aspirin.*caffeine"):
        load(adata)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_nan_or_inf_values(bad):
    adata = make_cells(counts=False)
    adata.X[0, 0] = bad
    with pytest.raises(ScdcaInputError, match="NaN or infinite"):
        load(adata)


def test_error_negative_values_suggest_layer():
    adata = make_cells(counts=False)
    adata.X[1, 2] = -0.5
    with pytest.raises(ScdcaInputError, match="negative values.*--layer"):
        load(adata)


def test_error_duplicate_gene_names():
    adata = make_cells()
    adata.var_names = ["G0", "G1", "G1", "G3", "G4"]
    with pytest.raises(ScdcaInputError, match=r"not unique: \['G1'\]"):
        load(adata)


def test_error_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ScdcaInputError, match="does not exist"):
        load(tmp_path / "nope.h5ad")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ScdcaInputError, match="not an .h5ad"):
        load(tmp_path / "x.csv")


def test_to_anndata_is_pseudobulk_with_controls_and_scanpy_degs(tiny_data, tmp_path):
    import scanpy as sc
    from scipy import stats

    from scdca.data.degs import rank_genes_groups_uns

    a = tiny_data.to_anndata(n_degs=10)
    n, lines = len(tiny_data.ids), tiny_data.cell_lines
    assert a.shape == (n + len(lines), tiny_data.n_genes)
    np.testing.assert_array_equal(a.X[:n], tiny_data.mean)
    np.testing.assert_array_equal(a.layers["std"][n:], tiny_data.control_std)
    assert a.obs["control"].sum() == len(lines) and list(a.obs["n_cells"][:n]) == list(tiny_data.conditions["n_cells"])
    a.write_h5ad(tmp_path / "pb.h5ad")
    back = ad.read_h5ad(tmp_path / "pb.h5ad")
    back.uns["rank_genes_groups"] = rank_genes_groups_uns(back.uns["rank_genes_groups_df"])  # scanpy's layout
    cid = tiny_data.ids[5]
    df = sc.get.rank_genes_groups_df(back, group=cid)
    assert list(df["names"]) == [str(g) for g in tiny_data.genes[tiny_data.degs[cid][:10]]]
    # the scores are scanpy's Welch t-test on this condition's cells vs its line's controls
    row = tiny_data.conditions.loc[cid]
    line = tiny_data.controls.index.get_loc(row["cell_line"])
    gene = tiny_data.degs[cid][0]
    t, p = stats.ttest_ind_from_stats(
        tiny_data.mean[5, gene],
        tiny_data.std[5, gene],
        row["n_cells"],
        tiny_data.control_mean[line, gene],
        tiny_data.control_std[line, gene],
        tiny_data.controls["n_cells"].iloc[line],
        equal_var=False,
    )
    assert df["scores"].iloc[0] == pytest.approx(t, rel=1e-4) and df["pvals"].iloc[0] == pytest.approx(p, rel=1e-3)
    assert (df["pvals_adj"] >= df["pvals"] - 1e-12).all()


def test_benjamini_hochberg_matches_a_hand_computation():
    from scdca.data.degs import _bh

    p = np.array([[0.01, 0.04, 0.03, np.nan]])
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, 0.045, 0.04 -> monotone from the top: 0.03, 0.04, 0.04
    np.testing.assert_allclose(_bh(p), [[0.03, 0.04, 0.04, np.nan]])


def test_scanpy_degs_follow_a_shorter_ranking_taken_from_the_file(tiny_data):
    from scdca.data.degs import deg_long_table, rank_genes_groups_uns

    short = tiny_data.subset(tiny_data.ids[:4])
    short.degs = {i: v[:7] for i, v in short.degs.items()}  # as when the file's uns holds 7 DEGs per condition
    u = rank_genes_groups_uns(deg_long_table(short, n_degs=50))
    assert len(u["names"]) == 7
    assert list(u["names"][short.ids[0]]) == [str(g) for g in short.genes[short.degs[short.ids[0]]]]


def test_degs_of_thousands_of_conditions_are_written_to_h5ad(tmp_path):
    # scanpy's record-array layout fails here (HDF5 object-header limit); the long table does not
    rng = np.random.default_rng(0)
    delta = {(f"L{i % 2}", "aspirin", float(i + 1)): rng.normal(size=30) for i in range(1500)}
    data = make_pb(delta, control={"L0": np.ones(30), "L1": np.full(30, 2.0)})
    path = tmp_path / "pb.h5ad"
    data.to_anndata(n_degs=20).write_h5ad(path)
    table = ad.read_h5ad(path).uns["rank_genes_groups_df"]
    assert len(table) == 1500 * 20 and table["group"].nunique() == 1500
    cid = data.ids[777]
    assert list(table.loc[table["group"] == cid, "names"]) == [f"G{g}" for g in data.degs[cid][:20]]


def test_streaming_a_backed_file_in_chunks_equals_loading_it_whole(tiny_sim, tmp_path):
    path = tmp_path / "sim.h5ad"
    tiny_sim.write_h5ad(path)
    for kwargs in ({}, {"n_top_genes": 25}):
        whole = load(path, **kwargs)
        streamed = load(path, chunk_size=97, **kwargs)  # chunks cut across conditions and lines
        assert list(streamed.genes) == list(whole.genes) and list(streamed.ids) == list(whole.ids)
        pd.testing.assert_frame_equal(streamed.conditions, whole.conditions)
        pd.testing.assert_frame_equal(streamed.controls, whole.controls)
        for attr in ("mean", "std", "half_a", "half_b", "control_mean", "control_std"):
            np.testing.assert_allclose(getattr(streamed, attr), getattr(whole, attr), rtol=0, atol=1e-6, err_msg=attr)
        assert all(np.array_equal(streamed.degs[i], whole.degs[i]) for i in whole.ids)
    # and the pseudobulk is what numpy computes from the cells
    streamed = load(path, chunk_size=97)
    X = np.log1p(tiny_sim.X.toarray() / tiny_sim.X.toarray().sum(1, keepdims=True) * 1e4)
    cid = streamed.ids[3]
    in_cond = (tiny_sim.obs["cov_drug_dose_name"].astype(str) == cid).to_numpy()
    np.testing.assert_allclose(streamed.mean[3], X[in_cond].mean(0), atol=1e-5)
    np.testing.assert_allclose(streamed.std[3], X[in_cond].std(0, ddof=1), atol=1e-5)


def test_a_bad_value_in_a_streamed_file_names_its_cells(tmp_path):
    adata = make_cells(n_per=4, counts=False)
    adata.X[13, 2] = -1.0
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ScdcaInputError, match=r"X \(cells 10-19\): expression contains 1 negative"):
        load(tmp_path / "bad.h5ad", chunk_size=10)
    with pytest.raises(ScdcaInputError, match="chunk_size: 0"):
        load(tmp_path / "bad.h5ad", chunk_size=0)


def test_a_bounded_seeded_sample_of_cells_is_kept_per_condition_and_per_control(tiny_sim, tmp_path):
    data = load(tiny_sim, cells_per_condition=4)
    cells = data.cells
    assert load(tiny_sim).cells is None  # off by default: pseudobulk models carry no cells
    # at most 4 per condition (each has 6 cells) and per control line (30 each), never more
    per_cond = pd.Series(cells.condition[cells.condition != ""]).value_counts()
    assert set(per_cond.index) == set(data.ids) and (per_cond == 4).all()
    assert all(len(cells.of_control(line)) == 4 for line in data.cell_lines)
    assert len(cells.X) == 4 * (len(data.ids) + len(data.cell_lines))
    more = load(tiny_sim, cells_per_condition=4, control_cells_per_line=20).cells  # controls: their own bound
    assert all(len(more.of_control(line)) == 20 for line in data.cell_lines)
    assert all(len(more.of_condition(i)) == 4 for i in data.ids[:3])
    # the kept cells are the condition's own cells: with k above every group's size, their mean is
    # the pseudobulk mean and the control cells' mean the control mean
    every = load(tiny_sim, cells_per_condition=1000)
    for j in (0, 7):
        np.testing.assert_allclose(every.cells.of_condition(every.ids[j]).mean(0), every.mean[j], atol=1e-5)
    np.testing.assert_allclose(every.cells.of_control(every.cell_lines[1]).mean(0), every.control_mean[1], atol=1e-5)
    # seeded: the same cells again, other cells with another seed, the same when streamed in chunks
    assert np.array_equal(load(tiny_sim, cells_per_condition=4).cells.X, cells.X)
    assert not np.array_equal(load(tiny_sim, cells_per_condition=4, seed=1).cells.X, cells.X)
    path = tmp_path / "sim.h5ad"
    tiny_sim.write_h5ad(path)
    streamed = load(path, cells_per_condition=4, chunk_size=37)
    np.testing.assert_allclose(streamed.cells.X, cells.X, atol=1e-6)
    assert list(streamed.cells.condition) == list(cells.condition)


def test_a_query_keeps_every_control_cell_and_no_treated_cell(tiny_sim):
    data = load(tiny_sim, cells_per_condition=3)
    ids = data.ids[:5]
    query = data.subset(ids, observed=False)
    assert set(query.cells.condition) == {""}  # no treated cell of any condition
    assert len(query.cells.X) == 3 * len(data.cell_lines)  # every line's control cells stay (model inputs)
    train = data.subset(ids)
    assert set(train.cells.condition) - {""} == set(ids)


def test_cells_per_condition_is_validated(tiny_sim):
    with pytest.raises(ScdcaInputError, match="cells_per_condition: -1"):
        load(tiny_sim, cells_per_condition=-1)
