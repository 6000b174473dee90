"""Models behind one interface: `fit(train)` and `predict(query)`.

Importing this package registers every built-in model in `MODELS`.
"""
from . import baselines, c3tl, peers, scdca, shrinkage  # noqa: F401  (registers the models)
from .base import MODELS, PerturbationModel, load_model, make_model

__all__ = ["MODELS", "PerturbationModel", "load_model", "make_model"]
