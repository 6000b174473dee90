import numpy as np
import pytest

from scdca.chem.molecules import canonicalize, morgan_fingerprints, novelty_table, scaffold, tanimoto
from scdca.data.splits import make_splits
from scdca.errors import ScdcaInputError
from tests.conftest import SMILES, make_pb


def test_tanimoto_by_hand():
    a = np.array([[1, 1, 0, 0]], dtype=np.uint8)
    b = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    np.testing.assert_allclose(tanimoto(a, b), [[1 / 3, 1.0, 0.0]])


def test_tanimoto_matches_rdkit():
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in SMILES[:4]]
    expected = DataStructs.BulkTanimotoSimilarity(fps[0], fps[1:])
    ours = tanimoto(morgan_fingerprints(SMILES[:1]), morgan_fingerprints(SMILES[1:4]))[0]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_scaffold_and_novelty():
    assert scaffold("CC(=O)Oc1ccccc1C(=O)O") == "c1ccccc1"
    assert scaffold("CCO") == ""
    t = novelty_table({"aspirin": SMILES[0], "caffeine": SMILES[1]}, {"aspirin2": SMILES[0], "ethanol": "CCO"})
    assert t.loc["aspirin2", "max_tanimoto"] == pytest.approx(1.0)
    assert t.loc["aspirin2", "nearest_train_drug"] == "aspirin" and t.loc["aspirin2", "scaffold_in_train"]
    assert t.loc["ethanol", "max_tanimoto"] < 0.2


def test_canonicalize_reports_all_bad_drugs_at_once():
    with pytest.raises(ScdcaInputError, match=r"2 drug\(s\): b \('xx'\), c \('C1CC\(\('\)"):
        canonicalize({"a": "CCO", "b": "xx", "c": "C1CC(("})


def test_unseen_scaffold_split_holds_out_whole_scaffolds():
    drugs = {f"m{i}": s for i, s in enumerate(SMILES)}
    delta = {(c, d, 1.0): np.zeros(3) for c in ("L1", "L2") for d in drugs}
    data = make_pb(delta, control={"L1": np.ones(3), "L2": np.ones(3)}, smiles=drugs)
    for seed in range(5):
        (s,) = make_splits(data, "unseen_scaffold", seed)
        tr = {scaffold(drugs[d]) for d in data.conditions.loc[list(s.train), "drug"]} - {""}
        te = {scaffold(drugs[d]) for d in data.conditions.loc[list(s.test), "drug"]} - {""}
        assert not tr & te
        assert data.conditions.loc[list(s.test), "drug"].nunique() >= 3  # >= 30% of 10 drugs
