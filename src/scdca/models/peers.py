"""Published peer models, run through the same splits and metrics when their package is installed.

biolord (Piran et al., Nat. Biotechnol. 2024) decodes expression from a latent made of
one block per known attribute plus a per-sample "unknown attributes" code. Here the
known attributes are the cell line (categorical) and the drug (ordered: the standardised
molecule embedding times the scaled dose, as biolord's sci-Plex set-up multiplies RDKit
descriptors by dose). A prediction keeps the line's control sample (its line embedding,
and its unknown code when enabled) and swaps in the query drug: biolord's counterfactual.

How this differs from biolord's papers, on purpose: it trains on the same pseudobulk
profiles every other model sees (one sample per condition plus one control sample per
line), not on single cells, so the comparison is like for like. Every line's control is
a training sample, so an unseen line (zero-shot) gets a line embedding from its control.
With one sample per condition, biolord's per-sample "unknown attributes" code memorises
each condition's change instead of leaving it to the drug attribute (measured: training
reconstruction MSE 0.008 with the sample's own code, 0.37 for the counterfactual from the
control's code, 0.12 without codes), so the code is off by default (`unknown_code`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
import time
import warnings
from typing import Any, ClassVar

import numpy as np

from scdca.chem.featurizer import DrugFeaturizer
from scdca.data.screen import PerturbationData
from scdca.errors import ScdcaInputError
from scdca.models.base import MODELS, PerturbationModel, parameter_counts

log = logging.getLogger(__name__)

# model name -> (import name, install command); the report lists any that could not run.
# STATE (scdca.models.arc_state) is CC BY-NC-SA 4.0, so its lock is opt-in, not in the set-up.
PEERS: dict[str, tuple[str, str]] = {
    "biolord": ("biolord", "pip install biolord==0.0.3"),
    "state": ("state.tx", "pip install -r requirements-state.lock"),
    "state_pseudobulk": ("state.tx", "pip install -r requirements-state.lock"),
}


def installed(module: str) -> bool:
    """True when `module` (dotted names allowed) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


def peer_status() -> dict[str, str | None]:
    """Peer model name -> None when its package imports here, else how to install it."""
    return {name: None if installed(module) else install for name, (module, install) in PEERS.items()}


