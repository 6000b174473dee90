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


LEVEL4 = os.path.join(LINCS, "LJP009_A375_24H_X1_B20_ZSPCQNORM_n371x978.gct")
LEVEL5 = os.path.join(LINCS, "modzs_n272x978.gct")
PERTINFO = os.path.join(LINCS, "pertinfo.tsv.gz")


def _shared(*paths):
    if not all(os.path.isfile(p) for p in paths):
        pytest.skip("../shared/data/lincs/ not beside the project")


def test_level_4_is_the_level_3_plate_as_changes(plate):
    _shared(LEVEL4)
    z = read_lincs(LEVEL4, compounds=COMPOUNDS)
    assert z.uns["lincs"]["level"] == 4 and z.uns["expression_scale"] == "change"
    treated3 = plate.obs.index[~plate.obs["control"]]
    treated4 = z.obs.index[~z.obs["control"]]
    assert list(treated4) == list(treated3)  # the same wells, vehicle wells dropped
    assert (z.obs.loc[treated4, "condition"] == plate.obs.loc[treated3, "condition"]).all()
    assert list(z.obs.index[z.obs["control"]]) == ["A375:zero_reference"]
    data3, data4 = load(plate), load(z)
    assert data4.space == "change" and not data4.control_mean.any()
    d3, d4 = data3.delta(), data4.subset(data3.ids).delta()
    agree = []
    for i in range(len(d3)):  # the strongest genes of each well move the same way at both levels
        top = np.argsort(-np.abs(d4[i]))[:10]
        agree.append(np.mean(np.sign(d3[i, top]) == np.sign(d4[i, top])))
    assert np.mean(agree) > 0.9


def test_level_5_signatures_load_as_changes_in_their_65_lines():
    _shared(LEVEL5, PERTINFO)
    sig = read_lincs(LEVEL5, compounds=PERTINFO)
    treated = sig.obs[~sig.obs["control"]]
    assert sig.uns["lincs"]["level"] == 5 and len(treated) == 272
    assert treated["cell_id"].nunique() == 65
    assert set(treated["condition"]) == {"vemurafenib", "atorvastatin", "venlafaxine"}
    assert set(treated["dose_val"]) >= {10.0, 0.5}  # '10 <b5>M' and '500 nM'
    data = load(sig)
    assert data.space == "change" and float(sig.X.min()) < 0
    query = data.subset(data.ids[:3], observed=False)
    from scdca.models import make_model

    pred = make_model("train_mean").fit(data).predict(query)
    assert (pred < 0).any()  # signed changes are not clipped as log1p expression would be


def test_files_of_two_schemas_read_together_each_keep_their_own_treatment_time():
    """The level 4 plate gives its time as pert_time (24), the level 5 file as pert_itime ('6 h',
    '24 h'): read together, each well's time comes from its own file's field."""
    _shared(LEVEL4, LEVEL5, PERTINFO)
    both = read_lincs([LEVEL4, LEVEL5], compounds=PERTINFO, cell_id="A375")
    treated = both.obs[~both.obs["control"]]
    assert treated["pert_time_h"].notna().all()
    plate = treated["plate"].astype(str)
    assert set(treated.loc[plate.str.startswith("LJP009"), "cell_type"]) == {"A375_24h"}
    assert set(treated.loc[~plate.str.startswith("LJP009"), "pert_time_h"]) == {"6h", "24h"}


def test_the_perturbagen_table_is_read_as_it_ships():
    _shared(PERTINFO)
    from scdca.data.lincs import read_compounds

    table = read_compounds(PERTINFO)
    assert len(table) > 10_000 and table["smiles"].str.len().gt(0).all()
    lookup = dict(zip(table["key"], table["smiles"]))
    assert "vemurafenib" in lookup and "BRD-K56343971" in lookup  # by name and by 13-character id


def test_half_plates_give_the_whole_plates_conditions_within_their_references_precision(plate, tmp_path):
    X, rows, cols = read_gct_table(PLATE)
    halves = np.arange(len(cols)) % 2
    files = []
    for h in (0, 1):
        part = cols.iloc[halves == h].copy()
        part["rna_plate"] = f"LJP009_half{h}"
        shift = 1.0 if h else 0.0  # a plate effect the second half carries in every well
        write_gctx(tmp_path / f"half{h}.gctx", X[:, halves == h] + shift, rows, part)
        files.append(tmp_path / f"half{h}.gctx")
    both = read_lincs(files, compounds=COMPOUNDS)
    assert both.uns["lincs"]["n_plates_rereferenced"] == 2
    assert set(both.obs["plate"]) == {"LJP009_half0", "LJP009_half1"}
    whole, split = load(plate), load(both)
    assert sorted(split.ids) == sorted(whole.ids)  # one compound across plates is one drug
    diff = split.subset(whole.ids).delta() - whole.delta()
    vehicle = plate.X[plate.obs["control"].to_numpy()]
    n_half, n_whole = len(vehicle) / 2, len(vehicle)
    precision = vehicle.std(0, ddof=1) * np.sqrt(1 / n_half - 1 / n_whole)  # (G,) the references' difference
    assert np.mean(np.abs(diff) <= 4 * precision) > 0.99
    assert np.abs(diff).mean() < 0.2  # the plate effect of 1.0 is gone


