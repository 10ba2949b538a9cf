"""The report's charts (matplotlib, Agg backend): one PNG each, titled by what it shows.

- ``tau_speedup_vs_k``: tau and speedup against the draft length k per series of chain runs
  (the other swept values; a hybrid's runs are left out), with the expected tau of the fitted alpha
  and the cost model's predicted speedup (dashed) and each run's prediction from its measured tau (x);
- ``tau_speedup_vs_nodes``: tau and speedup against the draft nodes verified per step, one point per
  run, when the runs are not all chains (trees, dynamic trees, hybrids: what a tree's size buys);
- ``acceptance_by_depth``: the acceptance rate at each depth, one line per run;
- ``time_per_step``: ms per decoding step, stacked draft / verify / accept+commit / other, per run
  and for the autoregressive baseline;
- ``drafters``: tokens/s of each run and of its baseline, labelled with the speedup.
"""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

from experiments.costs import KS, chain_speedup_by_k, expected_tau, recommend_k
from experiments.results import BASELINE, SPECULATIVE, steps_of, steps_split
from experiments.runs import Run, is_hybrid, k_priced, label_of, pooled_model, row_of, series, shape_of


def _bar_labels(texts: list[str], width: int = 26) -> tuple[list[str], tuple[float, float]]:
    """Bar labels wrapped at ``width`` characters (a mixed directory's runs are labelled by all their overrides:
    they were cut off below the axes and ran into each other), and a figure size (inches) with room for them: each
    bar as wide as its slanted label's lines, the axes raised above the tallest label."""
    wrapped = ["\n".join(textwrap.fill(line, width) for line in text.split("\n")) for text in texts]
    lines = max((w.count("\n") + 1 for w in wrapped), default=1)
    longest = max((len(line) for w in wrapped for line in w.split("\n")), default=0)
    per_bar = max(0.8, 0.042 * longest + 0.15 * lines)
    return wrapped, (max(6.0, per_bar * len(texts) + 3), 4.2 + 0.045 * longest + 0.1 * lines)


#: The most legend entries drawn inside a plot's axes; more go below them.
LEGEND_INSIDE = 6


def _finish_axes(ax) -> None:
    """Integer x ticks, a small legend and a light grid (every line plot of the report)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    entries = len(ax.get_legend_handles_labels()[1])  # a plot without labelled lines (only failed runs): none
    if entries > LEGEND_INSIDE:  # below the axes, where it hides no point (the saved image grows to hold it),
        legend = ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        for text in legend.get_texts():  # as wide as the axes: a neighbour's legend runs beside, not under, it
            text.set_text(textwrap.fill(text.get_text(), 70))
    elif entries:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _step_part(metrics: dict, key: str | None) -> float:
    """Seconds of one part of a method's steps (``key``: a ``time_*`` field; None: the whole step where its
    phases were not timed apart, else 0); a fixed-shape step's phases are 0, not all "other"."""
    if steps_split(metrics):
        return metrics[key] if key else 0.0
    return 0.0 if key else metrics["time_total"] - metrics["time_prefill"]


