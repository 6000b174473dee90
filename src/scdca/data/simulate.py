"""The built-in simulated dataset: sci-Plex-like single cells with a known truth.

Generative model (all randomness from one seed)
-----------------------------------------------
Molecules. Real compounds from RDKit's bundled NCI set (`rdkit/Data/NCI/first_5K.smi`)
or user-given SMILES. Each gets a hidden *mechanism* from substructure rules and
physicochemical descriptors (`MECHANISMS`), checked in order. No model is ever given
the mechanism: fingerprints see substructures only indirectly, and descriptors
(logP, ring counts) are not a fingerprint feature, so no encoder wins by construction.

Drugs. Activity is drawn per drug with a mechanism-specific probability (many drugs
are inactive, as in sci-Plex). An active drug has amplitude A_d (log-normal),
potency EC50_d (log-normal around 1 uM, shifted by logP) and Hill slope n_d.

Genes. G genes; P gene programs (sparse signed loading vectors over 20-60 genes).
A mechanism's effect v_m is a weighted sum of programs; the broad 'hdac_like'
mechanism uses four programs at double strength and moves hundreds of genes.
Each drug adds its own deviation e_d on its mechanism's genes plus a weak random
extra program, so drugs sharing a mechanism differ.

Cell lines. Latent state z_c ~ N(0, I_r). Control log-expression is
base + W z_c. A line's sensitivity to mechanism m is
s_cm = exp(kappa * u_cm), where u_cm is the standardised mean of W z_c over
the mechanism's 15 target genes: sensitivity is readable from control expression,
so a model that reads the control can transfer to an unseen line.

Conditions. log-rate(c, d, dose) = base + W z_c
    + s_cm * A_d * hill(dose; EC50_d, n_d) * (v_m + e_d + eta_cd)
with eta_cd a small unpredictable line x drug interaction. Rates are normalised
to proportions (softmax over genes).

Cells. Library size L ~ LogNormal(log(mean_library_size), 0.35); counts
~ NegativeBinomial(mean = L p_g, dispersion theta). X holds raw counts.

Pretraining atlas (`simulate_atlas`). Unperturbed cells only, in the screen's gene
space (same seed -> same genes, programs, base rates and line loadings W). Each of
many cell states has its own latent z_s in the cell-line space and its own activity
a_s of every program (the P programs drugs act on and a few that no drug touches); each
cell adds its own program activity e_i: log-rate = base + W z_s + (a_s + e_i) @ programs.
So which genes move together under a drug is learnable from natural variation alone,
which is the premise of adapting a pretrained model. The screen's lines may appear as
control states; no drug-treated cell is ever in the atlas.

Truth. `uns['scdca_truth']` stores, per condition, the exact expectation of the
pseudobulk that `scdca.data.load` computes (mean of log1p(1e4 * counts / total))
in the limit of infinitely many cells, by summing the NB pmf (and an asymptotic
formula for large means) over 5 Gauss-Hermite nodes of the library size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import digamma

from scdca import storage
from scdca.data.keys import TRUTH_KEY, condition_id
from scdca.errors import ScdcaInputError

# name, rule, number of programs, strength, probability of being active
MECHANISMS: list[tuple[str, str, int, float, float]] = [
    ("hdac_like", "hydroxamic acid, or anilide with >= 2 aromatic rings", 4, 2.0, 0.95),
    ("dna_damage", "aromatic nitro group", 2, 1.0, 0.6),
    ("electrophile", "Michael acceptor or quinone", 2, 1.0, 0.6),
    ("nuclear_receptor", "steroid core, or logP > 4.5 without nitrogen", 1, 1.0, 0.6),
    ("kinase_like", ">= 3 aromatic rings including an aromatic nitrogen", 2, 1.0, 0.7),
    ("acid_metabolic", "carboxylic acid", 1, 0.8, 0.3),
    ("amine_gpcr", "basic aliphatic amine", 1, 0.8, 0.4),
    ("none", "anything else", 1, 0.6, 0.2),
]
# share of drugs per mechanism when sampling from the NCI pool (stratified)
_MECH_SHARE = dict(
    hdac_like=0.10,
    dna_damage=0.10,
    electrophile=0.12,
    nuclear_receptor=0.08,
    kinase_like=0.12,
    acid_metabolic=0.12,
    amine_gpcr=0.16,
    none=0.20,
)
_SMARTS = {
    "hydroxamic": "[CX3](=O)[NX3][OX2H1]",
    "anilide": "c[NH]C(=O)",
    "nitro_ar": "a[N+](=O)[O-]",
    "michael": "C=CC(=O)[#6,#7,#8]",
    "quinone": "O=C1C=CC(=O)C=C1",
    "steroid": "C1CCC2C(C1)CCC1C2CCC2CCCC12",
    "cooh": "C(=O)[OH]",
    "basic_amine": "[NX3;!$(NC=O);!$(N-a);!$(N-S);!$(N-[#7,#8])]([#6])",
    "arom_n": "n",
}


@dataclass
class SimulationConfig:
    """Settings of the simulator. Defaults make the demo dataset (~45k cells x 1000 genes)."""

    n_drugs: int = 120
    n_cell_lines: int = 3
    n_genes: int = 1000
    doses_nM: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
    cells_per_condition: int = 30
    control_cells: int = 1000
    n_programs: int = 16
    latent_dim: int = 4
    kappa: float = 0.7
    interaction_sd: float = 0.1
    drug_noise_sd: float = 0.35
    mean_library_size: float = 3000.0
    dispersion: float = 5.0
    smiles: Sequence[str] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.n_cell_lines < 2:
            raise ScdcaInputError(f"n_cell_lines: {self.n_cell_lines!r} is too few; use >= 2")
        if self.cells_per_condition < 2:
            raise ScdcaInputError(
                f"cells_per_condition: {self.cells_per_condition!r}; use >= 2 so a noise ceiling exists"
            )
        if self.n_genes < 50:
            raise ScdcaInputError(f"n_genes: {self.n_genes!r} is too few; use >= 50")


def nci_smiles() -> list[tuple[str, str]]:
    """(name, SMILES) of the 5,000 NCI compounds that ship inside the RDKit wheel."""
    import rdkit

    path = os.path.join(os.path.dirname(rdkit.__file__), "Data", "NCI", "first_5K.smi")
    out = []
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2:
                out.append((f"NCI{parts[1]}", parts[0]))
    return out


def assign_mechanism(mol) -> str:
    """The hidden mechanism class of an RDKit molecule (first matching rule in `MECHANISMS`)."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors, rdMolDescriptors

    def has(name):
        return mol.HasSubstructMatch(Chem.MolFromSmarts(_SMARTS[name]))

    n_arom = rdMolDescriptors.CalcNumAromaticRings(mol)
    logp = Descriptors.MolLogP(mol)  # type: ignore[attr-defined]  # RDKit defines it at import
    has_n = any(a.GetSymbol() == "N" for a in mol.GetAtoms())
    if has("hydroxamic") or (has("anilide") and n_arom >= 2):
        return "hdac_like"
    if has("nitro_ar"):
        return "dna_damage"
    if has("michael") or has("quinone"):
        return "electrophile"
    if has("steroid") or (logp > 4.5 and not has_n):
        return "nuclear_receptor"
    if n_arom >= 3 and has("arom_n"):
        return "kinase_like"
    if has("cooh"):
        return "acid_metabolic"
    if has("basic_amine"):
        return "amine_gpcr"
    return "none"


