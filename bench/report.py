"""Writers: results.json (everything measured) and results.md (tables a person reads)."""

from __future__ import annotations

import json
import os

from . import targets
from .contention import QUIET_FRACTION
from .runner import AGREEMENT_STEPS


SCHEMA = "fused_lagrangian.bench/1"
CANDIDATE_ORDER = ("fused:", "cooper", "unfused", "torch_fused", "ceiling")
CANDIDATE_NOTES = {
    "fused:": "this package, LagrangianAdam/SGD with the named backend",
    "cooper": "cooper-optim 1.0.1 SimultaneousOptimizer (torch fused primal, SGD(maximize=True) dual)",
    "unfused": "hand-written PyTorch: torch fused optimizer + index_add_ + clamp_ of the touched multipliers",
    "torch_fused": "torch.optim.Adam(fused=True) / SGD(fused=True), no constraints (the floor)",
    "ceiling": "in-place read-modify-write passes over the primal step's bytes (28 B/param Adam, 20 SGD)",
    "torch_adam": "torch.optim.Adam with its default implementation, no constraints (sweep smallmodel)",
}


def ordered(names) -> list[str]:
    def rank(name: str) -> tuple:
        for index, prefix in enumerate(CANDIDATE_ORDER):
            if name.startswith(prefix):
                return index, name
        return len(CANDIDATE_ORDER), name
    return sorted(names, key=rank)


def case_label(record: dict) -> str:
    config = record["config"]
    if record["sweep"] == "flat":
        ns = " and ".join(f"{n:.0e}" for n in config["num_constraints"])
        return (f"{config['num_params']:.0e} params adam, indexed N={ns} interleaved, B={config['batch']}, "
                f"{record['threads']} thr")
    if record["sweep"] == "blockcall":
        ks = " and ".join(f"{k:.0e}" for k in config["num_groups"])
        return (f"grouped block call, K={ks} interleaved, B={config['batch']}, forward and forward+backward, "
                f"{record['threads']} thr")
    if record["sweep"] == "smallmodel":
        groups = " and ".join(map(str, config["group_counts"]))
        return (f"{config['model']} BCE, B={config['batch']}, Adam step with grouped blocks of {groups} groups "
                f"(and '@no blocks'), {record['threads']} thr")
    if record["sweep"] == "training":
        return (f"{config['model']} ({config['num_params']:,} params), N={config['num_samples']:.0e}, "
                f"B={config['batch']}")
    blocks = " + ".join(f"{b['kind']} K={b['num_constraints']:.0e} B={b['batch']}" for b in config["blocks"])
    return (f"{config['num_params']:.0e} params {config['algorithm']}, {blocks or 'no blocks'}, "
            f"{record['threads']} thr")


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as out:
        json.dump(results, out, indent=1)


def contention_note(record: dict) -> str:
    """'' for a case measured on a quiet machine, else how much of it other processes used."""
    others = record.get("others_cpu_fraction")
    if others is None or others < QUIET_FRACTION:
        return ""
    return f"; ⚠ other processes used {100 * others:.0f}% of the CPUs"


def _contended_summary(results: dict) -> str:
    contended = [r for r in results["cases"] if contention_note(r)]
    if not contended:
        return (f"Every case was measured while other processes used < {100 * QUIET_FRACTION:.0f}% of the CPUs "
                "(or this could not be measured).")
    return (f"**{len(contended)} of {len(results['cases'])} cases were measured while other processes used "
            f">= {100 * QUIET_FRACTION:.0f}% of the CPUs (marked ⚠): their timings are noisy; re-run on a quiet "
            "machine.**")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _marked(verdict: str) -> str:
    return "**MISSED**" if verdict == "MISSED" else verdict


def targets_table(found: list[dict]) -> list[str]:
    """One row per (target, case), one column per candidate: the value and met / MISSED / not a target."""
    if not found:
        return ["(no target applies to this run)"]
    names = ordered({t["candidate"] for t in found})
    rows: dict[tuple, dict] = {}
    for target in found:
        key = (target["target"], target["case"], f"{target['comparison']} {target['threshold']:g}",
               target.get("note", ""))
        rows.setdefault(key, {})[target["candidate"]] = target
    lines = ["| target | case | needs | " + " | ".join(names) + " | note |", "|---" * (len(names) + 4) + "|"]
    for (name, case, needs, note), by_candidate in rows.items():
        cells = ["–" if n not in by_candidate else
                 f"{by_candidate[n]['value']:.2f} {_marked(targets.verdict(by_candidate[n]))}" for n in names]
        lines.append(f"| {name} | {case} | {needs} | " + " | ".join(cells) + f" | {note} |")
    return lines


