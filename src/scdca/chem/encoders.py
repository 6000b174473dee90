"""Molecule encoders: one interface, a registry, and an on-disk cache.

Every encoder maps SMILES to a float32 matrix (n, dim). SMILES are canonicalised
with RDKit first, so the same molecule written two ways gets one embedding and one
cache entry. Choose an encoder by spec string:

    morgan                  RDKit Morgan bits (radius 2, 2048 bits); 'morgan:r=3,bits=1024,counts=1'
    chemnet                 ChemNet (pretrained, ships inside the `fcd-torch` wheel), 512-d
    rdkit2d                 RDKit's 2D descriptors (~200: weight, logP, TPSA, counts, ...), as
                            chemCPA and biolord use for sci-Plex, each as sign(x) log(1 + |x|)
    hf:<folder or hub id>   any Hugging Face SMILES transformer (ChemBERTa, ...), mean-pooled
    table:<file>            precomputed embeddings (.csv or .parquet keyed by drug or SMILES)
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from scdca import storage
from scdca.chem.molecules import canonical_smiles
from scdca.errors import ScdcaInputError
from scdca.registry import Registry


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCDCA_CACHE", Path.home() / ".cache" / "scdca")) / "embeddings"


class MoleculeEncoder(ABC):
    """SMILES -> float32 embeddings, with canonicalisation and caching done here once.

    Subclasses implement `_embed` (canonical SMILES in, (n, dim) out) and set `dim` and
    `identifier` (which must change whenever the embeddings would).
    """

    dim: int
    identifier: str

    def __init__(self, *, cache_dir: str | os.PathLike | None | Literal["default"] = "default"):
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self._memory: dict[str, np.ndarray] = {}
        self._disk_loaded = False
        self.n_computed = 0  # molecules actually run through the model (for tests and logs)

    @abstractmethod
    def _embed(self, smiles: list[str]) -> np.ndarray:
        """Embed canonical SMILES -> (n, dim)."""

    def encode(self, smiles: Sequence[str], *, names: Sequence[str] | None = None) -> np.ndarray:
        """Embed molecules, in the given order.

        Args:
            smiles: SMILES strings (any valid form; CXSMILES accepted).
            names: drug names used in error messages (defaults to positions).
        Returns:
            float32 array of shape (len(smiles), dim).
        """
        names = list(names) if names is not None else [f"#{i}" for i in range(len(smiles))]
        canon = [canonical_smiles(s) if isinstance(s, str) else None for s in smiles]
        bad = [f"{n} ({s!r})" for n, s, c in zip(names, smiles, canon) if c is None]
        if bad:
            raise ScdcaInputError(
                f"smiles: RDKit cannot parse {len(bad)} molecule(s): {', '.join(bad[:20])}. Fix or remove them."
            )
        self._load_disk()
        parsed = [c for c in canon if c is not None]  # all of them: an unparseable one raised above
        missing = sorted({c for c in parsed if c not in self._memory})
        if missing:
            emb = np.asarray(self._embed(missing), dtype=np.float32)
            if emb.shape != (len(missing), self.dim):
                raise RuntimeError(f"{self.identifier} returned shape {emb.shape}, expected {(len(missing), self.dim)}")
            self.n_computed += len(missing)
            self._memory.update(zip(missing, emb))
            self._save_disk()
        if not parsed:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memory[c] for c in parsed]).astype(np.float32)

    # -- cache ----------------------------------------------------------------------------
    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha1(self.identifier.encode()).hexdigest()[:16]
        return self.cache_dir / f"{digest}.npz"

    def _load_disk(self) -> None:
        path = self._cache_file()
        if self._disk_loaded or path is None or not path.exists():
            self._disk_loaded = True
            return
        with np.load(path, allow_pickle=False) as z:
            if str(z["identifier"]) == self.identifier:
                self._memory.update(zip(z["smiles"].tolist(), z["emb"]))
        self._disk_loaded = True

    def _save_disk(self) -> None:
        path = self._cache_file()
        if path is None:
            return
        keys = sorted(self._memory)
        with storage.atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    identifier=np.array(self.identifier),
                    smiles=np.array(keys),
                    emb=np.stack([self._memory[k] for k in keys]).astype(np.float32),
                )


ENCODERS: Registry[Callable[..., MoleculeEncoder]] = Registry("molecule encoder")


def standardisation(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and spread of the training drugs' embeddings (n, dim) -> (dim,), (dim,).

    Features constant over the training drugs (a Morgan bit none of them has) get spread 1,
    so they are only centred: dividing by their ~0 spread would blow an unseen drug up.
    """
    std = emb.std(0)
    return emb.mean(0).astype(np.float32), np.where(std > 1e-3, std, 1.0).astype(np.float32)


