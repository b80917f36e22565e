"""Synthetic binary classification data with many long-tailed intersectional groups.

Adult has at most a few hundred groups and 45k rows; this generator scales
the same structure (race x sex x age x region) to millions of rows so the
constrained-training code can be exercised and timed at size.  Everything
is vectorised and driven by one seeded ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Per-feature std of the group-specific mean shift added to x.  It lets a
# model partly recognise groups from x (as on real data) without making
# groups separable.
GROUP_SHIFT = 0.5

# Rows per chunk when adding group shifts, bounding the temporary to
# CHUNK_ROWS x num_features instead of a second copy of x.
CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class SyntheticData:
    """Rows in random order with their intersectional group ids.

    ``x`` is float32 (num_rows, num_features), ``y`` float32 0/1, ``g`` int64
    ids in ``[0, num_groups)``; ``group_sizes[k]`` counts rows of group k and
    ``base_rates[k]`` is its intended P(y=1).  Group k is
    ``group_names[k]`` = "race{r}|sex{s}|age{a}|region{j}" with
    ``k = ((r * sexes + s) * age_bins + a) * regions + j``.
    """

    x: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    group_sizes: torch.Tensor
    base_rates: torch.Tensor
    group_names: list[str]
    num_groups: int

    def train_test_split(self, test_fraction: float = 0.2) -> tuple[SyntheticData, SyntheticData]:
        """Split off the last ``test_fraction`` of rows as a test set.

        Rows are already in random order, so a contiguous split is a random
        one; the parts are views (no copy), which matters at 10^7 rows.
        Small groups may be absent from one part.
        """
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        cut = len(self.g) - round(test_fraction * len(self.g))

        def part(rows: slice) -> SyntheticData:
            g = self.g[rows]
            return SyntheticData(
                x=self.x[rows],
                y=self.y[rows],
                g=g,
                group_sizes=torch.bincount(g, minlength=self.num_groups),
                base_rates=self.base_rates,
                group_names=self.group_names,
                num_groups=self.num_groups,
            )

        return part(slice(0, cut)), part(slice(cut, None))


def _zipf_sizes(num_rows: int, weights: torch.Tensor) -> torch.Tensor:
    """Group sizes proportional to ``weights``, each at least one row, summing to num_rows.

    One row per group is reserved first so the rarest groups exist at any
    scale; the rest is shared by largest remainder, which is exact and
    deterministic (unlike multinomial sampling).
    """
    spare = num_rows - len(weights)
    quota = spare * weights.double() / weights.double().sum()
    sizes = quota.floor().long()
    shortfall = spare - int(sizes.sum())
    sizes[torch.argsort(quota - sizes, descending=True, stable=True)[:shortfall]] += 1
    return sizes + 1


def _calibrated_offsets(base_rates: torch.Tensor, signal: float) -> torch.Tensor:
    """Logit offsets c with E[sigmoid(c + signal * Z)] = base_rate, Z ~ N(0, 1).

    Using logit(base_rate) as the intercept would shrink every group's rate
    towards 0.5 once the shared signal is added; solving for c keeps the
    groups' positive rates at their base rates.  The expectation is 64-node
    Gauss-Hermite quadrature and the solve is bisection (monotone in c).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    nodes_t = torch.from_numpy(nodes) * signal
    weights_t = torch.from_numpy(weights / weights.sum())
    target = base_rates.double()
    lo = torch.full_like(target, -30.0)
    hi = torch.full_like(target, 30.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        too_high = torch.sigmoid(mid[:, None] + nodes_t) @ weights_t > target
        hi = torch.where(too_high, mid, hi)
        lo = torch.where(too_high, lo, mid)
    return (lo + hi) / 2


def make_synthetic(
    num_rows: int,
    num_features: int = 16,
    races: int = 5,
    sexes: int = 2,
    age_bins: int = 6,
    regions: int = 9,
    seed: int = 0,
    zipf_a: float = 1.2,
    signal: float = 2.0,
) -> SyntheticData:
    """Generate ``num_rows`` rows over races x sexes x age_bins x regions groups.

    - Group sizes follow Zipf(``zipf_a``) over a random ranking of the groups
      (long tail; largest / median is ~800 at the defaults) and every group
      has at least one row, so ``num_rows`` must be at least the group count.
    - Each group gets a base rate drawn uniformly from [0.1, 0.3].
    - x = z + mu_g with z ~ N(0, I) and a per-group shift mu_g ~ N(0, GROUP_SHIFT^2 I);
      y ~ Bernoulli(sigmoid(c_g + w.z)) with a shared direction w of norm
      ``signal`` and c_g calibrated so P(y=1 | group) equals the base rate.
    Same arguments give identical tensors.
    """
    num_groups = races * sexes * age_bins * regions
    if num_rows < num_groups:
        raise ValueError(f"num_rows ({num_rows}) must be >= number of groups ({num_groups})")
    gen = torch.Generator().manual_seed(seed)

    ranks = torch.randperm(num_groups, generator=gen).double() + 1
    group_sizes = _zipf_sizes(num_rows, ranks.pow(-zipf_a))
    base_rates = 0.1 + 0.2 * torch.rand(num_groups, generator=gen, dtype=torch.float64)
    group_shift = GROUP_SHIFT * torch.randn(num_groups, num_features, generator=gen)
    w = torch.randn(num_features, generator=gen)
    w *= signal / w.norm()

    g = torch.repeat_interleave(torch.arange(num_groups), group_sizes)
    g = g[torch.randperm(num_rows, generator=gen)]
    x = torch.randn(num_rows, num_features, generator=gen)
    logits = _calibrated_offsets(base_rates, signal).float()[g] + x @ w
    y = (torch.rand(num_rows, generator=gen) < torch.sigmoid(logits)).float()
    for start in range(0, num_rows, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        x[rows] += group_shift[g[rows]]

    group_names = [
        f"race{r}|sex{s}|age{a}|region{j}"
        for r in range(races)
        for s in range(sexes)
        for a in range(age_bins)
        for j in range(regions)
    ]
    return SyntheticData(
        x=x,
        y=y,
        g=g,
        group_sizes=group_sizes,
        base_rates=base_rates.float(),
        group_names=group_names,
        num_groups=num_groups,
    )
