"""DrugFeaturizer: standardised over the training drugs, dose on the training range, restorable."""

import numpy as np
import pandas as pd
import pytest

from scdca.chem.featurizer import DrugFeaturizer
from scdca.errors import ScdcaInputError
from tests.conftest import SMILES


def test_training_drugs_are_centred_and_doses_span_zero_to_one():
    drugs = {f"d{i}": s for i, s in enumerate(SMILES[:5])}
    feat = DrugFeaturizer("morgan:bits=64").fit(drugs, np.array([0.01, 0.1, 1.0, 10.0]))
    emb = feat.molecules(list(drugs.values()), list(drugs))
    varying = emb.std(0) > 0
    np.testing.assert_allclose(emb[:, varying].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(emb[:, varying].std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(feat.dose(np.array([0.01, 0.1, 10.0, 1000.0])), [0.0, 1 / 3, 1.0, 1.0])
    table = pd.DataFrame({"smiles": [SMILES[0], SMILES[1]], "drug": ["d0", "d1"], "dose": [0.01, 10.0]})
    cond = feat.conditions(table)
    assert cond.shape == (2, feat.dim + 1) and cond.dtype == np.float32
    np.testing.assert_array_equal(cond[:, -1], [0.0, 1.0])
    np.testing.assert_array_equal(cond[:, :-1], emb[:2])


def test_restore_gives_the_same_features_and_refuses_another_encoder():
    drugs = {f"d{i}": s for i, s in enumerate(SMILES[:4])}
    feat = DrugFeaturizer("morgan:bits=64").fit(drugs, np.array([0.1, 1.0]))
    state = dict(mean=feat.mean, std=feat.std, dose_lo=feat.dose_lo, dose_span=feat.dose_span)
    again = DrugFeaturizer("morgan:bits=64").restore(**state, identifier=feat.encoder.identifier)
    np.testing.assert_array_equal(again.molecules(SMILES[4:6], ["a", "b"]), feat.molecules(SMILES[4:6], ["a", "b"]))
    with pytest.raises(ScdcaInputError, match="differs from the one used in training"):
        DrugFeaturizer("morgan:bits=128").restore(**state, identifier=feat.encoder.identifier)
