"""Tiny versions of every path of ``fused-lagrangian demo``: report.json's fields agree with each other and
with the data, and the plots are real PNG images.  Then full-length runs: the Lagrangian run's sensitivity
to dual_lr, overlapping groups, and the README's tables against a fresh run of the default demo."""

import json
import shlex
from pathlib import Path

import matplotlib.image
import pytest

from fused_lagrangian_apps import cli, demo, readme_tables

METRICS = ("accuracy", "positive_rate", "dp_gap", "eo_gap", "max_violation", "groups_violated",
           "worst_group_error", "smallest_group_size", "feasible")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_demo(tmp_path, *options, penalties="1,100", capsys=None):
    out = tmp_path / "out"
    argv = ["--epochs", "4", "--penalties", penalties, "--record-every", "1", "--no-progress", "--out", str(out),
            *options]
    assert demo.main(argv) == 0
    return json.loads((out / "report.json").read_text()), out


def check_report(report, out, num_penalties, min_group_size=10, sensitivity=True):
    runs = report["runs"]
    lagrangian_runs = [r for r in runs if r["formulation"] == "lagrangian"]
    assert runs[0]["label"] == "unconstrained" and lagrangian_runs[0]["label"] == "lagrangian"
    assert [r["dual_lr_scale"] for r in lagrangian_runs] == ([1.0, 0.3, 3.0] if sensitivity else [1.0])
    thresholds = [r for r in runs if r["formulation"] == "thresholds"]
    assert len(thresholds) == (report["config"]["constraint"] != "group-loss" and not report["config"]["marginals"])
    assert len(runs) == num_penalties + 1 + len(thresholds) + len(lagrangian_runs)
    for run in runs:
        for split in ("train", "test"):
            assert set(METRICS) <= set(run[split])
            assert 0.0 <= run[split]["accuracy"] <= 1.0
            assert run[split]["feasible"] == (run[split]["max_violation"] <= report["config"]["tolerance"])
        assert run["wall_s"] > 0
    summary = report["summary"]
    sweep = [r for r in runs if r["formulation"] == "quadratic"]
    assert summary["num_runs"] == len(runs)
    assert summary["sweep_runs"] == num_penalties
    assert summary["sweep_feasible"] == sum(r["train"]["feasible"] for r in sweep)
    groups = report["groups"]
    assert len(groups) == summary["num_groups"]
    constrained = [g for g in groups if g["constrained"]]
    assert summary["constrained_groups"] == len(constrained)
    assert all(g["constrained"] == (g["train_size"] >= min_group_size) for g in groups
               if report["config"]["constraint"] != "eo")
    assert summary["smallest_constrained_group_train"] == min(g["train_size"] for g in constrained)
    lagrangian = lagrangian_runs[0]["train"]
    assert summary["lagrangian"]["accuracy"] == lagrangian["accuracy"]
    assert len(summary["sensitivity"]) == len(lagrangian_runs)
    assert summary["lagrangian"]["test_max_violation_large_groups"] == lagrangian_runs[0]["test"][
        "max_violation_large_groups"]
    assert report["command"].startswith("fused-lagrangian demo") and "--out" not in report["command"]
    feasible_accuracies = [r["train"]["accuracy"] for r in sweep if r["train"]["feasible"]]
    best = summary["best_feasible_penalty"]
    assert (best["accuracy"] if best else None) == max(feasible_accuracies, default=None)
    assert summary["least_violating_penalty"]["max_violation"] == min(r["train"]["max_violation"] for r in sweep)
    gap = summary["accuracy_gap_to_best_feasible_penalty"]
    if thresholds:  # fitted on the training rows to hold every constraint there, when a choice can
        assert thresholds[0]["train"]["feasible"]
        assert summary["group_thresholds"]["test_accuracy"] == thresholds[0]["test"]["accuracy"]
    else:
        assert summary["group_thresholds"] is None
    assert summary["criterion_met"] == (lagrangian["feasible"] and (gap is None or gap <= 0.02))
    if report["config"]["constraint"] == "dp":
        check_intervals(report)
    for name in report["plots"]:
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100
    return summary


