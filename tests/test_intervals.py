"""Conformal intervals: coverage under known noise, calibration that never sees test groups, ordered bounds."""

import numpy as np
import pytest

from scdca.data.splits import MIN_GROUPS, fold_splits, make_splits
from scdca.errors import ScdcaInputError
from scdca.intervals import (
    Calibration,
    Intervals,
    OutOfFold,
    SharedFits,
    calibrate,
    difficulty_features,
    fit_calibration,
    load_calibration,
    out_of_fold,
)
from scdca.models import make_model


def _noisy(rng, n, G=40, k=10):
    """Predictions with heteroscedastic Gaussian errors: sd = gene scale x (1 + log10 dose)."""
    gene_sd = np.random.default_rng(99).uniform(0.05, 0.5, G)  # the same genes in calibration and test
    dose = rng.choice([0.1, 1.0, 10.0], n)
    control = np.full((n, G), 5.0)
    pred = control + rng.normal(0, 1, (n, G)) * (1 + np.log10(dose) + 1)[:, None] * 0.3
    sd = gene_sd[None, :] * (2 + np.log10(dose))[:, None]
    observed = pred + rng.normal(0, 1, (n, G)) * sd
    top = np.argsort(-np.abs(observed - control), axis=1)[:, :k]
    return OutOfFold(pred, observed, control, dose, top)


def test_coverage_matches_the_level_under_known_noise():
    rng = np.random.default_rng(0)
    cal = fit_calibration(_noisy(rng, 400))
    test = _noisy(rng, 400)
    interval = Intervals.of(cal, test.pred, test.control, test.dose)
    for level in (0.5, 0.8, 0.9):
        lower, upper = interval.bounds(test.pred, level)
        rows = np.arange(len(test.pred))[:, None]
        y = test.observed[rows, test.top]
        inside = (y >= lower[rows, test.top]) & (y <= upper[rows, test.top])
        assert abs(inside.mean() - level) < 0.03, (level, inside.mean())


def test_expected_error_sorts_the_realised_error():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    cal = fit_calibration(_noisy(rng, 300))
    test = _noisy(rng, 300)
    realised = ((test.observed - test.pred) ** 2).mean(1)
    assert spearmanr(cal.expected_mse(test.pred, test.control, test.dose), realised)[0] > 0.5
    conf = cal.confidence(cal.expected_mse(test.pred, test.control, test.dose))
    assert ((conf >= 0) & (conf <= 1)).all() and conf.std() > 0.1


def test_bounds_are_ordered_and_survive_save_and_load(tmp_path):
    rng = np.random.default_rng(2)
    cal = fit_calibration(_noisy(rng, 50), task="unseen_drug")
    test = _noisy(rng, 20)
    lower, upper = Intervals.of(cal, test.pred, test.control, test.dose).bounds(test.pred)
    assert (lower <= test.pred + 1e-6).all() and (test.pred <= upper + 1e-6).all() and (lower >= 0).all()
    cal.save(tmp_path / "calibration.npz")
    back = load_calibration(tmp_path)
    assert back.task == "unseen_drug" and back.alpha(0.9) == cal.alpha(0.9)
    np.testing.assert_array_equal(Intervals.of(back, test.pred, test.control, test.dose).bounds(test.pred)[1], upper)
    assert load_calibration(tmp_path / "elsewhere") is None


def test_a_level_too_high_for_the_calibration_size_gives_infinite_bounds():
    rng = np.random.default_rng(3)
    oof = _noisy(rng, 2, k=2)  # 4 calibration values: no finite 95% quantile
    assert np.isinf(fit_calibration(oof).alpha(0.95))
    with pytest.raises(ScdcaInputError, match="level"):
        fit_calibration(oof).alpha(1.5)


