import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdca.errors import ScdcaInputError
from scdca.nn.backbone import load, weights_hash
from scdca.nn.pretrain import PretrainConfig, _Batches, coexpression_learned, linear_baseline, pretrain

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
    assert s["linear_baseline_val_loss"] < s["gene_mean_baseline_val_loss"]


def test_masked_value_loss_beats_the_gene_mean():
    cfg = PretrainConfig(
        **{**TINY, "layers": 2, "dim": 32, "steps": 400, "seq_len": 24, "lr": 3e-3, "mask_ratio": 0.3, "eval_every": 50}
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = pretrain(structured_cells(), d, cfg, progress=False)
    assert s["best_val_loss"] < 0.85 * s["gene_mean_baseline_val_loss"]


def _val_examples(X, seq_len=12, mask_ratio=0.4):
    from scdca.nn.backbone import GeneVocab

    vocab = GeneVocab.from_genes([f"G{i}" for i in range(X.shape[1])])
    batches = _Batches(
        X, np.arange(X.shape[1]) + 10, PretrainConfig(**{**TINY, "seq_len": seq_len, "mask_ratio": mask_ratio}), vocab
    )
    return batches.make(np.arange(len(X)), np.random.default_rng(1))


def test_linear_baseline_finds_low_rank_coexpression_and_reads_only_unmasked_values():
    X = structured_cells(n=400).X
    train, val = np.arange(300), _val_examples(X[300:])
    gene_mean = float((((X[train].mean(0)[val[4]] - val[3][:, 1:].numpy()) ** 2)[val[2][:, 1:].numpy()]).mean())
    lin = linear_baseline(X, train, val, k=2)
    assert lin < 0.2 * gene_mean  # rank-2 data: two axes explain nearly everything the gene means miss
    # the masked positions' true values enter only the error, never the prediction
    ids, inp, mask, target, cols = val
    garbage = inp.clone()
    garbage[mask] = 1e6
    assert linear_baseline(X, train, (ids, garbage, mask, target, cols), k=2) == pytest.approx(lin)
    shifted = target.clone()
    shifted[mask] += 1.0
    assert linear_baseline(X, train, (ids, inp, mask, shifted, cols), k=2) > lin + 0.5


def test_an_undertrained_backbone_is_flagged_with_the_fix(tmp_path, caplog):
    # the old and the new demo backbone: 1,200 steps closed 11% of the gap, 3,000 steps 93%
    assert coexpression_learned(1.1377, 1.1717, 0.8606) == pytest.approx(0.109, abs=1e-3)
    assert coexpression_learned(0.8812, 1.1717, 0.8606) == pytest.approx(0.934, abs=1e-3)
    assert np.isnan(coexpression_learned(1.0, 1.0, 1.2))  # no gap to close
    with caplog.at_level("WARNING", logger="scdca.nn.pretrain"):
        s = pretrain(structured_cells(), tmp_path / "bb", PretrainConfig(**{**TINY, "steps": 2}), progress=False)
    assert s["coexpression_learned"] == pytest.approx(
        coexpression_learned(s["best_val_loss"], s["gene_mean_baseline_val_loss"], s["linear_baseline_val_loss"])
    )
    assert s["coexpression_learned"] < 0.5
    assert "learned little" in caplog.text and "--steps" in caplog.text


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


def test_a_screen_is_pretrained_on_its_controls_only_unless_asked(tiny_sim, tmp_path, caplog):
    cfg = dict(TINY, steps=2, eval_every=1, save_every=1)
    n_ctrl = int((tiny_sim.obs["control"] == 1).sum())
    s = pretrain(tiny_sim, tmp_path / "a", PretrainConfig(**cfg), progress=False)
    assert s["provenance"]["cells"] == n_ctrl and s["provenance"]["perturbed_cells"] == 0
    assert s["train_cells"] + s["val_cells"] == n_ctrl
    with caplog.at_level("WARNING"):
        s = pretrain(tiny_sim, tmp_path / "b", PretrainConfig(**cfg, include_perturbed=True), progress=False)
    assert s["provenance"]["cells"] == tiny_sim.n_obs and s["provenance"]["perturbed_cells"] == tiny_sim.n_obs - n_ctrl
    assert "leak" in caplog.text
    assert load(tmp_path / "b").cfg.nlayers == 1


def test_provenance_names_the_file_and_a_screen_without_controls_is_refused(tiny_sim, tmp_path):
    from scdca import storage

    path = tmp_path / "screen.h5ad"
    storage.write_h5ad(path, tiny_sim)
    s = pretrain(str(path), tmp_path / "bb", PretrainConfig(**dict(TINY, steps=1, eval_every=1)), progress=False)
    assert s["provenance"]["data_sha256"] == storage.file_sha256(path) and s["provenance"]["n_cell_lines"] == 3
    treated = tiny_sim[tiny_sim.obs["control"] == 0].copy()
    with pytest.raises(ScdcaInputError, match="no control cells.*--include-perturbed"):
        pretrain(treated, tmp_path / "c", PretrainConfig(**TINY), progress=False)


class _Hostile:
    """Unpickling this would create the marker folder: the test fails if any code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_hostile_pickle_in_place_of_the_resume_file_runs_no_code(writer, tmp_path):
    import pickle

    import torch

    out, marker = tmp_path / "b", tmp_path / "pwned"
    out.mkdir()
    payload = {"model": _Hostile(marker), "step": 3}
    if writer == "pickle":
        (out / "train_state.pt").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, out / "train_state.pt")
    with pytest.raises(ScdcaInputError, match=r"resume file .*train_state.pt.* it was not run\. Delete it"):
        pretrain(structured_cells(), out, PretrainConfig(**TINY), progress=False)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Hostile(marker)))  # the payload does work when unpickled unsafely
    assert marker.exists()
