"""Randomized differential test of the drop-in contract: 1,000 seeded cases (dropin_cases.py), each on
every CPU backend (the ``backend`` fixture) against the reference and torch.optim after every step.

Reproduce one case: ``python -c "import sys; sys.path.insert(0, 'tests'); import dropin_cases as c;
c.run_case(SEED, 'native')"``.  More cases: ``DROPIN_RANDOM_CASES=20000 pytest tests/test_dropin_random.py``.
"""

from __future__ import annotations

import os

import pytest

from dropin_cases import run_case

CASES = int(os.environ.get("DROPIN_RANDOM_CASES", "1000"))
CHUNKS = 10


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_cases_match_reference_and_torch_optim(backend, chunk):
    for seed in range(chunk, CASES, CHUNKS):
        run_case(seed, backend)
