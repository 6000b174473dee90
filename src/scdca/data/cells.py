"""A bounded sample of single cells kept beside the pseudobulk, for models that train on cell sets.

Most models here see one mean profile per condition. Set-based models (STATE) learn from sets
of cells: a condition's treated cells against a set of its line's control cells. Keeping every
cell would make memory grow with the file, so `load(..., cells_per_condition=k)` keeps at most
`k` cells of each condition and up to `k_control` of each line's control, chosen at random with
the load's seed. Memory is then bounded by (conditions x k + lines x k_control) x genes,
whatever the number of cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass
class CellSample:
    """Sampled cells, one row each, on the kept genes (the same values the pseudobulk averages).

    Attributes:
        X: (M, G) float32 expression of the sampled cells.
        condition: (M,) the cell's condition id, or "" for a control cell.
        cell_line: (M,) the cell's line.
        k: the most cells kept per condition.
        k_control: the most control cells kept per line.
    """

    X: np.ndarray
    condition: np.ndarray
    cell_line: np.ndarray
    k: int
    k_control: int

    def of_condition(self, condition_id: str) -> np.ndarray:
        """The sampled cells of one condition, (n, G) (n = 0 when its cells were withheld)."""
        return self.X[self.condition == condition_id]

    def of_control(self, cell_line: str) -> np.ndarray:
        """The sampled control cells of one line, (n, G)."""
        return self.X[(self.condition == "") & (self.cell_line == cell_line)]

    def subset(self, ids: Sequence[str], *, observed: bool) -> CellSample:
        """Every control cell, and the cells of conditions `ids` only when `observed` (a model's
        query holds no treated cells, as it holds no means)."""
        keep = self.condition == ""
        if observed:
            keep |= np.isin(self.condition, np.asarray(list(ids), dtype=object))
        return replace(self, X=self.X[keep], condition=self.condition[keep], cell_line=self.cell_line[keep])


def sample_cells(group: np.ndarray, k: np.ndarray, *, seed: int) -> np.ndarray:
    """Which rows to keep: at most `k[g]` of group g, at random with `seed`; group -1 rows never.

    Args:
        group: (n_rows,) int group code per row (-1: in no group).
        k: (n_groups,) the most rows kept per group.
    Returns:
        (n_rows,) bool mask.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(group))  # random order, then stable-sorted by group
    by_group = order[np.argsort(group[order], kind="stable")]
    g = group[by_group]
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]  # where each group starts in by_group
    rank = np.arange(len(g)) - np.repeat(first, np.diff(np.r_[first, len(g)]))
    keep = np.zeros(len(group), dtype=bool)
    limit = np.where(g >= 0, np.asarray(k)[np.maximum(g, 0)], 0)
    keep[by_group[rank < limit]] = True
    return keep