def test_calibration_never_sees_a_test_drug_or_line(tiny_data):
    for task in ("unseen_drug", "unseen_pair", "unseen_cell_fewshot", "unseen_cell_zeroshot"):
        split = make_splits(tiny_data, task, 0)[0]
        train = tiny_data.subset(split.train)
        test = tiny_data.conditions.loc[list(split.test)]
        for cal in fold_splits(train, task, 0, exclude=split.held_out):
            used = set(cal.train) | set(cal.test)
            assert used <= set(split.train)  # only training conditions
            drugs = set(tiny_data.conditions.loc[list(used), "drug"])
            if task == "unseen_drug":
                assert not drugs & set(test["drug"])
            if split.held_out:
                assert cal.held_out != split.held_out  # the few-shot line is never a calibration line
                if task == "unseen_cell_zeroshot":
                    assert split.held_out not in set(tiny_data.conditions.loc[list(used), "cell_line"])


def test_calibrate_a_registered_model_end_to_end(tiny_data):
    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    train = tiny_data.subset(split.train)
    cal = calibrate(lambda: make_model("ridge"), train, "unseen_drug", 0, k=5)
    assert isinstance(cal, Calibration) and len(cal.residuals) % 5 == 0 and np.isfinite(cal.alpha(0.8))
    model = make_model("ridge").fit(train)
    test = tiny_data.subset(split.test, observed=False)
    pred = model.predict(test)
    sigma = cal.scale(pred, test.control_for(test.conditions["cell_line"]), test.conditions["dose"].to_numpy())
    assert sigma.shape == pred.shape and (sigma > 0).all()


def test_a_task_the_training_data_cannot_mimic_is_refused(tiny_data):
    first = tiny_data.conditions["cell_line"].iloc[0]
    one_line = tiny_data.subset([i for i in tiny_data.ids if tiny_data.conditions.loc[i, "cell_line"] == first])
    with pytest.raises(ScdcaInputError, match="folds: cannot make"):
        fold_splits(one_line, "unseen_cell_zeroshot", 0)


def test_a_damaged_calibration_file_gets_a_clear_error(tmp_path):
    (tmp_path / "calibration.npz").write_bytes(b"not an npz")
    with pytest.raises(ScdcaInputError, match="calibration: .* delete it"):
        load_calibration(tmp_path)


@pytest.mark.parametrize("task", ["unseen_cell_zeroshot", "unseen_cell_fewshot"])
def test_a_line_task_s_splits_share_calibration_fits_with_the_same_result(tiny_data, task):
    fits = []

    def counted():
        fits.append(1)
        return make_model("ridge")

    splits = make_splits(tiny_data, task, 0)

    def calibrations(shared):
        return [
            calibrate(counted, tiny_data.subset(s.train), task, 0, k=5, exclude=s.held_out, shared=shared)
            for s in splits
        ]

    alone = calibrations(None)
    n_alone = len(fits)
    fits.clear()
    shared = SharedFits.for_splits(tiny_data, splits, 0)
    together = calibrations(shared)
    n_lines = tiny_data.conditions["cell_line"].nunique()
    assert n_lines == 3 and n_alone == 6  # two calibration lines per split
    assert len(fits) == 3  # one fit per pair of lines: each serves two splits
    assert len(shared) == 0  # and none is held once its last calibration took it
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.residuals, b.residuals)
        np.testing.assert_array_equal(a.sigmas, b.sigmas)


def test_shared_fits_hold_only_a_fit_that_will_be_asked_for_again():
    shared = SharedFits([("a",), ("b",), ("b",)])
    made = []
    assert shared.fit(("a",), lambda: made.append("a") or "A") == "A" and len(shared) == 0  # asked once: not held
    assert shared.fit(("b",), lambda: made.append("b") or "B") == "B" and len(shared) == 1
    assert shared.fit(("b",), lambda: made.append("b") or "B2") == "B" and len(shared) == 0  # reused, then dropped
    assert made == ["a", "b"]


@pytest.mark.parametrize(("n_drugs", "n_folds"), [(30, 3), (60, 2), (150, 1)])
def test_drug_folds_are_refitted_until_enough_drugs_are_held_out(n_drugs, n_folds):

    from .conftest import make_pb

    rng = np.random.default_rng(0)
    delta = {("L1", f"d{i}", x): rng.normal(size=4) for i in range(n_drugs) for x in (0.1, 1.0)}
    data = make_pb(delta, control={"L1": np.ones(4)}, smiles={f"d{i}": "C" * (i + 1) for i in range(n_drugs)})
    splits = fold_splits(data, "unseen_drug", 0)
    held = [set(data.conditions.loc[list(s.test), "drug"]) for s in splits]
    assert len(splits) == n_folds
    assert sum(map(len, held)) >= min(MIN_GROUPS, n_drugs)  # enough held-out drugs, or every one
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1 :])  # a drug is held out once
    for s, h in zip(splits, held):
        assert not h & set(data.conditions.loc[list(s.train), "drug"])  # never in its fold's training part