def _druglike_pool():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    allowed = {"C", "N", "O", "S", "F", "Cl", "Br", "I", "P"}
    pool = []
    for name, smi in nci_smiles():
        mol = Chem.MolFromSmiles(smi)
        if mol is None or not 12 <= mol.GetNumHeavyAtoms() <= 50:
            continue
        if len(Chem.GetMolFrags(mol)) > 1 or any(a.GetSymbol() not in allowed for a in mol.GetAtoms()):
            continue
        pool.append((name, Chem.MolToSmiles(mol), mol))
    return pool


def _choose_drugs(cfg: SimulationConfig, rng: np.random.Generator):
    """(names, canonical SMILES, mechanisms, logP) of the simulated drugs."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    if cfg.smiles is not None:
        chosen = []
        bad: list[str] = []
        for i, smi in enumerate(cfg.smiles):
            mol = Chem.MolFromSmiles(smi)
            if mol is None:
                bad.append(smi)
            else:
                chosen.append((f"drug{i:04d}", Chem.MolToSmiles(mol), mol))
        if bad:
            raise ScdcaInputError(f"smiles: RDKit cannot parse {bad[:10]!r}; fix or remove them")
    else:
        pool = _druglike_pool()
        by_mech: dict[str, list] = {}
        for item in pool:
            by_mech.setdefault(assign_mechanism(item[2]), []).append(item)
        chosen = []
        for mech, share in _MECH_SHARE.items():
            items = by_mech.get(mech, [])
            k = min(len(items), int(round(share * cfg.n_drugs)))
            chosen += [items[i] for i in rng.choice(len(items), size=k, replace=False)]
        rest = [p for p in pool if p[0] not in {c[0] for c in chosen}]
        while len(chosen) < cfg.n_drugs:  # rounding shortfall
            chosen.append(rest.pop(int(rng.integers(len(rest)))))
        chosen = chosen[: cfg.n_drugs]
        chosen.sort(key=lambda t: t[0])
    names = [c[0] for c in chosen]
    smiles = [c[1] for c in chosen]
    mechs = [assign_mechanism(c[2]) for c in chosen]
    logp = np.array([Descriptors.MolLogP(c[2]) for c in chosen])  # type: ignore[attr-defined]  # (as above)
    return names, smiles, mechs, logp


def line_names(n: int) -> list[str]:
    return [f"line{chr(ord('A') + i)}" if i < 26 else f"line{i}" for i in range(n)]


def _programs(n: int, n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """n gene programs (n, G): each moves 20-60 random genes, mostly in one direction."""
    programs = np.zeros((n, n_genes))
    for p in range(n):
        genes = rng.choice(n_genes, size=int(rng.integers(20, 61)), replace=False)
        direction = rng.choice([-1.0, 1.0])
        programs[p, genes] = rng.normal(0.6 * direction, 0.5, genes.size)
    return programs


def _gene_world(cfg: SimulationConfig, rng: np.random.Generator):
    """Genes, programs, mechanisms and cell lines: the part the atlas shares with the screen.

    Draw order matters: `simulate` and `simulate_atlas` both call `_choose_drugs` then this
    with the same generator, so both see the same genes, programs and line states.
    """
    G, P, R = cfg.n_genes, cfg.n_programs, cfg.latent_dim
    base = rng.normal(0.0, 0.7, G)
    programs = _programs(P, G, rng)
    mech_vec = np.zeros((len(MECHANISMS), G))
    for i, (_, _, n_prog, strength, _) in enumerate(MECHANISMS):
        chosen = rng.choice(P, size=n_prog, replace=False)
        mech_vec[i] = strength * (programs[chosen] * rng.uniform(0.5, 1.0, (n_prog, 1))).sum(0)
    W = rng.normal(0.0, 0.6, (G, R)) * (rng.random((G, R)) < 0.3)
    z = rng.normal(0.0, 1.0, (cfg.n_cell_lines, R))
    line_shift = z @ W.T  # (C, G)
    targets = [rng.choice(np.flatnonzero(np.abs(W).sum(1) > 0), size=15, replace=False) for _ in MECHANISMS]
    u = np.stack([line_shift[:, t].mean(1) for t in targets], axis=1)  # (C, M)
    u_sd = np.array([np.sqrt((W[t] ** 2).sum(1).mean() / len(t)) for t in targets])  # sd under z~N(0,I)
    sensitivity = np.exp(cfg.kappa * np.clip(u / u_sd, -2.5, 2.5))  # (C, M)
    return base, programs, mech_vec, W, z, line_shift, sensitivity


def simulate(
    config: SimulationConfig | None = None, *, seed: int = 0, out: str | os.PathLike | None = None
) -> ad.AnnData:
    """Simulate a sci-Plex-like single-cell drug screen (see the module docstring).

    Args:
        config: simulator settings; defaults give the demo dataset.
        seed: random seed; the same seed gives the same AnnData.
        out: write the file here, generating and appending cells in chunks, so memory does
            not grow with the number of cells (millions of cells: large `cells_per_condition`);
            the file equals the in-memory result written with `write_h5ad`. Returns it backed.

    Returns:
        AnnData of raw counts with chemCPA-style obs columns (`cell_type`, `condition`,
        `SMILES`, `dose` in nM, `dose_val` = dose / 10 uM, `control`, `cov_drug_dose_name`),
        `uns['scdca_truth']` (noise-free condition means) and `uns['drug_annotations']`.

    Example:
        >>> adata = scdca.data.simulate.simulate(seed=0)
    """
    cfg = config or SimulationConfig()
    rng = np.random.default_rng(seed)
    names, smiles, mechs, logp = _choose_drugs(cfg, rng)
    base, programs, mech_vec, W, z, line_shift, sensitivity = _gene_world(cfg, rng)
    lines = line_names(cfg.n_cell_lines)

    drugs = _drug_effects(cfg, rng, mechs, logp, mech_vec, programs)
    rows, prop = _condition_rates(cfg, rng, lines, names, drugs, base, line_shift, sensitivity)
    # cells: library sizes now, counts drawn chunk by chunk as they are written
    n_cells = np.array([cfg.control_cells if r[1] == "control" else cfg.cells_per_condition for r in rows])
    cond_of_cell = np.repeat(np.arange(len(rows)), n_cells)
    lib = rng.lognormal(np.log(cfg.mean_library_size), 0.35, cond_of_cell.size)
    counts = _count_chunks(prop, cond_of_cell, lib, cfg.dispersion, rng)

    genes = [f"g{i:04d}" for i in range(cfg.n_genes)]
    adata = ad.AnnData(obs=_cell_obs(rows, smiles, cond_of_cell), var=pd.DataFrame(index=genes))
    _record_truth(adata, cfg, rows, prop, lines, genes, names, mechs, drugs, sensitivity)
    params = {k: v for k, v in asdict(cfg).items() if k != "smiles"}
    params["doses_nM"] = list(cfg.doses_nM)
    adata.uns["simulation"] = {"seed": seed, **params, "smiles_source": "user" if cfg.smiles else "rdkit NCI first_5K"}
    if out is not None:
        write_in_chunks(out, adata, counts)
        return ad.read_h5ad(out, backed="r")
    adata.X = sp.vstack(list(counts)).tocsr()
    return adata


def _drug_effects(cfg: SimulationConfig, rng, mechs, logp, mech_vec, programs) -> dict[str, np.ndarray]:
    """Per drug: mechanism index, activity, amplitude, potency, Hill slope and effect vector (D, G)."""
    G, P, D = cfg.n_genes, cfg.n_programs, len(mechs)
    mech_names = [m[0] for m in MECHANISMS]
    m_idx = np.array([mech_names.index(m) for m in mechs])
    p_active = np.array([MECHANISMS[i][4] for i in m_idx])
    active = rng.random(D) < p_active
    amplitude = np.where(active, rng.lognormal(np.log(1.2), 0.4, D), 0.0)
    log10_ec50 = np.clip(3.0 - 0.25 * (logp - 2.8) + rng.normal(0, 0.6, D), 1.0, 5.0)
    hill_n = rng.uniform(0.8, 2.0, D)
    drug_vec = np.zeros((D, G))
    for d in range(D):
        support = np.flatnonzero(mech_vec[m_idx[d]] != 0)
        drug_vec[d] = mech_vec[m_idx[d]]
        drug_vec[d, support] += rng.normal(0, cfg.drug_noise_sd, support.size)
        drug_vec[d] += rng.uniform(0.1, 0.3) * programs[rng.integers(P)]

    return {"m_idx": m_idx, "active": active, "amplitude": amplitude, "log10_ec50": log10_ec50, "hill_n": hill_n,
            "drug_vec": drug_vec}  # fmt: skip


def _condition_rates(cfg: SimulationConfig, rng, lines, names, drugs, base, line_shift, sensitivity):
    """The condition rows (line, drug, dose, drug index) and their gene proportions (K, G)."""
    G, D = cfg.n_genes, len(names)
    m_idx, amplitude, log10_ec50 = drugs["m_idx"], drugs["amplitude"], drugs["log10_ec50"]
    hill_n, drug_vec = drugs["hill_n"], drugs["drug_vec"]
    rows: list[tuple[str, str, float, int | None]] = []
    logit_rows: list[np.ndarray] = []
    for c, line in enumerate(lines):
        rows.append((line, "control", 0.0, None))
        logit_rows.append(base + line_shift[c])
    for c, line in enumerate(lines):
        for d in range(D):
            eta = rng.normal(0, cfg.interaction_sd, G) * (drug_vec[d] != 0)
            for dose in cfg.doses_nM:
                hill = dose ** hill_n[d] / (dose ** hill_n[d] + (10 ** log10_ec50[d]) ** hill_n[d])
                effect = sensitivity[c, m_idx[d]] * amplitude[d] * hill * (drug_vec[d] + eta)
                rows.append((line, names[d], float(dose), d))
                logit_rows.append(base + line_shift[c] + effect)
    logits = np.asarray(logit_rows)
    prop = np.exp(logits - logits.max(1, keepdims=True))
    prop /= prop.sum(1, keepdims=True)  # (K, G)

    return rows, prop


def _cell_obs(rows, smiles, cond_of_cell) -> pd.DataFrame:
    """Per-cell obs in chemCPA's sci-Plex names, taken from the condition table (categorical codes)."""
    per_condition = pd.DataFrame(
        {
            "cell_type": [r[0] for r in rows],
            "condition": [r[1] for r in rows],
            "SMILES": [smiles[r[3]] if r[3] is not None else "" for r in rows],
            "dose": [r[2] for r in rows],
        }
    )
    per_condition["dose_val"] = per_condition["dose"] / 1e4
    per_condition["control"] = (per_condition["condition"] == "control").astype(int)
    per_condition["cov_drug_dose_name"] = [
        f"{a}_{b}_{float(v)}"
        for a, b, v in zip(per_condition["cell_type"], per_condition["condition"], per_condition["dose_val"])
    ]
    obs = pd.DataFrame(index=[f"cell{i:06d}" for i in range(cond_of_cell.size)])
    for col in per_condition.columns:  # per-cell columns taken from the condition table (categorical codes)
        values = per_condition[col]
        if values.dtype == object:
            cat = pd.Categorical(values)
            obs[col] = pd.Categorical.from_codes(cat.codes[cond_of_cell], categories=cat.categories)
        else:
            obs[col] = values.to_numpy()[cond_of_cell]
    return obs


