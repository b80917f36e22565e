"""The benchmark harness at toy sizes: every candidate measured, the same update computed, valid outputs.

No timing is asserted here (speed is what ``fused-lagrangian bench`` reports); what is checked is that
the run is complete and honest: each candidate produced numbers, the constrained candidates agree with
each other (cooper-optim and hand-written PyTorch as oracles), and the report files are well formed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import fused_backends, run_cases
from bench.problems import (BlockCallProblem, BlockConfig, FlatProblem, SmallModelData, SmallModelProblem,
                            StepProblem, TrainingProblem)
from bench.small_model_candidates import small_model_candidates
from bench.sweeps import Case
from bench.timing import time_interleaved

pytest.importorskip("cooper")

TOY_BLOCKS = (BlockConfig("indexed", 100, 64), BlockConfig("grouped", 10, 64))
TOY_CASES = [
    Case("params", StepProblem(1000), threads=1),
    Case("params", StepProblem(1000, TOY_BLOCKS), threads=1),
    Case("threads", StepProblem(1000, TOY_BLOCKS, algorithm="sgd"), threads=1),
    Case("indexed", StepProblem(1000, (BlockConfig("indexed", 50, 64),)), threads=1),
    Case("indexed", StepProblem(1000, (BlockConfig("indexed", 5000, 64),)), threads=1),
    Case("flat", FlatProblem(1000, 64, (50, 5000)), threads=1),
    Case("grouped", StepProblem(1000, (BlockConfig("grouped", 7, 64),)), threads=1),
    Case("training", TrainingProblem(num_samples=1000, batch=32, hidden=(16,)), threads=1),
]
CONSTRAINED = {"cooper", "unfused"}
FLAT_NS = ("5e+01", "5e+03")


def is_constrained(record: dict) -> bool:
    return record["sweep"] in ("training", "flat") or bool(record["config"]["blocks"])


def is_oracle(name: str) -> bool:
    return name.partition(" @")[0] == "unfused"


RESULT_FIELDS = {"median_s", "min_s", "max_s", "samples_s", "steps_per_sample", "ratio_to_torch_fused",
                 "fraction_of_ceiling", "effective_GBps"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run_cases(TOY_CASES, str(out), repetitions=2, sample_seconds=0.0, mode="toy", command="test",
                        log=lambda line: None)
    return out, results


def test_every_candidate_produced_numbers(run):
    _, results = run
    fused = {f"fused:{name}" for name in fused_backends(torch.device("cpu"))}
    assert "fused:reference" in fused
    for record in results["cases"]:
        expected = fused | {"torch_fused", "ceiling"}
        if record["sweep"] == "flat":  # every constrained candidate but Cooper at each N, one floor
            expected = {f"{name} @N={n}" for name in fused | {"unfused"} for n in FLAT_NS} | {"torch_fused", "ceiling"}
        elif is_constrained(record):
            expected |= CONSTRAINED
        assert set(record["results"]) == expected, record["config"]
        assert record["skipped"] == {}
        assert record["attempts"] == 1  # the default policy never retries
        assert record["others_cpu_fraction"] is None or record["others_cpu_fraction"] >= 0
        for entry in record["results"].values():
            assert set(entry) == RESULT_FIELDS
            assert len(entry["samples_s"]) == 2
            assert 0 < entry["min_s"] <= entry["median_s"] <= entry["max_s"]
            assert math.isfinite(entry["ratio_to_torch_fused"]) and entry["fraction_of_ceiling"] > 0
        assert record["results"]["torch_fused"]["ratio_to_torch_fused"] == 1.0
        assert record["results"]["ceiling"]["fraction_of_ceiling"] == 1.0


def test_candidates_compute_the_same_update(run):
    """Same steps on the same inputs: fused, Cooper and hand-written PyTorch end at the same point."""
    _, results = run
    for record in results["cases"]:
        constrained = is_constrained(record)
        # The oracle is not compared with itself, the ceiling computes nothing comparable, and with
        # constraints the unconstrained floor takes a different path.
        names = {name for name in record["results"] if name not in ("ceiling", "torch_fused")
                 and not (constrained and is_oracle(name))}
        assert set(record["agreement"]) == names, record["config"]
        for name, entry in record["agreement"].items():
            if constrained:
                assert set(entry) == {"multipliers_vs_unfused", "params_vs_unfused"}
            for difference in entry.values():
                assert difference < 1e-5, (record["config"], name, entry)


def test_report_files(run):
    out, results = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == "fused_lagrangian.bench/1"
    assert on_disk["cases"] == json.loads(json.dumps(results["cases"]))
    for key in ("cpu_model", "logical_cpus", "torch_threads", "torch_version", "backends", "auto_backend"):
        assert key in on_disk["machine"]
    markdown = (out / "results.md").read_text()
    for name in results["cases"][1]["results"]:
        assert f"| {name} |" in markdown
    for name in ("headline.png", "step_vs_params.png", "step_vs_constraints.png", "step_vs_groups.png",
                 "training_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_are_evaluated_and_reported(run):
    out, results = run
    found = {target["target"] for target in results["targets"]}
    # The toy run has no case at >= 10^6 parameters or N >= 10^7: only the flatness target applies.
    assert found == {"flat_in_n", "cooper_grows_with_n"}
    markdown = (out / "results.md").read_text()
    for target in results["targets"]:
        assert target["met"] == (target["value"] <= target["threshold"] if target["comparison"] == "<="
                                 else target["value"] >= target["threshold"])
        verdict = "not a target" if target["candidate"] == "fused:reference" else \
            "met" if target["met"] else "**MISSED**"
        assert f"{target['value']:.2f} {verdict}" in markdown
        assert f"| {target['target']} | {target['case']} |" in markdown


def test_interleaving_rotates_the_candidates():
    sequence = []
    steps = {name: (lambda name=name: sequence.append(name)) for name in "abc"}
    timings = time_interleaved(steps, repetitions=3, inner={"a": 2, "b": 2, "c": 1}, warmup=1)
    # Warm-up once each, then repetition r starts at candidate r, each running its own steps per sample.
    assert "".join(sequence) == "abc" + "aabbc" + "bbcaa" + "caabb"
    assert all(len(t.samples) == 3 for t in timings.values())


# The block-call and small-model sweeps at toy sizes, in a run of their own: their candidates have no
# ceiling and the block call no floor, which the checks of the step sweeps above assume.
TOY_FORWARD_CASES = [
    Case("blockcall", BlockCallProblem(batch=64, num_groups=(10, 10**5)), threads=1),
    Case("smallmodel", SmallModelProblem(features=12, batch=16), threads=1),
]
BLOCK_CALL_VARIANTS = ("forward", "forward+backward")


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_forward")
    results = run_cases(TOY_FORWARD_CASES, str(out), repetitions=2, sample_seconds=0.0, mode="toy",
                        command="test", log=lambda line: None)
    return out, {record["sweep"]: record for record in results["cases"]}, results


def expected_forward_candidates(sweep: str) -> set[str]:
    fused = {f"fused:{name}" for name in fused_backends(torch.device("cpu"))}
    if sweep == "blockcall":
        return {f"{name} @K={k} {variant}" for name in fused | {"unfused"} for k in ("1e+01", "1e+05")
                for variant in BLOCK_CALL_VARIANTS}
    return fused | {f"{name} @no blocks" for name in fused} | {"unfused", "torch_fused", "torch_adam"}


def test_block_call_and_small_model_candidates_produced_numbers(forward_run):
    _, records, _ = forward_run
    assert set(records) == {"blockcall", "smallmodel"}
    for sweep, record in records.items():
        assert set(record["results"]) == expected_forward_candidates(sweep)
        assert record["skipped"] == {}
        for entry in record["results"].values():
            assert set(entry) == RESULT_FIELDS
            assert len(entry["samples_s"]) == 2
            assert 0 < entry["min_s"] <= entry["median_s"] <= entry["max_s"]
    # The small model's floor is torch's fused Adam; a block call has no optimizer step to compare with.
    assert records["smallmodel"]["results"]["torch_fused"]["ratio_to_torch_fused"] == 1.0
    assert all(entry["ratio_to_torch_fused"] is None for entry in records["blockcall"]["results"].values())


def test_block_call_and_small_model_agree_with_the_oracle(forward_run):
    """Each fused call gives the hand-written call's term and gradient; each constrained step the oracle's
    multipliers and parameters; the unconstrained steps torch's fused Adam's parameters."""
    _, records, _ = forward_run
    call = records["blockcall"]
    assert set(call["agreement"]) == {name for name in call["results"] if name.startswith("fused:")}
    for entry in call["agreement"].values():
        assert set(entry) == {"multipliers_vs_unfused", "params_vs_unfused"}
        assert max(entry.values()) < 1e-5, entry
    model = records["smallmodel"]
    fused = {f"fused:{name}" for name in fused_backends(torch.device("cpu"))}
    assert set(model["agreement"]) == fused | {f"{name} @no blocks" for name in fused} | {"torch_adam"}
    for name, entry in model["agreement"].items():
        expected = {"params_vs_torch_fused"} if " @" in name or name == "torch_adam" else \
            {"multipliers_vs_unfused", "params_vs_unfused"}
        assert set(entry) == expected, name
        assert max(entry.values()) < 1e-5, (name, entry)


def test_small_model_oracle_moves_the_multipliers():
    """The agreement above is not vacuous: after a few steps some multipliers are positive, and every
    backend's equal the hand-written ones."""
    factories = small_model_candidates(SmallModelData(SmallModelProblem(), torch.device("cpu")),
                                       fused_backends(torch.device("cpu")))
    candidates = {name: factory() for name, factory in factories.items()
                  if name == "unfused" or (name.startswith("fused:") and " @" not in name)}
    for _ in range(5):
        for candidate in candidates.values():
            candidate.step()
    oracle = candidates.pop("unfused").multipliers()
    assert [m.numel() for m in oracle] == [2, 3]
    assert all(bool((m > 0).any()) for m in oracle)
    for name, candidate in candidates.items():
        for mine, expected in zip(candidate.multipliers(), oracle):
            torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6, msg=name)


