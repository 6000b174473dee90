"""Backbone: our scGPT-architecture model against the official scGPT code, and its checkpoints."""

import importlib
import json
import logging
import os
import sys
import types

import pytest
import torch

from scdca.errors import ScdcaInputError
from scdca.nn.backbone import Backbone, BackboneConfig, GeneVocab, load, save, weights_hash


def scgpt_root() -> str | None:
    """Folder of the installed scgpt wheel, found without importing it."""
    from importlib import metadata

    try:
        root = str(metadata.distribution("scgpt").locate_file("scgpt"))
    except metadata.PackageNotFoundError:
        return None
    return root if os.path.isdir(root) else None


@pytest.fixture(scope="module")
def official():
    """The official `scgpt.model.model` module from the scgpt==0.2.4 wheel.

    Its package __init__ imports torchtext, which cannot load on current torch; stub
    packages with the right __path__ let the model module import on its own.
    """
    root = scgpt_root()
    if root is None:
        pytest.skip("official scgpt wheel not installed: pip install --no-deps scgpt==0.2.4")
    saved = {k: sys.modules.get(k) for k in ("scgpt", "scgpt.model", "scgpt.model.model")}
    pkg = types.ModuleType("scgpt")
    pkg.__path__ = [root]
    pkg.logger = logging.getLogger("scgpt")
    sub = types.ModuleType("scgpt.model")
    sub.__path__ = [os.path.join(root, "model")]
    sys.modules["scgpt"], sys.modules["scgpt.model"] = pkg, sub
    try:
        module = importlib.import_module("scgpt.model.model")
        yield module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def official_model(official, *, ntoken=60, d=32, nhead=4, d_hid=48, nlayers=2, mvc=True):
    torch.manual_seed(0)
    m = official.TransformerModel(
        ntoken,
        d,
        nhead,
        d_hid,
        nlayers,
        vocab={"<pad>": ntoken - 3},
        dropout=0.2,
        pad_value=-2,
        do_mvc=mvc,
        use_fast_transformer=False,
    )
    # make every parameter non-trivial (LayerNorms start at 1/0, biases at 0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def write_checkpoint(folder, state, *, ntoken, d, nhead, d_hid, nlayers, extra_args=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "best_model.pt")
    args = {
        "embsize": d,
        "nheads": nhead,
        "d_hid": d_hid,
        "nlayers": nlayers,
        "dropout": 0.2,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "input_emb_style": "continuous",
        "n_bins": 51,
        "max_seq_len": 1200,
        "fast_transformer": True,
        "some_future_field": [1, 2],
        **(extra_args or {}),
    }
    (folder / "args.json").write_text(json.dumps(args))
    vocab = {f"GENE{i}": i for i in range(ntoken - 3)} | {"<pad>": ntoken - 3, "<cls>": ntoken - 2, "<eoc>": ntoken - 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder


def to_flash_layout(state):
    out = {}
    for k, v in state.items():
        if k.startswith("cls_decoder."):
            continue
        out[k.replace("self_attn.in_proj_", "self_attn.Wqkv.")] = v
    out["flag_encoder.weight"] = torch.randn(2, next(iter(state.values())).shape[-1])
    return out


def to_nested_flash_layout(state):
    out = {}
    for k, v in state.items():
        if k.startswith("cls_decoder."):
            continue
        k = k.replace("self_attn.in_proj_", "self_attn._impl.Wqkv.").replace(
            "self_attn.out_proj.", "self_attn._impl.out_proj."
        )
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["torch", "flash", "flash_nested"])
def test_outputs_match_the_official_scgpt_model(official, layout, tmp_path):
    dims = dict(ntoken=60, d=32, nhead=4, d_hid=48, nlayers=2)
    ref = official_model(official, **dims)
    state = ref.state_dict()
    state = {"torch": state, "flash": to_flash_layout(state), "flash_nested": to_nested_flash_layout(state)}[layout]
    ours = load(write_checkpoint(tmp_path / layout, state, **dims))

    g = torch.Generator().manual_seed(1)
    B, T = 3, 25
    ids = torch.randint(0, 57, (B, T), generator=g)
    values = torch.rand(B, T, generator=g) * 5
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 20:] = True
    ids[pad] = 57
    values[pad] = -2
    with torch.no_grad():
        expected = ref(ids, values, pad, MVC=True)
        got = ours(ids, values, pad)
    keep = ~pad
    torch.testing.assert_close(got["pred"][keep], expected["mlm_output"][keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["cell_emb"], expected["cell_emb"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["mvc"][keep], expected["mvc_output"][keep], atol=1e-5, rtol=1e-5)
    if layout == "flash":
        assert ours.load_report.ignored == ["flag_encoder.weight"]
    assert ours.load_report.missing == []


def test_whole_human_shaped_checkpoint_loads_with_only_documented_extras(tmp_path):
    """Real key names and shapes of scGPT_human (random weights): 163 keys, 60,697 tokens."""
    d, L, ntoken = 512, 12, 60697
    state = {
        "encoder.embedding.weight": torch.zeros(ntoken, d),
        "encoder.enc_norm.weight": torch.ones(d),
        "encoder.enc_norm.bias": torch.zeros(d),
        "flag_encoder.weight": torch.zeros(2, d),
        "value_encoder.linear1.weight": torch.zeros(d, 1),
        "value_encoder.linear1.bias": torch.zeros(d),
        "value_encoder.linear2.weight": torch.zeros(d, d),
        "value_encoder.linear2.bias": torch.zeros(d),
        "value_encoder.norm.weight": torch.ones(d),
        "value_encoder.norm.bias": torch.zeros(d),
    }
    for i in range(L):
        p = f"transformer_encoder.layers.{i}."
        state |= {
            p + "self_attn.Wqkv.weight": torch.zeros(3 * d, d),
            p + "self_attn.Wqkv.bias": torch.zeros(3 * d),
            p + "self_attn.out_proj.weight": torch.zeros(d, d),
            p + "self_attn.out_proj.bias": torch.zeros(d),
            p + "linear1.weight": torch.zeros(d, d),
            p + "linear1.bias": torch.zeros(d),
            p + "linear2.weight": torch.zeros(d, d),
            p + "linear2.bias": torch.zeros(d),
            p + "norm1.weight": torch.ones(d),
            p + "norm1.bias": torch.zeros(d),
            p + "norm2.weight": torch.ones(d),
            p + "norm2.bias": torch.zeros(d),
        }
    for j in (0, 2):
        state |= {f"decoder.fc.{j}.weight": torch.zeros(d, d), f"decoder.fc.{j}.bias": torch.zeros(d)}
    state |= {
        "decoder.fc.4.weight": torch.zeros(1, d),
        "decoder.fc.4.bias": torch.zeros(1),
        "mvc_decoder.gene2query.weight": torch.zeros(d, d),
        "mvc_decoder.gene2query.bias": torch.zeros(d),
        "mvc_decoder.W.weight": torch.zeros(d, d),
    }
    assert len(state) == 163
    model = load(write_checkpoint(tmp_path / "human", state, ntoken=ntoken, d=d, nhead=8, d_hid=d, nlayers=L))
    assert model.load_report.ignored == ["flag_encoder.weight"] and model.load_report.missing == []
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in state.items() if k != "flag_encoder.weight"
    )
    assert model.vocab["<pad>"] == 60694 and model.cfg.nlayers == 12


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    dims = dict(ntoken=60, d=32, nhead=4, d_hid=48, nlayers=2)
    model = Backbone(BackboneConfig(ntoken=60, d_model=32, nhead=4, d_hid=48, nlayers=2, pad_token_id=57))
    state = model.state_dict()
    state["transformer_encoder.layers.1.linear1.weight"] = torch.zeros(64, 32)
    folder = write_checkpoint(tmp_path / "bad", state, **dims)
    with pytest.raises(
        ScdcaInputError, match=r"layers\.1\.linear1\.weight.*expected shape \(48, 32\).*found \(64, 32\)"
    ):
        load(folder)


def test_missing_files_and_missing_keys_are_refused(tmp_path):
    with pytest.raises(ScdcaInputError, match="no best_model.pt"):
        load(tmp_path)
    dims = dict(ntoken=60, d=32, nhead=4, d_hid=48, nlayers=2)
    model = Backbone(BackboneConfig(ntoken=60, d_model=32, nhead=4, d_hid=48, nlayers=2, pad_token_id=57))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    folder = write_checkpoint(tmp_path / "nodec", state, **dims)
    with pytest.raises(ScdcaInputError, match="lacks 6 key"):
        load(folder)
    assert load(folder, strict=False).load_report.missing[0].startswith("decoder.")


def test_save_load_roundtrip_same_outputs_and_hash(tmp_path):
    cfg = BackboneConfig(ntoken=13, d_model=16, nhead=2, d_hid=16, nlayers=2, pad_token_id=10, do_mvc=True)
    model = Backbone(cfg).eval()
    vocab = GeneVocab.from_genes([f"g{i}" for i in range(10)])
    save(model, vocab, tmp_path / "ck")
    again = load(tmp_path / "ck")
    ids, values = torch.randint(0, 10, (2, 7)), torch.rand(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, values)["pred"], again(ids, values)["pred"])
    assert weights_hash(model) == weights_hash(again)
    with torch.no_grad():
        again.decoder.fc[0].bias[0] += 1
    assert weights_hash(model) != weights_hash(again)


