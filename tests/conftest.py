"""Shared tiny fixtures: a few real molecules, a tiny simulated screen, hand-made tables."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("SCDCA_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "scdca"))

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdca.data.keys import condition_id
from scdca.data.screen import PerturbationData

# Small real molecules (aspirin, caffeine, ibuprofen, paracetamol, vorinostat-like hydroxamate, ...)
SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "CC(=O)Nc1ccc(O)cc1",
    "ONC(=O)CCCCCCC(=O)Nc1ccccc1",
    "O=[N+]([O-])c1ccc(Cl)cc1",
    "C=CC(=O)OCC",
    "CCN(CC)CCOC(=O)c1ccc(N)cc1",
    "c1ccc2nc3ccccc3cc2c1",
    "OC(=O)CCc1ccccc1",
]


@pytest.fixture(scope="session")
def tiny_sim() -> ad.AnnData:
    from scdca.data.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(
        n_genes=60,
        n_cell_lines=3,
        cells_per_condition=6,
        control_cells=30,
        n_programs=6,
        doses_nM=(100.0, 10000.0),
        smiles=SMILES,
    )
    return simulate(cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_data(tiny_sim):
    from scdca.data.screen import load

    return load(tiny_sim)


def make_cells(n_per=4, *, lines=("L1", "L2"), drugs=("aspirin", "caffeine"), genes=5, seed=0, counts=True):
    """A hand-made single-cell AnnData: every line has controls and every drug at dose 1.0."""
    rng = np.random.default_rng(seed)
    smiles = {"aspirin": SMILES[0], "caffeine": SMILES[1], "ibuprofen": SMILES[2]}
    rows = []
    for line in lines:
        rows += [(line, "control", 0.0, "", 1)] * (2 * n_per)
        for d in drugs:
            rows += [(line, d, 1.0, smiles[d], 0)] * n_per
    obs = pd.DataFrame(rows, columns=["cell_type", "condition", "dose_val", "SMILES", "control"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    X = (
        rng.poisson(20, (len(obs), genes)).astype(np.float32)
        if counts
        else rng.random((len(obs), genes)).astype(np.float32)
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]))


def make_pb(delta: dict, *, control: dict, smiles: dict | None = None) -> PerturbationData:
    """PerturbationData from exact values: delta[(line, drug, dose)] = change vector; control[line] = vector."""
    smiles = smiles or {}
    default = {"aspirin": SMILES[0], "caffeine": SMILES[1], "ibuprofen": SMILES[2], "paracetamol": SMILES[3]}
    keys = list(delta)
    ids = [condition_id(c, d, x) for c, d, x in keys]
    lines = sorted(control)
    cm = np.stack([np.asarray(control[c], dtype=np.float32) for c in lines])
    mean = np.stack([cm[lines.index(c)] + np.asarray(delta[k], dtype=np.float32) for k, (c, _, _) in zip(keys, keys)])
    cond = pd.DataFrame(
        {
            "cell_line": [k[0] for k in keys],
            "drug": [k[1] for k in keys],
            "dose": [float(k[2]) for k in keys],
            "smiles": [smiles.get(k[1], default.get(k[1])) for k in keys],
            "n_cells": 10,
        },
        index=pd.Index(ids, name="condition_id"),
    )
    G = cm.shape[1]
    return PerturbationData(
        genes=np.array([f"G{i}" for i in range(G)], dtype=object),
        conditions=cond,
        mean=mean,
        std=np.ones_like(mean),
        controls=pd.DataFrame({"n_cells": 10}, index=pd.Index(lines, name="cell_line")),
        control_mean=cm,
        control_std=np.ones_like(cm),
        degs={i: np.argsort(-np.abs(mean[j] - cm[lines.index(keys[j][0])]), kind="stable") for j, i in enumerate(ids)},
    )