def check_intervals(report):
    """Every group with test rows has a Wilson interval around its rate; the count of intervals outside the
    bound in the runs' test metrics is the one of the groups table."""
    for group in report["groups"]:
        if group["test_size"] == 0:
            continue
        low, high = group["lagrangian_rate_test_interval"]
        assert 0.0 <= low <= group["lagrangian_rate_test"] + 1e-12 <= high + 2e-12 <= 1.0 + 2e-12
        if group["test_size"] <= 10:  # a few rows cannot pin a rate down: the interval says so
            assert high - low > 0.25
    outside = sum(g["lagrangian_test_interval_outside_bound"] for g in report["groups"] if g["test_size"])
    assert report["summary"]["lagrangian"]["test_groups_outside_bound_by_interval"] == outside
    check_sampling_noise(report)


def check_sampling_noise(report):
    """The summary's sampling-noise figure is the largest train-to-test move of (rate - overall rate) of the
    unconstrained model over the large constrained groups, recomputed here from the groups table."""
    shift = report["summary"]["unconstrained_rate_shift_large_groups"]
    if not any(r["formulation"] == "unconstrained" for r in report["runs"]):
        assert shift is None
        return
    overall_train = report["overall_rates"]["unconstrained"]["train"]
    moves = [abs(g["unconstrained_rate_test_minus_overall"] - (g["unconstrained_rate_train"] - overall_train))
             for g in report["groups"]
             if g["constrained"] and g["test_size"] >= report["config"]["large_group_rows"]]
    assert shift == pytest.approx(max(moves), abs=1e-6)
    chance = report["summary"]["chance_test_target_at_bound"]
    large = [g for g in report["groups"] if g["constrained"] and g["test_size"] >= report["config"]["large_group_rows"]]
    assert (chance is None) == (not large)
    assert chance is None or 0.0 <= chance <= 1.0


def test_adult_demographic_parity(tmp_path, capsys):
    report, out = run_demo(tmp_path)
    summary = check_report(report, out, num_penalties=2)
    assert summary["num_groups"] == 59
    assert sum(g["train_size"] for g in report["groups"]) == 30162
    assert sum(g["test_size"] for g in report["groups"]) == 15060
    printed = capsys.readouterr().out
    assert "penalty sweep (2 runs)" in printed and "criterion" in printed and "report.json" in printed
    assert "#CI out" in printed and "groups with >= 100 test rows:" in printed


