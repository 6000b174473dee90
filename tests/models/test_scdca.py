import numpy as np
import pytest
import torch

from scdca.data.splits import make_splits
from scdca.errors import ScdcaInputError
from scdca.models import make_model
from scdca.models.scdca.config import ScDCAConfig
from scdca.models.scdca.model import ScDCAModel, dose_levels, interpolation_weights
from scdca.models.scdca.net import ScDCANet
from scdca.nn.adapters import AdapterConfig, DrugConditionalAdapter, count_parameters
from scdca.nn.backbone import Backbone, BackboneConfig, GeneVocab, load, save, weights_hash

FAST = dict(encoder="morgan:bits=128", epochs=3, batch_size=8, lr=1e-3, patience=10)


@pytest.fixture(scope="module")
def tiny_backbone(tiny_data, tmp_path_factory):
    torch.manual_seed(0)
    vocab = GeneVocab.from_genes(list(tiny_data.genes)[:-5])  # the last 5 genes are out of vocabulary
    model = Backbone(
        BackboneConfig(
            ntoken=len(vocab), d_model=16, nhead=2, d_hid=16, nlayers=2, dropout=0.0, pad_token_id=vocab["<pad>"]
        )
    )
    folder = tmp_path_factory.mktemp("bb")
    save(model, vocab, folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDCA_CACHE", str(tmp_path / "cache"))


def test_adapter_starts_as_identity_and_both_paths_get_gradients():
    ad = DrugConditionalAdapter(AdapterConfig(d_model=8, cond_dim=5, bottleneck=4))
    h, c = torch.randn(2, 3, 8), torch.randn(2, 5)
    out = ad(h, c)
    torch.testing.assert_close(out, h)
    out.pow(2).sum().backward()  # zero-init layers still receive gradient
    assert ad.up.weight.grad.abs().sum() > 0 and ad.mol_proj[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "variant,extra",
    [
        ("adapter", {}),
        ("finetune", {}),
        ("concat", {}),
        ("feature", {}),
        ("lowrank", {}),
        ("adapter", {"gene_head": True, "modulation": "film"}),
    ],
)
def test_step_zero_equals_the_frozen_backbone_and_predicts_no_change(tiny_backbone, variant, extra):
    bb = load(tiny_backbone)
    ids = torch.arange(20)
    net = ScDCANet(bb, ids, cond_dim=7, cfg=ScDCAConfig(variant=variant, **extra))
    values = torch.rand(3, 20)
    cond = torch.randn(3, 7)
    with torch.no_grad():
        ref = net.reference_output(values) if variant == "finetune" else None  # finetune: computed before training
        torch.testing.assert_close(net(values, cond, reference=ref), values)  # control + (output - ref) = control
        if variant == "adapter":  # the adapted stack's hidden states equal the backbone's
            h = bb.embed(ids.expand(3, -1), values)
            for layer, adapter in zip(bb.transformer_encoder.layers, net.adapters):
                h = adapter(layer(h), cond)
            torch.testing.assert_close(h, bb.encode(ids.expand(3, -1), values))


@pytest.mark.parametrize("variant", ["adapter", "concat", "feature"])
def test_frozen_backbone_has_no_dropout_in_training_mode(tiny_backbone, variant):
    bb = load(tiny_backbone)
    bb.cfg.dropout = 0.5
    for m in bb.modules():  # a backbone pretrained with dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    net = ScDCANet(bb, torch.arange(20), cond_dim=7, cfg=ScDCAConfig(variant=variant)).train()
    assert not net.backbone.training and all(not m.training for m in net.backbone.modules())
    values, cond = torch.rand(3, 20), torch.randn(3, 7)
    torch.testing.assert_close(net(values, cond), net(values, cond))  # deterministic while training
    # finetune trains the backbone and keeps its dropout
    ft = ScDCANet(load(tiny_backbone), torch.arange(20), cond_dim=7, cfg=ScDCAConfig(variant="finetune")).train()
    assert ft.backbone.training


def _trained_adapter_net(backbone: str, **cfg) -> tuple[ScDCANet, torch.Tensor, torch.Tensor]:
    """An adapter net after two optimiser steps (so the adapters are no longer the identity), and its inputs."""
    torch.manual_seed(0)
    net = ScDCANet(load(backbone), torch.arange(20), cond_dim=7, cfg=ScDCAConfig(variant="adapter", **cfg))
    values, cond = torch.rand(3, 20), torch.randn(3, 7)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (net(values, cond) - values - 1.0).pow(2).mean().backward()
        opt.step()
    return net, values, cond


def test_recomputing_frozen_activations_gives_the_same_outputs_and_gradients(tiny_backbone):
    plain, values, cond = _trained_adapter_net(tiny_backbone)
    again, _, _ = _trained_adapter_net(tiny_backbone, recompute_frozen=True)
    calls = {}
    for name, net in (("plain", plain), ("again", again)):
        ref = net.reference_output(values)
        # the top layer's input needs gradient (an adapter sits below it); count a module inside it
        # (a checkpointed module's own hooks do not fire when it is recomputed)
        inner = net.backbone.transformer_encoder.layers[-1].linear1
        hook = inner.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        net.zero_grad()
        net(values, cond, reference=ref).pow(2).sum().backward()
        hook.remove()
    assert calls == {"plain": 1, "again": 2}  # recomputed once in the backward pass, not stored
    torch.testing.assert_close(again(values, cond), plain(values, cond))
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("up.weight"))  # gradients reached layer 1
    for n, p in again.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n])


