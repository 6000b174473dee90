import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdca.backbone import load, weights_hash
from scdca.errors import ScdcaInputError
from scdca.pretrain import PretrainConfig, pretrain

TINY = dict(layers=1, dim=16, heads=2, steps=20, batch_size=8, seq_len=12, eval_every=10, save_every=5, val_cells=32)


def structured_cells(n=300, g=24, seed=0):
    """Rank-2 expression: every gene is predictable from the others, not from its mean alone."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 2))
    w = rng.normal(size=(2, g))
    X = np.clip(1.5 + f @ w * 0.6 + rng.normal(0, 0.1, (n, g)), 0, None).astype(np.float32)
    return ad.AnnData(X=X, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))


def test_writes_a_checkpoint_that_load_reads(tmp_path):
    s = pretrain(structured_cells(), tmp_path / "bb", PretrainConfig(**TINY), progress=False)
    model = load(tmp_path / "bb")
    assert model.cfg.nlayers == 1 and model.cfg.d_model == 16
    assert "G5" in model.vocab and "<cls>" in model.vocab
    assert s["steps"] == 20 and (tmp_path / "bb" / "pretrain_log.csv").exists()


def test_masked_value_loss_beats_the_gene_mean():
    cfg = PretrainConfig(**{**TINY, "layers": 2, "dim": 32, "steps": 400, "seq_len": 24, "lr": 3e-3,
                            "mask_ratio": 0.3, "eval_every": 50})
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = pretrain(structured_cells(), d, cfg, progress=False)
    assert s["best_val_loss"] < 0.85 * s["gene_mean_baseline_val_loss"]


def test_same_seed_same_weights_and_resume_after_a_kill_gives_the_same_result(tmp_path):
    cfg = PretrainConfig(**TINY)
    a = pretrain(structured_cells(), tmp_path / "a", cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        pretrain(structured_cells(), tmp_path / "b", cfg, progress=False, _stop_after=13)
    b = pretrain(structured_cells(), tmp_path / "b", cfg, progress=False)  # resumes from step 10
    assert b["steps"] == 20 and b["best_val_loss"] == pytest.approx(a["best_val_loss"], rel=1e-6)
    assert weights_hash(load(tmp_path / "a")) == weights_hash(load(tmp_path / "b"))


def test_resume_with_other_settings_is_refused(tmp_path):
    pretrain(structured_cells(), tmp_path / "a", PretrainConfig(**TINY), progress=False)
    with pytest.raises(ScdcaInputError, match="other settings"):
        pretrain(structured_cells(), tmp_path / "a", PretrainConfig(**{**TINY, "dim": 8}), progress=False)


def test_bad_settings_are_refused():
    with pytest.raises(ScdcaInputError, match="mask_ratio"):
        PretrainConfig(mask_ratio=1.5)
