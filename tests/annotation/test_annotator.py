import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scdca.annotation import AnnotateConfig, Annotator, write_explanation
from scdca.errors import ScdcaInputError
from scdca.nn.backbone import resolve
from scdca.nn.peft import PeftConfig

GENES = [f"g{i}" for i in range(15)]
MARKERS = {"A": "g7", "B": "g3", "C": "g11"}
MARKER = MARKERS["A"]


def cells(n_per=40, seed=0, types=("A", "B", "C"), markers=MARKERS) -> ad.AnnData:
    """Noise in every gene, and one planted marker per type (g7 high in type A only, ...)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(types, n_per)
    X = rng.gamma(2.0, 0.5, (len(labels), len(GENES))).astype(np.float32)
    for t, gene in markers.items():
        X[:, GENES.index(gene)] = np.where(labels == t, 4.0, 0.2) + rng.normal(0, 0.1, len(labels))
    X = np.clip(X, 0, None)
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{seed}_{i}" for i in range(len(labels))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))


def _fit(method, reference=None, **kw):
    cfg = AnnotateConfig(
        peft=PeftConfig(method=method, r=2, prefix_tokens=2),
        epochs=kw.pop("epochs", 4),
        batch_size=16,
        seed=0,
        lr=kw.pop("lr", 1e-2),
        **kw,
    )
    return Annotator("random:1x16", cfg, progress=False).fit(cells() if reference is None else reference, "cell_type")


@pytest.mark.parametrize("method", ["lora", "prefix", "adapter", "token", "linear"])
def test_training_changes_only_the_methods_parameters(method):
    ann = _fit(method, epochs=2)
    original = resolve("random:1x16", genes=GENES).state_dict()
    trainable = {n for n, p in ann.net.backbone.named_parameters() if p.requires_grad}
    compared = set()
    for name, value in ann.net.backbone.state_dict().items():
        base = name.replace("base_layer.", "").replace(".base.", ".")  # wrapped modules keep the original tensor
        if name in trainable or base not in original:
            continue
        torch.testing.assert_close(value, original[base], rtol=0, atol=0, msg=name)
        compared.add(base)
    assert compared == set(original)  # every frozen tensor was found and checked
    assert trainable or method == "linear"
    assert ann.cost["params_trainable"] > 0 and ann.cost["params_trainable_pct"] < 100


def test_annotate_writes_scanpy_style_obs_and_save_load_gives_identical_probabilities(tmp_path):
    ann = _fit("lora", epochs=15)
    query = cells(n_per=10, seed=1)
    out = ann.annotate(query)
    assert list(out.obs["scdca_label"].cat.categories) == ["A", "B", "C"]
    assert out.obsm["scdca_proba"].shape == (30, 3)
    np.testing.assert_allclose(out.obsm["scdca_proba"].sum(1), 1, atol=1e-5)
    assert (out.obs["scdca_label"].astype(str) == query.obs["cell_type"]).mean() > 0.9  # it learned the markers
    ann.save(tmp_path / "m")
    again = Annotator.load(tmp_path / "m")
    pd.testing.assert_frame_equal(again.predict_proba(query), ann.predict_proba(query), check_exact=True)
    out.write_h5ad(tmp_path / "annotated.h5ad")  # h5ad-safe


def test_attention_ranking_puts_the_planted_marker_first(tmp_path):
    ref = cells(types=("A", "B"), markers={"A": MARKER})  # the one gene that tells A from B
    ann = _fit("full", ref, epochs=15, lr=3e-3)
    table = ann.explain(ref, ref.obs["cell_type"])
    top = table[table["rank"] == 1].set_index("group")["gene"]
    assert top["A"] == MARKER and top["B"] == MARKER
    untrained = _fit("full", ref, epochs=1, lr=1e-9).explain(ref, ref.obs["cell_type"])  # training put it there
    assert untrained.set_index(["group", "gene"]).loc[("A", MARKER), "rank"] > 1
    assert set(table.columns) == {"group", "gene", "attention", "rank"}
    np.testing.assert_allclose(table.groupby("group")["attention"].sum(), 1, atol=1e-5)
    png = write_explanation(table, tmp_path / "genes.csv", top=3)
    assert png.stat().st_size > 1000 and (tmp_path / "genes.csv").exists()


def test_bad_references_are_refused_with_the_fix():
    ann = Annotator("random:1x16", AnnotateConfig(epochs=1), progress=False)
    with pytest.raises(ScdcaInputError, match="label-key: 'celltype' is not an obs column.*cell_type"):
        ann.fit(cells(), "celltype")
    lonely = cells()
    lonely.obs["cell_type"] = lonely.obs["cell_type"].astype(str)
    lonely.obs.iloc[0, 0] = "Z"
    with pytest.raises(ScdcaInputError, match=r"label\(s\) \['Z'\] have a single reference cell"):
        ann.fit(lonely, "cell_type")
    ann = _fit("linear", epochs=1)
    other = cells(n_per=3)
    other.var_names = [f"x{i}" for i in range(len(GENES))]
    with pytest.raises(ScdcaInputError, match="query: none of the model's 15 genes"):
        ann.annotate(other)


def test_patience_stops_once_validation_loss_stops_improving():
    # lr 0: the weights never move, so no epoch after the first has a lower validation loss
    stopped = _fit("lora", epochs=20, lr=0.0, patience=2)
    assert (stopped.cost["best_epoch"], stopped.cost["epochs_run"]) == (1, 3)
    every = _fit("lora", epochs=8, lr=0.0, patience=None)
    assert every.cost["epochs_run"] == 8
    with pytest.raises(ScdcaInputError, match="patience"):
        AnnotateConfig(patience=0)


def test_linear_probe_runs_the_frozen_backbone_once_per_cell_and_learns(monkeypatch):
    from scdca.nn.backbone import Backbone

    calls = []
    encode = Backbone.encode

    def counted(self, ids, values, *args, **kwargs):
        calls.append(len(ids))
        return encode(self, ids, values, *args, **kwargs)

    monkeypatch.setattr(Backbone, "encode", counted)
    ann = _fit("linear", epochs=100, patience=None, lr=3e-2)
    assert sum(calls) == 120 and ann.cost["epochs_run"] == 100  # 100 epochs, one pass over the 120 cells
    query = cells(n_per=10, seed=1)
    right = (ann.annotate(query).obs["scdca_label"].astype(str) == query.obs["cell_type"]).mean()
    untrained = _fit("linear", epochs=1, patience=None, lr=0.0).annotate(query).obs["scdca_label"].astype(str)
    assert right >= 0.7 > 0.4 >= (untrained == query.obs["cell_type"]).mean()  # 3 types: chance is 1/3


def test_the_frozen_backbone_trains_without_dropout_unless_asked_and_full_fine_tuning_keeps_it(monkeypatch):
    from scdca.nn.backbone import Backbone

    modes = []
    encode = Backbone.encode

    def recorded(self, ids, values, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step (validation and prediction run without gradients)
            modes.append(any(m.training for m in self.modules() if isinstance(m, torch.nn.Dropout)))
        return encode(self, ids, values, *args, **kwargs)

    monkeypatch.setattr(Backbone, "encode", recorded)
    for method, asked, expected in (("lora", False, False), ("lora", True, True), ("full", False, True)):
        modes.clear()
        _fit(method, epochs=2, patience=None, backbone_dropout=asked)
        assert modes and set(modes) == {expected}, (method, asked)
