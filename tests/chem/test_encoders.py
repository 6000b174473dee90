"""Every molecule encoder passes the same contract."""

import importlib.util
import os

import numpy as np
import pytest

from scdca.chem.encoders import ENCODERS, get_encoder, read_molecule_list, write_table
from scdca.errors import ScdcaInputError
from tests.conftest import SMILES


def rxnfp_bert_dir():
    spec = importlib.util.find_spec("rxnfp")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "models", "transformers", "bert_pretrained")
    return path if os.path.isdir(path) else None


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A tiny random RoBERTa with a byte-level BPE tokenizer trained on a few SMILES, saved offline."""
    pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    folder = tmp_path_factory.mktemp("tiny_roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SMILES * 20, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    tok.save_pretrained(folder)
    assert len(set(map(tuple, tok(SMILES[:3])["input_ids"]))) == 3  # the tokenizer really tokenises
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=tok.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    RobertaModel(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    emb = np.arange(len(SMILES) * 3, dtype=np.float32).reshape(len(SMILES), 3)
    write_table(folder / "emb.csv", [f"drug{i}" for i in range(len(SMILES))], SMILES, emb)
    return str(folder / "emb.csv")


SPECS = ["morgan", "rdkit2d", "morgan:r=3,bits=512,counts=1", "chemnet", "hf:tiny", "hf:rxnfp", "table"]


@pytest.fixture(params=SPECS)
def spec(request, tiny_roberta, table_file):
    s = request.param
    if s == "hf:tiny":
        return f"hf:{tiny_roberta}"
    if s == "hf:rxnfp":
        d = rxnfp_bert_dir()
        if d is None:
            pytest.skip("rxnfp wheel not installed (pip install --no-deps rxnfp)")
        return f"hf:{d}"
    if s == "chemnet" and importlib.util.find_spec("fcd_torch") is None:
        pytest.skip("fcd-torch not installed")
    if s == "table":
        return f"table:{table_file}"
    return s


def test_contract_shape_dtype_order_determinism_and_cache(spec, tmp_path):
    enc = get_encoder(spec, cache_dir=tmp_path)
    names = [f"drug{i}" for i in range(len(SMILES))]
    emb = enc.encode(SMILES, names=names)
    assert emb.shape == (len(SMILES), enc.dim) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert len({row.tobytes() for row in emb}) == len(SMILES)  # distinct molecules, distinct vectors
    # order preserved
    np.testing.assert_array_equal(enc.encode(SMILES[::-1], names=names[::-1]), emb[::-1])
    # a second call computes nothing; a fresh encoder reads the disk cache
    n = enc.n_computed
    enc.encode(SMILES, names=names)
    assert enc.n_computed == n
    again = get_encoder(spec, cache_dir=tmp_path)
    np.testing.assert_allclose(again.encode(SMILES, names=names), emb, rtol=1e-6)
    assert again.n_computed == 0
    # deterministic without any cache
    fresh = get_encoder(spec, cache_dir=None)
    np.testing.assert_allclose(fresh.encode(SMILES, names=names), emb, rtol=1e-5, atol=1e-6)


def test_contract_bad_smiles_named(spec):
    enc = get_encoder(spec, cache_dir=None)
    with pytest.raises(ScdcaInputError, match=r"mystery"):
        enc.encode([SMILES[0], "C1CC(("], names=["drug0", "mystery"])


def test_same_molecule_written_differently_gets_one_embedding(tmp_path):
    enc = get_encoder("morgan", cache_dir=tmp_path)
    a, b = enc.encode(["OCC", "C(O)C"])
    np.testing.assert_array_equal(a, b)
    assert enc.n_computed == 1


def test_cxsmiles_from_the_sciplex_table_parse():
    enc = get_encoder("morgan", cache_dir=None)
    emb = enc.encode(["C[C@H](N)C(=O)O |&1:1|"])
    assert emb.shape == (1, 2048)


def test_table_matches_by_name_when_smiles_differ(table_file):
    enc = get_encoder(f"table:{table_file}")
    emb = enc.encode(["CCCCCCCCCC"], names=["drug2"])
    np.testing.assert_array_equal(emb[0], [6, 7, 8])
    with pytest.raises(ScdcaInputError, match="not in"):
        enc.encode(["CCCCCCCCCC"], names=["unknown_drug"])


def test_unknown_encoder_lists_choices():
    with pytest.raises(ScdcaInputError, match="unknown molecule encoder 'unimol'.*morgan.*chemnet"):
        get_encoder("unimol")
    assert {"morgan", "chemnet", "hf", "table"} <= set(ENCODERS.names())


def test_read_molecule_list_csv_and_smi(tmp_path):
    (tmp_path / "a.smi").write_text("CCO ethanol\nc1ccccc1\n")
    assert read_molecule_list(tmp_path / "a.smi") == (["ethanol", "mol1"], ["CCO", "c1ccccc1"])
    (tmp_path / "b.csv").write_text("name,SMILES\nx,CCO\n")
    assert read_molecule_list(tmp_path / "b.csv") == (["x"], ["CCO"])


def test_rxnfp_bert_is_loaded_with_its_pretrained_weights():
    d = rxnfp_bert_dir()
    if d is None:
        pytest.skip("rxnfp wheel not installed (pip install --no-deps rxnfp)")
    import torch

    from scdca.chem.encoders import _load_hf_model

    model = _load_hf_model(d, True)
    saved = torch.load(os.path.join(d, "pytorch_model.bin"), map_location="cpu")
    torch.testing.assert_close(
        model.encoder.layer[0].attention.self.query.weight, saved["bert.encoder.layer.0.attention.self.query.weight"]
    )


def test_embed_cli_writes_a_table_the_table_encoder_reads(tmp_path, capsys):
    from scdca.cli import main

    (tmp_path / "in.csv").write_text("drug,smiles\n" + "\n".join(f"d{i},{s}" for i, s in enumerate(SMILES)))
    assert (
        main(
            [
                "embed",
                "--input",
                str(tmp_path / "in.csv"),
                "--encoder",
                "morgan:bits=64",
                "--out",
                str(tmp_path / "e.csv"),
                "--no-cache",
            ]
        )
        == 0
    )
    direct = get_encoder("morgan:bits=64", cache_dir=None).encode(SMILES)
    np.testing.assert_array_equal(get_encoder(f"table:{tmp_path / 'e.csv'}").encode(SMILES), direct)


def test_embed_cli_bad_smiles_exits_nonzero_naming_the_drug(tmp_path, capsys):
    from scdca.cli import main

    (tmp_path / "in.csv").write_text("drug,smiles\nok,CCO\nbroken_one,C1CC((\n")
    assert main(["embed", "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "e.csv"), "--no-cache"]) == 2
    assert "broken_one" in capsys.readouterr().err
    assert not (tmp_path / "e.csv").exists()


def test_rdkit2d_values_are_the_named_descriptors():
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    enc = get_encoder("rdkit2d", cache_dir=None)
    emb = enc.encode(["CCO", "c1ccccc1"])
    names = [n for n, _ in Descriptors._descList]
    col = names.index("MolWt")
    raw = [Descriptors.MolWt(Chem.MolFromSmiles(s)) for s in ("CCO", "c1ccccc1")]
    np.testing.assert_allclose(emb[:, col], np.log1p(raw), rtol=1e-5)  # signed log1p of the descriptor
    ring = names.index("NumAromaticRings")
    np.testing.assert_allclose(emb[:, ring], [0.0, np.log(2.0)], rtol=1e-6)


def test_rdkit2d_stays_small_for_a_large_molecule_with_a_huge_ipc():
    bortezomib = "CC(C)C[C@H](NC(=O)[C@@H](Cc1ccccc1)NC(=O)c1cnccn1)B(O)O"
    peptide = "N" + "CC(=O)N" * 40 + "CC(=O)O"  # long chain: Ipc = 4e46, beyond float32
    emb = get_encoder("rdkit2d", cache_dir=None).encode([bortezomib, peptide])
    assert np.isfinite(emb).all() and np.abs(emb).max() < 110  # ln(4e46) = 107


def test_standardise_clips_drugs_far_outside_the_training_range():
    from scdca.chem.encoders import standardisation, standardise

    train = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0]], dtype=np.float32)
    mean, std = standardisation(train)
    np.testing.assert_allclose(std, [1.0, np.std([1.0, 3.0, 2.0])], rtol=1e-6)  # constant feature: spread 1
    z = standardise(np.array([[1e6, 2.0]], dtype=np.float32), mean, std)
    np.testing.assert_allclose(z, [[10.0, 0.0]], atol=1e-6)