def _record_truth(adata, cfg, rows, prop, lines, genes, names, mechs, drugs, sensitivity) -> None:
    """uns: the noise-free condition means, each drug's hidden parameters, each line's sensitivities."""
    mech_names = [m[0] for m in MECHANISMS]
    active, amplitude, log10_ec50, hill_n = (drugs[k] for k in ("active", "amplitude", "log10_ec50", "hill_n"))
    truth = _expected_log_normalised(prop, cfg.mean_library_size, 0.35, cfg.dispersion)
    treated = [k for k, r in enumerate(rows) if r[1] != "control"]
    adata.uns[TRUTH_KEY] = {
        "ids": np.array([condition_id(rows[k][0], rows[k][1], rows[k][2] / 1e4) for k in treated]),
        "genes": np.array(genes),
        "mean": truth[treated].astype(np.float32),
        "control_ids": np.array(lines),
        "control_mean": truth[: len(lines)].astype(np.float32),
    }
    adata.uns["drug_annotations"] = {
        "drug": np.array(names),
        "mechanism": np.array(mechs),
        "active": active.astype(int),
        "amplitude": amplitude,
        "ec50_nM": 10**log10_ec50,
        "hill_n": hill_n,
    }
    adata.uns["cell_line_sensitivity"] = {
        "cell_line": np.array(lines),
        **{m: sensitivity[:, i] for i, m in enumerate(mech_names)},
    }


