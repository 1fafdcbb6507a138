"""The summary of ``flatpeft compare``: per-seed values, paired differences from the reference row
with t-intervals, the sharpness probe with its standard error, and sharpness against generalisation;
written as Markdown, long-format CSV and (through the report) JSON.

Every table cell can be recomputed from the per-seed values the CSV and JSON carry: a difference is
``method - reference`` on each seed both have, its interval the 95 % Student-t interval of those
differences (:func:`flatpeft._stats.paired`).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._stats import MIN_MARKED, paired, spearman

if TYPE_CHECKING:
    from .compare import Row
    from .train import TrainConfig

__all__ = ["console_lines", "markdown", "metric_names", "read_csv", "set_metrics", "summarise", "write_csv"]

#: metrics in table order; the first one present in every run is the primary one
ORDER = {
    "classification": ["accuracy", "macro_f1", "loss"],
    "causal-lm": ["exact_match", "loss", "token_accuracy", "perplexity"],
}
TITLES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "loss": "loss",
    "exact_match": "exact match",
    "token_accuracy": "token acc.",
    "perplexity": "perplexity",
}
POINTS = {"accuracy", "macro_f1", "exact_match", "token_accuracy"}  # fractions, differences in points
#: A set named ``lm-eval:<task>`` holds a run's LM Evaluation Harness headline for ``<task>`` (the
#: ``lm_eval`` block of its metrics.json, written by ``flatpeft eval``).
HARNESS = "lm-eval:"
HARNESS_POINTS = {"acc", "acc_norm", "pass@1", "pass_at_1", "f1", "mcc", "bleu", "rouge1"}
POINTS |= HARNESS_POINTS
NOISY = 3  # the probe is "too noisy" when its standard error is above a third of the difference
SHARP = "sharpness"


def metric_names(task: str, results: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics to tabulate: those of ``ORDER[task]`` that any run reports on its test split (or
    any evaluation set), those that every run reports first, in ``ORDER``; then any others."""
    blocks = [r.get("test", {}) for r in results] + [b for r in results for b in r.get("eval", {}).values()]
    blocks += [_harness_block(r, HARNESS + t) for r in results for t in r.get("lm_eval", {})]
    seen = [k for k in dict.fromkeys(k for b in blocks for k in b) if k != "n"]
    known = [m for m in ORDER.get(task, []) if m in seen] + [m for m in seen if m not in ORDER.get(task, [])]
    every = [m for m in known if results and all(m in r.get("test", {}) for r in results)]
    return every + [m for m in known if m not in every]


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _harness_block(run: dict[str, Any], name: str) -> dict[str, Any]:
    """``{metric: value}`` of a run's harness headline for set ``lm-eval:<task>``."""
    entry = run.get("lm_eval", {}).get(name.removeprefix(HARNESS)) or {}
    return {entry["metric"]: entry["value"]} if "metric" in entry else {}


def _block(run: dict[str, Any], name: str) -> dict[str, Any]:
    if name.startswith(HARNESS):
        return _harness_block(run, name)
    return run.get("test", {}) if name == "test" else run.get("eval", {}).get(name, {})


def set_metrics(summary: dict[str, Any], name: str) -> list[str]:
    """The metrics tabulated for set ``name``: for a harness set those some run reports there (its
    headline metric); for the others every metric but those that only harness sets report."""
    metrics = summary["metrics"]
    sets = [name] if name.startswith(HARNESS) else [s for s in summary["sets"] if not s.startswith(HARNESS)]
    return [
        m
        for m in metrics
        if any(v is not None for r in summary["rows"] for s in sets for v in r["values"][s][m])
    ]