def test_old_cmap_and_cmap_2020_field_names_read_as_the_lincs_2017_ones(tmp_path):
    X, rows, cols = _tiny_tables()
    old = cols.rename(
        columns={
            "pert_dose": "exp_pert_dose",
            "pert_dose_unit": "exp_pert_dose_unit",
            "pert_time": "exp_pert_time",
            "pert_time_unit": "exp_pert_time_unit",
            "pert_iname": "pert_desc",
        }
    )
    old["pert_type"] = old["pert_type"].str.upper()
    new = cols.rename(columns={"cell_id": "cell_iname", "pert_iname": "cmap_name"})
    new["pert_idose"] = ["-666", "-666", "500 nM", "10 uM", "1 uM"]
    new = new.drop(columns=["pert_dose", "pert_dose_unit"])
    compounds = pd.DataFrame({"pert_id": ["BRD-K00000001"], "smiles": [SMILES[0]]})
    reference = read_lincs(_written(tmp_path / "ref.gct", X, rows, cols), compounds=compounds)
    for name, table in (("old", old), ("new", new)):
        a = read_lincs(_written(tmp_path / f"{name}.gct", X, rows, table), compounds=compounds)
        for key in ("cell_type", "condition", "dose_val", "control", "pert_time_h"):
            assert list(a.obs[key]) == list(reference.obs[key]), (name, key)
    fields = read_lincs(tmp_path / "old.gct", compounds=compounds).uns["lincs"]["fields"]
    assert fields["pert_dose"] == "exp_pert_dose" and fields["pert_iname"] == "pert_desc"


def _written(path, X, rows, cols):
    _write_gct(path, X, rows, cols)
    return path


def test_a_companion_table_gives_a_bare_matrix_its_well_metadata(tmp_path):
    X, rows, cols = _tiny_tables()
    write_gctx(tmp_path / "bare.gctx", X, rows, cols[[]])
    cols.rename_axis("inst_id").reset_index().to_csv(tmp_path / "inst_info.txt", sep="\t", index=False)
    compounds = pd.DataFrame({"pert_id": ["BRD-K00000001"], "smiles": [SMILES[0]]})
    with pytest.raises(ScdcaInputError, match="--col-meta"):
        read_lincs(tmp_path / "bare.gctx", compounds=compounds)
    a = read_lincs(tmp_path / "bare.gctx", compounds=compounds, col_meta=tmp_path / "inst_info.txt")
    assert list(a.obs["condition"]) == ["control", "control", "aspirin", "aspirin"]


