"""DistributedDataParallel with 2 real processes (gloo, CPU): the ranks stay bitwise identical and equal one
process fed the global batches, including the parameters (the blocks' terms give the global-batch gradient)."""

from __future__ import annotations

import torch

from dist_comparisons import assert_bitwise_equal, assert_close
from dist_worker import reference_run


def test_every_block_is_active_in_the_oracle(single_process_run) -> None:
    # Otherwise the comparisons below could not see a wrong primal term or a missing exchange.
    for name, multipliers in single_process_run["multipliers"].items():
        assert multipliers.abs().max() > 1e-2, name


def test_ranks_are_bitwise_identical(distributed_run) -> None:
    rank0, rank1 = distributed_run.results("ddp")
    assert_bitwise_equal(rank0["run"], rank1["run"])
    assert rank0["run"]["report"] == rank1["run"]["report"]


def test_matches_single_process_on_the_global_batches(distributed_run, single_process_run) -> None:
    rank0, _ = distributed_run.results("ddp")
    assert_close(rank0["run"], single_process_run, atol=1e-6)
    assert rank0["run"]["report"].keys() == single_process_run["report"].keys()


def test_state_dict_is_the_same_on_every_rank(distributed_run) -> None:
    rank0, rank1 = distributed_run.results("ddp")
    for name, block in rank0["state_dict"]["constraints"].items():
        assert torch.equal(block["multipliers"], rank1["state_dict"]["constraints"][name]["multipliers"])
        assert torch.equal(block["dual_state"], rank1["state_dict"]["constraints"][name]["dual_state"])


def test_resume_from_a_checkpoint_saved_once_by_rank_0(distributed_run) -> None:
    for result in distributed_run.results("ddp"):
        assert_bitwise_equal(result["resumed"], result["run"])


def test_nan_on_one_rank_raises_on_every_rank_and_changes_nothing(distributed_run) -> None:
    rank0, rank1 = distributed_run.results("bad_input")
    for result in (rank0, rank1):
        assert "'parity'" in result["errors"]["nan"] and "NaN or inf on 1 of 2 ranks" in result["errors"]["nan"]
        assert_bitwise_equal(result["after_errors"], result["before"])
    # Blocks called before the failing one kept their samples, on every rank alike.
    assert rank0["pending"] == rank1["pending"] == {
        "per_sample": True, "parity": False, "mean_rate": False, "group_floor": False}
    assert_bitwise_equal(rank0["final"], rank1["final"])


def test_invalid_ids_on_one_rank_raise_on_every_rank(distributed_run) -> None:
    rank0, rank1 = distributed_run.results("bad_input")
    assert "ids out of range" in rank0["errors"]["ids"]
    assert "'per_sample'" in rank1["errors"]["ids"] and "invalid input on 1 other rank" in rank1["errors"]["ids"]


def test_nan_skip_skips_identically_and_matches_single_process(distributed_run) -> None:
    rank0, rank1 = distributed_run.results("nan_skip")
    assert_bitwise_equal(rank0["run"], rank1["run"])
    oracle = reference_run(poison_steps=(2, 5), nonfinite="skip")
    assert_close(rank0["run"], oracle, atol=1e-6)
    for report in (rank0["run"]["report"], rank1["run"]["report"], oracle["report"]):
        assert report["parity"]["nonfinite_skipped"] == 2
        assert report["per_sample"]["nonfinite_skipped"] == 0


def test_observe_records_the_global_batch_like_a_call(distributed_run, single_process_run) -> None:
    rank0, rank1 = distributed_run.results("observe")
    assert_bitwise_equal(rank0["run"], rank1["run"])
    oracle = reference_run(observe_parity=True)
    assert_close(rank0["run"], oracle, atol=1e-6)
    # Without its term the parity block no longer shapes the model, but its multipliers still move.
    assert oracle["multipliers"]["parity"].abs().max() > 1e-2
    assert not torch.equal(oracle["params"][0], single_process_run["params"][0])
