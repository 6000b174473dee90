"""The scDCA family: config, network, model, the named presets and the recommended routed model.

Importing this package registers every scDCA model in `scdca.models.MODELS`.
"""

from scdca.models.scdca import presets, routed  # noqa: F401  (registers the models)
from scdca.models.scdca.config import ScDCAConfig
from scdca.models.scdca.model import ScDCAModel
from scdca.models.scdca.routed import ScDCARouted

__all__ = ["ScDCAConfig", "ScDCAModel", "ScDCARouted"]
