"""The `scdca` command line: simulate, benchmark, report, export, pretrain, train, predict,
screen, embed, novelty, annotate, pbmc."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from scdca.errors import GridError, LeakageError, ScdcaInputError


def _add_keys(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("obs/var keys (defaults match chemCPA's sci-Plex3 file)")
    g.add_argument("--cell-line-key", default="cell_type")
    g.add_argument("--drug-key", default="condition")
    g.add_argument("--smiles-key", default="SMILES")
    g.add_argument("--dose-key", default="dose_val")
    g.add_argument("--control-key", default="control")
    g.add_argument("--gene-symbols-key", default=None)
    g.add_argument("--layer", default=None, help="read expression from this layer instead of X")
    g.add_argument(
        "--compounds",
        default=None,
        help="for a LINCS .gct/.gctx --data: CSV mapping pert_id or "
        "pert_iname to smiles (wells of compounds without a structure are skipped)",
    )


CONFIG_FILE = "command.yaml"  # what `pretrain` and `train` write into --out; their --config reads it
_NOT_OPTIONS = {"config", "command", "func", "verbose", "parser", "help"}  # argparse entries a config cannot set
_NOT_SETTINGS = _NOT_OPTIONS | {"quiet"}  # not written to command.yaml: they do not change a run's result


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help=f"YAML file of this command's options (names as on the command "
        f"line, e.g. batch-size: 32); flags given too override it. pretrain and train write "
        f"--out/{CONFIG_FILE}, which reruns the run",
    )


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make the values of `--config FILE` the defaults of the chosen command, so flags override them."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if "--config" not in argv or command not in parser.configurable:
        return
    from scdca import storage

    sub = parser.configurable[command]
    path = argv[argv.index("--config") + 1] if argv.index("--config") + 1 < len(argv) else ""
    raw = storage.read_mapping(
        path, arg="config", hint=f"a YAML file of option names and values, e.g. --out/{CONFIG_FILE} of an earlier run"
    )
    actions = {a.dest: a for a in sub._actions if a.dest not in _NOT_OPTIONS}
    values = {str(k).lstrip("-").replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ScdcaInputError(
            f"config: unknown option(s) {unknown!r} for `scdca {command}` in {path!r}; known: "
            f"{', '.join(sorted(actions))}"
        )
    sub.set_defaults(**values)
    for dest in values:
        actions[dest].required = False


def _write_command(args) -> None:
    """The resolved options of this run as --out/command.yaml, which `--config` reruns."""
    import yaml

    from scdca import storage

    settings = {k.replace("_", "-"): v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    storage.write_text(Path(args.out) / CONFIG_FILE, yaml.safe_dump(settings, sort_keys=False))


def _keys(args):
    from scdca.data.keys import DataKeys

    return DataKeys(
        cell_line=args.cell_line_key,
        drug=args.drug_key,
        smiles=args.smiles_key,
        dose=args.dose_key,
        control=args.control_key,
        gene_symbols=args.gene_symbols_key,
        layer=args.layer,
    )


def cmd_simulate(args) -> None:
    from scdca import storage
    from scdca.data.simulate import SimulationConfig, simulate, simulate_atlas

    smiles = None
    if args.smiles:
        with open(args.smiles) as fh:
            smiles = [line.split()[0] for line in fh if line.strip() and not line.startswith("#")]
    cfg = SimulationConfig(
        n_drugs=args.drugs,
        n_cell_lines=args.cell_lines,
        n_genes=args.genes,
        cells_per_condition=args.cells,
        smiles=smiles,
    )
    t0 = time.perf_counter()
    if args.atlas:
        adata = simulate_atlas(cfg, seed=args.seed)
        storage.write_h5ad(args.out, adata)
        print(
            f"wrote {args.out}: pretraining atlas, {adata.n_obs} unperturbed cells x {adata.n_vars} genes from "
            f"{adata.obs['cell_type'].nunique()} cell states; same genes as `scdca simulate --seed {args.seed}` "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        return
    adata = simulate(cfg, seed=args.seed, out=args.out)  # cells streamed to the file: millions fit
    print(
        f"wrote {args.out}: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{adata.obs['condition'].nunique() - 1} drugs, {adata.obs['cell_type'].nunique()} cell lines "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def cmd_benchmark(args) -> None:
    from dataclasses import replace

    from scdca.eval.grid import BenchmarkConfig, run
    from scdca.eval.report import build
    from scdca.eval.tables import format_summary, summarize

    if args.config:
        from scdca.eval.grid import read_config

        given = [
            f"--{k.replace('_', '-')}"
            for k, v in vars(args).items()
            if k
            not in (
                "config",
                "data",
                "out",
                "quiet",
                "verbose",
                "command",
                "func",
                "parser",
                "workers",
                "ray_address",
                "threads_per_worker",
            )
            and v != args.parser.get_default(k)
        ]
        if given:
            raise ScdcaInputError(
                f"config: {', '.join(given)} given next to --config {args.config!r}; put every "
                f"setting in the config file (only --data, --out, --quiet and where it runs, "
                f"--workers, --ray-address, --threads-per-worker, may be given as well)"
            )
        cfg = read_config(args.config, data=args.data, out=args.out)
    else:
        missing = [f for f, v in (("--data", args.data), ("--out", args.out)) if not v]
        if missing:
            raise ScdcaInputError(f"benchmark: {' and '.join(missing)} required (or --config FILE)")
        cfg = BenchmarkConfig(
            data=args.data,
            out=args.out,
            models=args.models,
            tasks=args.tasks,
            seeds=args.seeds,
            metrics=args.metrics,
            k=args.k,
            n_top_genes=args.n_top_genes,
            keys=_keys(args),
            model_options=_model_options(args),
            chunk_size=args.chunk_size,
            compounds=args.compounds,
        )
    t0 = time.perf_counter()
    results = run(
        replace(cfg, report=False),
        progress=not args.quiet,
        workers=args.workers,
        ray_address=args.ray_address,
        threads=args.threads_per_worker,
    )
    t1 = time.perf_counter()
    print(format_summary(summarize(results)))
    print(f"\nwrote {cfg.out}/results.csv, summary.csv, predictions/, splits/ (grid {t1 - t0:.1f} s)")
    path = build(cfg.out)
    print(f"wrote {path} ({time.perf_counter() - t1:.1f} s)")


def cmd_embed(args) -> None:
    from scdca.chem.encoders import get_encoder, read_molecule_list, write_table

    names, smiles = read_molecule_list(args.input)
    encoder = get_encoder(args.encoder, **({"cache_dir": None} if args.no_cache else {}))
    t0 = time.perf_counter()
    emb = encoder.encode(smiles, names=names)
    write_table(args.out, names, smiles, emb)
    print(
        f"wrote {args.out}: {len(names)} molecules x {emb.shape[1]} dims with {encoder.identifier} "
        f"({encoder.n_computed} computed, {len(names) - encoder.n_computed} from cache; "
        f"{time.perf_counter() - t0:.1f} s)"
    )


def cmd_novelty(args) -> None:
    import numpy as np

    from scdca.chem.encoders import read_molecule_list
    from scdca.chem.molecules import canonicalize, novelty_table

    names, smiles = read_molecule_list(args.input)
    mols = canonicalize(dict(zip(names, smiles)), arg=args.input)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(names))
    n_test = int(round(args.test_fraction * len(names)))
    test = {names[i]: mols[names[i]] for i in order[:n_test]}
    train = {names[i]: mols[names[i]] for i in order[n_test:]}
    table = novelty_table(train, test)
    hist, edges = np.histogram(table["max_tanimoto"], bins=np.linspace(0, 1, 11))
    print(
        f"{len(test)} test vs {len(train)} training molecules (seed {args.seed}); "
        f"max Tanimoto to training (Morgan r=2, 2048 bits):"
    )
    for h, lo, hi in zip(hist, edges[:-1], edges[1:]):
        print(f"  [{lo:.1f}, {hi:.1f}) {h:4d} {'#' * int(h)}")
    below = (table["max_tanimoto"] < 0.4).mean()
    print(
        f"below 0.4: {below:.0%}; median {table['max_tanimoto'].median():.2f}; "
        f"scaffold also in training: {table['scaffold_in_train'].mean():.0%}"
    )
    if args.out:
        from scdca import storage

        storage.write_csv(args.out, table.reset_index())


def cmd_pretrain(args) -> None:
    from scdca.nn.pretrain import PretrainConfig, describe_learned, pretrain

    cfg = PretrainConfig(
        layers=args.layers,
        dim=args.dim,
        heads=args.heads,
        genes=args.genes,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        dropout=args.dropout,
        seed=args.seed,
        device=args.device,
        include_perturbed=args.include_perturbed,
        precision=args.precision,
    )
    s = pretrain(args.data, args.out, cfg, keys=_keys(args), progress=not args.quiet, compounds=args.compounds)
    if not _main_process():  # one of several torchrun processes: rank 0 writes and reports
        return
    _write_command(args)
    print(
        f"wrote {args.out} (best_model.pt, args.json, vocab.json): {s['parameters']:,} parameters, "
        f"{s['genes']} genes; masked-value validation MSE {s['best_val_loss']:.4f} vs "
        f"{s['gene_mean_baseline_val_loss']:.4f} for each gene's mean and {s['linear_baseline_val_loss']:.4f} for a "
        f"linear (PCA) co-expression model: {describe_learned(s['coexpression_learned'])} "
        f"({s['seconds_this_run']:.0f} s)"
    )


def _model_options(args) -> dict:
    return {
        k: v
        for k, v in {
            "backbone": args.backbone,
            "encoder": args.encoder,
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "lr": args.lr,
            "device": args.device,
            "precision": getattr(args, "precision", None),
        }.items()
        if v is not None
    }


def _main_process() -> bool:
    """False in all but rank 0 of a torchrun job (`torchrun --nproc-per-node K --no-python scdca ...`)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args) -> None:
    from scdca.data.screen import load
    from scdca.models import MODELS
    from scdca.models.base import savable_models
    from scdca.models.scdca.model import ScDCAModel
    from scdca.models.scdca.routed import ScDCARouted

    cls = MODELS.get(args.model)
    if not cls.savable:
        raise ScdcaInputError(f"model: {args.model!r} cannot be saved; train one of {', '.join(savable_models())}")
    data = load(args.data, keys=_keys(args), n_top_genes=args.n_top_genes, compounds=args.compounds)
    options = _model_options(args)
    if issubclass(cls, (ScDCAModel, ScDCARouted)):
        model = cls(progress=not args.quiet, checkpoint_dir=f"{args.out}/checkpoint", **options)
    else:
        model = cls(**{k: v for k, v in options.items() if k in cls.options})
    model.fit(data)
    if not _main_process():  # one of several torchrun processes: rank 0 writes and reports
        return
    model.save(args.out)
    _write_command(args)
    c = model.cost()
    extra = f", {c['epochs_run']} epochs, best validation MSE {c['best_val_mse']:.4f}" if "epochs_run" in c else ""
    print(
        f"wrote {args.out}: {c['params_trainable']:,} of {c['params_total']:,} parameters trained "
        f"({c['params_trainable_pct']:.2f}%){extra}"
    )


