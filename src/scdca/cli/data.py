"""Commands that make or describe inputs: `simulate`, `embed`, `novelty`, `pbmc`."""

from __future__ import annotations

import time

import numpy as np

from scdca import storage
from scdca.cli.options import Command, add_fields, encoder_help, settings

SIMULATE = {
    "n_drugs": ("--drugs", "number of drugs"),
    "n_cell_lines": ("--cell-lines", "number of cell lines"),
    "n_genes": ("--genes", "number of genes"),
    "cells_per_condition": ("--cells", "cells per condition"),
}


def add_commands(sub) -> None:
    from scdca.data.simulate import SimulationConfig

    s = Command(sub, "simulate", cmd_simulate, help="write the built-in simulated sci-Plex-like dataset")
    s.add("--out", required=True, help="output .h5ad path")
    s.add("--seed", type=int, default=0)
    add_fields(s, SimulationConfig, SIMULATE)
    s.add("--smiles", default=None, help="file with one SMILES per line to use as the drugs")
    s.add("--atlas", action="store_true", help="write the pretraining atlas instead: unperturbed cells from 60 "
          "cell states in the gene space of the screen with the same --seed")  # fmt: skip

    e = Command(sub, "embed", cmd_embed, help="precompute molecule embeddings into a table (the table: encoder format)")
    e.add("--input", required=True, help="CSV with drug/name and smiles columns, or a .smi file")
    e.add("--encoder", default="morgan", help=encoder_help("morgan"))
    e.add("--out", required=True, help="output .csv or .parquet")
    e.add("--no-cache", action="store_true", help="do not read or write the embedding cache")

    n = Command(sub, "novelty", cmd_novelty, help="max Tanimoto of test to training molecules for a random split")
    n.add("--input", required=True, help="CSV with drug/name and smiles columns, or a .smi file")
    n.add("--test-fraction", type=float, default=0.3)
    n.add("--seed", type=int, default=0)
    n.add("--out", default=None, help="optional CSV with one row per test molecule")

    pb = Command(sub, "pbmc", cmd_pbmc, help="write scanpy's PBMC cells as an annotation reference/query pair")
    pb.add("--out", required=True, help="folder for reference.h5ad and query.h5ad")


def cmd_simulate(args) -> None:
    from scdca.data.simulate import SimulationConfig, simulate, simulate_atlas

    smiles = None
    if args.smiles:
        with open(args.smiles) as fh:
            smiles = [line.split()[0] for line in fh if line.strip() and not line.startswith("#")]
    cfg = settings(args, SimulationConfig, SIMULATE, smiles=smiles)
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
        storage.write_csv(args.out, table.reset_index())


def cmd_pbmc(args) -> None:
    from scdca.data.pbmc import pbmc68k_split

    ref, query = pbmc68k_split(args.out)
    print(
        f"wrote {ref} and {query}: scanpy's pbmc68k_reduced, log1p values, labels in obs['bulk_labels']; "
        f"reference = G1-phase cells, query = cycling (S, G2M) cells"
    )
