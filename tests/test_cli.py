import pandas as pd

from scdca.cli import main


def test_simulate_then_benchmark_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "d.h5ad"
    smi = tmp_path / "drugs.smi"
    from .conftest import SMILES

    smi.write_text("\n".join(SMILES) + "\n")
    assert main(["simulate", "--out", str(data), "--seed", "1", "--genes", "60", "--cells", "4",
                 "--smiles", str(smi)]) == 0
    assert main(["benchmark", "--data", str(data), "--out", str(tmp_path / "b"), "--models", "control,knn",
                 "--tasks", "unseen_pair", "--seeds", "1", "--k", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pearson_delta_deg" in out and "knn" in out
    s = pd.read_csv(tmp_path / "b" / "summary.csv")
    assert set(s["model"]) == {"control", "knn", "ceiling", "ceiling_half", "oracle"}


def test_bad_model_name_exits_2_with_the_choices(tmp_path, capsys):
    code = main(["benchmark", "--data", str(tmp_path / "x.h5ad"), "--out", str(tmp_path), "--models", "nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "train_mean" in err


def test_missing_data_file_exits_2(tmp_path, capsys):
    assert main(["benchmark", "--data", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written half-way


def test_train_c3tl_then_predict_a_new_molecule_from_the_command_line(tmp_path, tiny_sim):
    import anndata as ad

    from scdca import _io

    data = tmp_path / "d.h5ad"
    _io.write_h5ad(data, tiny_sim)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--model", "c3tl",
                 "--encoder", "morgan:bits=128", "--epochs", "3", "--quiet"]) == 0  # --epochs: not a c3tl option
    assert main(["predict", "--model", str(tmp_path / "m"), "--smiles", "CCO", "--cell-line", "lineA",
                 "--dose", "100", "10000", "--out", str(tmp_path / "p.h5ad")]) == 0
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.n_obs == 2 and pred.n_vars == tiny_sim.n_vars
