"""Every bad input a user can hand the command line: exit code 2, one line naming the
argument or column, the bad value and the fix, and no traceback."""

import json
import re

import numpy as np
import pytest

from scdca import storage
from scdca.cli import main
from tests.conftest import make_cells

BENCH = ["--models", "control", "--tasks", "unseen_pair", "--seeds", "1", "--quiet"]


def _run(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith(f"scdca {argv[0]}: error: ")
    assert len(err.strip().splitlines()) == 1
    return err


def _bench(tmp_path, capsys, adata, *extra) -> str:
    path = tmp_path / "d.h5ad"
    storage.write_h5ad(path, adata)
    return _run(capsys, ["benchmark", "--data", str(path), "--out", str(tmp_path / "o"), *BENCH, *extra])


def _set(adata, column, value, where):
    adata.obs[column] = adata.obs[column].astype(object)
    adata.obs.loc[where, column] = value
    return adata


def _dose(value):
    def f(a):
        a.obs.loc[a.obs["condition"] == "caffeine", "dose_val"] = value
        return a

    return f


def _layer_with_negative(a):
    a.layers["logn"] = np.log1p(a.X)
    a.layers["logn"][3, 1] = -1.0
    return a


def _no_controls(a):
    return a[~((a.obs["cell_type"] == "L2") & (a.obs["control"] == 1)).to_numpy()].copy()


def _smiles_problems(a):
    _set(a, "SMILES", np.nan, a.obs["condition"] == "caffeine")
    return _set(a, "SMILES", "C1CC((", a.obs["condition"] == "aspirin")


def _dup_obs(a):
    a.obs_names = ["c0"] + list(a.obs_names[:-1])
    return a


def _nan_x(a):
    a.X[0, 0] = np.nan
    return a


def _no_dose_column(a):
    del a.obs["dose_val"]
    return a


def _dup_var(a):
    a.var_names = ["G0", "G1", "G1", "G3", "G4"]
    return a


CASES = {
    "missing obs column": (_no_dose_column, [], r"dose='dose_val'.*--dose-key"),
    "wrong --drug-key": (lambda a: a, ["--drug-key", "compound"], r"drug='compound'.*Available obs columns"),
    "wrong --layer": (lambda a: a, ["--layer", "counts"], r"layer: 'counts' not in adata.layers"),
    "NaN in X": (_nan_x, [], r"X: expression contains 1 NaN"),
    "negative in layer": (
        _layer_with_negative,
        ["--layer", "logn"],
        r"layers\['logn'\]: expression contains 1 negative.*--layer",
    ),
    "NaN dose": (_dose(np.nan), [], r"obs\['dose_val'\]: 8 perturbed cell\(s\) have a missing"),
    "zero dose": (_dose(0.0), [], r"zero or negative dose \(e.g. \[0.0\], drugs \['caffeine'\]\)"),
    "negative dose": (_dose(-1.0), [], r"zero or negative dose \(e.g. \[-1.0\]"),
    "duplicated var_names": (_dup_var, [], r"gene names are not unique: \['G1'\]"),
    "duplicated obs_names": (_dup_obs, [], r"obs_names: 1 cell name.*'c0'.*obs_names_make_unique"),
    "line without controls": (_no_controls, [], r"\['L2'\] have no control cells"),
    "missing and unparseable SMILES": (
        _smiles_problems,
        [],
        r"no SMILES: \['caffeine'\].*cannot parse.*aspirin \('C1CC\(\('\)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_exits_2_with_one_line_naming_the_problem(case, tmp_path, capsys):
    mutate, extra, pattern = CASES[case]
    counts = case != "NaN in X"
    err = _bench(tmp_path, capsys, mutate(make_cells(counts=counts)), *extra)
    assert re.search(pattern, err), err
    assert not (tmp_path / "o" / "results.csv").exists()


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all", "truncate"])
def test_empty_truncated_or_foreign_file(content, tmp_path, capsys):
    path = tmp_path / "d.h5ad"
    if content == "truncate":
        storage.write_h5ad(path, make_cells())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    err = _run(capsys, ["benchmark", "--data", str(path), "--out", str(tmp_path / "o"), *BENCH])
    assert str(path) in err
    assert ("is empty (0 bytes)" in err) if content == b"" else ("could not be read as AnnData" in err)


@pytest.mark.parametrize(
    "flag,value,pattern",
    [
        ("--models", "nope", r"models: unknown model name\(s\) \['nope'\]; choose from: control"),
        ("--tasks", "nope", r"tasks: unknown task\(s\) \['nope'\]; choose from unseen_drug"),
        ("--metrics", "nope", r"metrics: unknown metric name\(s\) \['nope'\]; choose from: r2_deg"),
        ("--encoder", "nope", r"encoder: unknown molecule encoder 'nope'; choose one of: morgan"),
        ("--seeds", "0", r"seeds: 0; use at least 1"),
    ],
)
def test_unknown_names_and_zero_seeds_fail_before_any_work(flag, value, pattern, tmp_path, capsys):
    path = tmp_path / "d.h5ad"
    storage.write_h5ad(path, make_cells())
    argv = [
        "benchmark",
        "--data",
        str(path),
        "--out",
        str(tmp_path / "o"),
        "--models",
        "control",
        "--tasks",
        "unseen_pair",
        "--seeds",
        "1",
        flag,
        value,
    ]
    assert re.search(pattern, _run(capsys, argv))
    assert not (tmp_path / "o").exists()


def test_an_output_folder_holding_another_run_is_refused(tmp_path, capsys, tiny_sim):
    path = tmp_path / "d.h5ad"
    storage.write_h5ad(path, tiny_sim)
    out = tmp_path / "o"
    assert main(["benchmark", "--data", str(path), "--out", str(out), *BENCH]) == 0
    before = (out / "results.csv").read_bytes()
    err = _run(capsys, ["benchmark", "--data", str(path), "--out", str(out), *BENCH, "--k", "7"])
    assert str(out) in err and "different settings" in err and "new --out folder" in err
    assert (out / "results.csv").read_bytes() == before


@pytest.fixture(scope="module")
def c3tl_folder(tmp_path_factory, tiny_sim):
    tmp = tmp_path_factory.mktemp("model")
    storage.write_h5ad(tmp / "d.h5ad", tiny_sim)
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp / "d.h5ad"),
                "--out",
                str(tmp / "m"),
                "--model",
                "c3tl",
                "--encoder",
                "morgan:bits=128",
                "--quiet",
            ]
        )
        == 0
    )
    return tmp / "m"


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "m")


