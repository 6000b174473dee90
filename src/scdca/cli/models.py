"""Commands that train and use models: `pretrain` (a backbone), `train`, `predict`, `screen`."""

from __future__ import annotations

import os

from scdca import storage
from scdca.cli.options import (
    Command,
    add_fields,
    add_keys,
    add_training_options,
    data_keys,
    encoder_help,
    lincs_options,
    model_options,
    settings,
    write_command,
)
from scdca.errors import ScdcaInputError

PRETRAIN = {
    "layers": ("--layers", None),
    "dim": ("--dim", None),
    "heads": ("--heads", None),
    "genes": ("--genes", "keep the top-N highly variable genes"),
    "steps": ("--steps", None),
    "batch_size": ("--batch-size", None),
    "seq_len": ("--seq-len", "genes per training example"),
    "lr": ("--lr", "peak learning rate (50 warm-up steps, then linear decay)"),
    "dropout": ("--dropout", "dropout in the transformer layers while pretraining"),
    "seed": ("--seed", None),
    "include_perturbed": ("--include-perturbed", "also pretrain on drug-treated cells (default: controls only); a "
                          "benchmark on the same file then tests responses the backbone has seen"),
    "device": ("--device", "cpu, cuda, cuda:1 ... (default: cuda if available)"),
    "precision": ("--precision", "bf16 autocast: auto = on CUDA only"),
}  # fmt: skip


def add_commands(sub) -> None:
    from scdca.data.splits import ALL_TASKS
    from scdca.models import RECOMMENDED
    from scdca.models.base import savable_models
    from scdca.nn.pretrain import PretrainConfig

    t = Command(sub, "pretrain", cmd_pretrain, help="pretrain a backbone (masked expression) on an AnnData's cells")
    t.add("--data", required=True)
    t.add("--out", required=True, help="checkpoint folder (resumes if it holds train_state.pt)")
    add_fields(t, PretrainConfig, PRETRAIN)
    t.add("--quiet", action="store_true")
    add_keys(t)

    tr = Command(sub, "train", cmd_train, help="train scDCA (or another savable model) on every condition and save it")
    tr.add("--data", required=True)
    tr.add("--out", required=True, help="model folder (resumes from out/checkpoint)")
    tr.add("--model", default=RECOMMENDED, help=f"one of {', '.join(savable_models())}; {RECOMMENDED} (default) "
           "is the recommended model (experts chosen out of fold), scdca the paper's adapter")  # fmt: skip
    tr.add("--n-top-genes", type=int, default=None)
    tr.add("--intervals", default="unseen_drug", choices=[*ALL_TASKS, "none"],
           help="calibrate prediction intervals for this kind of new prediction (refits the model on the "
                "task's splits of the training data; 'none' skips it); predict and screen report them")  # fmt: skip
    tr.add("--quiet", action="store_true")
    g = tr.group("model")
    tr.add("--backbone", default=None, group=g, help="backbone checkpoint folder")
    tr.add("--device", default=None, group=g)
    tr.add("--encoder", default=None, group=g, help=encoder_help("chemnet"))
    add_training_options(tr, g)
    add_keys(tr)

    pr = Command(sub, "predict", cmd_predict, help="predict expression for new drugs and/or new cell lines")
    pr.add("--model", required=True, help="folder written by scdca train")
    src = pr.parser.add_mutually_exclusive_group()
    pr.add("--smiles", nargs="+", group=src, help="one or more SMILES")
    pr.add("--input", group=src, help="CSV (drug, smiles) or .smi file")
    pr.add("--name", nargs="+", help="names for --smiles")
    pr.add("--cell-line", nargs="+", default=None, help="known cell line(s)")
    pr.add("--control", default=None, help=".h5ad of a new line's control cells (zero-shot)")
    pr.add("--control-name", default=None)
    pr.add("--dose", nargs="+", type=float, default=[1.0], help="dose(s), in the training data's units")
    pr.add("--level", type=float, default=0.9, help="prediction-interval level (calibrated models)")
    pr.add("--out", required=True, help="output .h5ad")
    _loaded_model_options(pr)

    sc = Command(sub, "screen", cmd_screen, help="rank a molecule library by predicted effect (streamed in batches)")
    sc.add("--model", required=True)
    sc.add("--library", required=True, help=".smi or CSV (drug, smiles)")
    sc.add("--cell-line", default=None)
    sc.add("--control", default=None, help=".h5ad of a new line's control cells")
    sc.add("--control-name", default=None)
    sc.add("--dose", type=float, default=1.0)
    sc.add("--signature", default=None, help="CSV gene,change: rank by cosine to this target signature")
    sc.add("--rank-by", default="auto", choices=["auto", "effect", "effect_lower", "signature"],
           help="auto: signature cosine with --signature, else effect size; effect_lower: the effect's lower "
                "confidence bound (calibrated models)")  # fmt: skip
    sc.add("--level", type=float, default=0.9, help="prediction-interval level (calibrated models)")
    sc.add("--batch-size", type=int, default=256)
    sc.add("--out", required=True, help="output CSV")
    sc.add("--quiet", action="store_true")
    _loaded_model_options(sc)


