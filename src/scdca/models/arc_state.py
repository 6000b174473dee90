"""Arc Institute's STATE transition model (Adduri et al., 2025) as a peer, through its own package.

STATE's transition model reads a *set* of a line's control cells plus the perturbation's
embedding, lets the cells attend to each other in a bidirectional transformer, and predicts
the set of perturbed cells; it trains on a distributional loss between predicted and observed
sets (energy distance). Here its network, loss and optimiser are `arc-state`'s own
(`StateTransitionPerturbationModel`); this wrapper only builds its batches and decides when to
stop.

Two modes, chosen from the data (`cost()['mode']` and the report say which ran):
- ``set``: the data holds sampled single cells (`PerturbationData.cells`, kept by
  `load(cells_per_condition=...)`; the benchmark keeps `cells_per_condition` when STATE runs).
  Each training set is `set_size` cells of one condition against `set_size` control cells of its
  line, both drawn at random each step, with the energy loss, as published. A prediction is the
  mean of STATE's predicted cells over sets that cover all of the line's kept control cells (in
  a seeded order), so it does not carry one set's sampling noise.
- ``pseudobulk``: bulk or pseudobulk input (a LINCS plate, one profile per condition), or
  `set_size=1`. Sets of one profile: the condition's mean against its line's control mean,
  with STATE's `mse` loss (the energy distance of two single points is their Euclidean
  distance, not a distribution loss). Then this is STATE's network as a regression model.

Drugs: the `--encoder` embedding, standardised over the training drugs, times the scaled log
dose (as the biolord peer's drug attribute), so unseen drugs are embedded like training ones.
STATE itself has no dose input. Lines: only through their control cells, so an unseen line
needs nothing else. A drug whose embedding is all zeros or not finite is refused: STATE would
silently treat it as "no drug".

Sizes are scaled for a CPU and a few thousand conditions (hidden 128, 4 layers; the package's
small configuration, `state_sm`, has 672 and 4), and training stops on the MSE of the pseudobulk
prediction of 10% of the training drugs, held out (not tuned on test data).
Licence: `arc-state` is CC BY-NC-SA 4.0 (non-commercial), unlike scdca (MIT), so it is an opt-in
install: `pip install -r requirements-state.lock`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from scdca.chem.featurizer import DrugFeaturizer
from scdca.data.cells import CellSample
from scdca.data.screen import PerturbationData
from scdca.errors import ScdcaInputError
from scdca.models.base import MODELS, PerturbationModel, Saved, parameter_counts
from scdca.models.peers import PEERS, drug_features, installed, quiet, scaled_log_dose

log = logging.getLogger(__name__)


@MODELS.register("state")
class StatePeer(PerturbationModel):
    """STATE's transition model on this harness's splits (see the module docstring).

    Args:
        encoder: molecule encoder spec (the benchmark's --encoder).
        set_size: cells per set in set mode (STATE's `cell_set_len`); 1 forces pseudobulk mode.
        hidden, layers, heads: the transformer (llama, bidirectional, as STATE's configs).
        batch_size: sets per step (pseudobulk mode: profiles per step, `pseudobulk_batch`).
        lr: Adam's rate (STATE's optimiser; 1e-3, not its 1e-4, for a CPU's few thousand steps,
            chosen on held-out training drugs: DECISIONS.md D44); gradients clipped at 10, as
            STATE's trainer does.
        max_steps, eval_every, patience: at most `max_steps` steps; every `eval_every` steps the
            validation drugs' pseudobulk MSE is scored and training stops after `patience`
            scores without improvement, keeping the best weights.
        seed: seeds the network, the sets and the choice of validation drugs.
        device: 'cpu' or 'cuda' (default: cuda if available).
    """

    name = "state"
    options: ClassVar[tuple[str, ...]] = ("encoder", "device", "seed")
    savable = True
    # what the benchmark keeps for it: cells per condition, control cells per line (a prediction
    # averages over sets covering all of them, so a line's input is not one set's sampling noise)
    cells_per_condition: ClassVar[int] = 64
    control_cells_per_line: ClassVar[int] = 256

    def __init__(
        self,
        *,
        encoder: str = "rdkit2d",
        set_size: int = 32,
        hidden: int = 128,
        layers: int = 4,
        heads: int = 8,
        batch_size: int = 8,
        pseudobulk_batch: int = 64,
        lr: float = 1e-3,
        max_steps: int = 3000,
        eval_every: int = 200,
        patience: int = 5,
        seed: int = 0,
        device: str | None = None,
    ):
        self.check_available()
        if set_size < 1 or hidden % heads:
            raise ScdcaInputError(
                f"state: set_size={set_size!r}, hidden={hidden!r}, heads={heads!r}; set_size must be >= 1 "
                f"and hidden a multiple of heads"
            )
        self.encoder_spec, self.set_size = encoder, set_size
        self.hidden, self.layers, self.heads = hidden, layers, heads
        self.batch_size, self.pseudobulk_batch, self.lr = batch_size, pseudobulk_batch, lr
        self.max_steps, self.eval_every, self.patience = max_steps, eval_every, patience
        self.seed, self.device = seed, device
        self._cost: dict[str, Any] = {}

    @classmethod
    def check_available(cls) -> None:
        if not (installed("state.tx") and installed("geomloss")):
            raise ScdcaInputError(
                f"model 'state' needs Arc's arc-state package (licence CC BY-NC-SA 4.0, non-commercial): "
                f"{PEERS['state'][1]} (or make demo-peers), then rerun"
            )

    # -- inputs ------------------------------------------------------------------------
    def _drug_attribute(self, data: PerturbationData) -> np.ndarray:
        """(N, D) standardised embedding x scaled log dose; refuses drugs without an embedding."""
        cond = data.conditions
        raw = self._drugs.encoder.encode(list(cond["smiles"]), names=list(cond["drug"]))
        empty = ~np.isfinite(raw).all(1) | ~raw.any(1)
        if empty.any():
            bad = sorted(set(cond["drug"].to_numpy()[empty]))
            raise ScdcaInputError(
                f"state: drug(s) {bad[:10]!r} have no usable embedding from encoder {self.encoder_spec!r} "
                f"(all zeros or not finite); STATE would read them as 'no drug'. Use another --encoder "
                f"or drop these drugs"
            )
        emb = self._drugs.molecules(cond["smiles"], cond["drug"])
        return drug_features(
            emb, scaled_log_dose(cond["dose"].to_numpy(float), self._drugs.dose_lo, self._drugs.dose_span)
        )

    def _mode(self, train: PerturbationData) -> str:
        cells = train.cells
        if self.set_size == 1 or cells is None or len(cells.X) == 0:
            return "pseudobulk"
        return "set" if int(train.conditions["n_cells"].max()) > 1 else "pseudobulk"

    def _control_sets(self, data: PerturbationData, lines) -> dict[str, np.ndarray]:
        """Each line's input for prediction from `data`: its sampled control cells in a seeded order
        as m sets of S, (m * S, G), the last set filled from the first (set mode); or its control
        mean, (1, G) (pseudobulk mode). A line `data` holds no controls of takes the sets saved
        at fit; a line with neither is refused."""
        out = {}
        for line in sorted(set(lines)):
            if self.mode == "pseudobulk" and line in data.controls.index:
                out[line] = data.control_for([line]).astype(np.float32)
                continue
            cells = data.cells.of_control(line) if data.cells is not None else np.zeros((0, 0))
            if self.mode == "set" and len(cells):
                rng = np.random.default_rng([self.seed, zlib.crc32(str(line).encode())])  # per line, not per query
                order = rng.permutation(len(cells))
                m = -(-len(cells) // self.set_size)
                out[line] = cells[np.resize(order, m * self.set_size)].astype(np.float32)
            elif line in getattr(self, "_sets", {}):
                out[line] = self._sets[line]
            else:
                raise ScdcaInputError(
                    f"state: no control cells of line {line!r} in the data; STATE in set mode predicts a line "
                    f"from its control cells, and `scdca predict --control` gives only their mean: load the "
                    f"data with scdca.load(..., cells_per_condition=64) and predict in Python, or train "
                    f"state_pseudobulk"
                    if self.mode == "set"
                    else f"state: no control profile of line {line!r}; add the line's controls to the data"
                )  # fmt: skip
        return out

    # -- fit ---------------------------------------------------------------------------
    def _network(self, n_genes: int, pert_dim: int):
        import torch
        from state.tx.models.state_transition import StateTransitionPerturbationModel

        torch.manual_seed(self.seed)
        S = self.set_size if self.mode == "set" else 1
        backbone = dict(
            bidirectional_attention=True, max_position_embeddings=S, hidden_size=self.hidden,
            intermediate_size=4 * self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.heads, head_dim=self.hidden // self.heads, use_cache=False,
            attention_dropout=0.0, hidden_dropout=0.0, layer_norm_eps=1e-6, tie_word_embeddings=False,
            vocab_size=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,  # no tokens are read: a small vocabulary
        )  # fmt: skip
        loss = "energy" if self.mode == "set" else "mse"
        with contextlib.redirect_stdout(io.StringIO()), quiet():  # it prints itself on construction
            net = StateTransitionPerturbationModel(
                input_dim=n_genes, hidden_dim=self.hidden, output_dim=n_genes, pert_dim=pert_dim,
                cell_set_len=S, embed_key=None, output_space="gene", gene_decoder_bool=False,
                n_encoder_layers=4, n_decoder_layers=4, predict_residual=True, loss=loss,
                distributional_loss="energy", blur=0.05, use_basal_projection=False,
                transformer_backbone_key="llama", transformer_backbone_kwargs=backbone,
                lr=self.lr, dropout=0.1, batch_size=self.batch_size,
            )  # fmt: skip
        return net.to(self._device())

    def _device(self):
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _fit(self, train: PerturbationData) -> None:
        t0 = time.perf_counter()
        self.mode = self._mode(train)
        drugs = train.drug_smiles()
        self._drugs = DrugFeaturizer(self.encoder_spec).fit(drugs, train.conditions["dose"])
        if self.mode == "pseudobulk":
            with_controls = train.cell_lines
        else:  # set mode (`_mode`) is chosen only for data with cells
            cells = _cells(train)
            with_controls = cells.cell_line[cells.condition == ""]
        self._sets = self._control_sets(train, with_controls)  # kept for a query without control cells
        pert = self._drug_attribute(train)
        self.net = self._network(train.n_genes, pert.shape[1])
        rng = np.random.default_rng(self.seed)
        names = sorted(drugs)
        n_val = max(1, round(0.1 * len(names))) if len(names) >= 5 else 0
        val_drugs = set(rng.choice(names, size=n_val, replace=False)) if n_val else set()
        is_val = train.conditions["drug"].isin(val_drugs).to_numpy()
        steps, best = self._train(train, pert, is_val, rng)
        self._cost = {
            **parameter_counts(self.net),
            "steps_run": steps,
            "val_mse": best,
            "mode": self.mode,
            "set_size": self.set_size if self.mode == "set" else 1,
            "fit_seconds": time.perf_counter() - t0,
        }
        log.info("state: %s mode, %d steps, best validation mse %s", self.mode, steps, best)

    def _batches(self, train: PerturbationData, pert: np.ndarray, rows: np.ndarray, rng):
        """An endless stream of training batches in STATE's layout: flat (B*S, dim) tensors."""
        import torch

        device = self._device()
        lines = train.conditions["cell_line"].to_numpy()
        if self.mode == "pseudobulk":
            ctrl = train.control_for(lines).astype(np.float32)
            while True:
                b = rng.choice(rows, size=min(self.pseudobulk_batch, len(rows)), replace=False)
                yield {
                    "pert_emb": torch.from_numpy(pert[b]).to(device),
                    "ctrl_cell_emb": torch.from_numpy(ctrl[b]).to(device),
                    "pert_cell_emb": torch.from_numpy(train.observed[b].astype(np.float32)).to(device),
                }
        S, ids, sample = self.set_size, train.ids, _cells(train)
        cells = {i: sample.of_condition(ids[i]) for i in rows}
        ctrl_cells = {c: sample.of_control(c) for c in set(lines[rows])}
        rows = np.asarray([i for i in rows if len(cells[i])])
        while True:
            b = rng.choice(rows, size=min(self.batch_size, len(rows)), replace=False)
            target, basal = [], []
            for i in b:
                x, c = cells[i], ctrl_cells[lines[i]]
                target.append(x[rng.choice(len(x), S, replace=len(x) < S)])
                basal.append(c[rng.choice(len(c), S, replace=len(c) < S)])
            yield {
                "pert_emb": torch.from_numpy(np.repeat(pert[b], S, axis=0)).to(device),
                "ctrl_cell_emb": torch.from_numpy(np.concatenate(basal).astype(np.float32)).to(device),
                "pert_cell_emb": torch.from_numpy(np.concatenate(target).astype(np.float32)).to(device),
            }

    def _train(self, train: PerturbationData, pert: np.ndarray, is_val: np.ndarray, rng) -> tuple[int, float | None]:
        """STATE's training step and optimiser with early stopping on the validation drugs;
        returns (steps run, best validation MSE or None without validation drugs)."""
        import torch

        rows = np.flatnonzero(~is_val)
        val = train.subset([i for i, v in zip(train.ids, is_val) if v]) if is_val.any() else None
        optim = self.net.configure_optimizers()
        batches = self._batches(train, pert, rows, rng)
        best, best_state, bad, step = float("inf"), None, 0, 0
        with quiet():  # STATE logs through lightning's self.log, which warns without a trainer
            for step in range(1, self.max_steps + 1):
                self.net.train()
                loss = self.net.training_step(next(batches), 0, padded=True)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
                optim.step()
                if val is None or step % self.eval_every:
                    continue
                mse = float(np.mean((self._predict(val) - val.mean) ** 2))
                if mse < best - 1e-6:
                    best, bad = mse, 0
                    best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        return step, (best if best_state is not None else None)

    # -- predict -----------------------------------------------------------------------
    def _predict(self, query: PerturbationData) -> np.ndarray:
        import torch

        if not hasattr(self, "net"):
            raise RuntimeError("call fit() before predict()")
        lines = list(query.conditions["cell_line"])
        sets = self._control_sets(query, lines)  # the query's own controls (a new line's too)
        pert = self._drug_attribute(query)
        device = self._device()
        S = self.set_size if self.mode == "set" else 1
        out = np.empty((len(lines), query.n_genes), dtype=np.float32)
        line_of = np.asarray(lines, dtype=object)
        self.net.eval()
        with torch.no_grad():
            for line, basal in sets.items():
                m = len(basal) // S  # sets per condition, all averaged
                rows = np.flatnonzero(line_of == line)
                step = max(1, 64 // m)  # about 64 sets per forward pass
                for start in range(0, len(rows), step):
                    part = rows[start : start + step]
                    batch = {
                        "pert_emb": torch.from_numpy(np.repeat(pert[part], m * S, axis=0)).to(device),
                        "ctrl_cell_emb": torch.from_numpy(np.tile(basal, (len(part), 1))).to(device),
                    }
                    pred = self.net.forward(batch, padded=True).reshape(len(part), m * S, -1)  # (n, m*S, G)
                    out[part] = pred.mean(1).cpu().numpy()
        return out

    def cost(self) -> dict[str, Any]:
        return dict(self._cost)

    # -- save / load (`models.base.save_folder`): weights, featurizer and each line's control set --
    def settings(self) -> dict[str, Any]:
        names = ("set_size", "hidden", "layers", "heads", "batch_size", "pseudobulk_batch", "lr", "max_steps",
                 "eval_every", "patience", "seed")  # fmt: skip
        return {"encoder": self.encoder_spec, "device": None, **{k: getattr(self, k) for k in names}}

    def _saved(self, folder: Path) -> Saved:
        arrays = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        lines = sorted(self._sets)
        arrays.update({f"set.{i}": self._sets[c] for i, c in enumerate(lines)})
        meta = {"mode": self.mode, "set_lines": lines, "cost": self._cost}
        return Saved(meta, arrays, featurizer=self._drugs, encoder=self.encoder_spec)

    def _restored(self, saved: Saved, folder: Path, overrides: dict[str, Any]) -> None:
        import torch

        a, meta = saved.arrays, saved.meta
        self.mode, self._drugs, self._cost = meta["mode"], saved.restored_featurizer, meta["cost"]
        self._sets = {c: a[f"set.{i}"] for i, c in enumerate(meta["set_lines"])}
        self.net = self._network(len(self.genes), self._drugs.dim)
        self.net.load_state_dict({k[4:]: torch.from_numpy(v) for k, v in a.items() if k.startswith("net.")})


def _cells(data: PerturbationData) -> CellSample:
    """The data's single cells, which STATE's set mode reads; an error naming the fix without them."""
    if data.cells is None:
        raise ScdcaInputError("state: set mode reads single cells and the data has none; use state_pseudobulk")
    return data.cells


@MODELS.register("state_pseudobulk")
class StatePseudobulk(StatePeer):
    """STATE's network in pseudobulk mode (sets of one profile, mse) even on single-cell data:
    the regression use of its network, beside the published set mode of `state`."""

    name = "state_pseudobulk"
    cells_per_condition: ClassVar[int] = 0
    control_cells_per_line: ClassVar[int] = 0

    def __init__(self, **kwargs):
        super().__init__(**{"set_size": 1, **kwargs})
