"""scdca: predict how drugs change gene expression in cell lines, including unseen drugs and lines."""

from scdca import data, models
from scdca.data import DataKeys, PerturbationData, load, read, read_lincs
from scdca.errors import LeakageError, ScdcaInputError

__version__ = "0.1.0"
__all__ = [
    "data",
    "models",
    "DataKeys",
    "PerturbationData",
    "load",
    "read",
    "read_lincs",
    "ScdcaInputError",
    "LeakageError",
]