def write_in_chunks(
    path: str | os.PathLike, adata: ad.AnnData, chunks: Iterable[sp.csr_matrix], *, rows_per_write: int = 65_536
) -> None:
    """Write `adata` (obs, var, uns; X is ignored) to an .h5ad whose X is the row-wise
    concatenation of the sparse `chunks`, appending them to the file so that at most
    `rows_per_write` rows of X are in memory. Atomic: the file appears only when complete."""
    from anndata.io import sparse_dataset, write_elem

    shell = ad.AnnData(obs=adata.obs, var=adata.var, uns=adata.uns)
    pending: list = []
    n_pending, written = 0, False
    with storage.atomic_path(path) as tmp:
        shell.write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:

            def flush():
                nonlocal written
                block = sp.vstack(pending).tocsr()
                if written:
                    sparse_dataset(f["X"]).append(block)
                else:
                    write_elem(f, "X", block)
                    written = True
                pending.clear()

            for chunk in chunks:
                pending.append(chunk)
                n_pending += chunk.shape[0]
                if n_pending >= rows_per_write:
                    flush()
                    n_pending = 0
            if pending:
                flush()
            if f["X"].attrs["shape"][0] != adata.n_obs:
                raise RuntimeError(f"wrote {f['X'].attrs['shape'][0]} rows of X for {adata.n_obs} cells")


