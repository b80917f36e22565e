"""FSDP2 (fully_shard) with 2 real processes on CPU: the step runs on the local shards, the state stays sharded,
the gathered parameters and the multipliers equal one process fed the global batches, and a
torch.distributed.checkpoint save / load resumes bit-identically."""

from __future__ import annotations

from dist_comparisons import assert_bitwise_equal, assert_close


def test_multipliers_bitwise_identical_and_gathered_parameters_match_single_process(
        distributed_run, single_process_run) -> None:
    rank0, rank1 = distributed_run.results("fsdp")
    assert_bitwise_equal(rank0["run"], rank1["run"])
    assert_close(rank0["run"], single_process_run, atol=1e-6)


def test_parameters_and_state_are_sharded(distributed_run) -> None:
    rank0, rank1 = distributed_run.results("fsdp")
    assert rank0["state_is_sharded"] and rank1["state_is_sharded"]
    # Linear(6, 8), Linear(8, 1): dim 0 split over 2 ranks, the last rank's share of the 1-row layer empty.
    assert rank0["local_numel"] == [24, 4, 8, 1]
    assert rank1["local_numel"] == [24, 4, 0, 0]


def test_checkpoint_round_trip_resumes_bit_identically(distributed_run) -> None:
    for result in distributed_run.results("fsdp"):
        assert_bitwise_equal(result["resumed"], result["run"])