def test_block_call_and_small_model_targets(forward_run):
    out, _, results = forward_run
    fused = {f"fused:{name}" for name in fused_backends(torch.device("cpu"))}
    by_name: dict[str, list[dict]] = {}
    for target in results["targets"]:
        by_name.setdefault(target["target"], []).append(target)
    assert set(by_name) == {"block_call_flat_in_k", "small_model_constraint_cost"}
    # One row per variant (forward + backward, forward alone) for the call, one for the small model.
    call_rows = [(t["candidate"], variant) for t in by_name["block_call_flat_in_k"]
                 for variant in BLOCK_CALL_VARIANTS if f"({variant})" in t["case"]]
    assert sorted(call_rows) == sorted((name, variant) for name in fused for variant in BLOCK_CALL_VARIANTS)
    assert {t["candidate"] for t in by_name["small_model_constraint_cost"]} == fused
    markdown = (out / "results.md").read_text()
    for target in results["targets"]:
        assert target["threshold"] == 1.5 and target["comparison"] == "<="
        assert target["met"] == (target["value"] <= 1.5)
        assert f"| {target['target']} | {target['case']} |" in markdown
        assert f"{target['value']:.2f} " in markdown
    for sweep in ("blockcall", "smallmodel"):
        assert f"## Sweep `{sweep}`" in markdown