@dataclass
class AtlasConfig:
    """Settings of the pretraining atlas (`simulate_atlas`); ~54k unperturbed cells by default."""

    n_states: int = 60
    cells_per_state: int = 900
    extra_programs: int = 8  # programs that vary in the atlas but that no drug acts on
    state_program_sd: float = 0.5  # how strongly each state sets each program's activity
    cell_program_sd: float = 0.25  # cell-to-cell program activity within a state
    include_screen_lines: bool = True  # the screen's lines appear as (control-only) states

    def __post_init__(self):
        if self.n_states < 2 or self.cells_per_state < 2:
            raise ScdcaInputError(
                f"n_states {self.n_states!r} and cells_per_state {self.cells_per_state!r} must both be >= 2"
            )


def simulate_atlas(
    config: SimulationConfig | None = None, atlas: AtlasConfig | None = None, *, seed: int = 0
) -> ad.AnnData:
    """Unperturbed cells from many cell states, in the gene space of `simulate(config, seed=seed)`.

    The pretraining corpus the foundation-model premise needs: no drug is ever applied,
    but the gene programs that drugs act on in the screen (and `extra_programs` others)
    vary naturally between and within cell states, so which genes move together is
    learnable from these cells alone.

    Generative story (the screen's genes, programs, base rates and line loadings W come
    from the same draws as `simulate` with this seed):
    - State s has a latent z_s ~ N(0, I) in the screen's cell-line space and program
      activities a_s ~ N(0, state_program_sd^2) over all programs.
    - Cell i of state s has log-rate base + W z_s + (a_s + e_i) @ programs with
      e_i ~ N(0, cell_program_sd^2): program genes co-vary across and within states.
    - Library size and negative-binomial counts as in `simulate`.
    - With `include_screen_lines`, the first states are the screen's cell lines in their
      control state (a_s = 0), named as in the screen; they appear only as control cells.

    Returns:
        AnnData of raw counts; obs `cell_type` (state), `condition` ('control'),
        `control` (1), `screen_line` (whether the state is one of the screen's lines);
        `uns['atlas_programs']` holds the program loadings (the screen's first).

    Example:
        >>> atlas = scdca.data.simulate.simulate_atlas(seed=0)
    """
    cfg, acfg = config or SimulationConfig(), atlas or AtlasConfig()
    rng = np.random.default_rng(seed)
    _choose_drugs(cfg, rng)  # keeps the draw order of `simulate`
    base, programs, _, W, z_lines, _, _ = _gene_world(cfg, rng)
    arng = np.random.default_rng([seed, 101])
    G = cfg.n_genes
    all_programs = np.vstack([programs, _programs(acfg.extra_programs, G, arng)])  # (P + E, G)

    n_screen = min(cfg.n_cell_lines, acfg.n_states) if acfg.include_screen_lines else 0
    z = arng.normal(0.0, 1.0, (acfg.n_states, cfg.latent_dim))
    activity = arng.normal(0.0, acfg.state_program_sd, (acfg.n_states, len(all_programs)))
    z[:n_screen], activity[:n_screen] = z_lines[:n_screen], 0.0
    names = line_names(n_screen) + [f"state{i:03d}" for i in range(n_screen, acfg.n_states)]
    state_logit = base + z @ W.T + activity @ all_programs  # (S, G)

    state_of_cell = np.repeat(np.arange(acfg.n_states), acfg.cells_per_state)
    lib = arng.lognormal(np.log(cfg.mean_library_size), 0.35, state_of_cell.size)
    chunks = []
    for start in range(0, state_of_cell.size, 4096):
        s = state_of_cell[start : start + 4096]
        noise = arng.normal(0.0, acfg.cell_program_sd, (s.size, len(all_programs)))
        logit = state_logit[s] + noise @ all_programs  # (b, G)
        prop = np.exp(logit - logit.max(1, keepdims=True))
        prop /= prop.sum(1, keepdims=True)
        chunks.append(_nb_counts(prop * lib[start : start + s.size, None], cfg.dispersion, arng))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([names[k] for k in state_of_cell], categories=names),
            "condition": pd.Categorical(["control"] * state_of_cell.size),
            "control": 1,
            "screen_line": state_of_cell < n_screen,
        },
        index=[f"atlas{i:06d}" for i in range(state_of_cell.size)],
    )
    adata = ad.AnnData(X=sp.vstack(chunks).tocsr(), obs=obs, var=pd.DataFrame(index=[f"g{i:04d}" for i in range(G)]))
    params = {k: v for k, v in asdict(cfg).items() if k != "smiles"}
    params["doses_nM"] = list(cfg.doses_nM)
    adata.uns["atlas_programs"] = all_programs.astype(np.float32)  # first n_programs: those drugs act on
    adata.uns["simulation"] = {
        "seed": seed,
        "kind": "atlas",
        **params,
        **asdict(acfg),
        "smiles_source": "user" if cfg.smiles else "rdkit NCI first_5K",
    }
    return adata


