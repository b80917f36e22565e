"""UCI Adult (Census Income) loader with intersectional group ids.

The raw files ship with the package in ``adult/`` (see ``adult/README.md`` for
the CC BY 4.0 attribution).  Only torch, numpy and the standard library are
used so that the data layer adds no dependencies to the package.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent / "adult"

COLUMNS: tuple[str, ...] = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)
CATEGORICAL_COLUMNS: tuple[str, ...] = (
    "workclass",
    "education",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "native-country",
)

# Upper-exclusive integer age edges of the six age bins:
# [17,26) [26,36) [36,46) [46,56) [56,66) [66,90].  Equivalently the
# right-closed bins (.,25] (25,35] (35,45] (45,55] (55,65] (65,.), i.e. what
# pandas.cut([0,25,35,45,55,65,inf]) gives; these are the bins behind the
# published group counts (59 race x sex x age groups, 304 with marital status,
# 687 with education).  Left-closed [25,35)... bins give 59 / 303 / 684.
AGE_EDGES: tuple[int, ...] = (26, 36, 46, 56, 66)

# group_by key -> raw column ("age" is binned with AGE_EDGES instead).
GROUP_ATTRIBUTES: dict[str, str] = {
    "race": "race",
    "sex": "sex",
    "age": "age",
    "marital": "marital-status",
    "education": "education",
}


@dataclass(frozen=True)
class AdultData:
    """Adult features, labels and group ids on the published train/test split.

    ``x_*`` are standardised numeric columns followed by one-hot categorical
    columns (names in ``feature_names``); ``y_*`` are 0/1 floats (1 = income
    >50K); ``g_*`` are int64 ids in ``[0, num_groups)`` naming
    ``group_names[id]``.  Ids are dense over train union test, so a group may
    be missing from one split (``group_sizes_train`` can contain zeros).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    g_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    g_test: torch.Tensor
    feature_names: list[str]
    group_names: list[str]
    num_groups: int
    group_sizes_train: torch.Tensor


def _read_rows(path: Path) -> list[list[str]]:
    """Rows of one gzip split with every field present ('?' rows dropped).

    Comment lines (the test file starts with ``|1x3 Cross validator``) and
    blank lines are skipped.
    """
    with gzip.open(path, "rt", newline="") as handle:
        rows = [
            row
            for row in csv.reader(handle, skipinitialspace=True)
            if row and not row[0].startswith("|") and "?" not in row
        ]
    if any(len(row) != len(COLUMNS) for row in rows):
        raise ValueError(f"{path}: expected {len(COLUMNS)} fields in every row")
    return rows


@dataclass(frozen=True)
class _Encoded:
    """Train rows followed by test rows, numeric and integer-coded.

    Categorical codes index ``categories[column]``, the sorted categories of
    train union test, so one-hot columns and group ids align across splits.
    """

    num_train: int
    numeric: np.ndarray
    codes: dict[str, np.ndarray]
    categories: dict[str, list[str]]
    positive: np.ndarray