def _predict(folder):
    return [
        "predict",
        "--model",
        str(folder),
        "--smiles",
        "CCO",
        "--cell-line",
        "lineA",
        "--dose",
        "100",
        "--out",
        str(folder.parent / "p.h5ad"),
    ]


def test_a_model_folder_with_corrupted_weights_is_refused(c3tl_folder, tmp_path, capsys):
    m = _copy(c3tl_folder, tmp_path)
    raw = bytearray((m / "arrays.safetensors").read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside a tensor: safetensors itself would not notice
    (m / "arrays.safetensors").write_bytes(bytes(raw))
    err = _run(capsys, _predict(m))
    assert "arrays.safetensors" in err and "checksum mismatch" in err and "retrain" in err
    assert not (tmp_path / "p.h5ad").exists()


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda meta: meta["settings"].update(hidden=meta["settings"]["hidden"] * 2), r"does not load \(RuntimeError"),
        (lambda meta: meta.pop("genes"), r"does not load \(KeyError"),
        (lambda meta: meta.update(model="nope"), r"unknown model 'nope'"),
    ],
)
def test_a_model_folder_with_an_edited_model_json_is_refused(edit, pattern, c3tl_folder, tmp_path, capsys):
    m = _copy(c3tl_folder, tmp_path)
    meta = json.loads((m / "model.json").read_text())
    edit(meta)
    (m / "model.json").write_text(json.dumps(meta))
    assert re.search(pattern, _run(capsys, _predict(m)))


def test_screen_skips_and_lists_bad_library_lines_unless_all_are_bad(c3tl_folder, tmp_path, capsys, caplog):
    lib = tmp_path / "lib.smi"
    lib.write_text("CCO ethanol\nC1CC(( broken\nCC(=O)Oc1ccccc1C(=O)O aspirin\nnot_a_smiles junk\n")
    out = tmp_path / "ranked.csv"
    argv = [
        "screen",
        "--model",
        str(c3tl_folder),
        "--library",
        str(lib),
        "--cell-line",
        "lineA",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    assert "skipped 2 molecule(s)" in caplog.text and "broken, junk" in caplog.text
    import pandas as pd

    ranked = pd.read_csv(out, keep_default_na=False)
    assert set(ranked.loc[ranked["error"] == "", "drug"]) == {"ethanol", "aspirin"}
    lib.write_text("C1CC(( broken\nnot_a_smiles junk\n")
    capsys.readouterr()
    err = _run(capsys, argv)
    assert "library: none of its 2 SMILES could be parsed" in err
    # the same screen from a config file of option names (flags would override it)
    lib.write_text("CCO ethanol\n")
    cfg = tmp_path / "screen.yaml"
    cfg.write_text(
        f"model: {c3tl_folder}\nlibrary: {lib}\ncell-line: lineA\nout: {tmp_path / 'cfg.csv'}\nquiet: true\n"
    )
    assert main(["screen", "--config", str(cfg)]) == 0
    assert list(pd.read_csv(tmp_path / "cfg.csv")["drug"]) == ["ethanol"]


def _annotate(tmp_path, capsys, ref, query=None, *extra) -> str:
    storage.write_h5ad(tmp_path / "ref.h5ad", ref)
    storage.write_h5ad(tmp_path / "query.h5ad", query if query is not None else ref)
    return _run(
        capsys,
        [
            "annotate",
            "--reference",
            str(tmp_path / "ref.h5ad"),
            "--query",
            str(tmp_path / "query.h5ad"),
            "--label-key",
            "cell_type",
            "--backbone",
            "random:1x8",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "a.h5ad"),
            *extra,
        ],
    )


def test_annotate_refuses_a_missing_label_column(tmp_path, capsys):
    ref = make_cells(genes=6, counts=False)
    del ref.obs["cell_type"]
    assert re.search(r"label-key: 'cell_type' is not an obs column .*condition", _annotate(tmp_path, capsys, ref))


def test_annotate_refuses_a_label_with_one_cell(tmp_path, capsys):
    ref = make_cells(genes=6, counts=False)
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.iloc[0, ref.obs.columns.get_loc("cell_type")] = "rare"
    assert "label(s) ['rare'] have a single reference cell" in _annotate(tmp_path, capsys, ref)


def test_annotate_refuses_a_query_without_the_models_genes(tmp_path, capsys):
    ref = make_cells(genes=6, counts=False)
    query = ref.copy()
    query.var_names = [f"other{i}" for i in range(6)]
    assert "query: none of the model's 6 genes" in _annotate(tmp_path, capsys, ref, query)


def test_annotate_refuses_an_unknown_method(tmp_path, capsys):
    ref = make_cells(genes=6, counts=False)
    assert "method: 'ia3' is not a PEFT method" in _annotate(tmp_path, capsys, ref, None, "--method", "ia3")