def test_a_selection_reads_only_its_columns_and_rows_and_equals_the_filtered_whole(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    cols = pd.DataFrame(
        {
            "pert_id": np.where(np.arange(n) % 5 == 0, "DMSO", [f"BRD-K0000000{i % 3}-001" for i in range(n)]),
            "pert_type": np.where(np.arange(n) % 5 == 0, "ctl_vehicle", "trt_cp"),
            "pert_dose": "10",
            "pert_dose_unit": "uM",
            "pert_time": np.where(np.arange(n) < 150, "24", "6"),
            "cell_id": np.where(np.arange(n) % 2 == 0, "A375", "MCF7"),
            "rna_plate": [f"P{i // 60}" for i in range(n)],
        },
        index=pd.Index([f"P{i // 60}:W{i}" for i in range(n)], name="id"),
    )
    rows = pd.DataFrame({"pr_is_lm": ["1", "0"] * 5}, index=pd.Index([f"g{i}" for i in range(10)], name="id"))
    X = rng.uniform(4, 12, (10, n)).astype(np.float32)
    write_gctx(tmp_path / "r.gctx", X, rows, cols, chunk_columns=16)
    compounds = pd.DataFrame({"pert_id": [f"BRD-K0000000{i}" for i in range(3)], "smiles": SMILES[:3]})
    part = read_lincs(tmp_path / "r.gctx", compounds=compounds, cell_id="A375", pert_time=24, genes="landmark")
    whole = read_lincs(tmp_path / "r.gctx", compounds=compounds)
    keep = (whole.obs["cell_id"] == "A375") & (whole.obs["pert_time_h"] == "24h")
    assert list(part.obs_names) == list(whole.obs_names[keep]) and part.n_vars == 5
    np.testing.assert_array_equal(part.X, whole[keep.to_numpy()].X[:, ::2])
    plates = read_lincs(tmp_path / "r.gctx", compounds=compounds, plates=["P1", "P3"], pert_id="BRD-K00000001")
    assert set(plates.obs["plate"]) == {"P1", "P3"} and set(plates.obs["condition"]) <= {"control", "BRD-K00000001"}


@pytest.mark.parametrize(
    "case, match",
    [
        ("level5_no_cell", "have no cell_id"),
        ("genes_differ", "other genes than"),
        ("no_smiles_column", "'canonical_smiles'"),
        ("level3_plate_without_vehicle", "have no vehicle wells"),
    ],
)
def test_bad_input_of_each_new_form_gets_a_one_line_error(tmp_path, case, match):
    X, rows, cols = _tiny_tables()
    compounds = pd.DataFrame({"pert_id": ["BRD-K00000001"], "smiles": [SMILES[0]]})
    if case == "level5_no_cell":
        cols.loc["P:A03", "cell_id"] = "-666"
        paths, kw = _written(tmp_path / "s.gct", X - 8, rows, cols), {"level": 5}
    elif case == "genes_differ":
        paths = [_written(tmp_path / "a.gct", X, rows, cols)]
        paths.append(_written(tmp_path / "b.gct", X[:3], rows.iloc[:3], cols.rename(index=lambda i: "Q" + i)))
        kw = {}
    elif case == "no_smiles_column":
        paths, kw = _written(tmp_path / "p.gct", X, rows, cols), {}
        compounds = pd.DataFrame({"pert_id": ["BRD-K00000001"], "structure": ["C"]})
    else:
        other = cols.rename(index=lambda i: "Q" + i).assign(rna_plate="Q", pert_type="trt_cp")
        paths = [_written(tmp_path / "a.gct", X, rows, cols.assign(rna_plate="P"))]
        paths.append(_written(tmp_path / "b.gct", X, rows, other))
        kw = {}
    with pytest.raises(ScdcaInputError, match=match) as err:
        read_lincs(paths, compounds=compounds, **kw)
    assert "\n" not in str(err.value)


def test_a_release_streams_into_changes_each_well_against_its_own_plates_vehicle(tmp_path):
    from scdca.data.lincs import aggregate_lincs

    rng = np.random.default_rng(2)
    n = 120
    plate = np.repeat(["P0", "P1", "P2"], 40)
    vehicle = np.arange(n) % 8 == 0
    cols = pd.DataFrame(
        {
            "pert_id": np.where(vehicle, "DMSO", [f"BRD-K0000000{i % 4}-001" for i in range(n)]),
            "pert_type": np.where(vehicle, "ctl_vehicle", "trt_cp"),
            "pert_dose": "10",
            "pert_dose_unit": "uM",
            "pert_time": "24",
            "cell_id": "A375",
            "rna_plate": plate,
        },
        index=pd.Index([f"W{i}" for i in range(n)], name="id"),
    )
    rows = pd.DataFrame({"pr_is_lm": "1"}, index=pd.Index([f"g{i}" for i in range(6)], name="id"))
    X = rng.normal(8, 1, (6, n)).astype(np.float32) + np.array([0.0, 2.0, -1.0])[np.repeat([0, 1, 2], 40)]
    write_gctx(tmp_path / "release.gctx", X, rows, cols, chunk_columns=7)
    out = aggregate_lincs(tmp_path / "release.gctx")
    assert len(out) == 4 and (out.obs["n_plates"] == 3).all() and out.obs["n_wells"].sum() == (~vehicle).sum()
    for i, pid in enumerate(out.obs["pert_id"]):
        wells = np.flatnonzero(cols["pert_id"].str[:13] == pid)
        own = np.stack([X[:, vehicle & (plate == plate[w])].mean(1) for w in wells])  # each well's own plate
        np.testing.assert_allclose(out.X[i], (X[:, wells].T - own).mean(0), atol=1e-5)


def test_a_folder_of_plates_reads_whether_named_by_text_or_by_path(tmp_path):
    """`read` takes a folder as a str or a pathlib.Path (a Path used to raise TypeError)."""
    import shutil
    from pathlib import Path

    _shared(LEVEL4, PERTINFO)
    folder = tmp_path / "plates"
    folder.mkdir()
    shutil.copy(LEVEL4, folder)
    by_text = read(str(folder), compounds=PERTINFO)
    by_path = read(Path(folder), compounds=PERTINFO)
    assert by_path.n_obs == by_text.n_obs == read(LEVEL4, compounds=PERTINFO).n_obs
    np.testing.assert_array_equal(by_path.X, by_text.X)