def _encode_categorical(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Codes into the sorted distinct values (a dict lookup: faster than np.unique on str)."""
    categories = sorted(set(values))
    index = {category: i for i, category in enumerate(categories)}
    codes = np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values))
    return codes, categories


@lru_cache(maxsize=1)
def _encoded() -> _Encoded:
    """Parse and encode both splits once per process; everything after this is cheap."""
    train = _read_rows(DATA_DIR / "adult.data.gz")
    test = _read_rows(DATA_DIR / "adult.test.gz")
    fields = dict(zip(COLUMNS, zip(*(train + test))))
    numeric = np.stack(
        [np.fromiter(map(float, fields[c]), dtype=np.float64) for c in NUMERIC_COLUMNS], axis=1
    )
    codes, categories = {}, {}
    for column in CATEGORICAL_COLUMNS:
        codes[column], categories[column] = _encode_categorical(fields[column])
    # Test labels carry a trailing '.', e.g. ">50K.".
    positive = np.fromiter(
        (label.rstrip(".") == ">50K" for label in fields["income"]), dtype=bool
    )
    for array in (numeric, positive, *codes.values()):
        array.setflags(write=False)
    return _Encoded(len(train), numeric, codes, categories, positive)


def _age_labels(edges: Sequence[int]) -> list[str]:
    """Readable labels for the bins that ``np.searchsorted(edges, age, "right")`` yields."""
    labels = [f"age <={edges[0] - 1}"]
    labels += [f"age {lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
    labels.append(f"age {edges[-1]}+")
    return labels


def _group_ids(data: _Encoded, group_by: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Dense group ids for all rows and one name per id.

    Groups are the attribute combinations present in train union test,
    numbered in lexicographic order of the attribute codes (categories sorted,
    age bins ascending) so the mapping is deterministic.
    """
    codes, labels = [], []
    for key in group_by:
        if key == "age":
            age = data.numeric[:, NUMERIC_COLUMNS.index("age")]
            codes.append(np.searchsorted(AGE_EDGES, age, side="right"))
            labels.append(_age_labels(AGE_EDGES))
        else:
            column = GROUP_ATTRIBUTES[key]
            codes.append(data.codes[column])
            labels.append(data.categories[column])
    shape = tuple(len(label) for label in labels)
    combos, ids = np.unique(np.ravel_multi_index(codes, shape), return_inverse=True)
    combo_codes = np.stack(np.unravel_index(combos, shape), axis=1).tolist()
    names = ["|".join(label[code] for label, code in zip(labels, combo)) for combo in combo_codes]
    return ids, names


def _features(data: _Encoded) -> tuple[np.ndarray, list[str]]:
    """Standardised numeric columns then one-hot categorical columns, all rows.

    Numeric columns use train mean/std only, so no test statistics leak in.
    """
    train_numeric = data.numeric[: data.num_train]
    mean, std = train_numeric.mean(axis=0), train_numeric.std(axis=0)
    widths = [len(data.categories[c]) for c in CATEGORICAL_COLUMNS]
    offsets = len(NUMERIC_COLUMNS) + np.cumsum([0, *widths[:-1]])
    x = np.zeros((len(data.numeric), len(NUMERIC_COLUMNS) + sum(widths)))
    x[:, : len(NUMERIC_COLUMNS)] = (data.numeric - mean) / std
    hot = offsets + np.stack([data.codes[c] for c in CATEGORICAL_COLUMNS], axis=1)
    np.put_along_axis(x, hot, 1.0, axis=1)
    names = list(NUMERIC_COLUMNS)
    names += [f"{c}={category}" for c in CATEGORICAL_COLUMNS for category in data.categories[c]]
    return x, names


def load_adult(
    group_by: Sequence[str] = ("race", "sex", "age"),
    dtype: torch.dtype = torch.float32,
) -> AdultData:
    """Load UCI Adult with groups given by any combination of attributes.

    ``group_by`` takes keys from ``GROUP_ATTRIBUTES`` ("race", "sex", "age",
    "marital", "education"); ``"age"`` uses the six bins of ``AGE_EDGES``.
    Rows with a missing value are dropped (45,222 remain: 30,162 train and
    15,060 test).  The protected attributes stay in the features; drop their
    columns via ``feature_names`` if a blind model is wanted.
    """
    unknown = [key for key in group_by if key not in GROUP_ATTRIBUTES]
    if unknown or not group_by or len(set(group_by)) != len(group_by):
        raise ValueError(
            f"group_by must be distinct keys from {sorted(GROUP_ATTRIBUTES)}, got {group_by!r}"
        )
    data = _encoded()
    x, feature_names = _features(data)
    ids, group_names = _group_ids(data, group_by)
    n = data.num_train
    # Splits are cloned so that each owns its storage (torch.save of a view
    # would otherwise write both splits).
    x_all = torch.from_numpy(x).to(dtype)
    y_all = torch.from_numpy(data.positive.copy()).to(dtype)
    g_all = torch.from_numpy(ids.astype(np.int64))
    return AdultData(
        x_train=x_all[:n].clone(),
        y_train=y_all[:n].clone(),
        g_train=g_all[:n].clone(),
        x_test=x_all[n:].clone(),
        y_test=y_all[n:].clone(),
        g_test=g_all[n:].clone(),
        feature_names=feature_names,
        group_names=group_names,
        num_groups=len(group_names),
        group_sizes_train=torch.bincount(g_all[:n], minlength=len(group_names)),
    )