def test_a_bf16_frozen_backbone_starts_at_no_change_and_trains_its_fp32_adapters(tiny_backbone):
    net = ScDCANet(load(tiny_backbone), torch.arange(20), cond_dim=7, cfg=ScDCAConfig(frozen_dtype="bfloat16"))
    assert {p.dtype for p in net.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in net.parameters() if p.requires_grad} == {torch.float32}
    values, cond = torch.rand(3, 20), torch.randn(3, 7)
    with torch.no_grad():
        out = net(values, cond)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, values)  # the reference runs the same bf16 path: no change, exactly
    trained, _, _ = _trained_adapter_net(tiny_backbone, frozen_dtype="bfloat16")
    plain, _, _ = _trained_adapter_net(tiny_backbone)
    with torch.no_grad():
        moved, moved32 = trained(values, cond) - values, plain(values, cond) - values
    assert moved.abs().max() > 1e-3  # the adapters learnt something through the bf16 layers ...
    torch.testing.assert_close(moved, moved32, atol=0.05, rtol=0.05)  # ... about what they learn in fp32
    assert not torch.equal(moved, moved32)  # (and it is not silently fp32)


def test_film_adapter_starts_as_identity_and_lets_the_drug_scale_channels():
    ad = DrugConditionalAdapter(AdapterConfig(d_model=8, cond_dim=5, bottleneck=4, modulation="film"))
    h, c = torch.randn(2, 3, 8), torch.randn(2, 5)
    torch.testing.assert_close(ad(h, c), h)
    assert ad.mol_proj[-1].out_features == 8 + 4
    with torch.no_grad():
        ad.up.weight.fill_(0.1)
        ad.mol_proj[-1].bias[8:] = 1.0  # g = 1 doubles the down-projection
        gained = ad(h, c)
        ad.mol_proj[-1].bias[8:] = 0.0
        plain = ad(h, c)
    assert not torch.allclose(gained, plain)


def test_training_changes_only_adapters_and_head(tiny_data, tiny_backbone):
    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    model = make_model("scdca", backbone=tiny_backbone, **FAST)
    model.fit(tiny_data.subset(split.train))
    after = model.net.backbone
    assert weights_hash(after) == weights_hash(load(tiny_backbone))
    fresh = ScDCANet(load(tiny_backbone), model.net.gene_ids, model.net.adapters[0].cfg.cond_dim, model.cfg)
    changed = {k for k, v in model.net.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert changed and all(k.startswith("adapters.") for k in changed)
    c = model.cost()
    assert 0 < c["params_trainable"] < c["params_total"] and c["steps"] > 0


def test_predict_unseen_drugs_and_unseen_line_zero_shot(tiny_data, tiny_backbone):
    split = [s for s in make_splits(tiny_data, "unseen_cell_zeroshot", 0)][0]
    model = make_model("scdca", backbone=tiny_backbone, **FAST).fit(tiny_data.subset(split.train))
    query = tiny_data.subset(split.test, observed=False)
    pred = model.predict(query)
    assert pred.shape == (len(split.test), tiny_data.n_genes) and np.isfinite(pred).all()
    control = query.control_for(query.conditions["cell_line"])
    np.testing.assert_array_equal(pred[:, -5:], control[:, -5:])  # out-of-vocabulary genes: no change
    assert not np.allclose(pred[:, :-5], control[:, :-5])


def test_save_load_gives_identical_predictions_and_refuses_another_backbone(tiny_data, tiny_backbone, tmp_path):
    split = make_splits(tiny_data, "unseen_drug", 1)[0]
    model = make_model("scdca", backbone=tiny_backbone, **FAST).fit(tiny_data.subset(split.train))
    model.save(tmp_path / "m")
    again = ScDCAModel.load(tmp_path / "m")
    q = tiny_data.subset(split.test, observed=False)
    np.testing.assert_allclose(again.predict(q), model.predict(q), rtol=1e-6, atol=1e-6)
    other = load(tiny_backbone)
    with torch.no_grad():
        other.decoder.fc[0].bias.add_(1.0)
    save(other, other.vocab, tmp_path / "other_bb")
    with pytest.raises(ScdcaInputError, match="differs from the one this model was trained on"):
        ScDCAModel.load(tmp_path / "m", backbone=str(tmp_path / "other_bb"))


def test_a_bf16_frozen_backbone_saves_and_loads_to_the_same_predictions(tiny_data, tiny_backbone, tmp_path):
    split = make_splits(tiny_data, "unseen_drug", 1)[0]
    model = make_model("scdca", backbone=tiny_backbone, frozen_dtype="bfloat16", recompute_frozen=True, **FAST)
    model.fit(tiny_data.subset(split.train))
    model.save(tmp_path / "m")
    again = ScDCAModel.load(tmp_path / "m")  # the backbone's hash is of its stored (fp32) weights
    assert again.cfg.frozen_dtype == "bfloat16" and next(again.net.backbone.parameters()).dtype == torch.bfloat16
    q = tiny_data.subset(split.test, observed=False)
    np.testing.assert_allclose(again.predict(q), model.predict(q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,backbone", [("scdca_lowrank", None), ("scdca_plus", "random:1x16"), ("scdca_plus_frozen", "random:1x16")]
)
def test_extensions_save_and_load_with_their_line_offsets(tiny_data, tiny_backbone, tmp_path, name, backbone):
    split = make_splits(tiny_data, "unseen_cell_zeroshot", 0)[0]  # the query line has no training offset
    model = make_model(
        name,
        backbone=backbone or tiny_backbone,
        encoder="morgan:bits=128",
        epochs=2,
        **({"head_warmup_epochs": 5} if name.startswith("scdca_plus") else {}),
    )
    model.fit(tiny_data.subset(split.train))
    model.save(tmp_path / "m")
    again = ScDCAModel.load(tmp_path / "m")
    assert type(again).name == name and again.cfg.line_offset
    q = tiny_data.subset(split.test, observed=False)
    np.testing.assert_allclose(again.predict(q), model.predict(q), rtol=1e-5, atol=1e-5)


def test_interpolation_weights_are_linear_between_grid_points_and_flat_beyond():
    grid = torch.tensor([0.0, 0.5, 1.0])
    w = interpolation_weights(torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.9, 2.0]), grid)
    expected = torch.tensor([[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.2, 0.8], [0, 0, 1.0]])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(interpolation_weights(torch.tensor([0.3, 7.0]), torch.tensor([0.4])), torch.ones(2, 1))


