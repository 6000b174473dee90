"""Models behind one interface: `fit(train)` and `predict(query)`.

Importing this package registers every built-in model in `MODELS`.
"""

from scdca.models import baselines, c3tl, peers, scdca, shrinkage, stack  # noqa: F401  (registers the models)
from scdca.models.base import MODELS, PerturbationModel, load_model, make_model

# isort: split
from scdca.models import arc_state  # noqa: F401  (the opt-in STATE peer, registered last: lists start with the baselines)

RECOMMENDED = "scdca_stack"  # the model `scdca train` builds by default and the reports single out

__all__ = ["MODELS", "RECOMMENDED", "PerturbationModel", "load_model", "make_model"]
