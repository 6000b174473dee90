import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scdca.data.splits import TASKS, Split, audit, make_splits
from scdca.errors import LeakageError, ScdcaInputError
from tests.conftest import make_pb


def grid(n_lines=3, n_drugs=20, doses=(0.1, 1.0), drop=()):
    drugs = [f"d{i}" for i in range(n_drugs)]
    delta = {
        (f"L{c}", d, x): np.zeros(4) for c in range(n_lines) for d in drugs for x in doses if (f"L{c}", d) not in drop
    }
    return make_pb(delta, control={f"L{c}": np.ones(4) for c in range(n_lines)}, smiles={d: "CCO" for d in drugs})


def test_unseen_drug_holds_out_30_percent_of_drugs_with_all_their_doses():
    data = grid(n_drugs=20)
    (s,) = make_splits(data, "unseen_drug", 0)
    test_drugs = set(data.conditions.loc[list(s.test), "drug"])
    assert len(test_drugs) == 6
    assert len(s.test) == 6 * 3 * 2  # every line and dose of each test drug


def test_unseen_pair_holds_out_half_the_pairs():
    data = grid(n_drugs=20)
    (s,) = make_splits(data, "unseen_pair", 1)
    pairs = set(zip(data.conditions.loc[list(s.test), "drug"], data.conditions.loc[list(s.test), "cell_line"]))
    assert len(pairs) == 30 and len(s.test) == 60
    # some test drugs are seen in training in other lines: that is the point of this task
    assert set(data.conditions.loc[list(s.train), "drug"]) & {d for d, _ in pairs}


def test_fewshot_one_split_per_line_with_ten_percent_of_its_drugs_in_training():
    data = grid(n_drugs=20)
    splits = make_splits(data, "unseen_cell_fewshot", 0)
    assert [s.held_out for s in splits] == ["L0", "L1", "L2"]
    for s in splits:
        train = data.conditions.loc[list(s.train)]
        assert train.loc[train["cell_line"] == s.held_out, "drug"].nunique() == 2
        assert len(s.test) == 18 * 2


def test_zeroshot_sees_nothing_of_the_held_out_line():
    data = grid()
    for s in make_splits(data, "unseen_cell_zeroshot", 0):
        assert s.held_out not in set(data.conditions.loc[list(s.train), "cell_line"])
        assert set(data.conditions.loc[list(s.test), "cell_line"]) == {s.held_out}


def test_splits_are_seeded():
    data = grid()
    for task in TASKS:
        assert make_splits(data, task, 3) == make_splits(data, task, 3)
    assert make_splits(data, "unseen_drug", 0) != make_splits(data, "unseen_drug", 1)


def test_split_json_roundtrip(tmp_path):
    (s,) = make_splits(grid(), "unseen_drug", 0)
    s.save(tmp_path / "s.json")
    assert Split.load(tmp_path / "s.json") == s


@pytest.mark.parametrize(
    "task,move",
    [
        ("unseen_drug", "drug"),
        ("unseen_pair", "pair"),
        ("unseen_cell_zeroshot", "line"),
        ("unseen_cell_fewshot", "line"),
    ],
)
def test_audit_catches_leaks(task, move):
    data = grid()
    s = make_splits(data, task, 0)[0]
    test = data.conditions.loc[list(s.test)]
    # move one test condition's sibling (same drug / pair / line, other dose) into training
    victim = test.index[0]
    sib = test.index[(test["drug"] == test.loc[victim, "drug"]) & (test.index != victim)]
    if move == "pair":
        sib = test.index[
            (test["drug"] == test.loc[victim, "drug"])
            & (test["cell_line"] == test.loc[victim, "cell_line"])
            & (test.index != victim)
        ]
    leaky = Split(s.task, s.seed, s.held_out, s.train + (sib[0],), tuple(i for i in s.test if i != sib[0]))
    with pytest.raises(LeakageError):
        audit(leaky, data)


def test_audit_catches_overlap():
    data = grid()
    (s,) = make_splits(data, "unseen_drug", 0)
    with pytest.raises(LeakageError, match="in train and test"):
        audit(Split(s.task, s.seed, "", s.train + s.test[:1], s.test), data)


def test_error_task_with_no_test_conditions():
    data = grid(n_drugs=1)  # 30% of one drug rounds to zero test drugs
    with pytest.raises(ScdcaInputError, match="no test conditions"):
        make_splits(data, "unseen_drug", 0)


def test_error_unknown_task_lists_choices():
    with pytest.raises(ScdcaInputError, match="unseen_cell_zeroshot"):
        make_splits(grid(), "unseen_everything", 0)