def _loaded_model_options(cmd: Command) -> None:
    g = cmd.group("model")
    cmd.add("--backbone", default=None, group=g, help="backbone folder (default: the one recorded in the model)")
    cmd.add("--device", default=None, group=g)


def cmd_pretrain(args) -> None:
    from scdca.nn.pretrain import PretrainConfig, describe_learned, pretrain

    cfg = settings(args, PretrainConfig, PRETRAIN)
    s = pretrain(args.data, args.out, cfg, keys=data_keys(args), progress=not args.quiet, compounds=args.compounds)
    if not _main_process():  # one of several torchrun processes: rank 0 writes and reports
        return
    write_command(args)
    print(
        f"wrote {args.out} (best_model.pt, args.json, vocab.json): {s['parameters']:,} parameters, "
        f"{s['genes']} genes; masked-value validation MSE {s['best_val_loss']:.4f} vs "
        f"{s['gene_mean_baseline_val_loss']:.4f} for each gene's mean and {s['linear_baseline_val_loss']:.4f} for a "
        f"linear (PCA) co-expression model: {describe_learned(s['coexpression_learned'])} "
        f"({s['seconds_this_run']:.0f} s)"
    )


def _main_process() -> bool:
    """False in all but rank 0 of a torchrun job (`torchrun --nproc-per-node K --no-python scdca ...`)."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args) -> None:
    from scdca.data.screen import load
    from scdca.models import MODELS
    from scdca.models.base import savable_models

    cls = MODELS.get(args.model)
    if not cls.savable:
        raise ScdcaInputError(f"model: {args.model!r} cannot be saved; train one of {', '.join(savable_models())}")
    data = load(
        args.data, keys=data_keys(args), n_top_genes=args.n_top_genes, compounds=args.compounds,
        lincs=lincs_options(args),
        cells_per_condition=cls.cells_per_condition, control_cells_per_line=cls.control_cells_per_line,
    )  # fmt: skip
    options = model_options(args)
    if "task" in cls.options and args.intervals != "none":  # scdca_stack: its folds mimic the calibrated task
        options["task"] = args.intervals
    model = _build(cls, options, progress=not args.quiet, checkpoint_dir=f"{args.out}/checkpoint")
    model.fit(data)
    if not _main_process():  # one of several torchrun processes: rank 0 calibrates, writes and reports
        return
    calibration = _calibration(args, cls, options, data, model)
    model.save(args.out)
    _save_calibration(args.out, calibration)
    write_command(args)
    c = model.cost()
    if hasattr(model, "describe"):
        print(f"{args.model}: {model.describe()}")
    extra = f", {c['epochs_run']} epochs" if "epochs_run" in c else ""
    if "best_val_mse" in c:  # only a model that held out a validation set has one
        extra += f", best validation MSE {c['best_val_mse']:.4f}"
    extra += f", {c['mode']} mode" if "mode" in c else ""
    if "params_trainable" not in c:  # a stack of closed-form experts, or the anchor alone: nothing trained
        print(f"wrote {args.out}{extra}")
        return
    print(
        f"wrote {args.out}: {c['params_trainable']:,} of {c['params_total']:,} parameters trained "
        f"({c['params_trainable_pct']:.2f}%){extra}"
    )


def _calibration(args, cls, options, data, fitted):
    """The trained model's conformal calibration for `--intervals TASK` (None for 'none'): fresh
    copies of the model, with the same options and no checkpoints, refitted on the task's own
    splits of the training data."""
    if args.intervals == "none":
        return None
    from scdca.intervals import calibrate

    print(f"calibrating prediction intervals for {args.intervals} (refits on splits of the training data) ...")
    fresh = lambda: _build(cls, options, progress=False, checkpoint_dir=None)  # noqa: E731
    return calibrate(fresh, data, args.intervals, seed=options.get("seed") or 0, fitted=fitted)


def _build(cls, options: dict, *, progress: bool, checkpoint_dir):
    """A model of class `cls` with the command's options: every one for the scDCA family (which
    also takes progress and a checkpoint folder), the ones it declares for the others."""
    from scdca.models.scdca.model import ScDCAModel
    from scdca.models.scdca.routed import ScDCARouted
    from scdca.models.stack import ScDCAStack

    if issubclass(cls, (ScDCAModel, ScDCARouted, ScDCAStack)):
        return cls(progress=progress, checkpoint_dir=checkpoint_dir, **options)
    return cls(**{k: v for k, v in options.items() if k in cls.options})


def _save_calibration(folder, calibration) -> None:
    from pathlib import Path

    from scdca.intervals import FILE

    if calibration is None:
        (Path(folder) / FILE).unlink(missing_ok=True)  # a stale one from an earlier training would lie
        return
    calibration.save(Path(folder) / FILE)
    print(f"calibrated: 90% interval multiplier {calibration.alpha(0.9):.2f} on {len(calibration.calibration_mse)} "
          f"held-out training conditions ({calibration.task})")  # fmt: skip


def _load_model(args):
    from scdca.predict import load

    return load(args.model, backbone=args.backbone, device=args.device)


def _controls_arg(args, model) -> dict | None:
    if not args.control:
        return None
    from scdca.predict import control_from_anndata

    name = args.control_name or args.control.rsplit("/", 1)[-1].removesuffix(".h5ad")
    return {name: control_from_anndata(args.control, model.genes)}


def cmd_predict(args) -> None:
    from scdca.chem.encoders import read_molecule_list
    from scdca.predict import predict

    model = _load_model(args)
    if not (args.smiles or args.input):
        raise ScdcaInputError("give the molecules: --smiles SMILES ... or --input FILE (CSV drug,smiles or .smi)")
    if args.smiles:
        smiles, names = args.smiles, args.name or args.smiles
    else:
        names, smiles = read_molecule_list(args.input)
    out = predict(
        model,
        smiles,
        names=names,
        cell_lines=args.cell_line,
        control=_controls_arg(args, model),
        doses=args.dose,
        level=args.level,
    )
    storage.write_h5ad(args.out, out)
    print(f"wrote {args.out}: {out.n_obs} predictions (drug x cell line x dose) x {out.n_vars} genes")
    if "intervals" in out.uns:
        print(
            f"{args.level:g} prediction intervals (calibrated for {out.uns['intervals']['calibrated_for']}) in "
            f"layers['lower'] and ['upper']; obs expected_mse and confidence "
            f"(median {out.obs['confidence'].median():.2f})"
        )
    else:
        print("no prediction intervals: the model was trained with --intervals none (or by an older scdca)")
    if "max_tanimoto_train" in out.obs:
        _print_similarity(
            out.obs.drop_duplicates("drug").set_index("drug")["max_tanimoto_train"], "obs['max_tanimoto_train']"
        )


def _print_similarity(sim, where: str) -> None:
    """One line on how far the predicted molecules are from the model's training drugs."""
    far = sim[sim < 0.2]
    print(
        f"similarity to the training drugs ({where}): median {sim.median():.2f}"
        + (
            f"; {len(far)} molecule(s) below 0.2, where predictions are least reliable: "
            f"{', '.join(map(str, far.index[:10]))}{' ...' if len(far) > 10 else ''}"
            if len(far)
            else ""
        )
    )


