"""Fit every scDCA-family model, C3TL and the stack on a tiny simulated screen and compare
unseen-drug predictions, as fitted and after a save and a load.

    PYTHONPATH=OLD_CHECKOUT/src python bench/compare_predictions.py old.npz    # the code before a change
    python bench/compare_predictions.py new.npz --against old.npz               # after it: max |difference|

A refactor must leave every model's predictions unchanged. `make demo` covers the baselines and
C3TL (bench/compare_results.py); this covers the scDCA family, which `make demo` does not run.
It imports both the layout before the renovation (scdca.datasets) and after it.
"""

import argparse
import sys
import tempfile

import numpy as np
import torch

try:
    from scdca.data.screen import load
    from scdca.data.simulate import SimulationConfig, simulate
except ImportError:  # the layout before the renovation
    from scdca.datasets import SimulationConfig, simulate

    from scdca.data import load
from scdca.models import MODELS as MODELS_REGISTRY
from scdca.models import load_model, make_model

MODELS = (
    "scdca", "scdca_nores", "scdca_noskip", "scdca_film", "scdca_lowrank", "scdca_plus", "scdca_plus_frozen",
    "finetune", "concat", "feature", "scdca_routed",
)  # fmt: skip
SAVABLE = ("c3tl", "scdca_stack")  # the savable models outside the scDCA family (state: when installed)
SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "CC(=O)Nc1ccc(O)cc1",
    "ONC(=O)CCCCCCC(=O)Nc1ccccc1", "c1ccc2c(c1)cccc2", "CCO", "OC(=O)c1ccccc1O",
]  # fmt: skip


def predictions() -> dict[str, np.ndarray]:
    """Each model fitted on 6 of 8 drugs (random 2 x 32 backbone, a few epochs), predicting the other 2."""
    cfg = SimulationConfig(n_genes=60, n_cell_lines=3, cells_per_condition=6, control_cells=30, n_programs=6,
                           doses_nM=(100.0, 10000.0), smiles=SMILES)  # fmt: skip
    data = load(simulate(cfg, seed=0))
    held = set(sorted(set(data.conditions["drug"]))[:2])
    train = [i for i in data.ids if data.conditions.loc[i, "drug"] not in held]
    test = [i for i in data.ids if i not in set(train)]
    out = {}
    for name in MODELS:
        options = {"backbone": "random:2x32", "encoder": "morgan", "seed": 0}
        if name not in ("scdca_lowrank", "scdca_routed"):  # those two train on their own fixed budgets
            options["epochs"] = 3
        if name in ("scdca_plus", "scdca_plus_frozen"):
            options["head_warmup_epochs"] = 20
        model = make_model(name, **options).fit(data.subset(train))
        out[name] = model.predict(data.subset(test, observed=False))
        out[f"{name}__reloaded"] = _reloaded(model, data.subset(test, observed=False))
    for name in SAVABLE:  # the other savable models, with the options they declare
        cls = MODELS_REGISTRY.get(name)
        options = {"backbone": "random:2x32", "encoder": "morgan", "seed": 0, "epochs": 3}
        extra = {"steps": 150} if name == "c3tl" else {}
        model = cls(**{k: v for k, v in options.items() if k in cls.options}, **extra).fit(data.subset(train))
        out[name] = model.predict(data.subset(test, observed=False))
        out[f"{name}__reloaded"] = _reloaded(model, data.subset(test, observed=False))
    return out


def _reloaded(model, query) -> np.ndarray:
    """What the model predicts after a save and a load (NaN where it cannot be saved)."""
    if not type(model).savable:
        return np.full((len(query.ids), query.n_genes), np.nan)
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        return load_model(folder).predict(query)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help=".npz file to write the predictions to")
    parser.add_argument("--against", help="an .npz written by the code before the change")
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-identical results need the same thread count on both sides
    preds = predictions()
    np.savez(args.out, **preds)
    if not args.against:
        print(f"wrote {args.out}: {len(preds)} models")
        return 0
    old = np.load(args.against)
    worst = 0.0
    for name in preds:
        a, b = (old[name], preds[name]) if name in old.files else (np.nan, preds[name])
        both_nan = np.isnan(a).all() and np.isnan(b).all()  # a model that cannot be saved, on both sides
        diff = 0.0 if both_nan else float(np.abs(a - b).max())
        worst = max(worst, diff) if diff == diff else float("inf")
        print(f"{name:28s} max |difference| {diff:.3g}")
    print(
        f"largest difference over {len(preds)} predictions ({len(preds) // 2} models, fitted and reloaded): {worst:.3g}"
    )
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