def test_two_dataset_scheme_overlapping_groups_and_minibatches(tmp_path, capsys):
    report, out = run_demo(tmp_path, "--held-out", "0.3", "--marginals", "race,sex", "--batch-size", "4096",
                           "--epochs", "2", "--runs", "unconstrained,penalties,thresholds,lagrangian", penalties="10")
    assert "group thresholds: not run" in capsys.readouterr().out  # a row in three groups has no one threshold
    summary = check_report(report, out, num_penalties=1, sensitivity=False)
    assert summary["num_groups"] == 59 + 5 + 2  # intersections, races, sexes
    marginal = {g["group"]: g for g in report["groups"] if g["group"].startswith(("race=", "sex="))}
    assert marginal["sex=Female"]["train_size"] + marginal["sex=Male"]["train_size"] == 30162
    assert sum(g["train_size"] for g in report["groups"]) == 3 * 30162  # every row in three groups
    assert summary["constraint_rows"] + summary["primal_rows"] > 30162  # small groups' rows are in both
    # 2 epochs of ceil(rows fitted / 4096) steps: the baselines fit every row, the Lagrangian run the primal ones
    steps = {r["formulation"]: r["total_steps"] for r in report["runs"]}
    assert steps == {"unconstrained": 2 * 8, "quadratic": 2 * 8, "lagrangian": 2 * -(-summary["primal_rows"] // 4096)}


def test_adult_equal_opportunity_on_fewer_groups(tmp_path):
    report, out = run_demo(tmp_path, "--constraint", "eo", "--groups", "race,sex", "--penalties", "10")
    summary = check_report(report, out, num_penalties=1)
    assert summary["num_groups"] == 10


def test_adult_bounded_group_loss_last_iterates(tmp_path):
    report, out = run_demo(tmp_path, "--constraint", "group-loss", "--epsilon", "0.6", "--select-window", "0")
    check_report(report, out, num_penalties=2)
    assert all(r["selected_step"] == 4 and r["train"] == r["last_iterate"]["train"] for r in report["runs"])


def test_synthetic_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "synthetic"
    code = cli.main(["demo", "--dataset", "synthetic", "--rows", "4000", "--epochs", "3", "--penalties", "1",
                     "--min-group-size", "20", "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    summary = check_report(report, out, num_penalties=1, min_group_size=20)
    assert summary["num_groups"] == 540
    assert sum(g["train_size"] + g["test_size"] for g in report["groups"]) == 4000
    assert "synthetic" in capsys.readouterr().out


def test_bad_options_are_rejected():
    for argv in (["--groups", "race,height"], ["--penalties", "1,x"], ["--penalties", "-1"], ["--epochs", "0"],
                 ["--runs", "penalties"], ["--held-out", "1"], ["--batch-size", "0"], ["--marginals", "height"],
                 ["--constraint", "group-loss", "--held-out", "0.3"], ["--augmented", "-1"],
                 ["--anneal-fraction", "0"], ["--anneal-fraction", "1.5"], ["--dual-warmup", "1"],
                 ["--dual-warmup", "-0.1"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)


def test_chance_of_the_test_target_at_the_bound():
    """Exact binomial CDFs: closed form on tiny groups, and a simulation on the demo's sizes."""
    import torch

    from fused_lagrangian_apps.demo_report import chance_within

    assert chance_within(torch.tensor([2]), 0.5, 0.5) == pytest.approx(0.75)  # P(X <= 1), X ~ Bin(2, 1/2)
    assert chance_within(torch.tensor([2, 2]), 0.5, 0.5) == pytest.approx(0.75 ** 2)
    assert chance_within(torch.tensor([3]), 0.2, 1.0) == pytest.approx(1.0)
    sizes = torch.tensor([127, 198, 1067, 2401, 116])
    generator = torch.Generator().manual_seed(0)
    draws = torch.binomial(sizes.double().expand(200_000, -1), torch.full((200_000, 5), 0.19, dtype=torch.float64),
                           generator=generator) / sizes
    simulated = float((draws <= 0.21).all(dim=1).double().mean())
    assert chance_within(sizes, 0.19, 0.21) == pytest.approx(simulated, abs=0.005)


def test_lr_schedule_anneals_over_its_fraction_then_holds():
    from fused_lagrangian_apps.demo_training import CosineThenHold

    schedule = CosineThenHold(total_steps=100, fraction=0.5, floor=0.01)
    assert schedule(0) == 1.0
    assert schedule(25) == pytest.approx(0.505)  # half way down the cosine
    assert [schedule(step) for step in (50, 75, 99)] == pytest.approx([0.01] * 3)
    whole_run = CosineThenHold(total_steps=100, fraction=1.0, floor=0.0)
    assert whole_run(50) == pytest.approx(0.5) and whole_run(100) == pytest.approx(0.0)


def test_dual_warmup_holds_the_multipliers_then_lets_them_move():
    """--dual-warmup 0.5 of 60 full-batch steps: the multipliers recorded before each step stay exactly at their
    init (0) through step 30 (the updates of steps 0-29 ran with dual_lr 0) although constraints are violated
    from about step 15, and move with the first update after it; without the warm-up they move before step 30."""
    import torch

    from fused_lagrangian_apps.demo_problem import load_problem
    from fused_lagrangian_apps.demo_training import DualWarmup, RunSpec, train_run

    assert [DualWarmup(20, 0.5)(step) for step in (0, 9, 10, 19)] == [0.0, 0.0, 1.0, 1.0]
    assert DualWarmup(20, 0.0)(0) == 1.0
    moved = {}
    for warmup in ("0.5", "0"):
        args = demo.parse_args(["--epochs", "60", "--record-every", "1", "--dual-warmup", warmup])
        result = train_run(args, load_problem(args), RunSpec("lagrangian", "lagrangian"), progress=False)
        assert result.history["step"][:32] == list(range(32))
        assert max(result.history["max_violation"][:31]) > 0.05  # there is something to push against
        moved[warmup] = [bool(torch.tensor([v for block in record for v in block]).gt(0).any())
                         for record in result.history["multipliers"]]
    assert not any(moved["0.5"][:31]) and moved["0.5"][31]
    assert any(moved["0"][:31])


@pytest.mark.parametrize("constraint", ["dp", "group-loss"])
def test_augmented_option_builds_augmented_lagrangian_blocks(constraint):
    from fused_lagrangian import LagrangianAdamW
    from fused_lagrangian_apps.demo_problem import load_problem
    from fused_lagrangian_apps.demo_training import RunSpec, build_model, constraint_term

    for augmented, formulation, penalty in ((0.0, "lagrangian", None), (10.0, "augmented", 10.0)):
        args = demo.parse_args(["--constraint", constraint, "--augmented", str(augmented)])
        problem = load_problem(args)
        opt = LagrangianAdamW(build_model(problem.x_train.shape[1], 4, 0).parameters(), lr=0.01)
        _, blocks = constraint_term(args, problem, opt, RunSpec("lagrangian", "lagrangian"))
        assert blocks and all(b.spec.formulation == formulation for b in blocks)
        assert penalty is None or all(b.spec.penalty == penalty for b in blocks)
        # The penalty sweep keeps its own formulation whatever --augmented says.
        opt = LagrangianAdamW(build_model(problem.x_train.shape[1], 4, 0).parameters(), lr=0.01)
        _, baseline = constraint_term(args, problem, opt, RunSpec("penalty c=1", "quadratic", 1.0))
        assert all(b.spec.formulation == "quadratic" for b in baseline)


def test_report_is_strict_json_with_null_for_empty_groups(tmp_path):
    report, out = run_demo(tmp_path, "--epochs", "1", "--penalties", "1")
    json.loads((out / "report.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    empty_in_test = [g for g in report["groups"] if g["test_size"] == 0]
    assert empty_in_test and all(g["lagrangian_rate_test"] is None for g in empty_in_test)


def test_readme_tables_render_from_a_report(tmp_path):
    report, _ = run_demo(tmp_path, "--epochs", "2", "--penalties", "1")
    table = readme_tables.render(report)
    assert table.startswith(f"`{report['command']}`")
    assert table.count("\n| ") == 2 + len(report["runs"])  # header, rule, one row per run
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- demo-table:x:begin -->\nstale\n<!-- demo-table:x:end -->\nafter\n")
    report_path = tmp_path / "out" / "report.json"
    assert readme_tables.main(["--readme", str(readme), "--check", f"x={report_path}"]) == 1
    assert readme_tables.main(["--readme", str(readme), f"x={report_path}"]) == 0
    assert readme_tables.committed_table(readme.read_text(), "x") == table
    assert readme.read_text().startswith("before\n") and readme.read_text().endswith("after\n")
    assert readme_tables.main(["--readme", str(readme), "--check", f"x={report_path}"]) == 0


# --------------------------------------------------------------------------------------------------
# Full-length runs (about a minute each on an idle 2-core machine).

README = Path(__file__).resolve().parents[2] / "README.md"


def _rerun(command: str, out: Path) -> dict:
    argv = shlex.split(command)
    assert argv[:2] == ["fused-lagrangian", "demo"], command
    assert demo.main([*argv[2:], "--no-progress", "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def test_readme_tables_match_a_fresh_run_of_their_command(tmp_path):
    """The README's demo tables are what their commands print on this machine (see the README for which
    machine the committed numbers come from); regenerate them with python -m fused_lagrangian_apps.readme_tables."""
    text = README.read_text()
    names = readme_tables.table_names(text)
    assert names, "README.md has no demo tables"
    for name in names:
        committed = readme_tables.committed_table(text, name)
        assert committed.startswith("`fused-lagrangian demo"), (
            f"README table {name!r} is empty: run its demo and python -m fused_lagrangian_apps.readme_tables")
        command = committed.split("`")[1]
        report = _rerun(command, tmp_path / name)
        assert readme_tables.render(report) == committed, f"README table {name!r} is stale"


def _lagrangian_runs(tmp_path, *options) -> dict:
    out = tmp_path / "out"
    assert demo.main(["--runs", "lagrangian", "--no-progress", "--out", str(out), *options]) == 0
    return json.loads((out / "report.json").read_text())


def test_overlapping_marginal_and_intersectional_groups_all_hold_on_train(tmp_path):
    """Each sex, each race and their intersections with age bins, constrained together (a row in three
    groups): every constraint holds on train."""
    report = _lagrangian_runs(tmp_path, "--marginals", "race,sex")
    marginal = [g for g in report["groups"] if g["group"].startswith(("race=", "sex="))]
    assert len(marginal) == 7 and all(g["constrained"] for g in marginal)
    run = report["runs"][0]
    assert run["train"]["max_violation"] <= report["config"]["tolerance"]
    overall = report["overall_rates"]["lagrangian"]["train"]
    for group in marginal:  # the marginal groups by hand from the per-group table
        assert abs(group["lagrangian_rate_train"] - overall) <= report["config"]["epsilon"] + 0.01


def test_dual_lr_sensitivity_last_iterates_feasible_and_not_over_satisfied(tmp_path):
    """Issue 12: dual_lr 0.3x, 1x and 3x the default, last iterates: train-feasible and no constraint
    over-satisfied by more than 0.02."""
    report = _lagrangian_runs(tmp_path, "--runs", "lagrangian,sensitivity", "--select-window", "0")
    rows = report["summary"]["sensitivity"]
    assert [row["dual_lr_scale"] for row in rows] == [1.0, 0.3, 3.0]
    for row in rows:
        assert row["last_iterate_train_max_violation"] <= 0.01, row
        assert row["last_iterate_train_tightest_excess"] >= -0.02, row
    _assert_no_swing_after_half(report)


def _assert_no_swing_after_half(report: dict) -> None:
    """Issue 12: after half of the steps the default run's train max violation stays under 0.03."""
    (run,) = [r for r in report["runs"] if r["label"] == "lagrangian"]
    assert run["train_max_violation_after_half_of_the_steps"] < 0.03, run


@pytest.mark.parametrize("seed", ["0", "1"])
def test_minibatch_dual_lr_sensitivity_last_iterates_feasible_and_not_over_satisfied(tmp_path, seed):
    """Issue 12 with minibatches of 1024 rows (the demo's minibatch defaults: lr 0.003, the library's dual rule
    for grouped blocks): the last iterates at 0.3x, 1x and 3x dual_lr are train-feasible and none
    over-satisfies its constraints by more than 0.02; the default run does not swing after half of the steps."""
    report = _lagrangian_runs(tmp_path, "--runs", "lagrangian,sensitivity", "--select-window", "0",
                              "--batch-size", "1024", "--seed", seed)
    for row in report["summary"]["sensitivity"]:
        assert row["last_iterate_train_max_violation"] <= 0.01, row
        assert row["last_iterate_train_tightest_excess"] >= -0.02, row
    _assert_no_swing_after_half(report)


def test_no_progress_prints_a_line_per_finished_run(tmp_path, capsys):
    assert demo.main(["--runs", "unconstrained,lagrangian", "--epochs", "3", "--no-progress",
                      "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run 1 of 2: unconstrained done in") and lines[1].startswith("run 2 of 2: lagrangian")
