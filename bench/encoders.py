"""Time every molecule encoder on real compounds, in one run, and report seconds per 1,000 molecules.

Usage: python bench/encoders.py [--smiles-file CSV]   (default: ../shared/data sci-Plex compounds if
present, else 500 NCI compounds from the RDKit wheel). Caches are off, so every molecule is computed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import pandas as pd

from scdca.chem.encoders import get_encoder

HERE = os.path.dirname(os.path.abspath(__file__))
SCIPLEX = os.path.join(HERE, "..", "..", "shared", "data", "Supplementary_Table_3.txt")


def compounds(path: str | None) -> tuple[list[str], list[str], str]:
    path = path or (SCIPLEX if os.path.exists(SCIPLEX) else None)
    if path and path.endswith(".txt"):
        df = pd.read_csv(path, sep="\t").dropna(subset=["SMILES"]).drop_duplicates("catalog_number")
        return df["name"].astype(str).tolist(), df["SMILES"].tolist(), f"sci-Plex Supplementary Table 3 ({path})"
    if path:
        df = pd.read_csv(path)
        return df.iloc[:, 0].astype(str).tolist(), df.iloc[:, 1].tolist(), path
    from scdca.data.simulate import nci_smiles

    mols = nci_smiles()[:500]
    return [m[0] for m in mols], [m[1] for m in mols], "RDKit NCI first 500"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smiles-file", default=None)
    args = ap.parse_args()
    names, smiles, source = compounds(args.smiles_file)
    specs = ["morgan", "chemnet"]
    spec = importlib.util.find_spec("rxnfp")
    if spec is not None:
        specs.append(
            "hf:" + os.path.join(spec.submodule_search_locations[0], "models", "transformers", "bert_pretrained")
        )
    print(f"{len(smiles)} molecules from {source}")
    print(f"{'encoder':<24}{'dim':>6}{'load s':>9}{'encode s':>10}{'s / 1000 mol':>14}")
    for s in specs:
        t0 = time.perf_counter()
        enc = get_encoder(s, cache_dir=None)
        enc.encode(smiles[:2], names=names[:2])  # warm-up: lazy model load
        t1 = time.perf_counter()
        enc._memory.clear()
        t2 = time.perf_counter()
        emb = enc.encode(smiles, names=names)
        t3 = time.perf_counter()
        label = s if not s.startswith("hf:") else "hf:rxnfp bert_pretrained"
        print(f"{label:<24}{emb.shape[1]:>6}{t1 - t0:>9.2f}{t3 - t2:>10.2f}{(t3 - t2) / len(smiles) * 1000:>14.2f}")


if __name__ == "__main__":
    main()
