import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdca.data.simulate import AtlasConfig, SimulationConfig, simulate, simulate_atlas
from scdca.errors import ScdcaInputError
from tests.conftest import SMILES

CFG = SimulationConfig(
    n_genes=80,
    n_cell_lines=3,
    cells_per_condition=4,
    control_cells=400,
    n_programs=6,
    doses_nM=(100.0, 10000.0),
    smiles=SMILES,
)
ATLAS = AtlasConfig(n_states=12, cells_per_state=400, extra_programs=2)


@pytest.fixture(scope="module")
def atlas():
    return simulate_atlas(CFG, ATLAS, seed=0)


def _log_norm(X):
    X = np.asarray(X.todense() if hasattr(X, "todense") else X, dtype=float)
    return np.log1p(1e4 * X / X.sum(1, keepdims=True))


def test_atlas_has_the_screens_genes_and_its_lines_only_as_controls(atlas):
    screen = simulate(CFG, seed=0)
    assert list(atlas.var_names) == list(screen.var_names)
    assert atlas.n_obs == 12 * 400 and atlas.obs["cell_type"].nunique() == 12
    assert (atlas.obs["control"] == 1).all() and set(atlas.obs["condition"]) == {"control"}
    # the screen's lines appear as states whose cells look like that line's controls
    for line in ("lineA", "lineB"):
        a = _log_norm(atlas[atlas.obs["cell_type"] == line].X).mean(0)
        ctrl = _log_norm(screen[(screen.obs["cell_type"] == line) & (screen.obs["control"] == 1)].X).mean(0)
        other = _log_norm(atlas[atlas.obs["cell_type"] == "state005"].X).mean(0)
        assert np.abs(a - ctrl).mean() < 0.5 * np.abs(other - ctrl).mean()
    assert atlas.obs["screen_line"].sum() == 3 * 400


def test_atlas_programs_covary_across_cells():
    atlas = simulate_atlas(
        SimulationConfig(n_genes=400, n_programs=4, smiles=SMILES),
        AtlasConfig(n_states=10, cells_per_state=200, extra_programs=1),
        seed=0,
    )
    programs = atlas.uns["atlas_programs"]  # (P + E, G) loadings
    corr = np.corrcoef(_log_norm(atlas.X).T)
    genes = np.argsort(-np.abs(programs[0]))[:8]  # strongest genes of a program drugs act on
    sign = np.sign(programs[0, genes])
    within = np.mean(
        [corr[i, j] * sign[a] * sign[b] for a, i in enumerate(genes) for b, j in enumerate(genes) if a < b]
    )
    outside = np.flatnonzero((programs == 0).all(0))[:8]  # genes in no program
    background = np.mean([abs(corr[i, j]) for a, i in enumerate(outside) for b, j in enumerate(outside) if a < b])
    assert within > 0.2 and within > 3 * background


def test_atlas_same_seed_same_cells_and_bad_settings_refused():
    small = AtlasConfig(n_states=3, cells_per_state=5, include_screen_lines=False)
    a, b = simulate_atlas(CFG, small, seed=1), simulate_atlas(CFG, small, seed=1)
    assert (a.X != b.X).nnz == 0 and not a.obs["screen_line"].any()
    with pytest.raises(ScdcaInputError, match="n_states"):
        AtlasConfig(n_states=1)


def test_a_screen_streamed_to_a_file_equals_the_in_memory_one(tmp_path):
    cfg = SimulationConfig(n_genes=200, n_drugs=5, cells_per_condition=5, control_cells=20)
    whole = simulate(cfg, seed=3)
    backed = simulate(cfg, seed=3, out=tmp_path / "screen.h5ad")
    assert backed.isbacked and backed.shape == whole.shape
    assert (backed.X[:] != whole.X).nnz == 0
    pd.testing.assert_frame_equal(backed.to_memory().obs, whole.obs)
    # more than one write block: appended blocks land in order
    from scdca.data.simulate import _count_chunks, write_in_chunks

    rng = np.random.default_rng(0)
    prop = rng.dirichlet(np.ones(30), size=4)
    cells = np.repeat(np.arange(4), 3000)
    chunks = list(_count_chunks(prop, cells, np.full(cells.size, 500.0), 5.0, rng))
    small = ad.AnnData(
        obs=pd.DataFrame(index=[f"c{i}" for i in range(cells.size)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(30)]),
    )
    write_in_chunks(tmp_path / "blocks.h5ad", small, iter(chunks), rows_per_write=5000)
    back = ad.read_h5ad(tmp_path / "blocks.h5ad")
    assert (back.X != sp.vstack(chunks).tocsr()).nnz == 0
