"""LINCS L1000 files: the real development plate from ../shared and tiny hand-made GCT/GCTX files."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

from scdca.data.lincs import dose_in_um, read_gct_table, read_lincs, write_gctx
from scdca.data.screen import load, read
from scdca.errors import ScdcaInputError
from tests.conftest import SMILES

LINCS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "lincs")
PLATE = os.path.join(LINCS, "LJP009_A375_24H_X1_B20_QNORM_n371x978.gct")
COMPOUNDS = os.path.join(LINCS, "LJP009_compounds.csv")


@pytest.fixture(scope="module")
def plate():
    if not os.path.isfile(PLATE):
        pytest.skip("../shared/data/lincs/ not beside the project")
    return read_lincs(PLATE, compounds=COMPOUNDS)


def test_real_plate_wells_controls_doses_and_compounds(plate, caplog):
    # README of the plate: 371 wells = 345 treated + 22 DMSO + 4 positive controls; 40 of 59 compounds have SMILES
    assert plate.n_vars == 978
    assert int(plate.obs["control"].sum()) == 22
    assert (plate.obs.loc[plate.obs["control"], "pert_type"] == "ctl_vehicle").all()
    assert not (plate.obs["pert_type"] == "trt_poscon").any()
    treated = plate.obs[~plate.obs["control"]]
    assert treated["condition"].nunique() == 40
    assert plate.uns["lincs"]["n_wells_read"] == 371
    assert plate.uns["lincs"]["n_wells_kept"] + plate.uns["lincs"]["n_no_structure"] + 4 == 371
    assert sorted(treated["dose_val"].unique()) == [0.04, 0.12, 0.37, 1.11, 3.33, 10.0]
    assert set(plate.obs["cell_type"]) == {"A375"}
    # the compound mapping: a well's SMILES is the table's for its 13-character pert_id
    table = pd.read_csv(COMPOUNDS).set_index("pert_id")["smiles"]
    ids = treated["pert_id"].str[:13]
    assert (treated["SMILES"].to_numpy() == table.loc[ids].to_numpy()).all()
    assert (treated.loc[treated["pert_iname"] == "dasatinib", "condition"] == "dasatinib").all()
    # log2 values, never taken for counts
    assert 2 < float(plate.X.min()) and float(plate.X.max()) < 16
    data = load(plate)
    assert len(data.conditions) == 235 and (data.conditions["n_cells"] == 1).all()
    np.testing.assert_allclose(data.control_mean[0], plate.X[plate.obs["control"].to_numpy()].mean(0), rtol=1e-5)


def test_real_plate_skips_compounds_without_structure_with_one_warning(caplog):
    if not os.path.isfile(PLATE):
        pytest.skip("../shared/data/lincs/ not beside the project")
    with caplog.at_level(logging.WARNING, logger="scdca.data.lincs"):
        read_lincs(PLATE, compounds=COMPOUNDS)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 110 compound well(s) of 19 compound(s)" in warnings[0].getMessage()


def _tiny_tables(n_genes=4):
    rng = np.random.default_rng(0)
    wells = ["P:A01", "P:A02", "P:A03", "P:A04", "P:A05"]
    cols = pd.DataFrame(
        {
            "pert_id": ["DMSO", "DMSO", "BRD-K00000001-001-01-1", "BRD-K00000001-003-02-9", "BRD-K00000002-001-01-1"],
            "pert_iname": ["DMSO", "DMSO", "aspirin", "aspirin", "caffeine"],
            "pert_type": ["ctl_vehicle", "ctl_vehicle", "trt_cp", "trt_cp", "trt_poscon"],
            "pert_dose": ["-666", "-666", "500", "10", "1"],
            "pert_dose_unit": ["-666", "-666", "nM", "uM", "uM"],
            "pert_time": ["24"] * 5,
            "pert_time_unit": ["h"] * 5,
            "cell_id": ["MCF7"] * 5,
        },
        index=pd.Index(wells, name="id"),
    )
    rows = pd.DataFrame(
        {"pr_gene_symbol": [f"GENE{i}" for i in range(n_genes)]},
        index=pd.Index([f"{200 + i}_at" for i in range(n_genes)], name="id"),
    )
    X = rng.uniform(4, 12, (n_genes, len(wells))).astype(np.float32)
    return X, rows, cols


def _write_gct(path, X, rows, cols, *, version="#1.3"):
    lines = [version, f"{len(rows)}\t{len(cols)}\t{rows.shape[1]}\t{cols.shape[1]}"]
    lines.append("\t".join(["id", *rows.columns, *cols.index]))
    for field in cols.columns:
        lines.append("\t".join([field, *(["na"] * rows.shape[1]), *cols[field].astype(str)]))
    for i, (rid, meta) in enumerate(rows.iterrows()):
        lines.append("\t".join([rid, *meta.astype(str), *(f"{v:.4f}" for v in X[i])]))
    path.write_text("\n".join(lines) + "\n")


def test_gct_and_gctx_read_the_same(tmp_path):
    X, rows, cols = _tiny_tables()
    _write_gct(tmp_path / "p.gct", X, rows, cols)
    write_gctx(tmp_path / "p.gctx", X, rows, cols)
    compounds = pd.DataFrame({"pert_id": ["BRD-K00000001"], "smiles": [SMILES[0]]})
    compounds.to_csv(tmp_path / "c.csv", index=False)
    a = read(tmp_path / "p.gct", compounds=tmp_path / "c.csv")
    b = read(tmp_path / "p.gctx", compounds=tmp_path / "c.csv")
    np.testing.assert_allclose(a.X, b.X, atol=1e-4)
    assert list(a.obs_names) == list(b.obs_names) == ["P:A01", "P:A02", "P:A03", "P:A04"]  # poscon dropped
    # two batches of one compound (first 13 characters) are one drug; 500 nM is 0.5 uM
    assert list(a.obs["condition"]) == ["control", "control", "aspirin", "aspirin"]
    assert list(a.obs["dose_val"]) == [0.0, 0.0, 0.5, 10.0]
    assert list(a.var_names) == ["GENE0", "GENE1", "GENE2", "GENE3"]
    data = load(tmp_path / "p.gctx", compounds=tmp_path / "c.csv")
    assert sorted(data.conditions["dose"]) == [0.5, 10.0]


def test_compounds_table_matches_names_when_ids_are_missing(tmp_path):
    X, rows, cols = _tiny_tables()
    _write_gct(tmp_path / "p.gct", X, rows, cols)
    pd.DataFrame({"pert_iname": ["Aspirin"], "smiles": [SMILES[0]]}).to_csv(tmp_path / "c.csv", index=False)
    a = read_lincs(tmp_path / "p.gct", compounds=tmp_path / "c.csv")
    assert (a.obs.loc[~a.obs["control"], "SMILES"] == SMILES[0]).all()
    b = read_lincs(tmp_path / "p.gct", compounds=pd.read_csv(tmp_path / "c.csv"))  # a DataFrame works too
    assert list(b.obs["SMILES"]) == list(a.obs["SMILES"])
    with pytest.raises(ScdcaInputError, match="needs a 'smiles'"):
        read_lincs(tmp_path / "p.gct", compounds=pd.DataFrame({"pert_id": ["x"], "structure": ["C"]}))


def test_dose_units():
    got = dose_in_um(
        pd.Series(["10", "500", "2", "10 uM", "250 nM", "1"]), pd.Series(["uM", "nM", "mM", None, None, "µM"])
    )
    np.testing.assert_allclose(got, [10, 0.5, 2000, 10, 0.25, 1])
    assert np.isnan(dose_in_um(pd.Series(["3"]), pd.Series(["furlongs"])))[0]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.replace("#1.3", "#9.9", 1), "first line"),
        (lambda t: "\n".join(t.split("\n")[:3] + t.split("\n")[5:]), "metadata rows missing|data block|fields"),
        (lambda t: t.replace("ctl_vehicle", "ctl_untrt"), "no vehicle wells"),
    ],
)
def test_bad_gct_files_get_one_line_errors(tmp_path, mutate, match):
    X, rows, cols = _tiny_tables()
    _write_gct(tmp_path / "p.gct", X, rows, cols)
    (tmp_path / "bad.gct").write_text(mutate((tmp_path / "p.gct").read_text()))
    pd.DataFrame({"pert_id": ["BRD-K00000001"], "smiles": [SMILES[0]]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ScdcaInputError, match=match):
        read_lincs(tmp_path / "bad.gct", compounds=tmp_path / "c.csv")


def test_missing_structures_name_the_compounds_option(tmp_path):
    X, rows, cols = _tiny_tables()
    _write_gct(tmp_path / "p.gct", X, rows, cols)
    with pytest.raises(ScdcaInputError, match="--compounds"):
        read_lincs(tmp_path / "p.gct")


def test_gct_table_dimensions(tmp_path):
    X, rows, cols = _tiny_tables()
    _write_gct(tmp_path / "p.gct", X, rows, cols)
    M, r, c = read_gct_table(tmp_path / "p.gct")
    assert M.shape == (4, 5) and list(c.index) == list(cols.index)
    assert pd.isna(c.loc["P:A01", "pert_dose"]) and c.loc["P:A03", "pert_dose"] == "500"  # -666 is missing


def test_gct_v12_reads_as_a_table_but_has_no_well_annotations(tmp_path):
    (tmp_path / "p.gct").write_text(
        "#1.2\n2\t3\nName\tDescription\tw1\tw2\tw3\ng1\tgene one\t1.0\t2.0\t3.0\ng2\tgene two\t4.0\t5.0\t6.0\n"
    )
    X, rows, cols = read_gct_table(tmp_path / "p.gct")
    np.testing.assert_allclose(X, [[1, 2, 3], [4, 5, 6]])
    assert list(rows["Description"]) == ["gene one", "gene two"] and list(cols.index) == ["w1", "w2", "w3"]
    with pytest.raises(ScdcaInputError, match="pert_id"):
        read_lincs(tmp_path / "p.gct")


def test_a_plate_with_two_times_splits_each_line_by_time(tmp_path):
    X, rows, cols = _tiny_tables()
    cols["pert_time"] = ["24", "6", "24", "6", "24"]
    _write_gct(tmp_path / "p.gct", X, rows, cols)
    pd.DataFrame({"pert_id": ["BRD-K00000001"], "smiles": [SMILES[0]]}).to_csv(tmp_path / "c.csv", index=False)
    a = read_lincs(tmp_path / "p.gct", compounds=tmp_path / "c.csv")
    assert list(a.obs["cell_type"]) == ["MCF7_24h", "MCF7_6h", "MCF7_24h", "MCF7_6h"]


def test_a_compounds_table_next_to_an_h5ad_is_refused(tiny_sim, tmp_path):
    tiny_sim.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(ScdcaInputError, match="not a LINCS"):
        read(tmp_path / "d.h5ad", compounds=tmp_path / "c.csv")


def test_a_plate_keeps_no_cell_sample_its_rows_are_wells():
    if not os.path.isfile(PLATE):
        pytest.skip("../shared/data/lincs/ not beside the project")
    assert load(PLATE, compounds=COMPOUNDS, cells_per_condition=64).cells is None
