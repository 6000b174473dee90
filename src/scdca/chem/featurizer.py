"""A drug condition as model input: a molecule embedding standardised over the training drugs,
and its dose scaled onto the training range. One `DrugFeaturizer` serves every model that
embeds drugs (the scDCA family, C3TL, the biolord peer), so they all treat unseen drugs alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scdca.chem.encoders import MoleculeEncoder, get_encoder, standardisation, standardise
from scdca.errors import ScdcaInputError


def dose_range(dose: np.ndarray) -> tuple[float, float]:
    """(lowest log10 dose, span of log10 doses, at least 1e-12) of the training doses."""
    logd = np.log10(np.maximum(np.asarray(dose, dtype=float), 1e-12))
    return float(logd.min()), max(float(logd.max() - logd.min()), 1e-12)


def scaled_dose(dose: np.ndarray, lo: float, span: float) -> np.ndarray:
    """log10 dose mapped onto [0, 1] by the training range (`dose_range`), clipped outside it."""
    return np.clip((np.log10(np.maximum(np.asarray(dose, dtype=float), 1e-12)) - lo) / span, 0.0, 1.0)


class DrugFeaturizer:
    """Encoder -> standardisation over the training drugs -> dose scaling, fitted once.

    Attributes (after `fit` or `restore`): `encoder`, `mean` and `std` (dim,) of the training
    drugs' embeddings, `dose_lo` and `dose_span` of their log10 doses (`dose_range`).
    """

    def __init__(self, encoder: str | MoleculeEncoder):
        self.encoder = get_encoder(encoder) if isinstance(encoder, str) else encoder

    def fit(self, drugs: Mapping[str, str], doses: np.ndarray) -> DrugFeaturizer:
        """Standardise on these training drugs (name -> SMILES) and scale on these doses."""
        self.mean, self.std = standardisation(self.encoder.encode(list(drugs.values()), names=list(drugs)))
        self.dose_lo, self.dose_span = dose_range(np.asarray(doses, dtype=float))
        return self

    def restore(
        self, *, mean: np.ndarray, std: np.ndarray, dose_lo: float, dose_span: float, identifier: str
    ) -> DrugFeaturizer:
        """The state of a saved model; refuses an encoder other than the one it was fitted with."""
        if self.encoder.identifier != identifier:
            raise ScdcaInputError(
                f"molecule encoder {self.encoder.identifier!r} differs from the one used in training ({identifier!r})"
            )
        self.mean, self.std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        self.dose_lo, self.dose_span = dose_lo, dose_span
        return self

    @property
    def dim(self) -> int:
        """Width of a molecule's features."""
        return len(self.mean)

    def molecules(self, smiles: Sequence[str], names: Sequence[str]) -> np.ndarray:
        """(n, dim) standardised embeddings (clipped, so a far-away drug cannot dominate)."""
        return standardise(self.encoder.encode(list(smiles), names=list(names)), self.mean, self.std)

    def dose(self, dose: np.ndarray) -> np.ndarray:
        """(n,) log10 dose on [0, 1] over the training range."""
        return scaled_dose(dose, self.dose_lo, self.dose_span)

    def conditions(self, conditions) -> np.ndarray:
        """(N, dim + 1) float32: each condition's molecule features with its scaled dose appended
        (`conditions` has columns smiles, drug and dose, as `PerturbationData.conditions`)."""
        emb = self.molecules(conditions["smiles"], conditions["drug"])
        t = self.dose(conditions["dose"].to_numpy(float))
        return np.hstack([emb, t[:, None]]).astype(np.float32)