def test_the_interval_scale_ignores_a_shift_in_predicted_change_between_refits_and_the_final_model():
    rng = np.random.default_rng(3)
    oof = _noisy(rng, 300)
    oof.pred = oof.control + 1.5 * (oof.pred - oof.control)  # refits predicting larger changes
    cal = fit_calibration(oof)
    test = _noisy(rng, 300)  # the final model: the same noise, smaller predicted changes
    rows = np.arange(len(test.pred))[:, None]
    y = test.observed[rows, test.top]
    for smaller in (1.0, 0.5):  # how the final model's changes differ does not move its intervals
        pred = test.control + smaller * (test.pred - test.control)
        lower, upper = Intervals.of(cal, pred, test.control, test.dose).bounds(pred)
        np.testing.assert_allclose(
            upper - pred, Intervals.of(cal, test.pred, test.control, test.dose).sigma * cal.alpha(0.9), rtol=1e-5
        )
    lower, upper = Intervals.of(cal, test.pred, test.control, test.dose).bounds(test.pred)
    inside = (y >= lower[rows, test.top]) & (y <= upper[rows, test.top])
    assert abs(inside.mean() - 0.9) < 0.03, inside.mean()  # and they still cover at their level
    # the expected error still reads the predicted change, which sorts the errors within a model
    assert not np.allclose(
        cal.expected_mse(test.pred, test.control, test.dose), cal.expected_mse(pred, test.control, test.dose)
    )


def test_a_calibration_file_without_a_scale_fit_keeps_its_old_scale(tmp_path):
    rng = np.random.default_rng(4)
    cal = fit_calibration(_noisy(rng, 60))
    old = Calibration(
        **{
            k: getattr(cal, k)
            for k in ("gene_scale", "coef", "smear", "mean_expected", "residuals", "sigmas", "calibration_mse", "task")
        }
    )
    test = _noisy(rng, 10)
    X = np.exp(difficulty_features(test.pred, test.control, test.dose) @ cal.coef) * cal.smear
    np.testing.assert_allclose(
        old.scale(test.pred, test.control, test.dose),
        cal.gene_scale * np.sqrt(X / cal.mean_expected)[:, None],
        rtol=1e-5,
    )
    old.save(tmp_path / "calibration.npz")
    np.testing.assert_array_equal(
        load_calibration(tmp_path).scale(test.pred, test.control, test.dose),
        old.scale(test.pred, test.control, test.dose),
    )


def test_expected_error_grows_as_the_molecule_moves_away_from_the_training_molecules(tmp_path):
    rng = np.random.default_rng(5)
    oof = _noisy(rng, 300)
    oof.similarity = rng.uniform(0, 1, 300)  # the predicting model's nearest training molecule
    oof.observed = oof.pred + (oof.observed - oof.pred) * (1 + 3 * (1 - oof.similarity))[:, None]
    training = ["CCO", "CCCO", "CCCCO"]
    cal = fit_calibration(oof, training_smiles=training)
    assert cal.coef[3] < 0  # less similar, larger error
    test = _noisy(rng, 2)
    seen, far = ["CCO", "CCCO"], ["c1ccc2ccccc2c1", "c1ccc2ccccc2c1"]  # in training, and nothing like it
    near_mse = cal.expected_mse(test.pred, test.control, test.dose, seen)
    far_mse = cal.expected_mse(test.pred, test.control, test.dose, far)
    assert (far_mse > 3 * near_mse).all()
    with pytest.raises(ScdcaInputError, match="smiles"):
        cal.expected_mse(test.pred, test.control, test.dose)
    cal.save(tmp_path / "calibration.npz")
    back = load_calibration(tmp_path)
    assert list(back.training_smiles) == training
    np.testing.assert_array_equal(back.expected_mse(test.pred, test.control, test.dose, far), far_mse)
    # the interval scale does not read the similarity (refits know fewer molecules than the final model)
    np.testing.assert_array_equal(
        Intervals.of(cal, test.pred, test.control, test.dose, seen).sigma,
        Intervals.of(cal, test.pred, test.control, test.dose, far).sigma,
    )