@contextlib.contextmanager
def quiet():
    """Silence lightning's and scvi-tools' banners and deprecation warnings during a fit."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def scaled_log_dose(dose: np.ndarray, lo: float, span: float) -> np.ndarray:
    """log10 dose mapped to (0, 1] whatever the unit: with k decades of training doses
    (`lo` = lowest log10 dose, `span` = k) the lowest gets 1 / (k + 1), never 0, since a zero
    drug attribute means "control"."""
    t = (np.log10(np.maximum(dose, 1e-12)) - lo + 1.0) / (span + 1.0)
    return np.clip(t, 1e-3, None)


def drug_features(emb: np.ndarray, dose_t: np.ndarray) -> np.ndarray:
    """Standardised embedding x dose, the ordered drug attribute; all zeros means no drug."""
    return (emb * dose_t[:, None]).astype(np.float32)


@MODELS.register("biolord")
class BiolordPeer(PerturbationModel):
    """biolord on pseudobulk profiles (see the module docstring for the set-up).

    Args:
        encoder: molecule encoder spec; rdkit2d is biolord's own choice for sci-Plex.
        epochs, patience: at most `epochs` epochs; stop when the validation MSE (10% of the
            training drugs, predicted as `predict` would) has not improved for `patience`.
        seed: seeds biolord's module and the choice of validation drugs.
        device: 'cpu' or 'cuda' (default: cuda if available).
        unknown_code: biolord's per-sample "unknown attributes" code; off by default on
            pseudobulk, where it memorises each condition (see the module docstring).
        n_latent, decoder_width, decoder_depth, attribute_width, batch_size, lr: biolord
            hyperparameters, scaled to a few thousand pseudobulk samples (not tuned on test data).
    """

    name = "biolord"
    options: ClassVar[tuple[str, ...]] = ("encoder", "device", "seed")

    def __init__(
        self,
        *,
        encoder: str = "rdkit2d",
        epochs: int = 200,
        seed: int = 0,
        device: str | None = None,
        n_latent: int = 32,
        decoder_width: int = 512,
        decoder_depth: int = 2,
        attribute_width: int = 256,
        batch_size: int = 64,
        lr: float = 1e-3,
        patience: int = 20,
        unknown_code: bool = False,
    ):
        self.check_available()
        self.encoder_spec, self.epochs, self.seed, self.device = encoder, epochs, seed, device
        self.n_latent, self.decoder_width, self.decoder_depth = n_latent, decoder_width, decoder_depth
        self.attribute_width, self.batch_size, self.lr, self.patience = attribute_width, batch_size, lr, patience
        self.unknown_code = unknown_code
        self._cost: dict[str, Any] = {}

    @classmethod
    def check_available(cls) -> None:
        if not installed("biolord"):
            raise ScdcaInputError(
                f"model 'biolord' needs the biolord package: {PEERS['biolord'][1]} "
                f"(or pip install -r requirements-peers.lock), then rerun"
            )

    # -- inputs ------------------------------------------------------------------------
    def _drug_attribute(self, data: PerturbationData) -> np.ndarray:
        cond = data.conditions
        emb = self._drugs.molecules(cond["smiles"], cond["drug"])
        return drug_features(emb, scaled_log_dose(cond["dose"].to_numpy(float), self._dose_lo, self._dose_span))

    def _fit(self, train: PerturbationData) -> None:
        import biolord

        t0 = time.perf_counter()
        drugs = train.drug_smiles()
        self._drugs = DrugFeaturizer(self.encoder_spec).fit(drugs, train.conditions["dose"])
        logd = np.log10(np.maximum(train.conditions["dose"].to_numpy(float), 1e-12))
        self._dose_lo, self._dose_span = float(logd.min()), float(logd.max() - logd.min())
        adata, is_val, n_val = self._training_anndata(train, drugs)
        with quiet():
            biolord.Biolord.setup_anndata(
                adata, ordered_attributes_keys=["drug"], categorical_attributes_keys=["cell_line"]
            )
        with quiet():
            self._model = biolord.Biolord(
                adata=adata, n_latent=self.n_latent, module_params=self._module_params(),
                split_key="split" if n_val else None,
            )  # fmt: skip
        self._control_row = {line: len(train.ids) + i for i, line in enumerate(train.cell_lines)}
        self._adata = adata
        stopper = self._train(train, is_val, n_val)
        self._record_cost(stopper, time.perf_counter() - t0)

    def _training_anndata(self, train: PerturbationData, drugs: dict[str, str]):
        """Conditions and line controls as biolord's samples, with a validation split of drugs;
        returns (AnnData, validation flags, number of validation drugs)."""
        import anndata as ad
        import pandas as pd

        lines = train.cell_lines
        X = np.vstack([train.observed, train.control_mean]).astype(np.float32)  # (N + L, G)
        drug_attr = np.vstack([self._drug_attribute(train), np.zeros((len(lines), self._drugs.dim), np.float32)])
        rng = np.random.default_rng(self.seed)
        names = sorted(drugs)
        n_val = max(1, round(0.1 * len(names))) if len(names) >= 5 else 0
        val_drugs = set(rng.choice(names, size=n_val, replace=False)) if n_val else set()
        is_val = np.r_[train.conditions["drug"].isin(val_drugs).to_numpy(), np.zeros(len(lines), bool)]
        obs = pd.DataFrame(
            {
                "cell_line": pd.Categorical(list(train.conditions["cell_line"]) + lines, categories=lines),
                # biolord's names: train / test (= validation) / ood (unused here)
                "split": np.where(is_val, "test", "train"),
            },
            index=[f"s{i}" for i in range(len(X))],
        )
        adata = ad.AnnData(X=X, obs=obs)
        adata.obsm["drug"] = drug_attr
        return adata, is_val, n_val

    def _module_params(self) -> dict:
        """biolord's network settings."""
        return dict(
            decoder_width=self.decoder_width,
            decoder_depth=self.decoder_depth,
            attribute_nn_width=self.attribute_width,
            attribute_nn_depth=2,
            n_latent_attribute_categorical=4,
            n_latent_attribute_ordered=16,
            gene_likelihood="normal",
            reconstruction_penalty=1e2,
            unknown_attribute_penalty=1e1,
            unknown_attribute_noise_param=1e-1,
            unknown_attributes=self.unknown_code,
            use_batch_norm=False,
            use_layer_norm=False,
            decoder_dropout_rate=0.1,
            seed=self.seed,
        )

    def _train(self, train: PerturbationData, is_val: np.ndarray, n_val: int):
        """biolord's trainer with our early stopping on the validation drugs; returns the stopper."""
        import torch

        # biolord 0.0.3's training plan reads `latent_lr` before assigning it unless the
        # attribute network's rates are given explicitly. Its StepLR (step_size=45) is stepped
        # once every 45 epochs, so the rate would first drop after 2,025 epochs: constant here.
        plan = dict(
            latent_lr=self.lr,
            latent_wd=1e-5,
            decoder_lr=self.lr,
            decoder_wd=1e-5,
            attribute_nn_lr=self.lr,
            attribute_nn_wd=1e-6,
        )
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        accelerator = "gpu" if device.startswith("cuda") else "cpu"
        callbacks = []
        if n_val:
            # biolord's own validation metric scores the validation samples' per-sample codes,
            # which never train; stop instead on the MSE of the counterfactual prediction
            # (the line's control sample with the held-out drug) that `predict` makes.
            val = train.subset([i for i, v in zip(train.ids, is_val) if v])
            callbacks.append(_early_stopping(self, val, self.patience))
        with tempfile.TemporaryDirectory() as tmp, quiet():
            self._model.train(
                max_epochs=self.epochs,
                batch_size=self.batch_size,
                plan_kwargs=plan,
                train_size=1.0,
                early_stopping=False,
                accelerator=accelerator,
                enable_checkpointing=False,
                enable_progress_bar=False,
                logger=False,
                default_root_dir=tmp,
                enable_model_summary=False,
                callbacks=callbacks,
                **({} if n_val else {"limit_val_batches": 0}),
            )
        return callbacks[0] if callbacks else None

    def _record_cost(self, stopper, seconds: float) -> None:
        """The best epoch's weights back into the model, and what the fit cost."""
        epochs_run, val_mse = self.epochs, None
        if stopper is not None:
            self._model.module.load_state_dict(stopper.best_state)
            epochs_run, val_mse = stopper.epochs_seen, stopper.best
            log.info("biolord: best validation MSE %.4f at epoch %d", stopper.best, stopper.best_epoch)
        self._cost = {
            **parameter_counts(self._model.module),
            "epochs_run": epochs_run,
            "val_mse": val_mse,
            "fit_seconds": seconds,
        }

    def _predict(self, query: PerturbationData) -> np.ndarray:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before predict()")
        lines = list(query.conditions["cell_line"])
        unknown = sorted(set(lines) - set(self._control_row))
        if unknown:
            raise ScdcaInputError(
                f"biolord: no control sample for cell line(s) {unknown!r}; the training data "
                f"must include every query line's control"
            )
        return self._counterfactual(lines, self._drug_attribute(query))

    def _counterfactual(self, lines: list[str], drug_attr: np.ndarray) -> np.ndarray:
        """Decode each line's control sample with its drug attribute replaced -> (n, G)."""
        import torch

        module = self._model.module
        was_training = module.training
        module.eval()
        uniq = sorted(set(lines))
        base = self._model.get_dataset(self._adata, indices=[self._control_row[c] for c in uniq])
        pick = torch.as_tensor([uniq.index(c) for c in lines])
        tensors = {k: v[pick].to(module.device) for k, v in base.items()}
        tensors["drug"] = torch.from_numpy(drug_attr).to(module.device)
        with torch.no_grad():
            mean, _ = module.get_expression(tensors)
        module.train(was_training)
        return mean.detach().cpu().numpy().reshape(len(lines), -1)

    def cost(self) -> dict[str, Any]:
        return dict(self._cost)


def _early_stopping(peer: BiolordPeer, val: PerturbationData, patience: int):
    """A lightning callback (lightning is imported only when biolord trains) that scores `peer`'s
    predictions for `val` after each epoch, keeps the best weights and stops after `patience`
    epochs without improvement."""
    from lightning.pytorch.callbacks import Callback

    class EarlyStopOnPrediction(Callback):
        def __init__(self):
            self.best, self.best_epoch, self.bad, self.epochs_seen = float("inf"), -1, 0, 0
            self.best_state: dict | None = None

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs_seen += 1
            mse = float(np.mean((peer.predict(val) - val.mean) ** 2))
            if mse < self.best - 1e-6:
                self.best, self.best_epoch, self.bad = mse, self.epochs_seen, 0
                self.best_state = {k: v.detach().clone() for k, v in peer._model.module.state_dict().items()}
            else:
                self.bad += 1
                if self.bad >= patience:
                    trainer.should_stop = True

    return EarlyStopOnPrediction()
