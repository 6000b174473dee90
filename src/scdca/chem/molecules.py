"""Molecules: SMILES canonicalisation, Morgan fingerprints and Tanimoto similarity.

RDKit is the only chemistry dependency. Fingerprints are returned as dense uint8
arrays so that similarity over many molecules is one matrix product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

from scdca.errors import ScdcaInputError


def _rdkit():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # parse failures are reported by us, by drug name
    return Chem


@lru_cache(maxsize=100_000)
def canonical_smiles(smiles: str) -> str | None:
    """Canonical isomeric SMILES, or None if RDKit cannot parse it.

    CXSMILES extensions (`... |&1:3|`) are accepted, as in the sci-Plex compound table.
    """
    Chem = _rdkit()
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        return None
    return Chem.MolToSmiles(mol)


def canonicalize(drug_smiles: Mapping[str, str | None], *, arg: str = "SMILES") -> dict[str, str]:
    """Canonicalise every drug's SMILES; one error lists every drug that fails.

    Args:
        drug_smiles: drug name -> SMILES (None or empty: missing, listed in the error).
        arg: the column or argument the SMILES came from, named in the error.
    Returns:
        drug name -> canonical SMILES.
    """
    out, missing, bad = {}, [], []
    for drug, smi in drug_smiles.items():
        if smi is None or (isinstance(smi, float) and np.isnan(smi)) or str(smi).strip() == "":
            missing.append(drug)
            continue
        can = canonical_smiles(str(smi))
        if can is None:
            bad.append(f"{drug} ({smi!r})")
        else:
            out[drug] = can
    problems = []
    if missing:
        problems.append(f"{len(missing)} drug(s) have no SMILES: {missing[:20]!r}")
    if bad:
        problems.append(f"RDKit cannot parse the SMILES of {len(bad)} drug(s): {', '.join(bad[:20])}")
    if problems:
        raise ScdcaInputError(
            f"{arg}: {'; '.join(problems)}. Add or fix a SMILES for each of these drugs, or drop them before loading."
        )
    return out


def morgan_fingerprints(smiles: Sequence[str], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-like) bit vectors.

    Returns:
        uint8 array of shape (n, n_bits).
    """
    out = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    for i, smi in enumerate(smiles):
        fp = _fingerprint(smi, radius, n_bits)
        if fp is None:
            raise ScdcaInputError(f"smiles[{i}]: RDKit cannot parse {smi!r}; fix or remove it")
        out[i] = fp
    return out


@lru_cache(maxsize=100_000)
def _fingerprint(smiles: str, radius: int, n_bits: int) -> np.ndarray | None:
    """One molecule's Morgan bits (read-only; None if RDKit cannot parse it), cached: the report
    asks for the same training drugs once per seed."""
    from rdkit.Chem import rdFingerprintGenerator

    mol = _rdkit().MolFromSmiles(smiles)
    if mol is None:
        return None
    fp = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits).GetFingerprintAsNumPy(mol)
    fp = fp.astype(np.uint8)
    fp.setflags(write=False)
    return fp


def tanimoto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tanimoto similarity between every row of `a` (n, bits) and of `b` (m, bits) -> (n, m)."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    inter = a @ b.T  # (n, m)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(union > 0, inter / union, 0.0)
    return sim.astype(np.float32)


@lru_cache(maxsize=100_000)
def scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold (canonical SMILES; '' for acyclic molecules)."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    Chem = _rdkit()
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ScdcaInputError(f"smiles: RDKit cannot parse {smiles!r}")
    return Chem.MolToSmiles(MurckoScaffold.GetScaffoldForMol(mol))


class NearestTraining:
    """Each query molecule's most similar training molecule and their Tanimoto similarity
    (Morgan r=2, 2048 bits). The training fingerprints are computed once, so a library can be
    queried in batches. `train`: drug name -> SMILES (may be empty: similarity 0, name '')."""

    def __init__(self, train: Mapping[str, str]):
        self.names = list(train)
        self._fps = morgan_fingerprints([train[d] for d in self.names])  # (n_train, bits)

    def query(self, smiles: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(max Tanimoto (n,), nearest training drug name per molecule)."""
        if not self.names:
            return np.zeros(len(smiles)), ["" for _ in smiles]
        sim = tanimoto(morgan_fingerprints(list(smiles)), self._fps)  # (n, n_train)
        return sim.max(1), [self.names[j] for j in sim.argmax(1)]


def novelty_table(train: Mapping[str, str], test: Mapping[str, str]):
    """Per test drug: its most similar training drug and their Tanimoto similarity (Morgan r=2, 2048).

    Args:
        train, test: drug name -> SMILES.
    Returns:
        DataFrame indexed by test drug with columns max_tanimoto, nearest_train_drug,
        scaffold, scaffold_in_train.
    """
    import pandas as pd

    te_names = list(test)
    max_sim, nearest = NearestTraining(train).query([test[d] for d in te_names])
    train_scaffolds = {scaffold(smi) for smi in train.values()}
    te_scaf = [scaffold(test[d]) for d in te_names]
    return pd.DataFrame(
        {
            "max_tanimoto": max_sim,
            "nearest_train_drug": nearest,
            "scaffold": te_scaf,
            "scaffold_in_train": [s in train_scaffolds and s != "" for s in te_scaf],
        },
        index=pd.Index(te_names, name="drug"),
    )
