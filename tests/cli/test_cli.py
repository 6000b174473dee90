import json

import pandas as pd
import pytest

from scdca.cli import main


def test_simulate_then_benchmark_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "d.h5ad"
    smi = tmp_path / "drugs.smi"
    from tests.conftest import SMILES

    smi.write_text("\n".join(SMILES) + "\n")
    assert (
        main(["simulate", "--out", str(data), "--seed", "1", "--genes", "60", "--cells", "4", "--smiles", str(smi)])
        == 0
    )
    assert (
        main(
            [
                "benchmark",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "b"),
                "--models",
                "control,knn",
                "--tasks",
                "unseen_pair",
                "--seeds",
                "1",
                "--k",
                "5",
                "--quiet",
            ]
        )
        == 0
    )
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


def test_train_c3tl_then_predict_a_new_molecule_from_the_command_line(tmp_path, tiny_sim, capsys):
    import anndata as ad

    from scdca import storage

    data = tmp_path / "d.h5ad"
    storage.write_h5ad(data, tiny_sim)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "m"),
                "--model",
                "c3tl",
                "--encoder",
                "morgan:bits=128",
                "--epochs",
                "3",
                "--quiet",
            ]
        )
        == 0
    )  # --epochs: not a c3tl option
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "m"),
                "--smiles",
                "OCC(O)CO",
                "--cell-line",
                "lineA",
                "--dose",
                "100",
                "10000",
                "--out",
                str(tmp_path / "p.h5ad"),
            ]
        )
        == 0
    )
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.n_obs == 2 and pred.n_vars == tiny_sim.n_vars
    # glycerol is not a training drug: its similarity to the nearest one is reported, below 1
    trained = set(tiny_sim.obs["condition"].astype(str))
    assert (pred.obs["max_tanimoto_train"] < 1).all() and set(pred.obs["nearest_train_drug"]) <= trained
    assert pred.obs["max_tanimoto_train"].iloc[0] < 0.2  # glycerol shares almost no substructure with them
    out = capsys.readouterr().out
    assert "1 molecule(s) below 0.2, where predictions are least reliable: OCC(O)CO" in out
    assert "calibrated: 90% interval multiplier" in out  # `train` calibrates for unseen drugs by default
    # the bounds: ordered, saved with the model, and in the screen table, which can rank by them
    assert (pred.layers["lower"] <= pred.X + 1e-6).all() and (pred.X <= pred.layers["upper"] + 1e-6).all()
    assert (pred.layers["upper"] - pred.layers["lower"] > 0).any() and pred.obs["confidence"].between(0, 1).all()
    (tmp_path / "lib.smi").write_text("OCC(O)CO glycerol\nCC(=O)Oc1ccccc1C(=O)O aspirin\n")
    screen = ["screen", "--model", str(tmp_path / "m"), "--library", str(tmp_path / "lib.smi"), "--cell-line",
              "lineA", "--dose", "10000", "--out", str(tmp_path / "s.csv"), "--quiet"]  # fmt: skip
    assert main([*screen, "--rank-by", "effect_lower"]) == 0
    table = pd.read_csv(tmp_path / "s.csv")
    assert (table["effect_lower"] <= table["effect_size"] + 1e-9).all()
    assert table["score"].tolist() == sorted(table["effect_lower"], reverse=True)
    assert "lower bound of the effect size" in capsys.readouterr().out


