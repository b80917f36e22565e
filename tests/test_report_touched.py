"""report() on large blocks reads only the touched multipliers (touched.py): the same figures as a scan of
all K, and a scan again whenever something the steps did not see wrote the multipliers."""

from __future__ import annotations

import pytest
import torch

from fused_lagrangian import LagrangianAdam
from fused_lagrangian.touched import SCAN_FRACTION, TRACK_FROM, multiplier_summary

K = 1 << 20  # scans start past K / 32 = 32,768 touched ids


def _scanned(block) -> tuple[float, float, int]:
    return multiplier_summary(block.multipliers, None, float(block.spec.init))


def _reported(block) -> tuple[float, float, int]:
    report = block.report()
    return report["multiplier_mean"], report["multiplier_max"], report["multiplier_nonzero"]


def _assert_same_summary(block) -> None:
    mean, largest, nonzero = _reported(block)
    scan_mean, scan_largest, scan_nonzero = _scanned(block)
    assert mean == pytest.approx(scan_mean, rel=1e-5, abs=1e-9)
    assert largest == scan_largest
    assert nonzero == scan_nonzero


def _model_and_optimizer(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)


def _train(model, optimizer, block, steps: int, batch: int = 256, generator=None, padded: bool = False,
           id_range: int = K) -> None:
    generator = generator or torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch, 3, generator=generator)
        ids = torch.randint(0, id_range, (batch,), generator=generator)
        if padded:  # (B, 2) memberships, a quarter of the second column padding
            second = torch.randint(0, id_range, (batch,), generator=generator)
            second[torch.rand(batch, generator=generator) < 0.25] = -1
            ids = torch.stack([ids, second], dim=1)
        loss = model(x).pow(2).mean() + block(model(x).squeeze(1) - 0.1, ids=ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("kind,sense,init", [("indexed", "<=", 0.0), ("grouped", "<=", 0.5), ("grouped", "==", 0.0)])
def test_touched_report_equals_full_scan(backend, kind, sense, init):
    model, optimizer = _model_and_optimizer(backend)
    block = optimizer.add_constraint("big", kind=kind, num_constraints=K, sense=sense, dual_lr=0.5, init=init)
    assert block.touched is not None
    _train(model, optimizer, block, steps=30, padded=kind == "grouped")
    touched = block.touched.ids(block.multipliers)
    assert touched is not None and 0 < touched.numel() < K  # the report really reads a subset
    _assert_same_summary(block)
    _train(model, optimizer, block, steps=5, generator=torch.Generator().manual_seed(7))  # more after a read
    _assert_same_summary(block)


def test_merges_bound_the_queue_and_keep_the_set(backend):
    model, optimizer = _model_and_optimizer(backend)
    block = optimizer.add_constraint("big", kind="grouped", num_constraints=K, dual_lr=0.5)
    # 200 x 512 ids from 5,000 groups: the queue passes K / 32 three times, the set stays 5,000.
    _train(model, optimizer, block, steps=200, batch=512, id_range=5000)
    assert block.touched._queued_entries <= K * SCAN_FRACTION
    _assert_same_summary(block)
    assert block.touched.ids(block.multipliers).numel() == 5000


def test_a_set_larger_than_a_scan_switches_to_scans(backend):
    model, optimizer = _model_and_optimizer(backend)
    block = optimizer.add_constraint("big", kind="indexed", num_constraints=K, dual_lr=0.5)
    _train(model, optimizer, block, steps=100, batch=512)  # ~50,000 distinct ids > K / 32
    assert block.touched.ids(block.multipliers) is None
    _assert_same_summary(block)


def test_writes_the_steps_did_not_see_make_the_report_rescan(backend):
    model, optimizer = _model_and_optimizer(backend)
    block = optimizer.add_constraint("big", kind="indexed", num_constraints=K, dual_lr=0.5)
    _train(model, optimizer, block, steps=10)
    _assert_same_summary(block)
    with torch.no_grad():
        block.multipliers[K - 1] = 7.0  # an id no step touched
    _assert_same_summary(block)
    assert _reported(block)[1] == 7.0

    # A write between two steps, then a step: the step must not hide the write.
    with torch.no_grad():
        block.multipliers[K - 2] = 9.0
    _train(model, optimizer, block, steps=1)
    assert _reported(block)[1] == 9.0
    _assert_same_summary(block)

    # New multipliers in place of the old tensor (a fresh tensor's version counter starts again at 0).
    replacement = torch.zeros_like(block.multipliers)
    replacement[K - 3] = 11.0
    block.multipliers = replacement
    assert _reported(block)[1] == 11.0
    _assert_same_summary(block)

    # A checkpoint from another run: its multipliers are everywhere.
    other_model, other = _model_and_optimizer(backend)
    other_block = other.add_constraint("big", kind="indexed", num_constraints=K, dual_lr=0.5)
    _train(other_model, other, other_block, steps=10, generator=torch.Generator().manual_seed(3))
    block.load_state_dict(other_block.state_dict())
    _assert_same_summary(block)
    assert _reported(block) == pytest.approx(_reported(other_block))


def test_a_write_before_the_first_step_is_seen(backend):
    """A warm start written into the multipliers before any step: the steps' ids alone would miss it."""
    model, optimizer = _model_and_optimizer(backend)
    block = optimizer.add_constraint("big", kind="indexed", num_constraints=K, dual_lr=0.5)
    with torch.no_grad():
        block.multipliers.fill_(0.25)
    _train(model, optimizer, block, steps=3)
    assert _reported(block)[2] > K // 2  # nonzero almost everywhere
    _assert_same_summary(block)


def test_small_and_dense_blocks_are_scanned_whole():
    model, optimizer = _model_and_optimizer("reference")
    assert optimizer.add_constraint("small", kind="indexed", num_constraints=TRACK_FROM - 1).touched is None
    assert optimizer.add_constraint("dense", num_constraints=TRACK_FROM).touched is None


def test_summary_of_untouched_multipliers_at_init():
    multipliers = torch.full((10,), 0.25)
    multipliers[3] = 2.0
    multipliers[5] = 0.0
    touched = torch.tensor([3, 5])
    assert multiplier_summary(multipliers, touched, 0.25) == pytest.approx((4.0 / 10, 2.0, 9))
    assert multiplier_summary(multipliers, touched, 0.25) == pytest.approx(multiplier_summary(multipliers, None, 0.25))


def test_compiled_steps_make_the_report_rescan():
    model, optimizer = _model_and_optimizer("native" if "native" in _backends() else "reference")
    block = optimizer.add_constraint("big", kind="indexed", num_constraints=K, dual_lr=0.5)
    _train(model, optimizer, block, steps=3)
    compiled_step = torch.compile(optimizer.step, fullgraph=True)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(64, 3, generator=generator)
        ids = torch.randint(0, K, (64,), generator=generator)
        loss = model(x).pow(2).mean() + block(model(x).squeeze(1) - 0.1, ids=ids)
        optimizer.zero_grad()
        loss.backward()
        compiled_step()
    _assert_same_summary(block)


def _backends():
    from tests.conftest import CPU_BACKENDS

    return CPU_BACKENDS