def test_gene_mapping_excludes_and_reports_out_of_vocabulary(caplog):
    vocab = GeneVocab.from_genes(["A", "B", "C"])
    with caplog.at_level(logging.WARNING):
        m = vocab.map_genes(["C", "X", "A", "<pad>"])
    assert m.ids.tolist() == [2, 0] and m.kept.tolist() == [True, False, True, False]
    assert m.oov == ["X", "<pad>"]
    assert "2 of 4 genes are not in the backbone vocabulary" in caplog.text


def test_census_vocabulary_from_the_scgpt_wheel_maps_real_symbols():
    root = scgpt_root()
    if root is None:
        pytest.skip("scgpt wheel not installed: pip install --no-deps scgpt==0.2.4")
    path = os.path.join(root, "tokenizer", "default_census_vocab.json")
    vocab = GeneVocab.load(path)
    assert len(vocab.token_to_id) == 60694
    m = vocab.map_genes(["TP53", "MYC", "NOT_A_GENE_XYZ"])
    assert m.kept.tolist() == [True, True, False]


def test_no_padding_gives_no_mask_and_padding_does_not_leak():
    cfg = BackboneConfig(ntoken=13, d_model=16, nhead=2, d_hid=16, nlayers=2, pad_token_id=10)
    model = Backbone(cfg).eval()
    assert Backbone.attention_mask(torch.zeros(2, 5, dtype=torch.bool)) is None
    ids, values = torch.randint(0, 10, (1, 6)), torch.rand(1, 6)
    padded_ids = torch.cat([ids, torch.full((1, 3), 10)], 1)
    padded_values = torch.cat([values, torch.full((1, 3), 99.0)], 1)
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[0, 6:] = True
    with torch.no_grad():
        a = model(ids, values)["pred"]
        b = model(padded_ids, padded_values, pad)["pred"][:, :6]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_random_backbone_spec_is_deterministic_and_bad_specs_are_refused():
    from scdca.nn.backbone import resolve

    genes = ["A", "B", "C"]
    a, b = resolve("random:2x16", genes=genes), resolve("random:2x16", genes=genes)
    assert a.cfg.nlayers == 2 and a.cfg.d_model == 16 and "B" in a.vocab
    assert weights_hash(a) == weights_hash(b)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    resolve("random:1x8", genes=genes)  # does not consume the caller's random stream
    assert torch.equal(torch.rand(1), before)
    for bad in ("random:2", "random:0x16", "random:axb"):
        with pytest.raises(ScdcaInputError, match="random:<layers>x<dim>"):
            resolve(bad, genes=genes)