def test_a_calibration_file_from_before_the_similarity_feature_needs_no_smiles(tmp_path):
    rng = np.random.default_rng(6)
    cal = fit_calibration(_noisy(rng, 60))
    cal.coef, cal.training_smiles = cal.coef[:3], None  # as such files were written: 3 coefficients
    cal.save(tmp_path / "calibration.npz")
    test = _noisy(rng, 10)
    X = difficulty_features(test.pred, test.control, test.dose)[:, :3]
    np.testing.assert_allclose(
        load_calibration(tmp_path).expected_mse(test.pred, test.control, test.dose),
        np.exp(X @ cal.coef) * cal.smear,
        rtol=1e-6,
    )


def test_out_of_fold_similarity_is_to_the_molecules_of_each_fold_s_training_part(tiny_data):
    from scdca.chem.molecules import NearestTraining

    split = make_splits(tiny_data, "unseen_drug", 0)[0]
    train = tiny_data.subset(split.train)
    cals = fold_splits(train, "unseen_drug", 0)
    oof = out_of_fold(lambda: make_model("train_mean"), train, cals, 5)
    expected = np.concatenate(
        [
            NearestTraining(train.subset(c.train).drug_smiles()).query(
                train.conditions.loc[list(c.test), "smiles"].tolist()
            )[0]
            for c in cals
        ]
    )
    np.testing.assert_allclose(oof.similarity, expected)
    assert (oof.similarity < 1).any()  # held-out drugs are new to their fold's model


def test_the_expected_error_reads_the_predicted_change_only_where_held_out_groups_support_it():
    from scdca.intervals import _chosen_columns

    rng = np.random.default_rng(7)
    n = 600
    logd = rng.choice([-1.0, 0.0, 1.0], n)
    X = np.column_stack([np.ones(n), logd, rng.normal(size=n), rng.uniform(size=n), logd**2])
    groups = np.repeat(np.arange(60), 10)
    noise = rng.normal(0, 0.5, n)
    assert 2 not in _chosen_columns(X, 1 + 0.5 * logd + noise, groups)  # the change is noise here: left out
    assert 2 in _chosen_columns(X, 1 + 0.5 * logd + X[:, 2] + noise, groups)  # here it sorts the errors
    assert _chosen_columns(X, logd, np.arange(n) % 2) == [0, 1, 2, 3, 4]  # two lines: too few to hold out, all read


def test_a_feature_that_never_varied_in_calibration_is_not_extrapolated():
    from scdca.intervals import _least_squares

    rng = np.random.default_rng(8)
    X = np.column_stack([np.ones(50), rng.normal(size=50), np.ones(50)])  # the last: every molecule seen
    y = 2 + X[:, 1] + rng.normal(0, 0.1, 50)
    coef = _least_squares(X, y)
    assert coef[2] == 0 and abs(coef[0] - 2) < 0.1  # the intercept carries the level; a new molecule reads it


def test_the_expected_error_never_falls_as_the_predicted_change_grows():
    from scdca.intervals import SIGNS, _least_squares

    rng = np.random.default_rng(9)
    n = 200
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n), rng.uniform(size=n), rng.normal(size=n)])
    y = 1 + 0.5 * X[:, 1] - 0.3 * X[:, 2] + 0.4 * X[:, 3] + rng.normal(0, 0.1, n)  # a fluke of one small screen
    free = _least_squares(X, y)
    bound = _least_squares(X, y, SIGNS)
    assert free[2] < -0.2 and free[3] > 0.2  # unconstrained, the fit follows the fluke
    assert abs(bound[2]) < 1e-12 and abs(bound[3]) < 1e-12 and abs(bound[1] - 0.5) < 0.05  # priors hold; dose read
