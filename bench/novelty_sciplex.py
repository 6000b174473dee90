"""Chemical novelty of the unseen-drug task on the real sci-Plex3 compounds (paper's Figure 9).

For 5 random 70/30 drug splits: each test drug's maximum Tanimoto similarity (Morgan r=2,
2048 bits) to any training drug, and the share below 0.4 (paper: 88% for its split).
Needs ../shared/data/trapnell_drugs_smiles.csv (chemCPA's drug table; not shipped with scdca).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd

from scdca.chem.molecules import canonicalize, novelty_table

PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "trapnell_drugs_smiles.csv"
)


def main() -> None:
    if not os.path.exists(PATH):
        sys.exit(f"not found: {PATH}")
    df = pd.read_csv(PATH, header=None, names=["drug", "smiles", "pathway"])
    df = df[df["drug"].str.lower() != "control"].drop_duplicates("drug")
    mols = canonicalize(dict(zip(df["drug"], df["smiles"])))
    names = sorted(mols)
    pooled = []
    print(f"{len(names)} sci-Plex3 compounds; 70/30 drug splits")
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(names))
        n_test = int(round(0.3 * len(names)))
        test = {names[i]: mols[names[i]] for i in order[:n_test]}
        train = {names[i]: mols[names[i]] for i in order[n_test:]}
        t = novelty_table(train, test)
        pooled.append(t["max_tanimoto"].to_numpy())
        print(
            f"  seed {seed}: below 0.4 {np.mean(t['max_tanimoto'] < 0.4):.0%}, "
            f"median {t['max_tanimoto'].median():.2f}, "
            f"scaffold seen in training {t['scaffold_in_train'].mean():.0%}"
        )
    allv = np.concatenate(pooled)
    hist, edges = np.histogram(allv, bins=np.linspace(0, 1, 11))
    print("pooled histogram of max Tanimoto to training:")
    for h, lo, hi in zip(hist, edges[:-1], edges[1:]):
        print(f"  [{lo:.1f}, {hi:.1f}) {h:4d} {'#' * int(h // 2)}")
    print(f"pooled: below 0.4 {np.mean(allv < 0.4):.0%} (paper: 88% for one split)")


if __name__ == "__main__":
    main()