def _probe_se(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Standard error of one seed's ``sharpness(a) - sharpness(b)``: from the per-draw differences
    when both used the same noise draws (common random numbers), else from the two standard errors."""
    sa, sb = a.get("samples"), b.get("samples")
    same_noise = sa and sb and len(sa) == len(sb) > 1 and a.get("noise_seed", -1) == b.get("noise_seed", -2)
    if same_noise:
        return statistics.stdev(x - y for x, y in zip(sa, sb, strict=True)) / math.sqrt(len(sa))
    if a.get("stderr") is None or b.get("stderr") is None:
        return None
    return math.hypot(a["stderr"], b["stderr"])


def _mean_se(errors: list[float | None]) -> float | None:
    """Standard error of a mean of independent estimates with standard errors ``errors``."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def summarise(
    results: list[dict[str, Any]], rows: Sequence[Row], task: str, reference: str
) -> dict[str, Any]:
    """Per-seed values, means and paired differences from ``reference`` for every row.

    Returns:
        ``{"task", "reference", "metrics", "sets", "rows", "correlation"}`` (Spearman's ρ of every
        run's sharpness and main metric per set, and of their paired differences from the
        reference); each row holds ``seeds``,
        ``values[set][metric]`` (one value or ``None`` per seed), ``stats`` (mean, std),
        ``diff[set][metric]`` (a :class:`~flatpeft._stats.Paired` as a dict, ``None`` for the
        reference row), and with the probe ``sharpness`` and ``sharpness_diff``.
    """
    metrics = metric_names(task, results)
    sets = ["test", *dict.fromkeys(k for r in results for k in r.get("eval", {}))]
    sets += [HARNESS + t for t in dict.fromkeys(k for r in results for k in r.get("lm_eval", {}))]
    by_label = {row.label: [r for r in results if r["label"] == row.label] for row in rows}
    ref_runs = {r["seed"]: r for r in by_label.get(reference, [])}
    out_rows = []
    for row in rows:
        runs = by_label[row.label]
        if not runs:
            continue
        seeds = [r["seed"] for r in runs]
        entry: dict[str, Any] = {"label": row.label, "spec": row.spec, "sweep": row.sweep, "seeds": seeds}
        entry["n"] = len(runs)
        entry["values"], entry["stats"], entry["diff"] = {}, {}, {}
        for name in sets:
            values = {m: [_block(r, name).get(m) for r in runs] for m in metrics}
            entry["values"][name] = values
            entry["stats"][name] = {m: _stats([v for v in vs if v is not None]) for m, vs in values.items()}
            entry["diff"][name] = {}
            for m in metrics:
                own = {s: v for s, v in zip(seeds, values[m], strict=True) if v is not None}
                ref = {s: _block(r, name).get(m) for s, r in ref_runs.items()}
                result = paired({s: v for s, v in ref.items() if v is not None}, own)
                own_row = row.label == reference or result is None
                entry["diff"][name][m] = None if own_row else result.to_dict()
        for key in ("train_loss", "seconds_per_step", "peak_memory_mb"):
            entry[key] = _stats([r[key] for r in runs if r.get(key) is not None])
        probes = {r["seed"]: r[SHARP] for r in runs if SHARP in r}
        if probes:
            values = [p["expected_full"] for p in probes.values()]
            entry[SHARP] = _stats(values) | {
                "values": [probes.get(s, {}).get("expected_full") for s in seeds],
                "stderr": [probes.get(s, {}).get("stderr") for s in seeds],
                "probe_se": _mean_se([p.get("stderr") for p in probes.values()]),
                "sigma": next(iter(probes.values())).get("sigma"),
                "n_samples": next(iter(probes.values())).get("n_samples"),
            }
            ref_probes = {s: r[SHARP] for s, r in ref_runs.items() if SHARP in r}
            result = paired({s: p["expected_full"] for s, p in ref_probes.items()},
                            {s: p["expected_full"] for s, p in probes.items()})  # fmt: skip
            if result is not None and row.label != reference:
                se = _mean_se([_probe_se(probes[s], ref_probes[s]) for s in result.seeds])
                noisy = se is None or se * NOISY >= abs(result.mean)
                entry["sharpness_diff"] = result.to_dict() | {"probe_se": se, "noisy": noisy}
        out_rows.append(entry)
    correlation = []
    probed = [r for r in results if SHARP in r]
    if len(probed) > 1 and metrics:
        for name in sets:
            pairs = [(r[SHARP]["expected_full"], _block(r, name).get(metrics[0])) for r in probed]
            pairs = [(x, y) for x, y in pairs if y is not None]
            rho = spearman([x for x, _ in pairs], [y for _, y in pairs])
            correlation.append({"set": name, "metric": metrics[0], "paired": False, **rho})
            # The same on the differences from the reference (same seed): the seed's effect removed.
            pairs = []
            for row in out_rows:
                ds, dm = row.get("sharpness_diff"), row["diff"][name].get(metrics[0])
                if ds and dm:
                    by_seed = dict(zip(dm["seeds"], dm["diffs"], strict=True))
                    pairs += [
                        (x, by_seed[s]) for s, x in zip(ds["seeds"], ds["diffs"], strict=True) if s in by_seed
                    ]
            rho = spearman([x for x, _ in pairs], [y for _, y in pairs])
            correlation.append({"set": name, "metric": metrics[0], "paired": True, **rho})
    return {
        "task": task,
        "reference": reference,
        "metrics": metrics,
        "sets": sets,
        "rows": out_rows,
        "correlation": correlation,
    }


# -- formatting --------------------------------------------------------------------------------------