def headline_rows(results: dict) -> list[dict]:
    """The few cases a reader looks at first: big step with and without blocks, huge N, the MLP step."""
    picks = []
    by_sweep: dict[str, list[dict]] = {}
    for record in results["cases"]:
        by_sweep.setdefault(record["sweep"], []).append(record)
    params = by_sweep.get("params", [])
    # 10^7 parameters (the native-step targets' size) when measured: the largest size of the quick run.
    headline_params = max((r["config"]["num_params"] for r in params if r["config"]["num_params"] <= 10**7),
                          default=None)
    picks += [r for r in params if r["config"]["num_params"] == headline_params]
    indexed = by_sweep.get("indexed", [])
    if indexed:
        largest_n = max(r["config"]["blocks"][0]["num_constraints"] for r in indexed)
        picks += [r for r in indexed if r["config"]["blocks"][0]["num_constraints"] == largest_n
                  and r["config"]["blocks"][0]["batch"] == 4096]
    training = by_sweep.get("training", [])
    if training:
        largest_n = max(r["config"]["num_samples"] for r in training)
        picks += [r for r in training if r["config"]["num_samples"] == largest_n]
    return picks


def headline_table(results: dict) -> str:
    rows = headline_rows(results)
    names = ordered({name for record in rows for name in record["results"]})
    lines = ["| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for record in rows:
        cells = []
        for name in names:
            entry = record["results"].get(name)
            cells.append("–" if entry is None
                         else f"{_ms(entry['median_s'])} ms ({_ratio(entry['ratio_to_torch_fused'])})")
        lines.append(f"| {case_label(record)}{contention_note(record)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(results: dict, path: str) -> None:
    machine = results["machine"]
    settings = results["settings"]
    lines = [
        f"# fused_lagrangian benchmark ({results['mode']} run)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs ({machine['cpu_capability']}), "
        f"{machine['memory_gib']} GiB; torch {machine['torch_version']} with {machine['torch_threads']} threads; "
        f"Python {machine['python_version']}; device {machine['device']}; cooper-optim "
        f"{machine['cooper_optim_version']}.  ",
        "Backends: " + ", ".join(f"{name}: {status}" for name, status in machine["backends"].items())
        + f"; auto picks `{machine['auto_backend']}`.  ",
        f"{_contended_summary(results)}  ",
        f"Total wall time {results['wall_s']:.0f} s. Load average (1, 5, 15 min) at start "
        f"{results['load_average_start']}, at end {results['load_average_end']} (includes this run).",
        "",
        f"Every figure is the median over {settings['repetitions']} interleaved repetitions (each the mean over "
        "several consecutive steps; all candidates take the same steps on identical tensors) with the min and max "
        "over the repetitions. ×floor is the ratio to `torch_fused` (candidate 4) in the same case; "
        "'of ceiling' is the ceiling's time divided by the candidate's (100% = as fast as streaming its bytes); "
        "GB/s counts the primal step's bytes plus 16 B per constraint sample.",
        "",
        "Candidates:",
        "",
    ]
    lines += [f"- `{prefix.rstrip(':')}`: {note}" for prefix, note in CANDIDATE_NOTES.items()]
    lines += ["", "## Targets", ""]
    lines += targets_table(results["targets"])
    lines += ["", "## Headline", "", headline_table(results), ""]
    for sweep in dict.fromkeys(record["sweep"] for record in results["cases"]):
        lines += [f"## Sweep `{sweep}`", "",
                  "| case | candidate | median ms | min–max ms | ×floor | of ceiling | GB/s |",
                  "|---|---|---|---|---|---|---|"]
        for record in (r for r in results["cases"] if r["sweep"] == sweep):
            label = case_label(record) + contention_note(record)
            for name in ordered(record["results"]):
                entry = record["results"][name]
                bandwidth = "–" if entry["effective_GBps"] is None else f"{entry['effective_GBps']:.1f}"
                lines.append(f"| {label} | {name} | {_ms(entry['median_s'])} | {_ms(entry['min_s'])}–"
                             f"{_ms(entry['max_s'])} | {_ratio(entry['ratio_to_torch_fused'])} | "
                             f"{_percent(entry['fraction_of_ceiling'])} | {bandwidth} |")
                label = ""
            for name, reason in record["skipped"].items():
                lines.append(f"| {label} | {name} | skipped: {reason} | | | | |")
        lines.append("")
    lines += ["## Agreement", "",
              f"Max abs difference after the first {AGREEMENT_STEPS} steps, the same for every candidate: "
              "parameters vs `torch_fused` (no blocks) or `unfused`, "
              "multipliers vs `unfused`. Small values mean every candidate computed the same update.", ""]
    worst: dict[str, float] = {}
    for record in results["cases"]:
        for name, entry in record["agreement"].items():
            worst[name] = max(worst.get(name, 0.0), *entry.values())
    lines += [f"- `{name}`: {value:.2e}" for name, value in sorted(worst.items())]
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in results["plots"]]
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")