def test_dose_levels_keep_distinct_doses_and_bin_long_dose_series():
    t = np.array([0.0, 1.0, 0.5, 0.0, 1.0])
    centres, level = dose_levels(t)
    np.testing.assert_array_equal(centres, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(centres[level], t)
    t = np.linspace(0, 1, 100)  # a different dose for every condition: binned
    centres, level = dose_levels(t, max_levels=4)
    assert len(centres) == 4 and np.all(np.diff(centres) > 0)
    np.testing.assert_array_equal(np.bincount(level), [25, 25, 25, 25])


def test_lowrank_starts_from_the_line_mean_change_shifted_to_the_rows_dose(tiny_data, tiny_backbone):
    """Before any step the head is zero: the prediction is control + the line's mean training
    change + (the mean change at the row's dose - the mean over all doses)."""
    train = tiny_data.subset(make_splits(tiny_data, "unseen_drug", 0)[0].train)
    model = make_model("scdca_lowrank", backbone=tiny_backbone, encoder="morgan:bits=128", epochs=0).fit(train)
    assert model.cfg.dose_profile
    cond = train.conditions
    delta, line, dose = train.delta(), cond["cell_line"].to_numpy(), cond["dose"].to_numpy()
    assert len(np.unique(dose)) > 1  # otherwise the profile is zero and this test shows nothing
    expected = train.control_for(cond["cell_line"]) + np.stack(
        [delta[line == c].mean(0) + delta[dose == x].mean(0) - delta.mean(0) for c, x in zip(line, dose)]
    )
    pred = model.predict(train.subset(train.ids, observed=False))
    kept = model._kept
    np.testing.assert_allclose(pred[:, kept], expected[:, kept], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pred[:, ~kept], train.control_for(cond["cell_line"])[:, ~kept])
    plain = make_model(
        "scdca_lowrank", backbone=tiny_backbone, encoder="morgan:bits=128", epochs=0, dose_profile=False
    ).fit(train)  # the ablation: the line's mean change only
    flat = plain.predict(train.subset(train.ids, observed=False))
    lines_mean = np.stack([delta[line == c].mean(0) for c in line])
    np.testing.assert_allclose(
        flat[:, kept], (train.control_for(cond["cell_line"]) + lines_mean)[:, kept], rtol=1e-4, atol=1e-5
    )


def test_dose_profile_without_line_offset_is_refused():
    with pytest.raises(ScdcaInputError, match="needs line_offset=True"):
        make_model("scdca_lowrank", backbone="random:1x16", line_offset=False)


def test_plus_frozen_keeps_the_warmed_up_head_and_trains_the_adapters(tiny_data):
    train = tiny_data.subset(make_splits(tiny_data, "unseen_drug", 0)[0].train)
    opts = dict(backbone="random:1x16", encoder="morgan:bits=128", head_warmup_epochs=20, seed=0)
    warm = make_model("scdca_plus_frozen", epochs=0, **opts).fit(train)  # warm-up only
    model = make_model("scdca_plus_frozen", epochs=3, lr=1e-2, **opts).fit(train)
    state = {k: v for k, v in model.net.state_dict().items()}
    for name, value in warm.net.state_dict().items():
        if name.startswith("gene_head."):
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    moved = [n for n, v in warm.net.state_dict().items() if n.startswith("adapters.") and not torch.equal(state[n], v)]
    assert moved  # the adapters trained
    assert model.cost()["steps"] > 0


@pytest.mark.parametrize("name", ["scdca_nores", "scdca_noskip", "scdca_film", "finetune", "concat", "feature"])
def test_every_variant_fits_and_predicts(name, tiny_data, tiny_backbone):
    split = make_splits(tiny_data, "unseen_pair", 0)[0]
    model = make_model(name, backbone=tiny_backbone, **{**FAST, "epochs": 1})
    pred = model.fit(tiny_data.subset(split.train)).predict(tiny_data.subset(split.test, observed=False))
    assert pred.shape == (len(split.test), tiny_data.n_genes) and np.isfinite(pred).all()
    if name == "finetune":
        assert weights_hash(model.net.backbone) != weights_hash(load(tiny_backbone))


def test_trainable_fraction_at_whole_human_size_is_below_one_percent():
    bb = Backbone(BackboneConfig(ntoken=60697, d_model=512, nhead=8, d_hid=512, nlayers=12, pad_token_id=60694))
    net = ScDCANet(bb, torch.arange(2000), cond_dim=768 + 1, cfg=ScDCAConfig())
    c = count_parameters(net)
    assert c["trainable_pct"] < 1.0, c


def test_missing_backbone_is_a_clear_error():
    with pytest.raises(ScdcaInputError, match="needs a backbone"):
        make_model("scdca")


def test_killed_training_resumes_to_the_same_result(tiny_data, tiny_backbone, tmp_path):
    split = make_splits(tiny_data, "unseen_drug", 2)[0]
    train = tiny_data.subset(split.train)
    q = tiny_data.subset(split.test, observed=False)
    full = make_model("scdca", backbone=tiny_backbone, checkpoint_dir=tmp_path / "a", **FAST).fit(train)
    killed = make_model("scdca", backbone=tiny_backbone, checkpoint_dir=tmp_path / "b", **FAST)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(train, _stop_after_epochs=2)
    resumed = make_model("scdca", backbone=tiny_backbone, checkpoint_dir=tmp_path / "b", **FAST).fit(train)
    assert resumed.cost()["best_val_mse"] == pytest.approx(full.cost()["best_val_mse"], rel=1e-6)
    np.testing.assert_allclose(resumed.predict(q), full.predict(q), rtol=1e-5, atol=1e-6)
    other = make_model("scdca", backbone=tiny_backbone, checkpoint_dir=tmp_path / "b", **{**FAST, "lr": 0.5})
    with pytest.raises(ScdcaInputError, match="other data or settings"):
        other.fit(train)


def test_predict_and_screen_from_a_saved_model(tiny_data, tiny_backbone, tmp_path):
    from scdca.predict import predict, screen

    model = make_model("scdca", backbone=tiny_backbone, **FAST).fit(tiny_data)
    model.save(tmp_path / "m")
    m = ScDCAModel.load(tmp_path / "m")
    new_line = {"newline": tiny_data.control_mean[0] * 0.9}
    out = predict(
        m, ["CCO", "c1ccccc1O"], names=["ethanol", "phenol"], cell_lines=["lineB"], control=new_line, doses=[0.01, 1.0]
    )
    assert out.n_obs == 2 * 2 * 2 and list(out.var_names) == [str(g) for g in tiny_data.genes]
    assert set(out.obs["cell_line"]) == {"lineB", "newline"}
    with pytest.raises(ScdcaInputError, match="was not in the training data"):
        predict(m, ["CCO"], cell_lines=["K999"])
    names = [f"m{i}" for i in range(7)]
    library = ["CCO", "c1ccccc1O", "not_smiles", "CC(=O)O", "CCN", "c1ccncc1", "OCCO"]
    ranked = screen(m, names, library, cell_line="lineA", batch_size=3, progress=False)
    assert len(ranked) == 7 and ranked.loc[ranked["drug"] == "m2", "error"].item() == "unparseable SMILES"
    ok = ranked[ranked["error"] == ""]
    assert (np.diff(ok["score"].to_numpy()) <= 0).all()
    # the streamed screen agrees with a direct prediction
    direct = predict(m, ["CCO"], cell_lines=["lineA"], doses=[1.0])
    d = direct.X[0] - direct.layers["control"][0]
    assert ok.loc[ok["drug"] == "m0", "effect_size"].item() == pytest.approx(float(np.sqrt((d**2).mean())), rel=1e-5)


def test_predictions_say_how_close_each_molecule_is_to_the_training_drugs(tiny_data, tiny_backbone, tmp_path):
    from scdca.chem.molecules import morgan_fingerprints, tanimoto
    from scdca.predict import predict, screen

    model = make_model("scdca", backbone=tiny_backbone, **FAST).fit(tiny_data)
    model.save(tmp_path / "m")
    m = ScDCAModel.load(tmp_path / "m")
    train = tiny_data.drug_smiles()
    assert m.training_molecules == train
    known_name, known_smiles = next(iter(train.items()))
    out = predict(m, [known_smiles, "CCCCCCCCO"], names=["again", "octanol"], cell_lines=["lineA"])
    obs = out.obs.set_index("drug")
    assert obs.loc["again", "max_tanimoto_train"] == 1.0 and obs.loc["again", "nearest_train_drug"] == known_name
    sim = tanimoto(morgan_fingerprints(["CCCCCCCCO"]), morgan_fingerprints(list(train.values())))[0]
    assert sim.max() < 1.0 and obs.loc["octanol", "max_tanimoto_train"] == pytest.approx(float(sim.max()), abs=1e-4)
    assert obs.loc["octanol", "nearest_train_drug"] == list(train)[int(sim.argmax())]
    ranked = screen(m, ["again", "octanol"], [known_smiles, "CCCCCCCCO"], cell_line="lineA", progress=False)
    assert ranked.set_index("drug")["max_tanimoto_train"].to_dict() == {
        "again": 1.0,
        "octanol": pytest.approx(float(sim.max()), abs=1e-4),
    }
    m.training_molecules = None  # a model saved before they were recorded: no such columns, no failure
    assert "max_tanimoto_train" not in screen(m, ["octanol"], ["CCCCCCCCO"], cell_line="lineA", progress=False)


def test_cli_train_predict_screen(tiny_sim, tiny_backbone, tmp_path, capsys):
    from scdca.cli import main

    data = tmp_path / "d.h5ad"
    tiny_sim.write_h5ad(data)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "m"),
                "--model",
                "scdca",
                "--backbone",
                tiny_backbone,
                "--encoder",
                "morgan:bits=64",
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "m"),
                "--smiles",
                "CCO",
                "--cell-line",
                "lineA",
                "--out",
                str(tmp_path / "p.h5ad"),
            ]
        )
        == 0
    )
    (tmp_path / "lib.smi").write_text("CCO ethanol\nc1ccccc1O phenol\nOCC(O)CO glycerol\n")
    assert (
        main(
            [
                "screen",
                "--model",
                str(tmp_path / "m"),
                "--library",
                str(tmp_path / "lib.smi"),
                "--cell-line",
                "lineA",
                "--out",
                str(tmp_path / "r.csv"),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "effect size" in printed
    # Tanimoto to the nearest training drug: ethanol 0.20, phenol 0.30, glycerol 0.10
    assert "median 0.20; 1 molecule(s) below 0.2, where predictions are least reliable: glycerol" in printed


def test_unseen_fingerprint_bits_do_not_blow_up_predictions(tiny_data, tiny_backbone):
    """A test drug with Morgan bits that no training drug has must not be scaled by 1/std ~ 1e6."""
    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    model = make_model("scdca", backbone=tiny_backbone, **{**FAST, "encoder": "morgan"})
    model.fit(tiny_data.subset(split.train))
    cond = model._conditions(tiny_data.subset(split.test, observed=False))
    assert np.abs(cond).max() < 100
    pred = model.predict(tiny_data.subset(split.test, observed=False))
    assert np.abs(pred - tiny_data.subset(split.test).mean).max() < 20


def test_drug_gene_head_starts_at_zero_and_gives_each_drug_its_own_gene_pattern():
    from scdca.nn.adapters import DrugGeneConfig, DrugGeneHead

    head = DrugGeneHead(DrugGeneConfig(d_model=6, cond_dim=3, n_genes=5, rank=2, hidden=8))
    h, c = torch.randn(2, 5, 6), torch.randn(2, 3)
    torch.testing.assert_close(head(h, c), torch.zeros(2, 5))
    with torch.no_grad():
        head.drug_proj[-1].weight.normal_()
    with torch.no_grad():
        out = head(h[:1].expand(2, -1, -1), c)  # same cell, two drugs
    assert out.shape == (2, 5) and abs(float(torch.corrcoef(out)[0, 1])) < 0.999  # not one shared direction


def test_drug_gene_head_per_line_states_match_per_row_states_forward_and_backward():
    """h given once per line with `rows` (unsorted, one line unused) gives the same output and
    gradients as each row's own copy of its line's states; an in-place change to h is seen."""
    from scdca.nn.adapters import DrugGeneConfig, DrugGeneHead

    torch.manual_seed(0)
    head = DrugGeneHead(DrugGeneConfig(d_model=6, cond_dim=4, n_genes=5, rank=3, hidden=8))
    with torch.no_grad():
        head.drug_proj[-1].weight.normal_()
    h, cond, rows = torch.randn(4, 5, 6), torch.randn(7, 4), torch.tensor([2, 0, 2, 3, 0, 0, 2])  # line 1 unused
    grads = []
    for out in (lambda: head(h, cond, rows), lambda: head(h[rows], cond)):
        head.zero_grad()
        value = out()
        (value * torch.arange(35.0).reshape(7, 5)).sum().backward()
        grads.append((value.detach(), [p.grad.clone() for p in head.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    before = head(h, cond, rows).detach()
    h.add_(torch.randn_like(h))  # the same tensor, changed in place: the kept LN(h) must not be reused
    torch.testing.assert_close(head(h, cond, rows), head(h.clone(), cond, rows))
    assert not torch.allclose(head(h, cond, rows), before)


def _two_program_screen(tmp_path):
    """Two drugs move one gene set up, two others another set down (dose-proportional), and a
    tiny random backbone over those genes: a drug-blind model cannot fit both."""
    from ..conftest import make_pb

    G = 12
    up, down = np.zeros(G), np.zeros(G)
    up[:4], down[6:10] = 1.0, -1.0
    delta = {
        (line, d, x): (up if d in ("aspirin", "ibuprofen") else down) * x
        for line in ("L1", "L2")
        for d in ("aspirin", "caffeine", "ibuprofen", "paracetamol")
        for x in (0.5, 1.0)
    }
    data = make_pb(delta, control={"L1": np.linspace(0.5, 2, G), "L2": np.linspace(2, 0.5, G)})
    torch.manual_seed(0)
    vocab = GeneVocab.from_genes(list(data.genes))
    bb = Backbone(
        BackboneConfig(
            ntoken=len(vocab), d_model=16, nhead=2, d_hid=16, nlayers=1, dropout=0.0, pad_token_id=vocab["<pad>"]
        )
    )
    save(bb, vocab, tmp_path / "bb")
    return data, str(tmp_path / "bb"), up, down


def _changes(model, data):
    from scdca.data.keys import condition_id

    q = [condition_id("L1", "aspirin", 1.0), condition_id("L1", "caffeine", 1.0)]
    return model.predict(data.subset(q, observed=False)) - data.control_mean[0]


def test_lowrank_variant_learns_drug_specific_changes(tmp_path):
    data, bb, up, down = _two_program_screen(tmp_path)
    model = make_model("scdca_lowrank", backbone=bb, encoder="morgan:bits=64", epochs=150)
    change = _changes(model.fit(data), data)
    assert np.corrcoef(change[0], up)[0, 1] > 0.9 and np.corrcoef(change[1], down)[0, 1] > 0.9
    assert model.cost()["epochs_run"] == 150  # no validation: a fixed budget of full-batch steps


def test_plus_variant_warms_up_its_head_before_the_adapters_train(tmp_path):
    data, bb, up, down = _two_program_screen(tmp_path)
    # epochs=0: only the warm-up runs; the adapters are still the identity
    model = make_model("scdca_plus", backbone=bb, encoder="morgan:bits=64", epochs=0, head_warmup_epochs=150)
    change = _changes(model.fit(data), data)
    assert np.corrcoef(change[0], up)[0, 1] > 0.9 and np.corrcoef(change[1], down)[0, 1] > 0.9
    assert all(float(a.up.weight.abs().sum()) == 0 for a in model.net.adapters)
    cold = make_model("scdca_plus", backbone=bb, encoder="morgan:bits=64", epochs=0, head_warmup_epochs=0)
    # no warm-up, no training: every drug gets the line's mean training change (line_offset)
    line_mean = data.delta()[(data.conditions["cell_line"] == "L1").to_numpy()].mean(0)
    np.testing.assert_allclose(_changes(cold.fit(data), data), np.stack([line_mean] * 2), atol=1e-5)


def test_head_dropout_acts_only_while_training():
    from scdca.nn.adapters import DrugGeneConfig, DrugGeneHead

    torch.manual_seed(0)
    head = DrugGeneHead(DrugGeneConfig(d_model=8, cond_dim=6, n_genes=5, rank=3, hidden=16, dropout=0.5))
    with torch.no_grad():
        head.drug_proj[-1].weight.normal_()
    cond = torch.randn(4, 6)
    head.eval()
    torch.testing.assert_close(head.drug_weights(cond), head.drug_weights(cond))  # deterministic
    plain = DrugGeneHead(DrugGeneConfig(d_model=8, cond_dim=6, n_genes=5, rank=3, hidden=16))
    plain.load_state_dict(head.state_dict())  # same keys: dropout adds no parameters
    plain.eval()
    torch.testing.assert_close(head.drug_weights(cond), plain.drug_weights(cond))
    head.train()
    assert not torch.allclose(head.drug_weights(cond), head.drug_weights(cond))


def test_head_dropout_drops_a_share_p_and_keeps_the_expectation():
    from scdca.nn.adapters import DrugGeneConfig, DrugGeneHead

    torch.manual_seed(0)
    head = DrugGeneHead(DrugGeneConfig(d_model=8, cond_dim=6, n_genes=5, rank=3, hidden=16, dropout=0.6)).train()
    x = torch.ones(200_000)
    out = head._drop(x)
    assert float((out == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    assert float(out.mean()) == pytest.approx(1.0, abs=0.01)  # kept entries scaled by 1 / (1 - p)
    head.cfg.dropout = 1.0
    assert torch.equal(head._drop(x), torch.zeros_like(x))


def test_molecule_grouping_gives_the_per_row_drug_weights():
    from scdca.nn.adapters import DrugGeneConfig, DrugGeneHead, group_molecules

    torch.manual_seed(0)
    head = DrugGeneHead(DrugGeneConfig(d_model=8, cond_dim=6, n_genes=5, rank=3, hidden=16)).eval()
    with torch.no_grad():
        head.drug_proj[-1].weight.normal_()
    molecules = torch.randn(3, 5)
    cond = torch.cat([molecules[[0, 1, 0, 2, 1, 0]], torch.rand(6, 1)], 1)  # 3 molecules at 6 doses
    groups = group_molecules(cond)
    assert 3 <= len(groups.molecules) <= 6  # different molecules are never merged
    assert torch.equal(groups.select @ groups.molecules, cond[:, :-1])
    first, act, last = head.drug_proj
    out = last(act(first(cond[:, :-1])))  # every row on its own
    u, alpha, beta = out[:, :-2], out[:, -2], out[:, -1]
    per_row = u * torch.sigmoid(alpha + 8.0 * torch.nn.functional.softplus(beta) * (cond[:, -1] - 0.5))[:, None]
    torch.testing.assert_close(head.drug_weights(cond), per_row)
    torch.testing.assert_close(head.drug_weights(cond, groups), per_row)


def test_routed_training_killed_in_its_second_head_resumes_to_the_same_result(tiny_data, tiny_backbone, tmp_path):
    opts = dict(backbone=tiny_backbone, encoder="morgan:bits=128", epochs=4, seed=0)
    q = tiny_data.subset(list(tiny_data.ids[:8]), observed=False)
    full = make_model("scdca_routed", checkpoint_dir=tmp_path / "a", **opts).fit(tiny_data)
    killed = make_model("scdca_routed", checkpoint_dir=tmp_path / "b", **opts)
    killed.seen.fit(tiny_data)
    with pytest.raises(KeyboardInterrupt):
        killed.new.fit(tiny_data, _stop_after_epochs=2)
    assert (tmp_path / "b" / "seen" / "train_state.pt").exists() and (
        tmp_path / "b" / "new" / "train_state.pt"
    ).exists()
    resumed = make_model("scdca_routed", checkpoint_dir=tmp_path / "b", **opts).fit(tiny_data)
    for kind in ("seen", "new"):  # the killed head resumed, the finished one reloaded
        head, reference = getattr(resumed, kind), getattr(full, kind)
        np.testing.assert_allclose(head.predict(q), reference.predict(q), rtol=1e-5, atol=1e-6)


def test_routed_gives_seen_molecules_the_plain_head_and_new_ones_the_dropout_head(tiny_data, tiny_backbone, tmp_path):
    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    train = tiny_data.subset(split.train)
    opts = dict(backbone=tiny_backbone, encoder="morgan:bits=128", epochs=30, seed=0)
    model = make_model("scdca_routed", new_dropout=0.5, new_shrinkage=1.0, shrinkage_folds=4, **opts).fit(train)
    assert model.cost()["steps"] == 60  # `fit` trained both heads (30 epochs each), before any predict
    seen_ids = list(split.train[:6])
    new_ids = list(split.test[:6])
    q = tiny_data.subset(seen_ids + new_ids, observed=False)
    pred = model.predict(q)
    plain = make_model("scdca_lowrank", **opts).fit(train)
    dropped = make_model("scdca_lowrank", gene_head_dropout=0.5, **opts).fit(train)
    np.testing.assert_allclose(pred[:6], plain.predict(tiny_data.subset(seen_ids, observed=False)), atol=1e-6)
    np.testing.assert_allclose(pred[6:], dropped.predict(tiny_data.subset(new_ids, observed=False)), atol=1e-6)
    assert not np.allclose(pred[6:], plain.predict(tiny_data.subset(new_ids, observed=False)), atol=1e-4)
    # seen is decided on the molecule, not its spelling or name
    smiles = q.conditions["smiles"].iloc[0]
    from rdkit import Chem

    other_spelling = Chem.MolToSmiles(Chem.MolFromSmiles(smiles), doRandom=True, canonical=False)
    assert model.is_seen([smiles, other_spelling, "C1CCCCC1CCCCCCCCCCCCN"]).tolist() == [True, True, False]
    c = model.cost()
    assert c["params_trainable"] == plain.cost()["params_trainable"] * 2 and c["steps"] == 60
    # one head only (what scdca_stack asks for): every molecule goes to it, and only it trains
    only_seen = make_model("scdca_routed", new_dropout=0.5, new_shrinkage=1.0, heads=("seen",), **opts).fit(train)
    np.testing.assert_allclose(only_seen.predict(q), plain.predict(q), atol=1e-6)
    assert only_seen.cost()["steps"] == 30 and only_seen.cost()["params_trainable"] == c["params_trainable"] // 2
    only_new = make_model("scdca_routed", new_dropout=0.5, new_shrinkage=1.0, heads=["new"], **opts).fit(train)
    np.testing.assert_allclose(only_new.predict(q), dropped.predict(q), atol=1e-6)
    with pytest.raises(ScdcaInputError, match="heads"):
        make_model("scdca_routed", heads=("old",), **opts)

    model.save(tmp_path / "routed")
    from scdca.models import load_model

    again = load_model(tmp_path / "routed")
    np.testing.assert_allclose(again.predict(q), pred, rtol=1e-5, atol=1e-5)
    # rebuilt from its saved settings, not from defaults written into `load`
    assert (again.new_dropout, again.new_shrinkage, again.shrinkage_folds, again.heads) == (
        0.5,
        1.0,
        4,
        ("seen", "new"),
    )
    from scdca.predict import predict

    line = q.conditions["cell_line"].iloc[0]
    out = predict(again, [smiles, "C1CCCCC1CCCCCCCCCCCCN"], cell_lines=[line])  # a user's query: one seen, one new
    assert out.shape == (2, tiny_data.n_genes)
    np.testing.assert_allclose(out.X[0], predict(again.seen, [smiles], cell_lines=[line]).X[0], atol=1e-6)
    np.testing.assert_allclose(
        out.X[1], predict(again.new, ["C1CCCCC1CCCCCCCCCCCCN"], cell_lines=[line]).X[0], atol=1e-6
    )


def test_head_without_free_gene_loadings_reads_each_gene_from_its_hidden_state_alone():
    from scdca.nn.adapters import DrugGeneConfig, DrugGeneHead

    torch.manual_seed(0)
    cfg = dict(d_model=6, cond_dim=3, n_genes=4, rank=2, hidden=8)
    tied = DrugGeneHead(DrugGeneConfig(**cfg, free_genes=False))
    assert "gene_emb" not in dict(tied.named_parameters()) and "gene_emb" not in tied.state_dict()
    with torch.no_grad():
        tied.drug_proj[-1].weight.normal_()
    h, cond = torch.randn(1, 4, 6), torch.randn(1, 3)
    h[:, 1] = h[:, 0]  # genes 0 and 1 look the same to the backbone
    out = tied(h, cond)
    assert float(out.abs().sum()) > 0 and torch.equal(out[0, 0], out[0, 1])
    free = DrugGeneHead(DrugGeneConfig(**cfg))
    free.load_state_dict(tied.state_dict(), strict=False)  # same A and q, plus its own E
    out = free(h, cond)
    assert not torch.isclose(out[0, 0], out[0, 1])


def test_routed_pulls_new_molecules_toward_the_drug_blind_answer_by_a_weight_from_training_drugs(
    tiny_data, tiny_backbone, tmp_path
):
    from scdca.models import load_model
    from scdca.models.shrinkage import ScaledMeanBaseline

    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    train = tiny_data.subset(split.train)
    opts = dict(backbone=tiny_backbone, encoder="morgan:bits=128", epochs=6, seed=0)
    model = make_model("scdca_routed", **opts).fit(train)
    w, w_ridge = model.weights_["scdca"], model.weights_.get("ridge", 0.0)
    assert 0.0 <= w <= 1.0 and 0.0 <= w_ridge <= 1.0 and model.cost()["shrinkage"] == w
    cv = model.shrinkage_cv_
    assert cv["sse_blend"] <= min(cv["sse_anchor"], cv["sse_scdca"], cv["sse_ridge"]) + 1e-9
    assert (w == 1.0 and w_ridge == 0.0) == (cv["p_worse_scdca"] >= 0.05)
    new_ids, seen_ids = list(split.test[:5]), list(split.train[:3])
    q = tiny_data.subset(new_ids + seen_ids, observed=False)
    pred = model.predict(q)
    raw = make_model("scdca_routed", new_shrinkage=1.0, **opts).fit(train)
    qn = tiny_data.subset(new_ids, observed=False)
    anchor = qn.control_for(qn.conditions["cell_line"]) + ScaledMeanBaseline().fit(train).change(qn)
    ridge = make_model("ridge").fit(train).predict(qn)
    expected = anchor + w * (raw.predict(qn) - anchor) + w_ridge * (ridge - anchor)
    np.testing.assert_allclose(pred[:5], np.maximum(expected, 0), atol=1e-5)
    np.testing.assert_allclose(pred[5:], raw.predict(tiny_data.subset(seen_ids, observed=False)), atol=1e-6)
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.weights_ == model.weights_
    np.testing.assert_allclose(again.predict(q), pred, rtol=1e-5, atol=1e-5)
    blind = make_model("scdca_routed", new_shrinkage=0.0, **opts).fit(train)
    np.testing.assert_allclose(blind.predict(qn), np.maximum(anchor, 0), atol=1e-5)
    with pytest.raises(ScdcaInputError, match="new_shrinkage"):
        make_model("scdca_routed", new_shrinkage=1.5, **opts)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"variant": "adaptor"}, "variant: 'adaptor' is not one of adapter, finetune"),
        ({"precision": "fp16"}, "precision: 'fp16' is not one of auto, fp32, bf16"),
        ({"dose_profile": True}, "needs line_offset=True"),
        ({"freeze_head": True}, "set gene_head=True with variant='adapter'"),
        ({"variant": "lowrank", "head_warmup_epochs": 10}, "set gene_head=True with variant='adapter'"),
        ({"frozen_dtype": "float16"}, "frozen_dtype: 'float16' is not one of float32, bfloat16"),
        ({"variant": "finetune", "frozen_dtype": "bfloat16"}, "act on a frozen backbone"),
        ({"variant": "finetune", "recompute_frozen": True}, "act on a frozen backbone"),
    ],
)
def test_a_config_that_means_nothing_is_refused_naming_the_setting(settings, message):
    from scdca.models.scdca.config import ScDCAConfig

    with pytest.raises(ScdcaInputError, match=message):
        ScDCAConfig(**settings)
    assert ScDCAConfig(variant="adapter", gene_head=True, head_warmup_epochs=10, freeze_head=True).warms_up_head


def test_routed_is_calibrated_for_new_molecules_on_its_own_shrinkage_folds_without_a_refit(tiny_data, tiny_backbone):
    from scdca.intervals import calibrate

    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    train = tiny_data.subset(split.train)
    opts = dict(backbone=tiny_backbone, encoder="morgan:bits=128", epochs=4, seed=0)
    model = make_model("scdca_routed", **opts).fit(train)
    parts = model.out_of_fold("unseen_drug")
    assert model.out_of_fold("unseen_pair") is None  # its folds hold out drugs, not pairs
    ids = [i for s, _ in parts for i in s.test]
    oof = np.concatenate([pred for _, pred in parts])
    assert sorted(ids) == sorted(train.ids) and oof.shape == (len(train.ids), train.n_genes) and (oof >= 0).all()
    drug = train.conditions["drug"].astype(str)
    for s, _ in parts:  # a fold holds out whole drugs (its model never saw them)
        assert not set(drug[list(s.test)]) & set(drug[list(s.train)])

    def refit():
        raise AssertionError("calibration refitted the model although its folds were at hand")

    cal = calibrate(refit, train, "unseen_drug", 0, k=5, fitted=model)
    assert len(cal.calibration_mse) == len(train.ids)  # every training condition, each predicted out of fold
    # the residuals are those of the out-of-fold stack, the prediction the model makes for new molecules
    realised = ((train.subset(list(ids)).mean - oof) ** 2).mean(1)
    np.testing.assert_allclose(np.sort(cal.calibration_mse), np.sort(realised), rtol=1e-5)


def test_a_model_without_a_validation_set_reports_no_validation_loss(tiny_data, tiny_backbone):
    train = tiny_data.subset(make_splits(tiny_data, "unseen_drug", 0)[0].train)
    lowrank = make_model("scdca_lowrank", backbone=tiny_backbone, encoder="morgan:bits=128", epochs=2).fit(train)
    assert "best_val_mse" not in lowrank.cost() and lowrank.cost()["final_train_mse"] > 0  # val_fraction 0
    held = make_model("scdca", backbone=tiny_backbone, **FAST).fit(train)
    assert "best_val_mse" in held.cost() and "final_train_mse" not in held.cost()