def set_title(name: str) -> str:
    """``"test"`` -> ``"test"``; an evaluation file -> its file name; ``lm-eval:arith`` -> ``arith
    (lm-eval)``."""
    if name.startswith(HARNESS):
        return f"{name.removeprefix(HARNESS)} (lm-eval)"
    return name if name == "test" else Path(name).name or name


def _scale(metric: str) -> float:
    return 100.0 if metric in POINTS else 1e3 if metric == SHARP else 1.0  # sharpness in 10⁻³


def _num(x: float | None, metric: str, signed: bool = True) -> str:
    if x is None:
        return "–"
    x *= _scale(metric)
    spec = ("+" if signed else "") + (".1f" if metric in POINTS else ".3f" if metric == SHARP else ".4f")
    text = format(x, spec)
    if float(text) == 0:  # no "−0.0"
        text = text.replace("-", "+")
    return text.replace("-", "−")


def diff_cell(d: dict[str, Any] | None, metric: str) -> str:
    """``+0.4 [−0.3, +1.1]``; bold when the interval excludes zero; ``–`` without a difference."""
    if not d:
        return "–"
    text = _num(d["mean"], metric)
    if d["low"] is None:
        return f"{text} (1 seed)"
    text += f" [{_num(d['low'], metric)}, {_num(d['high'], metric)}]"
    return f"**{text}**" if d["marker"] else text


def _value_cell(stat: dict[str, Any], metric: str) -> str:
    if stat["mean"] is None:
        return "–"
    k, spec = (1e3, ".3f") if metric == SHARP else (1.0, ".4f")
    return f"{stat['mean'] * k:{spec}}" + (f" ± {stat['std'] * k:{spec}}" if stat["n"] > 1 else "")


def _sharpness_cells(row: dict[str, Any]) -> list[str]:
    s = row.get(SHARP)
    if s is None:
        return ["–", "–"]
    cell = _value_cell(s, SHARP)
    if s["probe_se"] is not None:
        cell += f" (probe SE {s['probe_se'] * 1e3:.3f})"
    d = row.get("sharpness_diff")
    text = diff_cell(d, SHARP)
    if d and d["probe_se"] is not None:
        text += f" (probe SE {d['probe_se'] * 1e3:.3f}{'; too noisy' if d['noisy'] else ''})"
    return [cell, text]


