"""Plate diagnostics: how much drug-specific signal a screen carries."""

import numpy as np

from scdca.eval.diagnostics import describe, plate_diagnostics
from tests.conftest import make_pb


def _screen(signal: float, noise: float, seed=0):
    rng = np.random.default_rng(seed)
    G = 50
    m = rng.normal(size=G)
    delta = {}
    for i in range(10):
        e = rng.normal(size=G)
        for dose, a in ((1.0, 1.0), (10.0, 2.0)):
            delta[("L1", f"d{i}", dose)] = a * m + signal * a * e + noise * rng.normal(size=G)
    data = make_pb(delta, control={"L1": np.zeros(G) + 5}, smiles={f"d{i}": "C" * (i + 1) for i in range(10)})
    data.control_std[:] = noise  # vehicle-well spread = the conditions' noise; make_pb gives n_cells = 10
    data.conditions["n_cells"] = 1
    return data


def test_a_common_response_only_screen_has_no_drug_specific_share():
    t = plate_diagnostics(_screen(signal=0.0, noise=0.0))
    assert t.loc[0, "common_share"] > 0.999 and t.loc[0, "drug_specific_share"] < 1e-3


def test_noise_sized_deviations_are_called_noise_and_real_effects_agree_across_doses():
    noisy = plate_diagnostics(_screen(signal=0.0, noise=1.0)).iloc[0]
    real = plate_diagnostics(_screen(signal=1.0, noise=0.1)).iloc[0]
    assert noisy["noise_share"] > 0.8 and abs(noisy["dose_neighbour_r"]) < 0.2
    assert real["noise_share"] < 0.1 and real["dose_neighbour_r"] > 0.9
    assert "little drug-specific signal" in describe(plate_diagnostics(_screen(signal=0.0, noise=1.0)))
    assert "a drug model can add" in describe(plate_diagnostics(_screen(signal=1.0, noise=0.1)))
