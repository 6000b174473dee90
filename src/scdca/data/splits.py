"""The four generalisation tasks of the scDCA paper, and three more, as seeded and audited splits.

Unit of splitting: a drug (all its doses, all lines) for `unseen_drug`, a scaffold for
`unseen_scaffold`, a (drug, cell line) pair (all its doses) for `unseen_pair` and the few-shot
drugs, a line for the cell tasks, a line and a share of the drugs for `unseen_drug_line`, and
each pair's top dose for `unseen_dose`.
Control expression of every cell line, held-out lines included, is always
available: it is the model's input, not a target.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from scdca.chem.molecules import scaffold
from scdca.data.screen import PerturbationData
from scdca.errors import LeakageError, ScdcaInputError
from scdca.storage import write_json

Task = Literal[
    "unseen_drug",
    "unseen_pair",
    "unseen_cell_fewshot",
    "unseen_cell_zeroshot",
    "unseen_scaffold",
    "unseen_drug_line",
    "unseen_dose",
]
TASKS: tuple[str, ...] = ("unseen_drug", "unseen_pair", "unseen_cell_fewshot", "unseen_cell_zeroshot")
# Extra tasks run only when named or with 'extended': not part of the paper's four ('all').
# unseen_drug_line: new drugs in a held-out line, both new at once (one split per line);
# unseen_dose: every drug-line pair's top dose held out, its lower doses in training.
EXTRA_TASKS: tuple[str, ...] = ("unseen_scaffold", "unseen_drug_line", "unseen_dose")
ALL_TASKS = TASKS + EXTRA_TASKS
CELL_TASKS = ("unseen_cell_fewshot", "unseen_cell_zeroshot")
LINE_TASKS = (*CELL_TASKS, "unseen_drug_line")  # one split per held-out line


@dataclass(frozen=True)
class Split:
    """Train and test condition ids for one task, seed and (for cell tasks) held-out line."""

    task: str
    seed: int
    held_out: str  # the held-out cell line, or "" for drug/pair tasks
    train: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def name(self) -> str:
        tail = f"__{self.held_out}" if self.held_out else ""
        return f"{self.task}__seed{self.seed}{tail}"

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {**asdict(self), "train": list(self.train), "test": list(self.test)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        with open(path) as fh:
            d = json.load(fh)
        return cls(d["task"], int(d["seed"]), d["held_out"], tuple(d["train"]), tuple(d["test"]))


def _rng(task: str, seed: int, held_out: str = "") -> np.random.Generator:
    # independent, reproducible stream per (task, seed, line), stable across Python runs
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(held_out.encode())])


def _unseen_drugs(data: PerturbationData, rng, frac: float) -> np.ndarray:
    """Test mask: a random share `frac` of the drugs, in every line and dose."""
    cond = data.conditions
    drugs = np.array(sorted(cond["drug"].unique()))
    test_drugs = set(rng.choice(drugs, size=int(round(frac * len(drugs))), replace=False))
    return cond["drug"].isin(test_drugs).to_numpy()


def _unseen_scaffolds(data: PerturbationData, rng, frac: float) -> np.ndarray:
    """Test mask: whole Bemis-Murcko scaffolds, in random order, until at least `frac` of the drugs."""

    smiles = data.drug_smiles()
    drugs = sorted(smiles)
    groups: dict[str, list[str]] = {}
    for d in drugs:
        groups.setdefault(scaffold(smiles[d]) or f"acyclic:{d}", []).append(d)
    order = list(groups)
    test_drugs: set[str] = set()
    for i in rng.permutation(len(order)):
        if len(test_drugs) >= frac * len(drugs):
            break
        test_drugs.update(groups[order[i]])
    return data.conditions["drug"].isin(test_drugs).to_numpy()


def _unseen_pairs(data: PerturbationData, rng, frac: float) -> np.ndarray:
    """Test mask: a random share `frac` of the (drug, line) pairs (the paper's random 50/50 pairs).

    Nothing keeps a drug seen elsewhere: a drug all of whose pairs are drawn is new to training
    (on the demo's 3 lines, 10-17 of about 107 test drugs per seed). Models meet it as an unseen
    molecule, as they would in a screen that mixes both."""
    cond = data.conditions
    pairs = sorted(set(zip(cond["drug"], cond["cell_line"])))
    pick = rng.choice(len(pairs), size=int(round(frac * len(pairs))), replace=False)
    test_pairs = {pairs[i] for i in pick}
    return np.array([p in test_pairs for p in zip(cond["drug"], cond["cell_line"])], dtype=bool)


def _unseen_doses(data: PerturbationData, rng, frac: float) -> np.ndarray:
    """Test mask: each (drug, line) pair's top dose, for pairs measured at two doses or more (frac unused)."""
    cond = data.conditions
    dose = cond["dose"].to_numpy(float)
    pair = cond["drug"].astype(str) + "|" + cond["cell_line"].astype(str)
    top = pd.Series(dose).groupby(pair.to_numpy()).transform("max").to_numpy()
    n_doses = pd.Series(dose).groupby(pair.to_numpy()).transform("nunique").to_numpy()
    return (dose == top) & (n_doses >= 2)


# task -> (default test share, test mask); the line tasks make one split per held-out line
_SINGLE = {"unseen_drug": (0.3, _unseen_drugs), "unseen_scaffold": (0.3, _unseen_scaffolds),
           "unseen_pair": (0.5, _unseen_pairs), "unseen_dose": (0.0, _unseen_doses)}  # fmt: skip


def _line_splits(
    data: PerturbationData, task: str, seed: int, fewshot_fraction: float, only=None, drug_fraction: float = 0.3
) -> list[Split]:
    """One split per held-out line (of `only`, if given): all its conditions (zero-shot), all but a few
    drugs (few-shot), or its conditions of a random `drug_fraction` of the drugs, those drugs then
    removed from every line's training conditions (unseen_drug_line)."""
    cond = data.conditions
    lines = sorted(cond["cell_line"].unique())
    if len(lines) < 2:
        raise ScdcaInputError(f"task {task!r} needs >= 2 cell lines with perturbations; the data has {lines!r}")
    splits = []
    for line in [x for x in lines if only is None or x in only]:
        in_line = (cond["cell_line"] == line).to_numpy()
        if task == "unseen_cell_zeroshot":
            is_test = in_line
        elif task == "unseen_drug_line":
            drugs = np.array(sorted(cond["drug"].unique()))
            new = _rng(task, seed, line).choice(
                drugs, size=max(1, int(round(drug_fraction * len(drugs)))), replace=False
            )
            is_new = cond["drug"].isin(new).to_numpy()
            is_test = in_line & is_new
            ids = np.asarray(data.ids)
            split = Split(task, seed, line, tuple(ids[~in_line & ~is_new]), tuple(ids[is_test]))
            if split.test and split.train:
                splits.append(split)
            continue
        else:
            drugs = np.array(sorted(cond.loc[in_line, "drug"].unique()))
            n_train = max(1, int(round(fewshot_fraction * len(drugs))))
            seen = set(_rng(task, seed, line).choice(drugs, size=n_train, replace=False))
            is_test = in_line & ~cond["drug"].isin(seen).to_numpy()
        splits.append(_split(data, task, seed, line, is_test))
    return splits


def make_splits(
    data: PerturbationData,
    task: str,
    seed: int,
    *,
    test_fraction: float | None = None,
    fewshot_fraction: float = 0.1,
    lines: Sequence[str] | None = None,
) -> list[Split]:
    """All splits of one task for one seed (one per held-out line for the cell tasks).

    Args:
        data: the perturbation data to split.
        task: one of `TASKS`.
        seed: random seed.
        test_fraction: share of drugs (unseen_drug, default 0.3) or of pairs (unseen_pair,
            default 0.5) held out.
        fewshot_fraction: share of the held-out line's drugs seen in training (few-shot).
        lines: the cell tasks hold out only these lines (default: every line).
    Returns:
        A list of audited splits.
    """
    if task not in ALL_TASKS:
        raise ScdcaInputError(f"task: unknown task {task!r}; choose from {', '.join(ALL_TASKS)} (or 'all')")
    if task in _SINGLE:
        fraction, mask = _SINGLE[task]
        frac = fraction if test_fraction is None else test_fraction
        splits = [_split(data, task, seed, "", mask(data, _rng(task, seed), frac))]
    else:
        splits = _line_splits(data, task, seed, fewshot_fraction, lines)
    for s in splits:
        audit(s, data)
    if not splits:
        raise ScdcaInputError(f"task {task!r}: no split has both training and test conditions in this data")
    return splits


def _split(data, task, seed, held_out, is_test) -> Split:
    ids = np.asarray(data.ids)
    split = Split(task, seed, held_out, tuple(ids[~is_test]), tuple(ids[is_test]))
    if not split.test:
        raise ScdcaInputError(
            f"split {split.name}: no test conditions. The data has too few drugs/pairs for this "
            f"task; add conditions or drop the task (--tasks)."
        )
    if not split.train:
        raise ScdcaInputError(f"split {split.name}: no training conditions. Add conditions or drop the task (--tasks).")
    return split


def _audit_doses(split: Split, train, test) -> None:
    """unseen_dose: every test condition's pair is in training only at lower doses."""
    seen = train.groupby([train["drug"], train["cell_line"]])["dose"].max()
    for (d, c), x in zip(zip(test["drug"], test["cell_line"]), test["dose"]):
        top = seen.get((d, c))
        if top is None or top >= x:
            raise LeakageError(
                f"{split.name}: test condition {d!r} in {c!r} at dose {x:g} has "
                + ("no lower training dose" if top is None else f"training dose {top:g} at or above it")
            )


def audit(split: Split, data: PerturbationData, *, fewshot_fraction: float = 0.1) -> None:
    """Raise LeakageError if any held-out drug, pair or line reaches training for its task."""
    cond = data.conditions
    train, test = cond.loc[list(split.train)], cond.loc[list(split.test)]
    both = set(split.train) & set(split.test)
    if both:
        raise LeakageError(f"{split.name}: {len(both)} condition(s) in train and test, e.g. {sorted(both)[:3]}")
    if split.task in ("unseen_drug", "unseen_scaffold"):
        leaked = set(train["drug"]) & set(test["drug"])
        if leaked:
            raise LeakageError(f"{split.name}: test drug(s) {sorted(leaked)[:5]} appear in training")
        if split.task == "unseen_scaffold":
            from scdca.chem.molecules import scaffold

            smiles = data.drug_smiles()
            scaf = lambda ds: {scaffold(smiles[d]) for d in ds} - {""}  # noqa: E731
            shared = scaf(set(train["drug"])) & scaf(set(test["drug"]))
            if shared:
                raise LeakageError(f"{split.name}: scaffold(s) {sorted(shared)[:3]} in train and test")
    elif split.task == "unseen_pair":
        leaked = set(zip(train["drug"], train["cell_line"])) & set(zip(test["drug"], test["cell_line"]))
        if leaked:
            raise LeakageError(f"{split.name}: test pair(s) {sorted(leaked)[:5]} appear in training")
    elif split.task == "unseen_dose":
        _audit_doses(split, train, test)
    elif split.task == "unseen_drug_line":
        if set(test["cell_line"]) != {split.held_out} or (train["cell_line"] == split.held_out).any():
            raise LeakageError(
                f"{split.name}: the held-out line {split.held_out!r} is in training or not alone in test"
            )
        leaked = set(train["drug"]) & set(test["drug"])
        if leaked:
            raise LeakageError(f"{split.name}: test drug(s) {sorted(leaked)[:5]} appear in training")
    elif split.task in CELL_TASKS:
        if set(test["cell_line"]) != {split.held_out}:
            raise LeakageError(f"{split.name}: test set contains lines other than {split.held_out!r}")
        train_line = train[train["cell_line"] == split.held_out]
        if split.task == "unseen_cell_zeroshot" and len(train_line):
            raise LeakageError(f"{split.name}: {len(train_line)} held-out-line condition(s) in training")
        if split.task == "unseen_cell_fewshot":
            leaked = set(train_line["drug"]) & set(test["drug"])
            if leaked:
                raise LeakageError(f"{split.name}: held-out-line test drug(s) {sorted(leaked)[:5]} in training")
            n_drugs = cond.loc[cond["cell_line"] == split.held_out, "drug"].nunique()
            allowed = max(1, int(round(fewshot_fraction * n_drugs)))
            if train_line["drug"].nunique() > allowed:
                raise LeakageError(
                    f"{split.name}: {train_line['drug'].nunique()} held-out-line drugs in training, "
                    f"more than the few-shot budget {allowed}"
                )
    else:
        raise ScdcaInputError(f"task: unknown task {split.task!r}; choose from {', '.join(ALL_TASKS)}")


FOLDS = {"unseen_drug": 3, "unseen_scaffold": 3, "unseen_pair": 2}  # calibration folds per split; line tasks: 2
MIN_GROUPS = 40  # held-out drugs (scaffolds, pairs) that are enough: folds beyond them are not refitted


def fold_splits(train: PerturbationData, task: str, seed: int, *, exclude: str = "", max_lines: int = 2):
    """Splits of the training conditions that hold out what `task` holds out (the folds on which
    `scdca.intervals` calibrates and `scdca_stack` chooses its experts).

    Drug, scaffold and pair tasks: the training drugs (scaffolds, drug-line pairs) in `FOLDS[task]`
    folds, each held out once, until at least `MIN_GROUPS` of them have been held out (all folds on
    a small screen, so every training condition is calibrated on; fewer refits on a large one,
    where more held-out groups would cost fits without steadying the calibration). Line tasks: the task's
    own split rule for at most `max_lines` training lines, chosen at random, never `exclude` (a
    few-shot split's own line, which has too few conditions to hold out). unseen_dose: its own rule
    (each pair's top training dose held out).
    """
    rng = np.random.default_rng([seed, 36])
    if task in FOLDS:
        units = held_out_units(train.conditions, task)
        names = np.unique(units)
        if len(names) < FOLDS[task]:
            raise ScdcaInputError(
                f"folds: cannot make {task!r} folds of the training data: it has {len(names)} held-out "
                f"unit(s), {FOLDS[task]} folds need at least that many; add training data"
            )
        ids = np.asarray(train.ids)
        folds = np.array_split(rng.permutation(names), FOLDS[task])
        enough = np.cumsum([len(f) for f in folds]) >= MIN_GROUPS
        folds = folds[: int(np.argmax(enough)) + 1] if enough.any() else folds
        return [Split(task, seed, "", tuple(ids[~np.isin(units, f)]), tuple(ids[np.isin(units, f)])) for f in folds]
    if task not in LINE_TASKS:  # unseen_dose: the rule itself (each pair's top remaining dose)
        try:
            return make_splits(train, task, seed)
        except ScdcaInputError as err:
            raise ScdcaInputError(
                f"folds: cannot make {task!r} folds of the training conditions alone ({err}); "
                f"add training data (or turn intervals off for this task)"
            ) from None
    candidates = sorted(set(train.conditions["cell_line"]) - {exclude})
    lines = sorted(rng.choice(candidates, size=min(max_lines, len(candidates)), replace=False))
    splits = _held_out_lines(train, task, seed, lines)
    if len(splits) == len(lines) and sum(len(s.test) for s in splits) >= MIN_GROUPS:
        return splits
    rest = [c for c in candidates if c not in lines]
    return _pooled_line_folds(train, task, seed, splits, list(rng.permutation(rest)), max_lines)


def _held_out_lines(train, task: str, seed: int, lines) -> list[Split]:
    """The task's own split of each line that its rule can hold out (a line with one drug has no
    few-shot split: it is skipped)."""
    out = []
    for line in lines:
        try:
            out += [s for s in make_splits(train, task, seed, lines=[line]) if s.test]
        except ScdcaInputError:
            continue
    return out


MAX_FOLD_LINES = 12  # lines a line task's folds may hold out when each line has few conditions


def _pooled_line_folds(train, task: str, seed: int, splits: list[Split], rest: list, n_folds: int) -> list[Split]:
    """Line folds on small lines (a LINCS signature file has 2-3 conditions per line, and a line
    with one drug has no few-shot split): more lines, drawn in the order `rest`, until
    `MIN_GROUPS` held-out conditions or `MAX_FOLD_LINES` lines, pooled into `n_folds` folds, so
    the fits stay as many as with one line per fold. A pooled fold holds out each of its lines as
    the task's rule does (its training part: what every one of the lines' own splits trains on)."""
    for line in rest:
        if sum(len(s.test) for s in splits) >= MIN_GROUPS or len(splits) >= MAX_FOLD_LINES:
            break
        splits += _held_out_lines(train, task, seed, [line])
    if not splits:
        raise ScdcaInputError(
            f"folds: cannot make {task!r} folds of the training conditions alone: no training line has "
            f"conditions the task's rule holds out; add training data (or turn intervals off for this task)"
        )
    folds = [splits[i::n_folds] for i in range(min(n_folds, len(splits)))]
    out = []
    for group in folds:
        train_ids = set.intersection(*(set(s.train) for s in group))
        test = tuple(i for s in group for i in s.test)
        keep = tuple(i for i in train.ids if i in train_ids)
        out.append(Split(task, seed, "|".join(s.held_out for s in group), keep, test))
    return out


def held_out_units(cond, task: str) -> np.ndarray:
    """The unit a task holds out together: a line (line tasks), a drug-line pair, a scaffold or a drug."""
    if task in LINE_TASKS:
        return cond["cell_line"].astype(str).to_numpy()
    if task in ("unseen_pair", "unseen_dose"):
        return (cond["drug"].astype(str) + "|" + cond["cell_line"].astype(str)).to_numpy()
    if task == "unseen_scaffold":
        return np.array([scaffold(s) or d for d, s in zip(cond["drug"].astype(str), cond["smiles"].astype(str))])
    return cond["drug"].astype(str).to_numpy()