def standardise(emb: np.ndarray, mean: np.ndarray, std: np.ndarray, *, clip: float = 10.0) -> np.ndarray:
    """(emb - mean) / std, clipped to +-`clip`: an unseen drug far outside the training drugs'
    range on one feature must not dominate (or overflow) a model's input."""
    return np.clip((emb - mean) / std, -clip, clip).astype(np.float32)


def get_encoder(spec: str, **kwargs) -> MoleculeEncoder:
    """Build an encoder from a spec such as 'morgan', 'chemnet', 'hf:/models/chemberta', 'table:emb.csv'."""
    name, _, arg = spec.partition(":")
    return ENCODERS.get(name)(arg, **kwargs)


def _parse_opts(arg: str) -> dict[str, str]:
    opts = {}
    for part in filter(None, arg.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ScdcaInputError(f"encoder option {part!r} must look like key=value")
        opts[key.strip()] = value.strip()
    return opts


class MorganEncoder(MoleculeEncoder):
    """RDKit Morgan (ECFP-like) fingerprints as float32 bits or counts."""

    def __init__(self, *, radius: int = 2, n_bits: int = 2048, counts: bool = False, **kw):
        super().__init__(**kw)
        self.radius, self.dim, self.counts = radius, n_bits, counts
        self.identifier = f"morgan:r={radius},bits={n_bits},counts={int(counts)}"

    def _embed(self, smiles):
        from rdkit import Chem
        from rdkit.Chem import rdFingerprintGenerator

        gen = rdFingerprintGenerator.GetMorganGenerator(radius=self.radius, fpSize=self.dim)
        get = gen.GetCountFingerprintAsNumPy if self.counts else gen.GetFingerprintAsNumPy
        return np.stack([get(Chem.MolFromSmiles(s)).astype(np.float32) for s in smiles])


@ENCODERS.register("morgan")
def _morgan(arg: str = "", **kw) -> MoleculeEncoder:
    o = _parse_opts(arg)
    unknown = set(o) - {"r", "bits", "counts"}
    if unknown:
        raise ScdcaInputError(f"morgan: unknown option(s) {sorted(unknown)}; use r=, bits=, counts=")
    return MorganEncoder(
        radius=int(o.get("r", 2)),
        n_bits=int(o.get("bits", 2048)),
        counts=o.get("counts", "0") in ("1", "true", "True"),
        **kw,
    )


class RDKit2DEncoder(MoleculeEncoder):
    """RDKit's 2D molecular descriptors, one column per entry of `rdkit.Chem.Descriptors._descList`.

    Raw values span up to 30 orders of magnitude (Ipc reaches 1e30 for large molecules), so
    each is compressed to sign(x) log(1 + |x|), as chemCPA compresses them with fitted CDFs
    for the same reason; models then standardise over the training drugs. Non-finite values
    (a descriptor undefined for a molecule) become 0.
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        from rdkit import rdBase
        from rdkit.Chem import Descriptors

        self._names = [name for name, _ in Descriptors._descList]
        self.dim = len(self._names)
        self.identifier = f"rdkit2d:rdkit={rdBase.rdkitVersion},n={self.dim},signed-log1p"

    def _embed(self, smiles):
        from rdkit import Chem, RDLogger
        from rdkit.Chem import Descriptors

        RDLogger.DisableLog("rdApp.*")
        rows = []
        for s in smiles:
            values = Descriptors.CalcMolDescriptors(Chem.MolFromSmiles(s), missingVal=np.nan)
            rows.append([values[name] for name in self._names])
        out = np.asarray(rows, dtype=np.float64)
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return (np.sign(out) * np.log1p(np.abs(out))).astype(np.float32)


@ENCODERS.register("rdkit2d")
def _rdkit2d(arg: str = "", **kw) -> MoleculeEncoder:
    if arg:
        raise ScdcaInputError(f"rdkit2d takes no options, got {arg!r}")
    return RDKit2DEncoder(**kw)


class ChemNetEncoder(MoleculeEncoder):
    """ChemNet's penultimate activations (512-d), the network behind the Frechet ChemNet Distance.

    The pretrained weights ship inside the MIT-licensed `fcd-torch` wheel: no download.
    """

    dim = 512

    def __init__(self, *, device: str | None = None, batch_size: int = 256, **kw):
        super().__init__(**kw)
        try:
            import fcd_torch
        except ImportError as err:
            raise ScdcaInputError("chemnet encoder needs fcd-torch: pip install fcd-torch") from err
        self._device = device or ("cuda" if _cuda() else "cpu")
        self._batch = batch_size
        self._fcd = None
        self.identifier = f"chemnet:fcd_torch={getattr(fcd_torch, '__version__', '1.0.7')}"

    def _embed(self, smiles):
        if self._fcd is None:
            from fcd_torch import FCD

            self._fcd = FCD(device=self._device, n_jobs=1, batch_size=self._batch, canonize=False)
        return self._fcd.get_predictions(list(smiles))


@ENCODERS.register("chemnet")
def _chemnet(arg: str = "", **kw) -> MoleculeEncoder:
    return ChemNetEncoder(**kw)


# Atom-level SMILES tokens (bracket atoms, two-letter halogens, ring bonds, bonds, branches)
_SMILES_TOKENS = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])"
)


class HFEncoder(MoleculeEncoder):
    """Any Hugging Face SMILES transformer (ChemBERTa, SMILES-BERT, ...), pooled over tokens.

    Args:
        source: a local folder (works offline) or a hub id.
        pooling: 'mean' over non-padding tokens, or 'cls' (first token).
        tokenizer: 'auto' uses the model's own tokenizer when the folder has one
            (ChemBERTa's BPE), else atom-level regex tokens looked up in vocab.txt
            (SMILES BERTs that ship only a vocabulary).
    """

    def __init__(
        self,
        source: str,
        *,
        pooling: Literal["mean", "cls"] = "mean",
        tokenizer: Literal["auto", "hf", "regex"] = "auto",
        batch_size: int = 32,
        device: str | None = None,
        max_length: int = 512,
        **kw,
    ):
        super().__init__(**kw)
        if not source:
            raise ScdcaInputError("hf: give a folder or hub id, e.g. 'hf:/models/ChemBERTa-zinc-base-v1'")
        if pooling not in ("mean", "cls"):
            raise ScdcaInputError(f"pooling: {pooling!r} is not 'mean' or 'cls'")
        try:
            import transformers  # noqa: F401
        except ImportError as err:
            raise ScdcaInputError("the hf: encoder needs transformers: pip install transformers") from err
        self.source, self.pooling, self.batch_size, self.max_length = source, pooling, batch_size, max_length
        local = os.path.isdir(source)
        self._model = _load_hf_model(source, local).eval()
        self.dim = int(self._model.config.hidden_size)
        self._device = device or ("cuda" if _cuda() else "cpu")
        self._model.to(self._device)
        self._tok = None
        self._vocab = None
        has_tok = local and any(
            (Path(source) / f).exists() for f in ("tokenizer.json", "merges.txt", "tokenizer_config.json")
        )
        if tokenizer == "hf" or (tokenizer == "auto" and (has_tok or not local)):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
        else:
            vocab_file = Path(source) / "vocab.txt"
            if not vocab_file.exists():
                raise ScdcaInputError(f"hf: {source!r} has no tokenizer files and no vocab.txt")
            self._vocab = {t: i for i, t in enumerate(vocab_file.read_text().splitlines())}
        weights = [p for p in Path(source).glob("*") if p.suffix in (".bin", ".safetensors")] if local else []
        stamp = ",".join(f"{p.name}:{p.stat().st_size}" for p in sorted(weights))
        self.identifier = f"hf:{os.path.abspath(source) if local else source}:{stamp}:{pooling}:{tokenizer}"

    def _regex_batch(self, smiles):
        import torch

        v = self._vocab
        unk, cls, sep, pad = (v.get(t, 0) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"))
        ids = [
            [cls] + [v.get(t, unk) for t in _SMILES_TOKENS.findall(s)][: self.max_length - 2] + [sep] for s in smiles
        ]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def _embed(self, smiles):
        import torch

        out = []
        for start in range(0, len(smiles), self.batch_size):
            chunk = smiles[start : start + self.batch_size]
            if self._tok is not None:
                batch = self._tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            else:
                batch = self._regex_batch(chunk)
            batch = {k: v.to(self._device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state  # (B, T, D)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(pooled.float().cpu().numpy())
        return np.concatenate(out)


def _load_hf_model(source: str, local: bool):
    """AutoModel, or for old folders whose config.json lacks `model_type`, BERT/RoBERTa by their vocab files."""
    from transformers import AutoModel, BertModel, RobertaModel

    try:
        return AutoModel.from_pretrained(source, local_files_only=local)
    except ValueError as err:
        if not local or "model_type" not in str(err):
            raise
    arch = BertModel if (Path(source) / "vocab.txt").exists() else RobertaModel
    return arch.from_pretrained(source, local_files_only=True)


@ENCODERS.register("hf")
def _hf(arg: str, **kw) -> MoleculeEncoder:
    return HFEncoder(arg, **kw)


class TableEncoder(MoleculeEncoder):
    """Precomputed embeddings from a CSV or Parquet table.

    The table has a `smiles` column and/or a `drug` column, and numeric embedding columns
    (every other numeric column). Molecules are matched by canonical SMILES, then by drug name.
    """

    def __init__(self, path: str, **kw):
        kw.setdefault("cache_dir", None)  # the table is its own cache
        super().__init__(**kw)
        if not path or not os.path.exists(path):
            raise ScdcaInputError(f"table: embedding file {path!r} does not exist")
        if path.endswith(".parquet"):
            try:
                df = pd.read_parquet(path)
            except ImportError as err:
                raise ScdcaInputError("reading .parquet needs pyarrow: pip install pyarrow") from err
        else:
            df = pd.read_csv(path)
        cols = {c.lower(): c for c in df.columns}
        self._smiles_col, self._drug_col = cols.get("smiles"), cols.get("drug") or cols.get("name")
        if self._smiles_col is None and self._drug_col is None:
            raise ScdcaInputError(f"table: {path!r} needs a 'smiles' or 'drug' column; found {list(df.columns)!r}")
        emb_cols = [
            c
            for c in df.columns
            if c not in (self._smiles_col, self._drug_col) and pd.api.types.is_numeric_dtype(df[c])
        ]
        if not emb_cols:
            raise ScdcaInputError(f"table: {path!r} has no numeric embedding columns")
        values = df[emb_cols].to_numpy(np.float32)
        self.dim = values.shape[1]
        self._by_smiles, self._by_name = {}, {}
        for i in range(len(df)):
            if self._smiles_col is not None:
                can = canonical_smiles(str(df[self._smiles_col].iloc[i]))
                if can is not None:
                    self._by_smiles[can] = values[i]
            if self._drug_col is not None:
                self._by_name[str(df[self._drug_col].iloc[i])] = values[i]
        self.path = path
        self.identifier = f"table:{os.path.abspath(path)}:{os.path.getmtime(path)}"

    def encode(self, smiles, *, names=None):
        names = list(names) if names is not None else [f"#{i}" for i in range(len(smiles))]
        rows, missing = [], []
        for n, s in zip(names, smiles):
            can = canonical_smiles(s) if isinstance(s, str) else None
            vec = self._by_smiles.get(can) if can is not None else None
            if vec is None:
                vec = self._by_name.get(n)
            if vec is None:
                missing.append(n if not n.startswith("#") else repr(s))
            rows.append(vec)
        if missing:
            raise ScdcaInputError(
                f"table: {len(missing)} molecule(s) are not in {self.path!r}: {missing[:20]}. "
                f"Add them (scdca embed writes this format) or use another encoder."
            )
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)

    def _embed(self, smiles):  # pragma: no cover - encode() is overridden
        raise NotImplementedError


@ENCODERS.register("table")
def _table(arg: str, **kw) -> MoleculeEncoder:
    return TableEncoder(arg, **kw)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def write_table(path: str | os.PathLike, names: Sequence[str], smiles: Sequence[str], emb: np.ndarray) -> None:
    """Write embeddings in the format `table:` reads: drug, smiles, e0..e{d-1}."""
    df = pd.DataFrame(emb, columns=[f"e{i}" for i in range(emb.shape[1])])
    df.insert(0, "smiles", [canonical_smiles(s) for s in smiles])
    df.insert(0, "drug", list(names))
    if str(path).endswith(".parquet"):
        with storage.atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
    else:
        storage.write_csv(path, df)


def read_molecule_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(names, smiles) from a CSV with drug/name and smiles columns, or a .smi file."""
    path = str(path)
    if not os.path.exists(path):
        raise ScdcaInputError(f"input: {path!r} does not exist")
    if path.endswith((".smi", ".txt")):
        names, smiles = [], []
        for i, line in enumerate(open(path)):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            smiles.append(parts[0])
            names.append(parts[1] if len(parts) > 1 else f"mol{i}")
        return names, smiles
    df = pd.read_csv(path)
    cols = {c.lower(): c for c in df.columns}
    s_col = cols.get("smiles")
    n_col = cols.get("drug") or cols.get("name") or cols.get("condition")
    if s_col is None:
        raise ScdcaInputError(f"input: {path!r} needs a 'smiles' column; found {list(df.columns)!r}")
    names = df[n_col].astype(str).tolist() if n_col else [f"mol{i}" for i in range(len(df))]
    return names, df[s_col].astype(str).tolist()
