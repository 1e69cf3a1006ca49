"""The validation hold-out: disjoint, complete, seeded, study-wise; and how the runner loads it."""

from __future__ import annotations

import pytest

from relaylearn.assembly import load_split
from relaylearn.config import load_config
from relaylearn.data.split import validation_split
from relaylearn.errors import DataError
from tests.conftest import tiny_config


def test_split_is_disjoint_complete_and_about_the_fraction():
    train, val = validation_split(100, 0.15, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(100))
    assert len(val) == 15 and train == sorted(train) and val == sorted(val)
    assert len(validation_split(7, 0.01, seed=0)[1]) == 1, "at least one image is held out"
    assert validation_split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


def test_split_is_seeded_and_deterministic():
    assert validation_split(50, 0.2, seed=3) == validation_split(50, 0.2, seed=3)
    assert validation_split(50, 0.2, seed=3)[1] != validation_split(50, 0.2, seed=4)[1]


def test_split_keeps_every_study_on_one_side():
    groups = [f"study{i // 4}" for i in range(40)] + ["big"] * 10  # 10 studies of 4 slices, one of 10
    train, val = validation_split(len(groups), 0.3, seed=1, groups=groups)
    val_studies = {groups[i] for i in val}
    assert val_studies.isdisjoint({groups[i] for i in train})
    assert len(val) >= round(0.3 * len(groups)) and sorted(train + val) == list(range(len(groups)))
    # the same studies are held out whatever order the slices come in
    order = list(reversed(range(len(groups))))
    _, val_reversed = validation_split(len(groups), 0.3, seed=1, groups=[groups[i] for i in order])
    assert {groups[order[i]] for i in val_reversed} == val_studies


def test_split_errors():
    with pytest.raises(DataError, match="val_fraction"):
        validation_split(10, 1.0, seed=0)
    with pytest.raises(DataError, match="1 study"):
        validation_split(3, 0.2, seed=0, groups=["a", "a", "a"])
    with pytest.raises(DataError, match="2 group ids for 3"):
        validation_split(3, 0.2, seed=0, groups=["a", "b"])
    assert validation_split(2, 0.9, seed=0, groups=["a", "b"])[0], "one study always trains"


def test_runner_loads_train_and_val_parts_of_the_train_folder(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus)), ["dataset.kwargs.val_fraction=0.34"])
    ds = cfg.tasks[0].dataset  # Domain1: 6 training images
    train, val = load_split(ds, "train"), load_split(ds, "val")
    assert len(train) == 4 and len(val) == 2 and set(train.names).isdisjoint(val.names)
    assert train.images.shape[0] == 4 and val.labels.shape[0] == 2
    everything = load_split(ds.model_copy(update={"kwargs": ds.kwargs.model_copy(update={"val_fraction": 0.0})}), "train")
    assert sorted(train.names + val.names) == sorted(everything.names)
    test_names = load_split(ds, "test").names
    assert len(test_names) == 4, "the test split is never divided"