def _count_chunks(prop, cond_of_cell, lib, theta, rng) -> Iterator[sp.csr_matrix]:
    """Gamma-Poisson (negative binomial) counts, 4,096 cells at a time, as sparse matrices.
    Lazy: the rng is drawn as chunks are consumed, so streamed and in-memory files are equal."""
    for start in range(0, cond_of_cell.size, 4096):
        sl = slice(start, start + 4096)
        yield _nb_counts(prop[cond_of_cell[sl]] * lib[sl, None], theta, rng)  # mean (b, G)


def _nb_counts(mu: np.ndarray, theta: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Negative-binomial counts with mean `mu` and dispersion theta, as a Gamma-Poisson mixture."""
    return sp.csr_matrix(rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32))


def _expected_log_normalised(prop, mean_lib, lib_sd, theta, target=1e4) -> np.ndarray:
    """E[log1p(target * X / L)] for X ~ NB(L * prop, theta), log L ~ N(log mean_lib, lib_sd^2).

    Uses the cell's library size L as its total (they differ by O(1/sqrt(L))). Exact pmf
    summation where the NB mean is <= 30; above that the gamma-mixture asymptote
    log(c mu) + digamma(theta) - log(theta) + theta / ((theta - 1) c mu).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    weights = weights / weights.sum()
    out = np.zeros_like(prop, dtype=np.float64)
    for x, w in zip(nodes, weights):
        L = mean_lib * np.exp(lib_sd * x)
        c = target / L
        mu = prop * L
        val = np.empty_like(mu)
        big = mu > 30
        val[big] = np.log(c * mu[big]) + digamma(theta) - np.log(theta) + theta / ((theta - 1) * c * mu[big])
        val[~big] = _nb_expect_log1p(mu[~big], theta, c)
        out += w * val
    return out


def _nb_expect_log1p(mu: np.ndarray, theta: float, c: float, tol: float = 1e-9) -> np.ndarray:
    """sum_k P(X=k) log1p(c k) for X ~ NB(mu, theta), by the pmf recurrence until mass < tol."""
    q = mu / (theta + mu)
    pk = (1.0 - q) ** theta  # P(X=0)
    acc = np.zeros_like(mu)
    mass = pk.copy()
    idx = np.arange(mu.size)
    k = 0
    while idx.size:
        pk = pk * (k + theta) / (k + 1) * q[idx]
        k += 1
        acc[idx] += pk * np.log1p(c * k)
        mass[idx] += pk
        keep = 1.0 - mass[idx] > tol
        idx, pk = idx[keep], pk[keep]
        if k > 2000:  # unreachable for mu <= 30; guards against an infinite loop
            break
    return acc
