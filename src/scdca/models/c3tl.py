"""C3TL-style lightweight transfer model (our design from the paper's idea; no code of it exists).

Idea (Causal Cellular Context Transfer Learning, seed paper 002): a drug's effect is largely
shared across contexts (an invariance) and modulated by the context, so a small model that
encodes the two separately transfers to new lines and new drugs at a fraction of the cost
of a foundation model. Every design choice below is ours:

- Change space. Changes from control are predicted as scores on the top `n_components`
  principal directions of the training changes (plus their mean), as `ridge` does: drug
  effects are low-rank and this discards per-gene noise. Works on single-cell or bulk input
  alike, since the model only ever sees pseudobulk means.
- Context c. The line's control expression, centred on the training lines' mean control and
  projected on the same directions, through a small MLP: an unseen line (zero-shot) only
  needs its control.
- Drug d, pooled over contexts. Each training observation of d (its change scores, scaled
  log dose and context) is embedded by phi and the embeddings are averaged: permutation-
  invariant and defined for any number of observations. A molecule embedding psi(m) is
  always added, so a drug never observed (empty pool) still has a code. While training, the
  pool of a condition leaves out its own line (so the model learns to transfer, not to
  copy), and is emptied for a random share of drugs (so psi learns to stand in for it).
- Combination. scores = S(r_d, t) + M(r_d, t, c): S is the context-invariant shared effect,
  M a context-specific modulation whose last layer starts at zero (the model starts
  invariant, and context enters only where the data ask for it).

Training: full batch, AdamW, MSE on the change scores, a fixed number of steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from scdca.chem.featurizer import DrugFeaturizer
from scdca.data.screen import PerturbationData
from scdca.errors import ScdcaInputError
from scdca.models.base import (
    MODELS,
    PerturbationModel,
    Saved,
    principal_directions,
)
from scdca.nn.adapters import zero_output
from scdca.nn.train import optimizer_step


@dataclass
class C3TLConfig:
    n_components: int = 32  # change directions (K)
    hidden: int = 64  # width of every code (H)
    steps: int = 400
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pool_dropout: float = 0.3  # share of training drugs whose pool is emptied in a step
    seed: int = 0


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


class C3TLNet(nn.Module):
    """The torch module; inputs are already in change-score space."""

    def __init__(self, cfg: C3TLConfig, mol_dim: int):
        super().__init__()
        K, H = cfg.n_components, cfg.hidden
        self.context = _mlp(K, H, H)  # control scores (K) -> c (H)
        self.phi = _mlp(K + 1 + H, H, H)  # one observation [scores, t, c] -> (H)
        self.psi = _mlp(mol_dim, H, H)  # molecule -> (H)
        self.shared = _mlp(H + 1, H, K)  # S(r, t)
        self.modulation = _mlp(2 * H + 1, H, K)  # M(r, t, c)
        zero_output(self.modulation)

    def drug_code(
        self,
        mol: Tensor,
        pool: Tensor,
        obs_scores: Tensor,
        obs_t: Tensor,
        obs_ctx: Tensor,
        select: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """mol (B, M); pool (B, N) sparse weights over N observations (rows sum to 1, or 0 = none);
        observations: scores (N, K), t (N,), context scores (N, K) -> drug code r (B, H).
        With `select` (B, D) one-hot, mol holds D distinct molecules and psi runs once per
        molecule (a matmul, not an index: index backward sums in a thread-dependent order).
        `keep` (B,) scales each row's pooled term (0 empties a pool)."""
        emb = self.phi(torch.cat([obs_scores, obs_t[:, None], self.context(obs_ctx)], -1))  # (N, H)
        m = self.psi(mol)
        pooled = pool @ emb  # (B, H); sparse: a drug's few observations, not all N
        return (m if select is None else select @ m) + (pooled if keep is None else keep[:, None] * pooled)

    def forward(self, r: Tensor, t: Tensor, ctx: Tensor) -> Tensor:  # (B, H), (B,), (B, K) -> (B, K)
        c = self.context(ctx)
        return self.shared(torch.cat([r, t[:, None]], -1)) + self.modulation(torch.cat([r, t[:, None], c], -1))


