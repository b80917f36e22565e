"""PNG plots of a run: step time against the size that each sweep varies, min–max as error bars."""

from __future__ import annotations

import os

from .report import ordered

STYLE = {"cooper": ("tab:red", "s"), "unfused": ("tab:orange", "^"), "torch_fused": ("tab:gray", "x"),
         "ceiling": ("black", "")}
FUSED_COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:cyan")


def _style(name: str, fused_names: list[str]) -> dict:
    if name.startswith("fused:"):
        return dict(color=FUSED_COLORS[fused_names.index(name) % len(FUSED_COLORS)], marker="o", linewidth=2)
    color, marker = STYLE.get(name, ("tab:brown", "d"))
    return dict(color=color, marker=marker or None, linestyle="--" if name == "ceiling" else "-")


def _series_plot(axis, records: list[dict], x_of, xlabel: str, title: str) -> None:
    names = ordered({n for r in records for n in r["results"]})
    fused = [n for n in names if n.startswith("fused:")]
    for name in names:
        points = sorted((x_of(r), r["results"][name]) for r in records if name in r["results"])
        if not points:
            continue
        xs = [x for x, _ in points]
        medians = [e["median_s"] * 1e3 for _, e in points]
        below = [m - e["min_s"] * 1e3 for m, (_, e) in zip(medians, points)]
        above = [e["max_s"] * 1e3 - m for m, (_, e) in zip(medians, points)]
        axis.errorbar(xs, medians, yerr=[below, above], label=name, capsize=3, **_style(name, fused))
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("ms per step (median, min–max)")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def _training_bars(axis, records: list[dict]) -> None:
    names = ordered({n for r in records for n in r["results"]})
    fused = [n for n in names if n.startswith("fused:")]
    records = sorted(records, key=lambda r: (-r["config"]["batch"], r["config"]["num_samples"]))
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        xs, medians, errors = [], [], [[], []]
        for position, record in enumerate(records):
            entry = record["results"].get(name)
            if entry is None:
                continue
            median = entry["median_s"] * 1e3
            xs.append(position + (index - (len(names) - 1) / 2) * width)
            medians.append(median)
            errors[0].append(median - entry["min_s"] * 1e3)
            errors[1].append(entry["max_s"] * 1e3 - median)
        style = _style(name, fused)
        axis.bar(xs, medians, width, yerr=errors, capsize=2, label=name, color=style["color"])
    axis.set_xticks(range(len(records)))
    axis.set_xticklabels([f"N={r['config']['num_samples']:.0e}\nB={r['config']['batch']}" for r in records])
    axis.set_yscale("log")
    axis.set_ylabel("ms per training step (median, min–max)")
    params = records[0]["config"]["num_params"] if records else 0
    axis.set_title(f"MLP ({params:,} params): forward + backward + step", fontsize=10)
    axis.grid(True, axis="y", which="both", alpha=0.3)
    axis.legend(fontsize=8)


def _num_constraints(record: dict) -> int:
    return record["config"]["blocks"][0]["num_constraints"]


def draw(results: dict, out_dir: str) -> list[str]:
    """Writes the plots for the sweeps present in ``results``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    paths = []

    def save(figure, name: str) -> None:
        path = os.path.join(out_dir, name)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)

    indexed = [r for r in cases if r["sweep"] == "indexed"]
    training = [r for r in cases if r["sweep"] == "training"]
    if indexed and training:
        figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
        batch = max(r["config"]["blocks"][0]["batch"] for r in indexed)
        _series_plot(left, [r for r in indexed if r["config"]["blocks"][0]["batch"] == batch], _num_constraints,
                     "number of per-sample constraints N",
                     f"Step alone, {indexed[0]['config']['num_params']:.0e} params, batch {batch}")
        _training_bars(right, training)
        save(figure, "headline.png")

    params = [r for r in cases if r["sweep"] == "params"]
    if params:
        figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for axis, with_blocks in zip(axes, (False, True)):
            subset = [r for r in params if bool(r["config"]["blocks"]) == with_blocks]
            blocks = " + ".join(f"{b['kind']} K={b['num_constraints']:.0e}, B={b['batch']}"
                                for b in subset[0]["config"]["blocks"]) if subset else ""
            title = "Step alone, Adam, " + (blocks or "no blocks")
            _series_plot(axis, subset, lambda r: r["config"]["num_params"], "parameters (8 tensors)", title)
        save(figure, "step_vs_params.png")

    if indexed:
        batches = sorted({r["config"]["blocks"][0]["batch"] for r in indexed})
        figure, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.8), squeeze=False)
        for axis, batch in zip(axes[0], batches):
            _series_plot(axis, [r for r in indexed if r["config"]["blocks"][0]["batch"] == batch], _num_constraints,
                         "number of per-sample constraints N",
                         f"Step alone, {indexed[0]['config']['num_params']:.0e} params, batch {batch}")
        save(figure, "step_vs_constraints.png")

    grouped = [r for r in cases if r["sweep"] == "grouped"]
    if grouped:
        figure, axis = plt.subplots(figsize=(6.5, 4.8))
        _series_plot(axis, grouped, _num_constraints, "number of groups K",
                     f"Step alone, {grouped[0]['config']['num_params']:.0e} params, grouped block, batch "
                     f"{grouped[0]['config']['blocks'][0]['batch']}")
        save(figure, "step_vs_groups.png")

    if training:
        figure, axis = plt.subplots(figsize=(7, 4.8))
        _training_bars(axis, training)
        save(figure, "training_step.png")
    return paths
