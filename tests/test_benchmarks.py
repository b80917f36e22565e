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
from bench.problems import BlockConfig, FlatProblem, StepProblem, TrainingProblem
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
