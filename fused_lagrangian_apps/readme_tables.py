"""The README's demo tables, rendered from the demo's report.json so that they cannot go stale.

    python -m fused_lagrangian_apps.readme_tables default=demo_out/report.json groups687=demo_687/report.json
    python -m fused_lagrangian_apps.readme_tables --check default=demo_out/report.json   # exit 1 if stale

Each ``NAME=REPORT`` replaces the text between ``<!-- demo-table:NAME:begin -->`` and
``<!-- demo-table:NAME:end -->`` in README.md (``--readme``) with the table of that report.  The table holds
only what the demo computes deterministically on a given machine (no wall times), and the command that
produced it, so a test can rerun the command and compare.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

BEGIN = "<!-- demo-table:{name}:begin -->"
END = "<!-- demo-table:{name}:end -->"


def render(report: dict) -> str:
    """The markdown table of one report: every run, train and test, plus the command."""
    config, summary = report["config"], report["summary"]
    large = config["large_group_rows"]
    lines = [
        f"`{report['command']}`: {report['dataset']}, {summary['num_groups']} groups, "
        f"{summary['constrained_groups']} constrained (ε = {config['epsilon']:g}; "
        f"{summary['test_groups_with_large_rows']} of them have ≥ {large} test rows)",
        "",
        f"| run | train acc | train max violation | feasible (≤ {config['tolerance']:g}) | test acc | "
        f"test max violation, all groups | test max violation, groups ≥ {large} rows | "
        f"test groups whose 95% interval is outside the bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        train, test = run["train"], run["test"]
        outside = test.get("groups_outside_bound_by_interval")
        name = run["label"]
        if run["formulation"] == "lagrangian" and run.get("dual_lr_scale", 1.0) == 1.0:
            name = f"**{name}**"
        lines.append(f"| {name} | {train['accuracy']:.3f} | {train['max_violation']:.3f} | "
                     f"{'yes' if train['feasible'] else 'no'} | {test['accuracy']:.3f} | {test['max_violation']:.3f} | "
                     f"{test['max_violation_large_groups']:.3f} | {'–' if outside is None else outside} |")
    lagrangian = summary["lagrangian"]
    lines += [
        "",
        f"Lagrangian run: last iterate train max violation {lagrangian['last_iterate_max_violation']:.3f}, "
        f"at most {lagrangian['train_max_violation_after_half_of_the_steps']:.3f} after half of the steps."
        + "".join(f" {row['run']} (dual_lr {row['dual_lr']:.3g}): last iterate train max violation "
                  f"{row['last_iterate_train_max_violation']:.3f}, tightest constraint "
                  f"{row['last_iterate_train_tightest_excess']:+.3f} from ε."
                  for row in summary["sensitivity"] if row["dual_lr_scale"] != 1.0),
    ]
    noise = []
    shift = summary.get("unconstrained_rate_shift_large_groups")
    if shift is not None:
        noise.append(f"Sampling noise of the test split: in the groups with ≥ {large} test rows, the unconstrained "
                     f"model's rate minus the overall rate moves by up to {shift:.3f} between train and test "
                     "(a model not fitted to the constraints: the shift is the splits' noise).")
    chance = summary.get("chance_test_target_at_bound")
    if chance is not None:
        noise.append(f"A model whose groups with ≥ {large} test rows all sit exactly at the bound (overall + ε) "
                     f"would show a test max violation ≤ {summary['target_test_violation_large_groups']:g} over "
                     f"them with probability {chance:.2f}, from the test split's sampling alone.")
    if noise:
        lines += ["", " ".join(noise)]
    return "\n".join(lines)


def replace_between_markers(text: str, name: str, table: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"README has no {begin} ... {end} markers")
    return pattern.sub(lambda _: f"{begin}\n{table}\n{end}", text, count=1)


def table_names(text: str) -> list[str]:
    """The names of the demo tables in a README, in order."""
    return re.findall(r"<!-- demo-table:([\w-]+):begin -->", text)


def committed_table(text: str, name: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    match = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), text, re.DOTALL)
    if match is None:
        raise ValueError(f"README has no {begin} ... {end} markers")
    return match.group(1).rstrip("\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_lagrangian_apps.readme_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", metavar="NAME=REPORT", help="marker name and report.json")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = updated = readme.read_text()
    for item in args.tables:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"expected NAME=REPORT, got {item!r}")
        updated = replace_between_markers(updated, name, render(json.loads(Path(path).read_text())))
    if args.check:
        if updated != text:
            print(f"{readme}: the demo tables differ from the reports", file=sys.stderr)
            return 1
        return 0
    readme.write_text(updated)
    print(f"updated {len(args.tables)} table(s) in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