def test_a_run_reruns_exactly_from_its_written_config_and_reports_from_any_folder(tmp_path, tiny_sim, monkeypatch):
    import json

    from scdca import storage

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    storage.write_h5ad("d.h5ad", tiny_sim)  # a relative path, as users type it
    assert (
        main(
            [
                "benchmark",
                "--data",
                "d.h5ad",
                "--out",
                "first",
                "--models",
                "control,ridge",
                "--tasks",
                "unseen_drug",
                "--seeds",
                "2",
                "--k",
                "5",
                "--quiet",
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "work" / "first" / "config.json").read_text())
    assert cfg["data"] == str(tmp_path / "work" / "d.h5ad")
    assert len(cfg["provenance"]["data_sha256"]) == 64 and "torch" in cfg["provenance"]["versions"]
    monkeypatch.chdir(tmp_path)  # elsewhere: the rerun and the report still find the data
    assert main(["benchmark", "--config", "work/first/config.json", "--out", "second", "--quiet"]) == 0
    first, second = (pd.read_csv(p / "results.csv") for p in (tmp_path / "work" / "first", tmp_path / "second"))
    pd.testing.assert_frame_equal(first, second)
    assert main(["report", "work/first"]) == 0
    report = (tmp_path / "work" / "first" / "report.md").read_text()
    assert "Chemical novelty of test drugs" in report and "not shown" not in report
    (tmp_path / "work" / "d.h5ad").rename(tmp_path / "moved.h5ad")  # gone: the report says why
    assert main(["report", "work/first"]) == 0
    assert "not shown: the benchmark's data file" in (tmp_path / "work" / "first" / "report.md").read_text()


def test_every_command_reads_its_options_from_config_and_flags_override_it(tmp_path, capsys, tiny_sim):
    from scdca import storage

    storage.write_h5ad(tmp_path / "d.h5ad", tiny_sim)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {tmp_path / 'd.h5ad'}\nout: {tmp_path / 'o'}\nmodels: control\nepochs_typo: 3\n")
    assert main(["benchmark", "--config", str(cfg)]) == 2
    assert "unknown option(s) ['epochs_typo'] for `scdca benchmark`" in capsys.readouterr().err
    cfg.write_text(f"data: {tmp_path / 'd.h5ad'}\nout: {tmp_path / 'o'}\nmodels: control\ntasks: unseen_drug\n"
                   f"seeds: 3\nk: 5\n")  # fmt: skip
    assert main(["benchmark", "--config", str(cfg), "--seeds", "1", "--quiet"]) == 0
    results = pd.read_csv(tmp_path / "o" / "results.csv")
    assert sorted(results["seed"].unique()) == [0]  # the flag won over the file's 3 seeds
    assert json.loads((tmp_path / "o" / "config.json").read_text())["k"] == 5  # the file's value was used
    (tmp_path / "sim.yaml").write_text("genes: 60\ndrugs: 4\ncells: 3\ncell-lines: 2\n")
    assert main(["simulate", "--config", str(tmp_path / "sim.yaml"), "--out", str(tmp_path / "s.h5ad")]) == 0
    assert "x 60 genes, 4 drugs, 2 cell lines" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --out is still required
        main(["simulate", "--config", str(tmp_path / "sim.yaml")])
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_prediction_files_keep_the_users_obs_keys_and_scanpy_reads_their_degs(tmp_path, tiny_sim):
    import scanpy as sc

    from scdca import storage
    from scdca.eval.runs import read_predictions

    renamed = tiny_sim.copy()
    renamed.obs = renamed.obs.rename(
        columns={"cell_type": "line", "condition": "compound", "dose_val": "conc", "SMILES": "smi"}
    )
    storage.write_h5ad(tmp_path / "d.h5ad", renamed)
    assert (
        main(
            [
                "benchmark",
                "--data",
                str(tmp_path / "d.h5ad"),
                "--out",
                str(tmp_path / "o"),
                "--models",
                "ridge",
                "--tasks",
                "unseen_drug",
                "--seeds",
                "1",
                "--k",
                "5",
                "--quiet",
                "--cell-line-key",
                "line",
                "--drug-key",
                "compound",
                "--dose-key",
                "conc",
                "--smiles-key",
                "smi",
            ]
        )
        == 0
    )
    a = sc.read_h5ad(tmp_path / "o" / "predictions" / "ridge__unseen_drug__seed0.h5ad")
    assert {"line", "compound", "conc", "smi", "perturbation", "control"} <= set(a.obs.columns)
    treated = a.obs[~a.obs["control"]]
    assert set(treated["compound"]) <= set(renamed.obs["compound"]) and (treated["line"] == treated["cell_line"]).all()
    assert set(a.obs.loc[a.obs["control"], "perturbation"]) == {"control"}
    from scdca.data.degs import rank_genes_groups_uns

    cid = treated.index[0]
    a.uns["rank_genes_groups"] = rank_genes_groups_uns(a.uns["rank_genes_groups_df"])
    degs = sc.get.rank_genes_groups_df(a, group=cid)
    assert list(degs["names"][:5]) == [g for g in a.uns["degs"].loc[cid].iloc[:5]]
    assert len(read_predictions(tmp_path / "o" / "predictions" / "ridge__unseen_drug__seed0.h5ad")) == len(treated)


def test_pretrain_reruns_from_its_command_yaml_and_flags_override_the_file(tmp_path, tiny_sim, capsys):
    import yaml

    from scdca import storage
    from scdca.nn.backbone import load, weights_hash

    storage.write_h5ad(tmp_path / "d.h5ad", tiny_sim)
    tiny = [
        "--layers",
        "1",
        "--dim",
        "16",
        "--heads",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--seq-len",
        "12",
        "--quiet",
    ]
    assert main(["pretrain", "--data", str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "a"), *tiny]) == 0
    written = yaml.safe_load((tmp_path / "a" / "command.yaml").read_text())
    assert written["steps"] == 6 and written["batch-size"] == 8 and written["out"] == str(tmp_path / "a")
    # the written file reruns the run (into another folder): the same weights
    assert main(["pretrain", "--config", str(tmp_path / "a" / "command.yaml"), "--out", str(tmp_path / "b")]) == 0
    assert weights_hash(load(tmp_path / "b")) == weights_hash(load(tmp_path / "a"))
    # a flag beats the file: another seed, other weights
    assert (
        main(
            ["pretrain", "--config", str(tmp_path / "a" / "command.yaml"), "--out", str(tmp_path / "c"), "--seed", "1"]
        )
        == 0
    )
    assert weights_hash(load(tmp_path / "c")) != weights_hash(load(tmp_path / "a"))
    # --lr and --dropout reach the run (its summary records the settings used)
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(tmp_path / "d.h5ad"),
                "--out",
                str(tmp_path / "e"),
                *tiny,
                "--lr",
                "3e-3",
                "--dropout",
                "0",
            ]
        )
        == 0
    )
    used = json.loads((tmp_path / "e" / "pretrain_summary.json").read_text())["config"]
    assert used["lr"] == 3e-3 and used["dropout"] == 0.0
    assert weights_hash(load(tmp_path / "e")) != weights_hash(load(tmp_path / "a"))
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    assert main(["pretrain", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown option(s) ['stepz'] for `scdca pretrain`" in capsys.readouterr().err


def test_annotate_real_pbmc_cells_from_the_command_line(tmp_path, capsys):
    import anndata as ad

    assert main(["pbmc", "--out", str(tmp_path)]) == 0
    ref, query = ad.read_h5ad(tmp_path / "reference.h5ad"), ad.read_h5ad(tmp_path / "query.h5ad")
    assert set(ref.obs["phase"]) == {"G1"} and "G1" not in set(query.obs["phase"])
    assert ref.n_obs + query.n_obs == 700 and ref.X.min() >= 0  # log1p values, not scanpy's scaled X
    out = tmp_path / "annotated.h5ad"
    code = main(
        [
            "annotate",
            "--reference",
            str(tmp_path / "reference.h5ad"),
            "--query",
            str(tmp_path / "query.h5ad"),
            "--label-key",
            "bulk_labels",
            "--backbone",
            "random:1x8",
            "--method",
            "adapter",
            "--epochs",
            "1",
            "--max-genes",
            "32",
            "--quiet",
            "--out",
            str(out),
            "--explain",
            "--save-model",
            str(tmp_path / "model"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "accuracy" in printed
    annotated = ad.read_h5ad(out)
    assert set(annotated.obs["scdca_label"].dropna()) <= set(ref.obs["bulk_labels"])
    assert annotated.obsm["scdca_proba"].shape == (query.n_obs, ref.obs["bulk_labels"].nunique())
    genes = pd.read_csv(tmp_path / "annotated_genes.csv")
    assert genes["rank"].max() == 32 and (tmp_path / "annotated_genes.png").exists()
    assert (tmp_path / "model" / "model.json").exists()


def test_train_defaults_to_the_recommended_model():
    from scdca.cli import build_parser

    assert build_parser().parse_args(["train", "--data", "d.h5ad", "--out", "m"]).model == "scdca_stack"


def test_every_annotate_flag_reaches_its_config():
    from scdca.cli import build_parser
    from scdca.cli.annotate import PEFT, TRAINING, annotate_config

    given = {
        "epochs": "7", "patience": "3", "batch_size": "9", "lr": "0.01", "max_genes": "64",
        "backbone_dropout": None, "seed": "4", "method": "prefix", "r": "2", "prefix_tokens": "5",
    }  # fmt: skip
    assert set(given) == set(TRAINING) | set(PEFT)  # a new flag must be added here, and so checked
    argv = ["annotate", "--reference", "r.h5ad", "--query", "q.h5ad", "--label-key", "t", "--backbone", "b"]
    argv += ["--out", "o.h5ad"]
    for name, value in given.items():
        flag = {**TRAINING, **PEFT}[name][0]
        argv += [flag] if value is None else [flag, value]
    cfg = annotate_config(build_parser().parse_args(argv))
    assert (cfg.epochs, cfg.patience, cfg.batch_size, cfg.lr, cfg.max_genes, cfg.seed) == (7, 3, 9, 0.01, 64, 4)
    assert cfg.backbone_dropout is True  # registered and documented, and before this test never passed on
    assert (cfg.peft.method, cfg.peft.r, cfg.peft.prefix_tokens) == ("prefix", 2, 5)


def test_every_lincs_flag_reaches_read_lincs():
    from scdca.cli import build_parser
    from scdca.cli.options import LINCS_FLAGS, lincs_options
    from scdca.errors import ScdcaInputError

    given = {"level": "4", "col_meta": "inst.txt", "cell_id": "A375,MCF7", "pert_time": "24", "pert_id": "BRD-K1",
             "plates": "P1,P2", "genes": "landmark"}  # fmt: skip
    assert set(given) == set(LINCS_FLAGS)
    argv = ["benchmark", "--data", "d.gctx", "--out", "o"]
    for name, value in given.items():
        argv += [LINCS_FLAGS[name][0], value]
    assert lincs_options(build_parser().parse_args(argv)) == given
    assert lincs_options(build_parser().parse_args(["benchmark", "--data", "d.gctx", "--out", "o"])) == {}
    with pytest.raises(ScdcaInputError, match="level: '6'"):
        lincs_options(build_parser().parse_args(["benchmark", "--data", "d", "--out", "o", "--lincs-level", "6"]))