def markdown(summary: dict[str, Any], base: TrainConfig) -> str:
    """The comparison as Markdown: paired differences, then every per-seed value."""
    rows = summary["rows"]
    if not rows:
        return "(no finished runs)"
    sets, ref = summary["sets"], summary["reference"]
    probe = any(SHARP in r for r in rows)
    header = ["method", "seeds"]
    for name in sets:
        where, ms = set_title(name), set_metrics(summary, name)
        header.append(f"{TITLES.get(ms[0], ms[0])} ({where})")
        header += [f"Δ {TITLES.get(m, m)}{' (pt)' if m in POINTS else ''} ({where})" for m in ms]
    if probe:
        header += ["sharpness ×10⁻³ (full, expected)", "Δ sharpness ×10⁻³"]
    header += ["wall s/step", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], str(row["n"])]
        for name in sets:
            ms = set_metrics(summary, name)
            cells.append(_value_cell(row["stats"][name][ms[0]], ms[0]))
            cells += [diff_cell(row["diff"][name].get(m), m) for m in ms]
        if probe:
            cells += _sharpness_cells(row)
        wall, peak = row["seconds_per_step"]["mean"], row["peak_memory_mb"]["mean"]
        cells += [f"{wall:.3f}" if wall is not None else "–", f"{peak:.0f}" if peak is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    n_train = f"{base.train_size} training examples" if base.train_size else "all training examples"
    lines += [
        "",
        f"Model {base.model}, data {base.data} ({n_train}); every run on the same split. Δ = method − {ref}"
        " on the same seeds, mean [95 % t-interval] over seeds; **bold** when the interval excludes "
        f"zero (with at least {MIN_MARKED} seeds whose differences vary); fractions in points (pt). "
        "The first value column is the mean ± std over seeds.",
        "wall s/step: the median wall time of each run's steps, run one after another (not interleaved: "
        "not an overhead measurement).",
    ]
    if probe:
        s = next(r[SHARP] for r in rows if SHARP in r)
        lines.append(
            f"Sharpness: expected full-space sharpness (σ = {s['sigma']}, {s['n_samples']} antithetic "
            "draws, the same noise draws for every run), in units of 10⁻³; probe SE = its Monte-Carlo "
            "standard error "
            f"(of the mean over seeds; of the paired difference for Δ); 'too noisy' when the probe SE is "
            f"above 1/{NOISY} of the difference."
        )
    for c in summary["correlation"]:
        lines.append(_correlation_line(c))
    lines += ["", "Per-seed values:", "", *_per_seed_table(summary)]
    return "\n".join(lines)


def _correlation_line(c: dict[str, Any]) -> str:
    what = f"sharpness vs {c['metric']} on {set_title(c['set'])}"
    what = f"Differences from the reference (same seed), {what}" if c["paired"] else what.capitalize()
    if c["rho"] is None:
        return f"{what}: no rank correlation (constant values or < 2 points)."
    interval = f" [{c['low']:+.2f}, {c['high']:+.2f}]" if c["low"] is not None else ""
    return (
        f"{what}: Spearman ρ = {c['rho']:+.2f}{interval} over {c['n']} {'pairs' if c['paired'] else 'runs'}."
    )


def _per_seed_table(summary: dict[str, Any]) -> list[str]:
    sets = summary["sets"]
    probe = any(SHARP in r for r in summary["rows"])
    header = ["method", "seed"]
    header += [f"{TITLES.get(m, m)} ({set_title(s)})" for s in sets for m in set_metrics(summary, s)]
    header += ["sharpness ± probe SE"] if probe else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        for i, seed in enumerate(row["seeds"]):
            cells = [row["label"], str(seed)]
            for name in sets:
                ms = set_metrics(summary, name)
                cells += ["–" if (v := row["values"][name][m][i]) is None else f"{v:.4f}" for m in ms]
            if probe:
                s = row.get(SHARP) or {}
                v, e = (s.get("values") or [None] * (i + 1))[i], (s.get("stderr") or [None] * (i + 1))[i]
                cells.append("–" if v is None else f"{v:.4g}" + (f" ± {e:.2g}" if e is not None else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def console_lines(summary: dict[str, Any]) -> list[str]:
    """One plain line per method: its difference from the reference on each set, no stars."""
    lines = []
    main = summary["metrics"][0] if summary["metrics"] else None
    for row in summary["rows"]:
        if row["label"] == summary["reference"] or main is None:
            continue
        parts = []
        for name in summary["sets"]:
            m = set_metrics(summary, name)[0] if name.startswith(HARNESS) else main
            d = row["diff"][name].get(m)
            if not d:
                continue
            unit = " pt" if m in POINTS else ""
            interval = " (1 seed)" if d["low"] is None else f" [{_num(d['low'], m)}, {_num(d['high'], m)}]"
            where = "in-domain" if name == "test" else f"on {set_title(name)}"
            what = f"{TITLES.get(m, m)} " if m != main else ""
            parts.append(f"{what}{_num(d['mean'], m)}{unit}{interval} {where}")
        d = row.get("sharpness_diff")
        if d:
            noisy = " (probe too noisy to tell)" if d["noisy"] else ""
            parts.append(f"sharpness {_num(d['mean'], SHARP)} (×10⁻³){noisy}")
        n = row["n"]
        lines.append(
            f"{row['label']}: {TITLES.get(main, main)} " + ", ".join(parts) + f" vs {summary['reference']}"
            f" ({n} seed{'s' if n > 1 else ''}, mean [95 % interval])"
        )
    return [line.replace("−", "-") for line in lines]


# -- CSV -----------------------------------------------------------------------------------------


FIELDS = ["label", "method", "sweep_key", "sweep_value", "seed", "set", "metric", "value", "stderr"]


def write_csv(path: Path, summary: dict[str, Any]) -> None:
    """One line per method, seed, set and metric (``set`` = ``probe`` for the sharpness probe, with its
    standard error): the values every difference in the table is computed from."""
    lines = []
    for row in summary["rows"]:
        sweep = row["sweep"] or {}
        first = {"label": row["label"], "method": row["spec"].partition(":")[0]}
        first |= {"sweep_key": sweep.get("key", ""), "sweep_value": sweep.get("value", "")}
        for i, seed in enumerate(row["seeds"]):
            for name in summary["sets"]:
                for m in summary["metrics"]:
                    v = row["values"][name][m][i]
                    if v is not None:
                        lines.append(first | {"seed": seed, "set": name, "metric": m, "value": v})
            s = row.get(SHARP)
            if s and s["values"][i] is not None:
                line = {"seed": seed, "set": "probe", "metric": SHARP, "value": s["values"][i]}
                lines.append(first | line | {"stderr": s["stderr"][i] if s["stderr"][i] is not None else ""})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(lines)


def read_csv(path: str | Path) -> dict[tuple[str, str, str], dict[int, float]]:
    """``(label, set, metric) -> {seed: value}`` from a ``compare.csv``."""
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            key = (line["label"], line["set"], line["metric"])
            values.setdefault(key, {})[int(line["seed"])] = float(line["value"])
    return values
