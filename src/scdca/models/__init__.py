"""Models behind one interface: `fit(train)` and `predict(query)`.

Importing this package registers every built-in model in `MODELS`.
"""

from scdca.models import baselines, c3tl, peers, scdca, shrinkage  # noqa: F401  (registers the models)
from scdca.models.base import MODELS, PerturbationModel, load_model, make_model

__all__ = ["MODELS", "PerturbationModel", "load_model", "make_model"]
