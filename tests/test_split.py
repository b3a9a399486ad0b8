"""Patient-level splits: deterministic, disjoint, complete, and no validation slice in training."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctseg.data import discover_cases
from ctseg.data.cache import cache_cases
from ctseg.data.dataset import SliceDataset
from ctseg.data.split import check_split, load_split, make_split, save_split
from ctseg.errors import ConfigError

NAMES = [f"Case_{i:03d}" for i in range(10)]


def _assert_partition(split: dict, names: list[str]) -> None:
    subsets = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(len(s) for s in subsets) == len(names)
    assert set().union(*subsets) == set(names)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not subsets[i] & subsets[j]


def test_fractions_are_deterministic_and_disjoint():
    cfg = {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.1}
    a = make_split(NAMES, cfg)
    b = make_split(list(reversed(NAMES)), cfg)  # input order does not matter
    assert a == b
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (7, 2, 1)
    _assert_partition(a, NAMES)
    others = [make_split(NAMES, {**cfg, "seed": s}) for s in range(4, 9)]
    assert any(o["val"] != a["val"] for o in others)


def test_small_fraction_still_gives_one_validation_case():
    split = make_split(["a", "b", "c"], {"val_fraction": 0.2})
    assert len(split["val"]) == 1 and len(split["train"]) == 2


@given(n=st.integers(2, 40), val=st.floats(0.01, 0.45), test=st.floats(0.0, 0.45), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_fraction_split_is_always_a_partition(n, val, test, seed):
    names = [f"c{i}" for i in range(n)]
    try:
        split = make_split(names, {"seed": seed, "val_fraction": val, "test_fraction": test})
    except ConfigError:
        return  # too few cases for the requested subsets: refused, never leaked
    _assert_partition(split, names)
    assert split["train"] and split["val"]


def test_kfold_validation_sets_cover_every_case_once():
    cfg = {"seed": 1, "folds": 4, "test_fraction": 0.2}
    splits = [make_split(NAMES, {**cfg, "fold": f}) for f in range(4)]
    test = set(splits[0]["test"])
    assert all(set(s["test"]) == test for s in splits)
    seen = [c for s in splits for c in s["val"]]
    assert sorted(seen) == sorted(set(NAMES) - test)
    for s in splits:
        _assert_partition(s, NAMES)
        assert s["method"] == "kfold"


def test_explicit_lists_and_refusals():
    split = make_split(NAMES, {"val": ["Case_001"], "test": ["Case_002"]})
    assert split["val"] == ["Case_001"] and split["test"] == ["Case_002"]
    assert len(split["train"]) == 8 and "Case_001" not in split["train"]
    with pytest.raises(ConfigError, match="both"):
        make_split(NAMES, {"train": ["Case_001", "Case_003"], "val": ["Case_001"]})
    with pytest.raises(ConfigError, match="unknown"):
        make_split(NAMES, {"val": ["Case_999"]})
    with pytest.raises(ConfigError, match="folds"):
        make_split(NAMES, {"folds": 20})
    with pytest.raises(ConfigError):
        make_split(["a", "b"], {"val_fraction": 0.5, "test_fraction": 0.5})
    with pytest.raises(ConfigError, match="both"):
        check_split({"train": ["a"], "val": ["b"], "test": ["a"]})


def test_split_json_round_trip(tmp_path):
    split = make_split(NAMES, {"seed": 0})
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == split


def test_training_slices_come_only_from_training_cases(phantom_dir, tmp_path):
    cases = discover_cases(phantom_dir)
    split = make_split([c.name for c in cases], {"seed": 0, "val_fraction": 0.34})
    config = {"data": {"size": [32, 32]}}
    by_name = {c.name: c for c in cases}
    dataset = SliceDataset(cache_cases([by_name[n] for n in split["train"]], config, tmp_path))
    seen = {dataset[i]["case"] for i in range(len(dataset))}
    assert seen == set(split["train"])
    assert not seen & (set(split["val"]) | set(split["test"]))
