"""The charts of ``flatpeft compare`` (matplotlib, skipped with a message when it is missing).

- ``compare.png``: each method's paired difference from the reference, with its 95 % interval,
  around a zero line; one panel per evaluation set and metric.
- ``compare_sweep.png`` (when a spec sweeps a strength): each metric against the strength, mean
  with its 95 % t-interval over seeds and the reference row as a band; below it the paired
  difference from the reference against the strength.
- ``compare_sharpness.png`` (with the sharpness probe): every run's expected full-space sharpness
  against its main metric on each evaluation set, with Spearman's ρ and its interval.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from ._compare_report import POINTS, SHARP, TITLES, set_metrics, set_title
from ._stats import t_quantile

__all__ = ["plot_all"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no charts (pip install 'flatpeft[plot]')", file=sys.stderr)
        return None
    return plt


def plot_all(root: Path, summary: dict[str, Any]) -> list[Path]:
    """Write every chart that ``summary`` has data for into ``root``; return their paths."""
    plt = _pyplot()
    if plt is None or not summary["rows"] or not summary["metrics"]:
        return []
    written = [_differences(plt, root / "compare.png", summary)]
    groups = list(dict.fromkeys(r["sweep"]["group"] for r in summary["rows"] if r["sweep"]))
    if groups:
        written.append(_sweeps(plt, root / "compare_sweep.png", summary, groups))
    if summary["correlation"]:
        written.append(_scatter(plt, root / "compare_sharpness.png", summary))
    return written


def _panels(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s, m) for s in summary["sets"] for m in set_metrics(summary, s)]


def _unit(metric: str) -> str:
    return f"Δ {TITLES.get(metric, metric)}" + (" (pt)" if metric in POINTS else "")


def _scale(metric: str) -> float:
    return 100.0 if metric in POINTS else 1.0


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _differences(plt, path: Path, summary: dict[str, Any]) -> Path:
    rows = [r for r in summary["rows"] if r["label"] != summary["reference"]]
    panels = _panels(summary)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 0.9 + 0.45 * max(len(rows), 2) * nrows),
                             squeeze=False)  # fmt: skip
    for ax, (name, metric) in zip(axes.flat, panels, strict=False):
        k = _scale(metric)
        for y, row in enumerate(rows):
            d = row["diff"][name].get(metric)
            if not d:
                continue
            lo, hi = (d["low"], d["high"]) if d["low"] is not None else (d["mean"], d["mean"])
            color = "tab:orange" if d["marker"] else "tab:blue"  # orange: the interval excludes zero
            ax.errorbar(d["mean"] * k, y, xerr=[[(d["mean"] - lo) * k], [(hi - d["mean"]) * k]],
                        fmt="o", color=color, capsize=3)  # fmt: skip
            ax.scatter([x * k for x in d["diffs"]], [y + 0.18] * len(d["diffs"]), s=8, color="gray")
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"{_unit(metric)} vs {summary['reference']}")
        ax.set_title(f"{set_title(name)}: {TITLES.get(metric, metric)}", fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    title = "paired difference per seed (gray), mean with 95 % t-interval (orange: excludes zero)"
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _interval(stat: dict[str, Any]) -> float:
    n = stat["n"]
    return t_quantile(0.975, n - 1) * stat["std"] / math.sqrt(n) if n > 1 else 0.0


def _sweeps(plt, path: Path, summary: dict[str, Any], groups: list[str]) -> Path:
    panels = _panels(summary)
    ref = next((r for r in summary["rows"] if r["label"] == summary["reference"]), None)
    fig, axes = plt.subplots(2 * len(groups), len(panels), figsize=(3.8 * len(panels), 5.2 * len(groups)),
                             squeeze=False)  # fmt: skip
    for g, group in enumerate(groups):
        members = [r for r in summary["rows"] if r["sweep"] and r["sweep"]["group"] == group]
        key = members[0]["sweep"]["key"]
        try:
            xs = [float(r["sweep"]["value"]) for r in members]
            ticks = None
        except ValueError:
            xs, ticks = list(range(len(members))), [r["sweep"]["value"] for r in members]
        for c, (name, metric) in enumerate(panels):
            k = _scale(metric)
            top, bottom = axes[2 * g, c], axes[2 * g + 1, c]
            stats = [r["stats"][name][metric] for r in members]
            pts = [(x, s["mean"] * k, _interval(s) * k) for x, s in zip(xs, stats, strict=True) if s["n"]]
            xs_, ys_, bars = ([p[i] for p in pts] for i in range(3))
            top.errorbar(xs_, ys_, yerr=bars, fmt="o-", capsize=3)
            if ref is not None and ref["stats"][name][metric]["mean"] is not None:
                s = ref["stats"][name][metric]
                mid, half = s["mean"] * k, _interval(s) * k
                top.axhspan(mid - half, mid + half, color="gray", alpha=0.25, label=summary["reference"])
                top.axhline(mid, color="gray", lw=0.8)
                top.legend(fontsize=8, loc="best")
            top.set_title(f"{members[0]['sweep']['method']} on {set_title(name)}", fontsize=10)
            top.set_ylabel(TITLES.get(metric, metric) + (" (%)" if metric in POINTS else ""))
            diffs = [(x, r["diff"][name].get(metric)) for x, r in zip(xs, members, strict=True)]
            diffs = [(x, d) for x, d in diffs if d]
            lows = [(d["mean"] - (d["low"] if d["low"] is not None else d["mean"])) * k for _, d in diffs]
            highs = [((d["high"] if d["high"] is not None else d["mean"]) - d["mean"]) * k for _, d in diffs]
            bottom.errorbar([x for x, _ in diffs], [d["mean"] * k for _, d in diffs], yerr=[lows, highs],
                            fmt="o-", color="tab:purple", capsize=3)  # fmt: skip
            bottom.axhline(0.0, color="black", lw=0.8)
            bottom.set_ylabel(f"{_unit(metric)} vs {summary['reference']}")
            for ax in (top, bottom):
                ax.set_xlabel(key)
                if ticks is not None:
                    ax.set_xticks(xs, ticks)
                elif min(xs) > 0 and max(xs) / min(xs) >= 4:
                    ax.set_xscale("log")
                    ax.set_xticks(xs, [r["sweep"]["value"] for r in members])
                    ax.minorticks_off()
    title = "strength sweep: mean ± 95 % t-interval over seeds (top), paired difference (bottom)"
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _scatter(plt, path: Path, summary: dict[str, Any]) -> Path:
    corr = [c for c in summary["correlation"] if not c["paired"]]
    fig, axes = plt.subplots(1, len(corr), figsize=(4.6 * len(corr), 4), squeeze=False)
    for ax, c in zip(axes.flat, corr, strict=True):
        metric, k = c["metric"], _scale(c["metric"])
        for row in summary["rows"]:
            s = row.get(SHARP)
            if not s:
                continue
            pts = [(x, y) for x, y in zip(s["values"], row["values"][c["set"]][metric], strict=True)
                   if x is not None and y is not None]  # fmt: skip
            ax.scatter([x for x, _ in pts], [y * k for _, y in pts], label=row["label"], s=18)
        rho = "ρ undefined" if c["rho"] is None else f"Spearman ρ = {c['rho']:+.2f}"
        if c["low"] is not None:
            rho += f" [{c['low']:+.2f}, {c['high']:+.2f}]"
        ax.set_title(f"{set_title(c['set'])}: {rho}, {c['n']} runs", fontsize=10)
        ax.set_xlabel("expected full-space sharpness")
        ax.set_ylabel(TITLES.get(metric, metric) + (" (%)" if metric in POINTS else ""))
    axes.flat[-1].legend(fontsize=7, loc="best")
    return _save(plt, fig, path)