def _load_model(args):
    from scdca.models import load_model

    return load_model(args.model, backbone=args.backbone, device=args.device)


def _controls_arg(args, model) -> dict | None:
    if not args.control:
        return None
    from scdca.predict import control_from_anndata

    name = args.control_name or args.control.rsplit("/", 1)[-1].removesuffix(".h5ad")
    return {name: control_from_anndata(args.control, model.genes)}


def cmd_predict(args) -> None:
    from scdca import storage
    from scdca.chem.encoders import read_molecule_list
    from scdca.predict import predict

    model = _load_model(args)
    if args.smiles:
        smiles, names = args.smiles, args.name or args.smiles
    else:
        names, smiles = read_molecule_list(args.input)
    out = predict(
        model, smiles, names=names, cell_lines=args.cell_line, control=_controls_arg(args, model), doses=args.dose
    )
    storage.write_h5ad(args.out, out)
    print(f"wrote {args.out}: {out.n_obs} predictions (drug x cell line x dose) x {out.n_vars} genes")
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

    from scdca import storage
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
    )
    storage.write_csv(args.out, ranked)
    print(ranked.head(10).to_string(index=False))
    print(
        f"wrote {args.out}: {len(ranked)} molecules ranked by "
        f"{'signature cosine' if sig is not None else 'effect size'}"
    )
    if "max_tanimoto_train" in ranked:
        _print_similarity(
            ranked.dropna(subset=["max_tanimoto_train"]).set_index("drug")["max_tanimoto_train"],
            "column max_tanimoto_train",
        )