@settings(max_examples=40, deadline=None)
@given(
    n_lines=st.integers(2, 4),
    n_drugs=st.integers(4, 25),
    seed=st.integers(0, 10_000),
    task=st.sampled_from(TASKS),
    drop_frac=st.floats(0.0, 0.3),
)
def test_property_no_split_ever_leaks(n_lines, n_drugs, seed, task, drop_frac):
    """Checked directly from the condition table, independently of `audit`."""
    rng = np.random.default_rng(seed)
    drop = {(f"L{c}", f"d{d}") for c in range(n_lines) for d in range(n_drugs) if rng.random() < drop_frac}
    data = grid(n_lines=n_lines, n_drugs=n_drugs, drop=drop)
    try:
        splits = make_splits(data, task, seed)
    except ScdcaInputError:
        return  # too small for this task: refused loudly, which is fine
    for s in splits:
        tr, te = data.conditions.loc[list(s.train)], data.conditions.loc[list(s.test)]
        assert not set(s.train) & set(s.test)
        assert set(s.train) | set(s.test) == set(data.ids)
        if task == "unseen_drug":
            assert not set(tr["drug"]) & set(te["drug"])
        elif task == "unseen_pair":
            assert not set(zip(tr["drug"], tr["cell_line"])) & set(zip(te["drug"], te["cell_line"]))
        else:
            assert set(te["cell_line"]) == {s.held_out}
            seen = tr.loc[tr["cell_line"] == s.held_out, "drug"]
            if task == "unseen_cell_zeroshot":
                assert len(seen) == 0
            else:
                assert not set(seen) & set(te["drug"])


def test_unseen_drug_line_holds_out_new_drugs_in_a_held_out_line_both_new_at_once():
    data = grid(n_lines=3, n_drugs=20)
    splits = make_splits(data, "unseen_drug_line", 0)
    assert [s.held_out for s in splits] == ["L0", "L1", "L2"]
    cond = data.conditions
    for s in splits:
        train, test = cond.loc[list(s.train)], cond.loc[list(s.test)]
        assert set(test["cell_line"]) == {s.held_out} and s.held_out not in set(train["cell_line"])
        assert not set(test["drug"]) & set(train["drug"]) and test["drug"].nunique() == 6  # 30% of 20
        assert len(test) == 6 * 2  # every dose of the new drugs in that line


def test_unseen_dose_holds_out_each_pairs_top_dose():
    data = grid(n_drugs=5, doses=(0.1, 1.0, 10.0))
    (s,) = make_splits(data, "unseen_dose", 0)
    cond = data.conditions
    assert set(cond.loc[list(s.test), "dose"]) == {10.0} and len(s.test) == 15
    assert set(cond.loc[list(s.train), "dose"]) == {0.1, 1.0}


@pytest.mark.parametrize("task", ["unseen_drug_line", "unseen_dose"])
def test_audit_catches_leaks_in_the_new_tasks(task):
    data = grid(doses=(0.1, 1.0, 10.0))
    s = make_splits(data, task, 0)[0]
    cond = data.conditions
    test = cond.loc[list(s.test)]
    if task == "unseen_dose":  # swap a pair's held-out top dose with its training dose below: top in training
        top = test.index[0]
        pair = (cond["drug"] == test.loc[top, "drug"]) & (cond["cell_line"] == test.loc[top, "cell_line"])
        lower = cond.index[pair & (cond["dose"] == 1.0)][0]
        leaky = Split(s.task, s.seed, "", tuple(i for i in s.train if i != lower) + (top,),
                      tuple(i for i in s.test if i != top) + (lower,))  # fmt: skip
    else:  # a new drug's condition in another line
        d = test["drug"].iloc[0]
        moved = cond.index[(cond["drug"] == d) & (cond["cell_line"] != s.held_out)][0]
        leaky = Split(s.task, s.seed, s.held_out, s.train + (moved,), s.test)
    with pytest.raises(LeakageError):
        audit(leaky, data)


@pytest.mark.parametrize("task", ["unseen_cell_zeroshot", "unseen_cell_fewshot"])
def test_line_folds_pool_small_lines_into_two_folds_until_enough_conditions_are_held_out(task):
    """A LINCS signature file has 2-3 conditions per line: two lines would hold out a handful.
    The folds then pool more lines (each held out as the task's rule does) into two folds."""
    from scdca.data.splits import MAX_FOLD_LINES, fold_splits, make_splits

    from ..conftest import make_pb

    rng = np.random.default_rng(0)
    drugs = ["aspirin", "caffeine", "ibuprofen", "paracetamol"]
    delta = {(f"L{i:02d}", d, 1.0): rng.normal(size=4) for i in range(30) for d in drugs[: 2 + i % 3]}
    small = make_pb(delta, control={f"L{i:02d}": np.ones(4) for i in range(30)})
    folds = fold_splits(small, task, 0)
    assert len(folds) == 2
    lines = [line for f in folds for line in f.held_out.split("|")]
    assert len(lines) == len(set(lines)) and 2 < len(lines) <= MAX_FOLD_LINES
    cond = small.conditions
    for f in folds:
        assert not set(f.train) & set(f.test) and f.test
        for line in f.held_out.split("|"):  # each line held out by its own split's rule
            own = make_splits(small, task, 0, lines=[line])[0]
            assert set(own.test) <= set(f.test) and set(f.train) <= set(own.train)
        if task == "unseen_cell_zeroshot":
            assert not set(cond.loc[list(f.train), "cell_line"]) & set(f.held_out.split("|"))
    # lines with many conditions: one line per fold, as before
    big = make_pb(
        {(f"L{i}", d, x): rng.normal(size=4) for i in range(3) for d in drugs for x in range(1, 13)},
        control={f"L{i}": np.ones(4) for i in range(3)},
    )
    plain = fold_splits(big, task, 0)
    assert all("|" not in f.held_out for f in plain) and len(plain) == 2