def make_plots(runs: list[Run], swept: list[str], out: Path) -> dict[str, Path]:
    """Write the report's PNGs into ``out``; returns ``{name: path}`` of those with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.metrics.get(SPECULATIVE)]
    labels = {r.name: label_of(r, swept) or (r.summary or {}).get("drafter") or r.name for r in done}
    paths: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        with warnings.catch_warnings():  # a legend below the axes is outside tight_layout's reach: the image grows
            warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
            fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110, bbox_inches="tight")
        plt.close(fig)

    chains = series(runs, swept)
    if chains:
        fig, (ax_tau, ax_up) = plt.subplots(1, 2, figsize=(11, 4.2))
        drawn: set[str] = set()  # the titles name only the series drawn (costs=false draws no prediction)
        for i, (label, group) in enumerate(chains.items()):
            color = f"C{i}"
            group = sorted(group, key=lambda r: row_of(r, [])["k"])
            ks = [row_of(r, [])["k"] for r in group]
            ax_tau.plot(ks, [r.metrics[SPECULATIVE]["tau"] for r in group], "o-", color=color, label=label)
            measured = [(k, r.metrics.get("speedup")) for k, r in zip(ks, group) if r.metrics.get("speedup")]
            if measured:
                ax_up.plot(*zip(*measured), "o-", color=color, label=f"{label} measured")
                drawn.add("measured")
            predicted = [(k, r.metrics.get("predicted_speedup")) for k, r in zip(ks, group)
                         if r.metrics.get("predicted_speedup")]
            if predicted:
                ax_up.plot(*zip(*predicted), "x", color=color, markersize=9, label=f"{label} predicted (measured tau)")
                drawn.add("predicted")
            alpha, costs, tokens = pooled_model(group)
            grid = sorted(set(KS) | set(ks))
            if alpha is not None:
                ax_tau.plot(grid, [expected_tau(alpha, k) for k in grid], "--", color=color, alpha=0.7,
                            label=f"{label} expected, pooled alpha={alpha:.2f}")
                drawn.add("expected")
            if alpha is not None and costs and all(k_priced(r) for r in group):  # else the curve misprices it
                curve = chain_speedup_by_k(alpha, costs, tuple(grid), tokens)
                caveat = ", implausible costs" if costs.get("implausible") else ""
                ax_up.plot(list(curve), list(curve.values()), "--", color=color, alpha=0.7,
                           label=f"{label} cost model (rec. k={recommend_k(curve)}{caveat})")
                drawn.add("model")
        ax_tau.set(xlabel="draft length k", ylabel="tau")
        ax_tau.set_title("tau (tokens per target forward) vs k\nmeasured (o)"
                         + (", expected from alpha fitted over the series (dashed)" if "expected" in drawn else ""),
                         fontsize=10)
        ax_up.axhline(1.0, color="gray", lw=0.8)
        ax_up.set(xlabel="draft length k", ylabel="speedup over autoregressive")
        said = [part for key, part in (("measured", "measured (o)"), ("predicted", "predicted from measured tau (x)"),
                                       ("model", "cost model with fitted alpha (dashed)")) if key in drawn]
        ax_up.set_title("Speedup vs k: " + (", ".join(said[:2]) + (",\n" + said[2] if said[2:] else "") if said
                                            else "none measured"), fontsize=10)
        for ax in (ax_tau, ax_up):
            _finish_axes(ax)
        save(fig, "tau_speedup_vs_k")

    sized = [r for r in done if r.metrics[SPECULATIVE].get("mean_proposed_drafts")]
    if len(sized) >= 2 and any(shape_of(r) != "chain" or is_hybrid(r) for r in sized):
        names = {r.name: label_of(r, swept) or shape_of(r) or r.name for r in sized}  # the swept values, or the shape
        save(nodes_figure(plt, sized, names), "tau_speedup_vs_nodes")

    with_depth = [r for r in done if r.metrics[SPECULATIVE].get("acceptance_rate_by_depth")]
    if with_depth:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in with_depth:
            rates = r.metrics[SPECULATIVE]["acceptance_rate_by_depth"]
            ax.plot(range(1, len(rates) + 1), rates, "o-", label=labels[r.name])
        ax.set(xlabel="depth d", ylabel="acceptance rate", ylim=(0, 1.05))
        ax.set_title("Acceptance rate by depth\n(share of the steps proposing depth d that accepted a node there)",
                     fontsize=10)
        _finish_axes(ax)
        save(fig, "acceptance_by_depth")

    stepped = [r for r in done if r.metrics[SPECULATIVE].get("target_forwards")]
    if stepped:
        bars = [(labels[r.name], r.metrics[SPECULATIVE]) for r in stepped]
        base = next((r for r in stepped if r.metrics.get(BASELINE, {}).get("target_forwards")), None)
        if base:  # one run's baseline (runs swept over sampling or the model each have their own)
            bars.append((f"autoregressive ({labels[base.name]}'s baseline)", base.metrics[BASELINE]))
        names, size = _bar_labels([b[0] for b in bars])
        fig, ax = plt.subplots(figsize=size)
        parts = (("draft", "time_draft"), ("verify", "time_verify"), ("accept+commit", "time_accept"),
                 ("other", "time_other"), ("whole step (fixed-shape, not split)", None))
        bottom = [0.0] * len(bars)
        for name, key in parts:
            values = [1000 * _step_part(m, key) / steps_of(m) for _, m in bars]
            if key is None and not any(values):
                continue
            ax.bar(range(len(bars)), values, bottom=bottom, label=name, hatch="//" if key is None else None)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(bars)), names, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(bars) - 0.4)  # matplotlib's 5% margins grow with the figure's width
        ax.set(ylabel="ms per step (= per target forward; a batch's)")
        ax.set_title("Time per decoding step (ms, prefill excluded)\nstacked: draft / verify / accept+commit / other",
                     fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "time_per_step")

    names, size = _bar_labels([f"{labels[r.name]}\n{(r.summary or {}).get('drafter', '')}" for r in done])
    fig, ax = plt.subplots(figsize=size)
    xs = range(len(done))
    ax.bar([x - 0.2 for x in xs], [r.metrics[SPECULATIVE].get("tokens_per_s", 0) for r in done], 0.4,
           label="speculative")
    ax.bar([x + 0.2 for x in xs], [r.metrics.get(BASELINE, {}).get("tokens_per_s", 0) for r in done], 0.4,
           label="autoregressive baseline")
    for x, r in zip(xs, done):
        up = r.metrics.get("speedup")
        if up:
            ax.annotate(f"{up:.2f}x", (x - 0.2, r.metrics[SPECULATIVE].get("tokens_per_s", 0)), ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(done) - 0.4)
    ax.set(ylabel="tokens/s")
    ax.set_title("Drafter comparison: tokens/s\n(speculative vs its autoregressive baseline; labels: speedup)",
                 fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "drafters")
    return paths


def nodes_figure(plt, runs: list[Run], labels: dict[str, str]):
    """tau and measured speedup against the draft nodes each step verified (``mean_proposed_drafts``), one
    labelled point per run; runs of the same shape kind (chain, tree, dynamic, ...) share a colour."""
    fig, (ax_tau, ax_up) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors: dict[str, str] = {}
    for r in sorted(runs, key=lambda r: r.metrics[SPECULATIVE]["mean_proposed_drafts"]):
        x, kind = r.metrics[SPECULATIVE]["mean_proposed_drafts"], (shape_of(r) or "other").rstrip("0123456789")
        legend = kind if kind not in colors else None
        color = colors.setdefault(kind, f"C{len(colors)}")
        for ax, y in ((ax_tau, r.metrics[SPECULATIVE]["tau"]), (ax_up, r.metrics.get("speedup"))):
            if y:
                ax.plot([x], [y], "o", color=color, label=legend)
                ax.annotate(labels[r.name], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax_tau.set(xlabel="draft nodes verified per step (mean)", ylabel="tau")
    ax_tau.set_title("tau vs the draft's size per step\n(what a bigger tree or a longer chain buys)", fontsize=10)
    ax_up.axhline(1.0, color="gray", lw=0.8)
    ax_up.set(xlabel="draft nodes verified per step (mean)", ylabel="speedup over autoregressive")
    ax_up.set_title("Speedup vs the draft's size per step\n(measured against each run's own baseline)", fontsize=10)
    for ax in (ax_tau, ax_up):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return fig