def cmd_report(args) -> None:
    from scdca.eval.report import build

    ann = None
    if args.annotations:
        from scdca.eval.report import read_annotations

        ann = read_annotations(args.annotations, drug_column=args.drug_column, group_column=args.group_column)
    path = build(args.dir, model=args.model, metric=args.metric, annotations=ann, annotation_name=args.group_column)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def cmd_export(args) -> None:
    from scdca.eval.export import export

    paths = export(args.run, args.model, args.task, args.seed, args.out, fmt=args.format)
    real, pred = (str(p) for p in paths)
    print(
        f"wrote {real} and {pred}; score them with:\n"
        f"  cell-eval run -ar {real} -ap {pred} --control-pert control --pert-col perturbation "
        f"--celltype-col cell_line --profile anndata -o {args.out}/cell-eval"
    )


def cmd_annotate(args) -> None:
    from scdca import storage
    from scdca.annotate import AnnotateConfig, Annotator, write_explanation
    from scdca.data.screen import read
    from scdca.nn.peft import PeftConfig

    reference = read(args.reference, what="reference")
    query = read(args.query, what="query")
    if not args.out.endswith(".h5ad"):
        raise ScdcaInputError(f"out: {args.out!r} must be an .h5ad path (the annotated query)")
    cfg = AnnotateConfig(
        peft=PeftConfig(method=args.method, r=args.r, prefix_tokens=args.prefix_tokens),
        epochs=args.epochs,
        patience=args.patience or None,
        batch_size=args.batch_size,
        lr=args.lr,
        max_genes=args.max_genes,
        seed=args.seed,
    )
    ann = Annotator(args.backbone, cfg, device=args.device, progress=not args.quiet).fit(
        reference, args.label_key, layer=args.layer
    )
    out = ann.annotate(query, layer=args.layer)
    storage.write_h5ad(args.out, out)
    c = ann.cost
    print(
        f"wrote {args.out}: {out.n_obs} cells labelled in obs['scdca_label'] (probabilities in obsm['scdca_proba']); "
        f"{args.method} trained {c['params_trainable']:,} parameters ({c['params_trainable_pct']:.2f}%) in "
        f"{c['fit_seconds']:.0f} s (best epoch {c['best_epoch']} of {c['epochs_run']} run)"
    )
    if c["best_val_loss"] is not None and c["best_epoch"] == c["epochs_run"] == args.epochs > 1:
        print(
            f"note: the last epoch was the best; the model may be undertrained: raise --epochs "
            f"(now {args.epochs}) and set --patience"
        )
    if args.label_key in query.obs:
        truth = query.obs[args.label_key].astype(str).to_numpy()
        pred = out.obs["scdca_label"].astype(str).to_numpy()
        from sklearn.metrics import f1_score

        print(
            f"query has {args.label_key!r}: accuracy {(truth == pred).mean():.3f}, macro-F1 "
            f"{f1_score(truth, pred, average='macro', labels=sorted(set(truth))):.3f}"
        )
    if args.save_model:
        ann.save(args.save_model)
        print(f"wrote {args.save_model} (trained parameters only; the backbone is referenced)")
    if args.explain:
        table = ann.explain(query, out.obs["scdca_label"], layer=args.layer)
        csv = args.out[: -len(".h5ad")] + "_genes.csv"
        png = write_explanation(table, csv)
        print(f"wrote {csv} (genes ranked per predicted cell type by <cls> attention) and {png}")


