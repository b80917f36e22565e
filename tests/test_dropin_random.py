"""Randomized differential test of the drop-in contract: 1,000 seeded cases (dropin_cases.py), each on
every CPU backend against the reference and torch.optim after every step.

Reproduce one case: ``python -c "import sys; sys.path.insert(0, 'tests'); import dropin_cases as c;
c.run_case(SEED, ['reference', 'native'])"``.  More cases: ``DROPIN_RANDOM_CASES=20000 pytest ...``.
"""

from __future__ import annotations

import os

import pytest

from conftest import CPU_BACKENDS
from dropin_cases import run_case

CASES = int(os.environ.get("DROPIN_RANDOM_CASES", "1000"))
CHUNKS = 10


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_cases_match_reference_and_torch_optim(chunk):
    for seed in range(chunk, CASES, CHUNKS):
        run_case(seed, CPU_BACKENDS)
