"""Checks of the synthetic intersectional data generator."""

from __future__ import annotations

import math

import pytest
import torch

from fused_lagrangian_apps.datasets.synthetic import SyntheticData, make_synthetic

NUM_ROWS = 100_000


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return make_synthetic(NUM_ROWS)


def test_shapes_and_dtypes(data: SyntheticData) -> None:
    assert data.x.shape == (NUM_ROWS, 16) and data.x.dtype == torch.float32
    assert data.y.shape == (NUM_ROWS,) and data.y.dtype == torch.float32
    assert data.g.shape == (NUM_ROWS,) and data.g.dtype == torch.int64
    assert set(data.y.unique().tolist()) == {0.0, 1.0}
    assert torch.isfinite(data.x).all()
    assert make_synthetic(1_000, num_features=3).x.shape == (1_000, 3)


def test_same_seed_same_data_other_seed_differs(data: SyntheticData) -> None:
    again = make_synthetic(NUM_ROWS)
    for a, b in [(again.x, data.x), (again.y, data.y), (again.g, data.g)]:
        assert torch.equal(a, b)
    assert torch.equal(again.base_rates, data.base_rates)
    other = make_synthetic(NUM_ROWS, seed=1)
    assert not torch.equal(other.g, data.g)
    assert not torch.equal(other.x, data.x)
    assert not torch.equal(other.base_rates, data.base_rates)


def test_groups_dense_and_sizes_consistent(data: SyntheticData) -> None:
    assert data.num_groups == 5 * 2 * 6 * 9 == 540
    assert len(data.group_names) == len(set(data.group_names)) == 540
    assert data.group_names[0] == "race0|sex0|age0|region0"
    assert data.group_names[-1] == "race4|sex1|age5|region8"
    assert data.g.min().item() == 0 and data.g.max().item() == 539
    assert torch.equal(data.group_sizes, torch.bincount(data.g, minlength=540))
    assert data.group_sizes.sum().item() == NUM_ROWS


def test_every_group_non_empty_down_to_one_row_each() -> None:
    tiny = make_synthetic(540)
    assert (tiny.group_sizes == 1).all()
    assert (make_synthetic(5_400).group_sizes >= 1).all()
    with pytest.raises(ValueError):
        make_synthetic(539)


def test_group_sizes_long_tailed(data: SyntheticData) -> None:
    sizes = data.group_sizes.double()
    assert sizes.max() > 50 * sizes.median()
    # Rows are shuffled, not sorted by group.
    assert (data.g[1:] != data.g[:-1]).float().mean() > 0.5


def test_base_rates_in_range(data: SyntheticData) -> None:
    assert data.base_rates.shape == (540,)
    assert data.base_rates.min() >= 0.1 and data.base_rates.max() <= 0.3
    assert data.base_rates.max() - data.base_rates.min() > 0.15  # actually spread out


def test_empirical_positive_rate_tracks_base_rate(data: SyntheticData) -> None:
    sizes = data.group_sizes
    positives = torch.bincount(data.g, weights=data.y.double(), minlength=540)
    big = sizes >= 2_000
    assert big.sum() >= 5
    rate = positives[big] / sizes[big]
    base = data.base_rates[big].double()
    tolerance = 4 * torch.sqrt(base * (1 - base) / sizes[big])
    assert ((rate - base).abs() < tolerance).all()
    overall = (data.base_rates.double() * sizes).sum() / NUM_ROWS
    assert data.y.mean().item() == pytest.approx(overall.item(), abs=4 * math.sqrt(0.25 / NUM_ROWS))


def test_features_carry_learnable_signal(data: SyntheticData) -> None:
    design = torch.cat([data.x, torch.ones(NUM_ROWS, 1)], dim=1).double()
    score = (design @ torch.linalg.lstsq(design, data.y.double()[:, None]).solution).squeeze(1)
    ranks = score.argsort().argsort().double() + 1
    positives = data.y.sum().item()
    negatives = NUM_ROWS - positives
    auc = (ranks[data.y == 1].sum().item() - positives * (positives + 1) / 2) / (
        positives * negatives
    )
    assert auc > 0.75


def test_train_test_split(data: SyntheticData) -> None:
    train, test = data.train_test_split(0.2)
    assert len(train.g) == 80_000 and len(test.g) == 20_000
    assert torch.equal(torch.cat([train.x, test.x]), data.x)
    assert torch.equal(torch.cat([train.g, test.g]), data.g)
    assert torch.equal(train.group_sizes + test.group_sizes, data.group_sizes)
    assert torch.equal(test.group_sizes, torch.bincount(test.g, minlength=540))
    assert train.num_groups == test.num_groups == 540
    with pytest.raises(ValueError):
        data.train_test_split(1.0)