def cmd_pbmc(args) -> None:
    from scdca.data.pbmc import pbmc68k_split

    ref, query = pbmc68k_split(args.out)
    print(
        f"wrote {ref} and {query}: scanpy's pbmc68k_reduced, log1p values, labels in obs['bulk_labels']; "
        f"reference = G1-phase cells, query = cycling (S, G2M) cells"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scdca", description="Drug perturbation prediction with scDCA.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write the built-in simulated sci-Plex-like dataset")
    s.add_argument("--out", required=True, help="output .h5ad path")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--drugs", type=int, default=120)
    s.add_argument("--cell-lines", type=int, default=3)
    s.add_argument("--genes", type=int, default=1000)
    s.add_argument("--cells", type=int, default=30, help="cells per condition")
    s.add_argument("--smiles", default=None, help="file with one SMILES per line to use as the drugs")
    s.add_argument(
        "--atlas",
        action="store_true",
        help="write the pretraining atlas instead: unperturbed cells "
        "from 60 cell states in the gene space of the screen with the same --seed",
    )
    s.set_defaults(func=cmd_simulate)

    b = sub.add_parser("benchmark", help="run models x tasks x seeds and score them")
    b.add_argument(
        "--config",
        default=None,
        help="YAML/JSON file with the settings (a run's config.json reruns it); --data/--out override its values",
    )
    b.add_argument("--data", default=None, help=".h5ad (single-cell or pseudobulk)")
    b.add_argument("--out", default=None, help="output folder (resumes if it exists)")
    b.add_argument("--models", default="control,train_mean,additive,ridge,knn")
    b.add_argument("--tasks", default="all")
    b.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    b.add_argument("--metrics", default="all")
    b.add_argument("--k", type=int, default=20, help="top-k DEGs for the *_deg metrics")
    b.add_argument("--n-top-genes", type=int, default=None, help="keep the top-N highly variable genes")
    b.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="read --data backed, this many cells at a time (files larger than memory; same pseudobulk)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run grid cells in parallel on a local Ray with N workers (results equal the serial run's)",
    )
    b.add_argument(
        "--ray-address",
        default=None,
        help="run grid cells on a Ray cluster: 'auto' or HOST:PORT (README: 'A grid on a cluster')",
    )
    b.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / workers; 1 on a cluster)",
    )
    g = b.add_argument_group(
        "learned models: scDCA and its variants (scdca, scdca_nores, scdca_noskip, scdca_film, "
        "scdca_plus, scdca_plus_frozen, finetune, concat, feature); scdca_lowrank, scdca_routed, c3tl and the peer "
        "biolord take --encoder and --device only (and scdca_lowrank, scdca_routed --backbone)"
    )
    g.add_argument(
        "--backbone",
        default=None,
        help="backbone checkpoint folder (scdca pretrain writes one), or "
        "random:<layers>x<dim> for an untrained one (ablation)",
    )
    g.add_argument(
        "--encoder",
        default=None,
        help="molecule encoder: chemnet (scDCA default), rdkit2d (biolord default), morgan, hf:DIR, table:FILE",
    )
    g.add_argument("--epochs", type=int, default=None, help="default 20 (paper)")
    g.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps per fit (CPU budgets)")
    g.add_argument("--lr", type=float, default=None, help="default 1e-4 (paper)")
    g.add_argument("--device", default=None)
    _add_keys(b)
    b.set_defaults(func=cmd_benchmark, parser=b)
    t = sub.add_parser("pretrain", help="pretrain a backbone (masked expression) on the cells of an AnnData")
    _add_config(t)
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="checkpoint folder (resumes if it holds train_state.pt)")
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--dim", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--genes", type=int, default=None, help="keep the top-N highly variable genes")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=128, help="genes per training example")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (50 warm-up steps, then linear decay)")
    t.add_argument("--dropout", type=float, default=0.1, help="dropout in the transformer layers while pretraining")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--include-perturbed",
        action="store_true",
        help="also pretrain on drug-treated cells (default: "
        "controls only); a benchmark on the same file then tests responses the backbone has seen",
    )
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="bf16 autocast: auto = on CUDA only"
    )
    t.add_argument("--quiet", action="store_true")
    _add_keys(t)
    t.set_defaults(func=cmd_pretrain)

    def model_args(p, *, training: bool):
        g = p.add_argument_group("model")
        g.add_argument(
            "--backbone",
            default=None,
            help="backbone checkpoint folder" + ("" if training else " (default: the one recorded in the model)"),
        )
        g.add_argument("--device", default=None)
        if training:
            g.add_argument("--encoder", default=None, help="chemnet (default), rdkit2d, morgan, hf:DIR, table:FILE")
            g.add_argument("--epochs", type=int, default=None)
            g.add_argument("--max-steps", type=int, default=None)
            g.add_argument("--lr", type=float, default=None)
            g.add_argument(
                "--precision",
                default=None,
                choices=["auto", "fp32", "bf16"],
                help="bf16 autocast (scDCA models): auto (default) = on CUDA only",
            )

    tr = sub.add_parser("train", help="train scDCA (or a variant) on all conditions of a dataset and save it")
    _add_config(tr)
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True, help="model folder (resumes from out/checkpoint)")
    tr.add_argument(
        "--model",
        default="scdca_routed",
        help="scdca_routed (default; recommended: it tells drugs apart), scdca (the paper's adapter), "
        "another scDCA variant or c3tl",
    )
    tr.add_argument("--n-top-genes", type=int, default=None)
    tr.add_argument("--quiet", action="store_true")
    model_args(tr, training=True)
    _add_keys(tr)
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="predict expression for new drugs and/or new cell lines")
    pr.add_argument("--model", required=True, help="folder written by scdca train")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--smiles", nargs="+", help="one or more SMILES")
    src.add_argument("--input", help="CSV (drug, smiles) or .smi file")
    pr.add_argument("--name", nargs="+", help="names for --smiles")
    pr.add_argument("--cell-line", nargs="+", default=None, help="known cell line(s)")
    pr.add_argument("--control", default=None, help=".h5ad of a new line's control cells (zero-shot)")
    pr.add_argument("--control-name", default=None)
    pr.add_argument("--dose", nargs="+", type=float, default=[1.0], help="dose(s), in the training data's units")
    pr.add_argument("--out", required=True, help="output .h5ad")
    model_args(pr, training=False)
    pr.set_defaults(func=cmd_predict)

    sc = sub.add_parser("screen", help="rank a molecule library by predicted effect (streamed in batches)")
    _add_config(sc)
    sc.add_argument("--model", required=True)
    sc.add_argument("--library", required=True, help=".smi or CSV (drug, smiles)")
    sc.add_argument("--cell-line", default=None)
    sc.add_argument("--control", default=None, help=".h5ad of a new line's control cells")
    sc.add_argument("--control-name", default=None)
    sc.add_argument("--dose", type=float, default=1.0)
    sc.add_argument("--signature", default=None, help="CSV gene,change: rank by cosine to this target signature")
    sc.add_argument("--batch-size", type=int, default=256)
    sc.add_argument("--out", required=True, help="output CSV")
    sc.add_argument("--quiet", action="store_true")
    model_args(sc, training=False)
    sc.set_defaults(func=cmd_screen)
    p.configurable = {"pretrain": t, "train": tr, "screen": sc}  # commands whose --config sets their defaults

    rp = sub.add_parser("report", help="HTML + Markdown report from a benchmark folder's results.csv")
    rp.add_argument("dir")
    rp.add_argument("--model", default=None, help="model to test against all others (default: first learned model)")
    rp.add_argument("--metric", default="pearson_delta_deg")
    rp.add_argument("--annotations", default=None, help="CSV/TSV mapping drugs to groups (target, pathway)")
    rp.add_argument("--drug-column", default="Product.Name")
    rp.add_argument("--group-column", default="Target")
    rp.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write one grid cell's predictions in another tool's format (cell-eval)")
    x.add_argument("run", help="a `scdca benchmark` --out folder")
    x.add_argument("--model", required=True)
    x.add_argument("--task", required=True)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--format", default="cell-eval", help="cell-eval: real/pred AnnData pair with control rows")
    x.add_argument("--out", required=True, help="output folder")
    x.set_defaults(func=cmd_export)

    an = sub.add_parser("annotate", help="cell-type annotation: a PEFT-tuned backbone trained on a labelled reference")
    an.add_argument("--reference", required=True, help="labelled .h5ad (log1p values or raw counts in X or --layer)")
    an.add_argument("--query", required=True, help=".h5ad to annotate")
    an.add_argument("--label-key", required=True, help="obs column of the reference with the cell types")
    an.add_argument("--backbone", required=True, help="checkpoint folder (scdca pretrain) or random:<layers>x<dim>")
    an.add_argument("--method", default="lora", help="lora | prefix | adapter | token | full | linear")
    an.add_argument("--out", required=True, help="annotated query .h5ad (obs scdca_label, scdca_confidence)")
    an.add_argument(
        "--explain",
        action="store_true",
        help="also rank genes per predicted type by <cls> attention: OUT_genes.csv and a heatmap OUT_genes.png",
    )
    an.add_argument("--save-model", default=None, help="folder to save the trained parts in")
    an.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    an.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many epochs without a better validation loss (on a 10%% split of the "
        "reference; the best epoch is kept); 0 = train every epoch",
    )
    an.add_argument("--batch-size", type=int, default=32)
    an.add_argument("--lr", type=float, default=None, help="default 1e-3 (full: 1e-4)")
    an.add_argument("--max-genes", type=int, default=256, help="gene tokens per cell (most variable in the reference)")
    an.add_argument("--r", type=int, default=8, help="LoRA rank")
    an.add_argument("--prefix-tokens", type=int, default=8)
    an.add_argument("--layer", default=None)
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--device", default=None)
    an.add_argument("--quiet", action="store_true")
    an.set_defaults(func=cmd_annotate)

    pb = sub.add_parser("pbmc", help="write scanpy's PBMC cells as an annotation reference/query pair")
    pb.add_argument("--out", required=True, help="folder for reference.h5ad and query.h5ad")
    pb.set_defaults(func=cmd_pbmc)

    e = sub.add_parser("embed", help="precompute molecule embeddings into a table (the table: encoder format)")
    e.add_argument("--input", required=True, help="CSV with drug/name and smiles columns, or a .smi file")
    e.add_argument("--encoder", default="morgan", help="morgan | chemnet | hf:<folder> | table:<file>")
    e.add_argument("--out", required=True, help="output .csv or .parquet")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    e.set_defaults(func=cmd_embed)

    n = sub.add_parser("novelty", help="max Tanimoto of test to training molecules for a random drug split")
    n.add_argument("--input", required=True, help="CSV with drug/name and smiles columns, or a .smi file")
    n.add_argument("--test-fraction", type=float, default=0.3)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--out", default=None, help="optional CSV with one row per test molecule")
    n.set_defaults(func=cmd_novelty)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        _apply_config(parser, argv)
    except ScdcaInputError as err:
        print(f"scdca {next(a for a in argv if not a.startswith('-'))}: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except (ScdcaInputError, LeakageError) as err:
        print(f"scdca {args.command}: error: {err}", file=sys.stderr)
        return 2
    except GridError as err:
        print(f"scdca {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
