"""scdca: predict how drugs change gene expression in cell lines, including unseen drugs and lines."""
from . import data, datasets, metrics, models, splits
from .data import DataKeys, PerturbationData, load
from .errors import LeakageError, ScdcaInputError
from .lincs import read_lincs

__version__ = "0.1.0"
__all__ = ["data", "datasets", "metrics", "models", "splits", "DataKeys", "PerturbationData", "load", "read_lincs",
           "ScdcaInputError", "LeakageError"]
