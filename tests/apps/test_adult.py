"""Checks of the Adult loader against facts measured on the raw UCI files."""

from __future__ import annotations

import pytest
import torch

from fused_lagrangian_apps.datasets.adult import NUMERIC_COLUMNS, AdultData, load_adult


@pytest.fixture(scope="module")
def adult() -> AdultData:
    return load_adult()


def _all_groups(data: AdultData) -> torch.Tensor:
    return torch.cat([data.g_train, data.g_test])


def test_row_counts_follow_published_split(adult: AdultData) -> None:
    assert adult.x_train.shape[0] == adult.y_train.shape[0] == adult.g_train.shape[0] == 30_162
    assert adult.x_test.shape[0] == adult.y_test.shape[0] == adult.g_test.shape[0] == 15_060
    assert adult.x_train.shape[1] == adult.x_test.shape[1] == len(adult.feature_names)


def test_positive_rate(adult: AdultData) -> None:
    y = torch.cat([adult.y_train, adult.y_test])
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert y.mean().item() == pytest.approx(0.248, abs=0.002)
    # Both splits contribute positives: catches a test-label '.' left unstripped.
    assert 0.2 < adult.y_test.mean().item() < 0.3


def test_dtypes_and_no_nan(adult: AdultData) -> None:
    for x in (adult.x_train, adult.x_test):
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all()
    assert adult.y_train.dtype == torch.float32
    assert adult.g_train.dtype == adult.g_test.dtype == torch.int64
    assert load_adult(dtype=torch.float64).x_train.dtype == torch.float64


def test_numeric_features_standardised_on_train(adult: AdultData) -> None:
    k = len(NUMERIC_COLUMNS)
    assert adult.feature_names[:k] == list(NUMERIC_COLUMNS)
    numeric = adult.x_train[:, :k].double()
    assert numeric.mean(dim=0).abs().max().item() < 1e-5
    assert torch.allclose(numeric.std(dim=0, correction=0), torch.ones(k, dtype=torch.float64))
    # Test rows reuse the train statistics, so their means are not exactly 0.
    assert adult.x_test[:, :k].mean(dim=0).abs().max().item() > 1e-3


def test_one_hot_block_aligned_across_splits(adult: AdultData) -> None:
    k = len(NUMERIC_COLUMNS)
    assert len(set(adult.feature_names)) == len(adult.feature_names)
    for x in (adult.x_train, adult.x_test):
        one_hot = x[:, k:]
        assert set(one_hot.unique().tolist()) == {0.0, 1.0}
        # One active column per categorical attribute (8 attributes).
        assert (one_hot.sum(dim=1) == 8).all()
    assert "native-country=Holand-Netherlands" in adult.feature_names  # train-only category


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        (("race",), 5),
        (("sex",), 2),
        (("race", "sex"), 10),
        (("race", "sex", "age"), 59),
        (("race", "sex", "age", "marital"), 304),
        (("race", "sex", "age", "education"), 687),
    ],
)
def test_group_counts_and_dense_ids(group_by: tuple[str, ...], expected: int) -> None:
    data = load_adult(group_by)
    assert data.num_groups == len(data.group_names) == len(set(data.group_names)) == expected
    g = _all_groups(data)
    assert g.min().item() == 0 and g.max().item() == expected - 1
    assert (torch.bincount(g, minlength=expected) > 0).all()
    assert torch.equal(data.group_sizes_train, torch.bincount(data.g_train, minlength=expected))
    assert all(name.count("|") == len(group_by) - 1 for name in data.group_names)


def test_smallest_race_sex_group() -> None:
    data = load_adult(("race", "sex"))
    sizes = torch.bincount(_all_groups(data), minlength=data.num_groups)
    assert sizes.min().item() == 126
    assert data.group_names[sizes.argmax().item()] == "White|Male"


def test_age_bins_follow_documented_edges() -> None:
    data = load_adult(("age",))
    assert data.group_names == [
        "age <=25", "age 26-35", "age 36-45", "age 46-55", "age 56-65", "age 66+"
    ]
    age = torch.cat([data.x_train[:, 0], data.x_test[:, 0]])  # standardised, order-preserving
    g = _all_groups(data)
    distinct = [age[g == k].unique().numel() for k in range(data.num_groups)]
    assert distinct[:5] == [9, 10, 10, 10, 10]  # ages 17-25, then whole decades
    for k in range(data.num_groups - 1):
        assert age[g == k].max() < age[g == k + 1].min()


def test_group_names_follow_sorted_attribute_order() -> None:
    data = load_adult(("race", "sex", "age"))
    assert data.group_names[0] == "Amer-Indian-Eskimo|Female|age <=25"
    assert data.group_names[-1] == "White|Male|age 66+"


def test_repeated_loads_are_equal_and_independent(adult: AdultData) -> None:
    again = load_adult()
    assert torch.equal(again.x_train, adult.x_train)
    assert torch.equal(again.g_test, adult.g_test)
    again.x_train.zero_()
    assert adult.x_train.abs().sum() > 0
    assert load_adult().x_train.abs().sum() > 0


@pytest.mark.parametrize("group_by", [(), ("race", "race"), ("income",)])
def test_invalid_group_by_rejected(group_by: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        load_adult(group_by)