@MODELS.register("c3tl")
class C3TLModel(PerturbationModel):
    """Lightweight transfer model: shared drug effect pooled over contexts + context modulation.

    Args:
        encoder: molecule encoder spec (default 'morgan'; any of scdca's encoders).
        device: torch device (default cpu: the model is tiny).
        **config: fields of C3TLConfig.
    """

    name = "c3tl"
    savable = True
    options = ("encoder", "device", "seed")

    def __init__(self, *, encoder: str = "morgan", device: str | None = None, **config):
        self.encoder_spec = encoder
        self.device = torch.device(device or "cpu")
        self.cfg = C3TLConfig(**config)
        self._cost: dict[str, Any] = {}

    # -- features ------------------------------------------------------------------------
    def _mol(self, smiles: list[str], names: list[str]) -> Tensor:
        return torch.from_numpy(self._drugs.molecules(smiles, names))

    def _t(self, dose: np.ndarray) -> np.ndarray:
        return self._drugs.dose(dose).astype(np.float32)

    def _scores(self, delta: np.ndarray) -> np.ndarray:
        return ((delta - self._mean_change) @ self._basis.T).astype(np.float32)  # (N, K)

    def _ctx(self, control: np.ndarray) -> np.ndarray:
        return ((control - self._ctrl_centre) @ self._basis.T).astype(np.float32)  # (L, K)

    @staticmethod
    def _pool(query_drugs, query_lines, obs_drugs, obs_lines, *, leave_line_out: bool) -> Tensor:
        """(B, N) sparse (COO) mean-pooling weights over the observations of each query's drug.

        Sparse because a drug has a handful of observations among N: a dense (B, N) product cost
        half of a fit's time on the demo. Its products are deterministic at any thread count."""
        query = pd.DataFrame({"drug": np.asarray(query_drugs), "line": np.asarray(query_lines)})
        obs = pd.DataFrame({"drug": np.asarray(obs_drugs), "obs_line": np.asarray(obs_lines)})
        pairs = query.reset_index(names="i").merge(obs.reset_index(names="j"), on="drug")
        if leave_line_out:
            pairs = pairs[pairs["line"] != pairs["obs_line"]]
        weight = 1.0 / pairs.groupby("i")["j"].transform("size").to_numpy(np.float64)
        index = torch.from_numpy(np.stack([pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64)]))
        values = torch.from_numpy(weight.astype(np.float32))
        coo = torch.sparse_coo_tensor(index, values, (len(query), len(obs)), check_invariants=True)
        return coo.coalesce()

    # -- fit / predict ---------------------------------------------------------------------
    def _fit(self, train: PerturbationData) -> None:
        t0 = time.perf_counter()
        cfg, cond = self.cfg, train.conditions
        drugs = train.drug_smiles()
        self._drugs = DrugFeaturizer(self.encoder_spec).fit(drugs, cond["dose"].to_numpy(float))
        delta = train.delta().astype(np.float64)
        self._mean_change, self._basis = principal_directions(delta, cfg.n_components)  # (G,), (K, G)
        if self._basis.shape[0] < cfg.n_components:  # fewer conditions than directions: pad with zeros
            self._basis = np.vstack([self._basis, np.zeros((cfg.n_components - len(self._basis), delta.shape[1]))])
        self._ctrl_centre = train.control_for(sorted(cond["cell_line"].unique())).mean(0)
        # the observations every later prediction pools over
        self._obs = {
            "drug": cond["drug"].astype(str).to_numpy(),
            "line": cond["cell_line"].astype(str).to_numpy(),
            "scores": self._scores(delta),
            "t": self._t(cond["dose"].to_numpy(float)),
            "ctx": self._ctx(train.control_for(cond["cell_line"])),
        }
        torch.manual_seed(cfg.seed)
        self.net = C3TLNet(cfg, self._drugs.dim).to(self.device)
        unique_drugs = np.unique(self._obs["drug"])
        drug_pos = np.searchsorted(unique_drugs, self._obs["drug"])
        select = torch.from_numpy(np.eye(len(unique_drugs), dtype=np.float32)[drug_pos]).to(self.device)  # (N, D)
        mol = self._mol([drugs[d] for d in unique_drugs], list(unique_drugs)).to(self.device)  # (D, M)
        pool = self._pool(
            self._obs["drug"], self._obs["line"], self._obs["drug"], self._obs["line"], leave_line_out=True
        ).to(self.device)
        obs = [torch.from_numpy(self._obs[k]).to(self.device) for k in ("scores", "t", "ctx")]
        target, t, ctx = obs[0], obs[1], obs[2]
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.device.type in ("cpu", "cuda")
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        self.net.train()
        for _ in range(cfg.steps):
            keep = (torch.rand(len(unique_drugs), generator=gen) >= cfg.pool_dropout).float().to(self.device)
            r = self.net.drug_code(mol, pool, obs[0], obs[1], obs[2], select=select, keep=select @ keep)
            loss = ((self.net(r, t, ctx) - target) ** 2).mean()
            optimizer_step(loss, opt)
        self.net.eval()
        n_params = sum(p.numel() for p in self.net.parameters())
        self._cost = {
            "params_total": n_params,
            "params_trainable": n_params,
            "params_trainable_pct": 100.0,
            "steps": cfg.steps,
            "final_train_mse_scores": float(loss.item()),
            "train_seconds": time.perf_counter() - t0,
        }

    def _predict(self, query: PerturbationData) -> np.ndarray:
        if not hasattr(self, "net"):
            raise RuntimeError("call fit() (or C3TLModel.load) before predict()")
        if list(query.genes) != list(self._genes):
            raise ScdcaInputError("query genes differ from the genes the model was trained on")
        cond = query.conditions
        control = query.control_for(cond["cell_line"])
        pool = self._pool(
            cond["drug"].astype(str).to_numpy(),
            cond["cell_line"].astype(str).to_numpy(),
            self._obs["drug"],
            self._obs["line"],
            leave_line_out=False,
        )
        obs = [torch.from_numpy(self._obs[k]).to(self.device) for k in ("scores", "t", "ctx")]
        with torch.no_grad():
            mol = self._mol(list(cond["smiles"]), list(cond["drug"])).to(self.device)
            r = self.net.drug_code(mol, pool.to(self.device), *obs)
            scores = (
                self.net(
                    r,
                    torch.from_numpy(self._t(cond["dose"].to_numpy(float))).to(self.device),
                    torch.from_numpy(self._ctx(control)).to(self.device),
                )
                .cpu()
                .numpy()
            )
        return (control + self._mean_change + scores.astype(np.float64) @ self._basis).astype(np.float32)

    def cost(self) -> dict[str, Any]:
        return dict(self._cost)

    # -- save / load (`models.base.save_folder`: arrays as safetensors, the rest as JSON, no pickle) --
    def settings(self) -> dict[str, Any]:
        return {"encoder": self.encoder_spec, "device": None, **asdict(self.cfg)}

    def _saved(self, folder: Path) -> Saved:
        arrays = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        arrays.update(
            basis=self._basis,
            mean_change=self._mean_change,
            ctrl_centre=self._ctrl_centre,
            **{f"obs.{k}": self._obs[k] for k in ("scores", "t", "ctx")},
        )
        meta = {"obs_drug": self._obs["drug"].tolist(), "obs_line": self._obs["line"].tolist(), "cost": self._cost}
        return Saved(meta, arrays, featurizer=self._drugs, encoder=self.encoder_spec)

    def _restored(self, saved: Saved, folder: Path, overrides: dict[str, Any]) -> None:
        a, meta = saved.arrays, saved.meta
        self._basis, self._mean_change, self._ctrl_centre = a["basis"], a["mean_change"], a["ctrl_centre"]
        self._drugs = saved.restored_featurizer
        self._obs = {
            "drug": np.array(meta["obs_drug"]),
            "line": np.array(meta["obs_line"]),
            **{k: a[f"obs.{k}"] for k in ("scores", "t", "ctx")},
        }
        self.net = C3TLNet(self.cfg, self._drugs.dim).to(self.device)
        self.net.load_state_dict({k[4:]: torch.from_numpy(v) for k, v in a.items() if k.startswith("net.")})
        self.net.eval()
        self._cost = meta["cost"]