def cmd_screen(args) -> None:
    import pandas as pd

    from scdca.chem.encoders import read_molecule_list
    from scdca.predict import screen

    model = _load_model(args)
    names, smiles = read_molecule_list(args.library)
    sig = None
    if args.signature:
        table = pd.read_csv(args.signature)
        sig = pd.Series(table.iloc[:, 1].to_numpy(float), index=table.iloc[:, 0].astype(str))
    ranked = screen(
        model,
        names,
        smiles,
        cell_line=args.cell_line,
        control=_controls_arg(args, model),
        dose=args.dose,
        signature=sig,
        batch_size=args.batch_size,
        progress=not args.quiet,
        rank_by=args.rank_by,
        level=args.level,
    )
    storage.write_csv(args.out, ranked)
    print(ranked.head(10).to_string(index=False))
    by = {"auto": "signature cosine" if sig is not None else "effect size", "effect": "effect size",
          "effect_lower": f"the {args.level:g} lower bound of the effect size",
          "signature": "signature cosine"}  # fmt: skip
    print(f"wrote {args.out}: {len(ranked)} molecules ranked by {by[args.rank_by]}")
    if "max_tanimoto_train" in ranked:
        _print_similarity(
            ranked.dropna(subset=["max_tanimoto_train"]).set_index("drug")["max_tanimoto_train"],
            "column max_tanimoto_train",
        )
