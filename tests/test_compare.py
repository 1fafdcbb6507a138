"""``flatpeft compare``: paired statistics, sweeps, seed ranges, the same-split check, the outputs."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from flatpeft import _compare_report, cli, compare
from flatpeft import data as data_lib
from flatpeft._stats import paired, sign_test, spearman, t_quantile

pytestmark = pytest.mark.usefixtures("one_thread")

# -- the statistics, on hand-set numbers ------------------------------------------------------------


def test_t_quantiles_match_the_tables():
    for df, value in [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-6)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318468, abs=1e-6)
    with pytest.raises(ValueError, match=r"0\.5 < p < 1"):
        t_quantile(0.3, 4)


def test_paired_difference_mean_interval_and_marker_on_hand_set_seeds():
    ref = {0: 0.60, 1: 0.62, 2: 0.61, 3: 0.63, 4: 0.60}
    diffs = [0.010, 0.020, 0.015, 0.005, 0.010]
    other = {s: ref[s] + d for s, d in zip(ref, diffs, strict=True)} | {7: 0.9}  # seed 7 has no pair
    result = paired(ref, other)
    assert result.seeds == [0, 1, 2, 3, 4]
    assert result.mean == pytest.approx(0.012)
    sd = math.sqrt(sum((d - 0.012) ** 2 for d in diffs) / 4)  # 0.005701
    half = 2.7764451 * sd / math.sqrt(5)  # t(0.975, 4 df) · s / √n = 0.0070789
    assert (result.low, result.high) == (pytest.approx(0.012 - half), pytest.approx(0.012 + half))
    assert result.low == pytest.approx(0.0049211, abs=1e-6)
    assert result.marker == 1 and (result.wins, result.losses) == (5, 0)
    assert result.sign_p == pytest.approx(0.0625)  # 2 · (1/2)^5

    mixed = paired({0: 0.5, 1: 0.5, 2: 0.5}, {0: 0.51, 1: 0.48, 2: 0.505})
    assert mixed.mean == pytest.approx(-0.005 / 3) and mixed.low < 0 < mixed.high and mixed.marker == 0
    assert (mixed.wins, mixed.losses) == (2, 1) and mixed.sign_p == 1.0
    worse = paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.9, 1: 0.92, 2: 0.91})
    assert worse.marker == -1 and worse.high < 0
    # One tweet lost on each of two seeds (the float differences agree to rounding): an interval of no
    # width, and too few seeds to mark anything; three equal differences are not marked either.
    two = paired({0: 0.3875, 1: 0.5125}, {0: 0.375, 1: 0.5})
    assert two.mean == pytest.approx(-0.0125) and two.high < 0 and two.marker == 0
    spread_two = paired({0: 1.0, 1: 1.0}, {0: 0.9, 1: 0.91})
    assert spread_two.high < 0 and spread_two.marker == 0  # two seeds: never marked
    same = paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4875, 1: 0.5875, 2: 0.6875})
    assert same.marker == 0 and same.losses == 3
    single = paired({0: 1.0}, {0: 1.5})
    assert single.mean == 0.5 and single.low is None and single.marker == 0
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test(5, 0) == pytest.approx(0.0625)
    assert sign_test(1, 4) == pytest.approx(0.375)  # 2 · (1 + 5) / 32
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0


def test_spearman_with_ties_and_its_fisher_interval():
    out = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert out["rho"] == pytest.approx(0.8) and out["n"] == 5
    half = 1.959964 * math.sqrt(1.06 / 2)
    assert out["low"] == pytest.approx(math.tanh(math.atanh(0.8) - half), abs=1e-5)
    assert out["high"] == pytest.approx(math.tanh(math.atanh(0.8) + half), abs=1e-5)
    tied = spearman([1.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0])  # ranks 1.5, 1.5, 3, 4
    assert tied["rho"] == pytest.approx(-0.9486833, abs=1e-6)
    assert spearman([1, 1, 1], [1, 2, 3])["rho"] is None and spearman([1, 2, 3], [3, 2, 1])["low"] is None
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2], [1])


# -- method specs and seeds ---------------------------------------------------------------------


def test_sweep_specs_expand_to_one_row_per_value():
    rows = compare.expand_specs(["lora", "flat_lora:sigma=0.02,0.05,schedule=constant", "bi_lora:rho=0.1"])
    assert [r.spec for r in rows] == [
        "lora",
        "flat_lora:sigma=0.02,schedule=constant",
        "flat_lora:sigma=0.05,schedule=constant",
        "bi_lora:rho=0.1",
    ]
    assert [r.label for r in rows][1:3] == [
        "flat_lora sigma=0.02 schedule=constant",
        "flat_lora sigma=0.05 schedule=constant",
    ]
    assert rows[0].sweep is None and rows[3].sweep is None
    assert rows[2].sweep == {
        "group": "flat_lora:sigma=0.02,0.05,schedule=constant",
        "method": "flat_lora",
        "key": "sigma",
        "value": "0.05",
    }
    # The single-valued form keeps its meaning: several options, no sweep.
    (one,) = compare.expand_specs(["flat_lora:sigma=0.1,lr=0.02"])
    assert one.spec == "flat_lora:sigma=0.1,lr=0.02" and one.sweep is None
    for specs, message in [
        (["flat_lora:0.1"], "comes before any key=value"),
        (["flat_lora:sigma=0.1,0.2,lr=0.1,0.2"], "sweep one option per spec"),
        (["lora", "flat_lora:sigma=0.1", "flat_lora:sigma=0.1"], "flat_lora sigma=0.1 more than once"),
    ]:
        with pytest.raises(ValueError, match=message):
            compare.expand_specs(specs)


def test_seed_ranges():
    assert compare.parse_seeds(["0-9"]) == list(range(10))
    assert compare.parse_seeds(["0-2", "5", "7,8"]) == [0, 1, 2, 5, 7, 8]
    assert compare.parse_seeds("3-4 0") == [3, 4, 0] and compare.parse_seeds([4, 1]) == [4, 1]
    args = cli.build_parser().parse_args(["compare", "--seeds", "0-9"])
    assert compare.parse_seeds(args.seeds) == list(range(10))
    for bad, message in [(["3-1"], "runs backwards; write 1-3"), (["a"], "integers and ranges"),
                         (["-1"], "integers and ranges"), (["0-2", "2"], r"\[2\] more than once"),
                         ([True], "integers and ranges")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            compare.parse_seeds(bad)


def test_causal_lm_puts_exact_match_first_when_every_run_has_it():
    full = {"loss": 1.0, "token_accuracy": 0.5, "perplexity": 2.7, "exact_match": 0.2, "n": 4}
    old = {k: v for k, v in full.items() if k != "exact_match"}
    every = [{"test": full}, {"test": full}]
    assert _compare_report.metric_names("causal-lm", every) == [
        "exact_match", "loss", "token_accuracy", "perplexity"
    ]  # fmt: skip
    some = [{"test": full}, {"test": old}]
    assert _compare_report.metric_names("causal-lm", some) == [
        "loss", "token_accuracy", "perplexity", "exact_match"
    ]  # fmt: skip
    # A metric one run lacks: "–" in its cells, paired on the seeds that have it.
    runs = [{"label": "lora", "seed": s, "test": full} for s in (0, 1)]
    runs += [{"label": "flat_lora", "seed": 0, "test": full}, {"label": "flat_lora", "seed": 1, "test": old}]
    rows = compare.expand_specs(["lora", "flat_lora"])
    summary = _compare_report.summarise(runs, rows, "causal-lm", "lora")
    flat = summary["rows"][1]
    assert flat["values"]["test"]["exact_match"] == [0.2, None]
    assert (
        flat["diff"]["test"]["exact_match"]["seeds"] == [0] and flat["stats"]["test"]["exact_match"]["n"] == 1
    )


def test_split_fingerprint_changes_with_any_example():
    examples = [data_lib.Example("a", 0), data_lib.Example("b", 1)]
    base = data_lib.split_fingerprint({"train": examples, "test": examples[:1]})
    assert base == data_lib.split_fingerprint({"train": list(examples), "test": examples[:1]})
    changed = [data_lib.Example("a", 0), data_lib.Example("b ", 1)]
    assert data_lib.split_fingerprint({"train": changed, "test": examples[:1]}) != base
    assert data_lib.split_fingerprint({"train": examples[::-1], "test": examples[:1]}) != base
    assert data_lib.split_fingerprint({"train": examples[:1], "test": examples}) != base  # moved


# -- a tiny comparison, run once -------------------------------------------------------------------


def _write(path: Path, rows: list[dict[str, str]]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    words = {"pos": "good great love", "neg": "bad awful hate", "neu": "car road the"}
    rows = [{"text": words[k], "label": k} for k in ["pos", "neg", "neu"] * 20]
    data = _write(folder / "small.csv", rows)
    shifted = {"pos": "neg", "neg": "neu", "neu": "pos"}  # another labelling: scores unlike the test split's
    ood = _write(folder / "ood.csv", [{"text": words[k], "label": shifted[k]} for k in shifted] * 4)
    args = ["compare", "--data", data, "--eval-data", ood, "--model", "tiny", "--max-steps", "6"]
    args += ["--lr", "0.03", "--batch-size", "8", "--test-size", "0.3", "--no-progress"]
    args += ["--sharpness-samples", "2", "--methods", "lora", "flat_lora:sigma=0.05,0.5", "--seeds", "0-2"]
    args += ["--out", str(folder / "cmp")]
    mp = pytest.MonkeyPatch()
    mp.setattr(compare, "_launch", lambda f: cli.main(["train", "--config", str(f)]))
    assert cli.main(args) == 0
    mp.undo()
    report = json.loads((folder / "cmp" / "compare.json").read_text())
    return {"args": args, "root": folder / "cmp", "report": report, "data": data, "ood": ood}


def test_compare_runs_share_the_exact_split(tiny_compare):
    report = tiny_compare["report"]
    assert len(report["runs"]) == 9
    splits = data_lib.load_splits(
        tiny_compare["data"], val_size=0.1, test_size=0.3, seed=0, eval_data=[tiny_compare["ood"]]
    )
    fingerprints = {json.loads((Path(r["dir"]) / "config.json").read_text())["data"]["fingerprint"]
                    for r in report["runs"]}  # fmt: skip
    assert fingerprints == {splits.fingerprint} == {report["split_fingerprint"]}
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    ood = {f"eval:{tiny_compare['ood']}": splits.eval_sets[tiny_compare["ood"]]}
    assert data_lib.split_fingerprint(parts | ood) == splits.fingerprint
    assert data_lib.split_fingerprint(parts) != splits.fingerprint  # the eval set is part of it


def test_a_run_on_another_split_is_refused_and_nothing_is_rewritten(
    tiny_compare, tmp_path, monkeypatch, capsys
):
    import shutil

    root = tmp_path / "cmp"
    shutil.copytree(tiny_compare["root"], root)
    config = root / "runs" / "flat_lora-sigma0.5-seed1" / "config.json"
    saved = json.loads(config.read_text())
    saved["data"]["fingerprint"] = "0123456789abcdef"
    config.write_text(json.dumps(saved))
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    monkeypatch.setattr(compare, "_launch", lambda f: pytest.fail("nothing should be trained"))
    args = [a if a != str(tiny_compare["root"]) else str(root) for a in tiny_compare["args"]]
    assert cli.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "records split fingerprint 0123456789abcdef, not this comparison's" in err
    assert "could not be paired" in err
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    # The untouched comparison resumes without training anything.
    args = [a if a != str(tiny_compare["root"]) else str(tmp_path / "again") for a in tiny_compare["args"]]
    shutil.copytree(tiny_compare["root"], tmp_path / "again")
    assert cli.main([*args, "--resume"]) == 0


def test_csv_and_json_carry_the_per_seed_values_of_every_difference(tiny_compare):
    report, root = tiny_compare["report"], tiny_compare["root"]
    summary = report["summary"]
    from_csv = _compare_report.read_csv(root / "compare.csv")
    by_run = {(r["label"], r["seed"]): r for r in report["runs"]}
    ref = summary["reference"]
    assert ref == "lora" and summary["sets"] == ["test", tiny_compare["ood"]]
    checked = 0
    for row in summary["rows"]:
        for name in summary["sets"]:
            for metric in summary["metrics"]:
                values = from_csv[(row["label"], name, metric)]
                block = "test" if name == "test" else None
                for seed, value in values.items():
                    run = by_run[(row["label"], seed)]
                    assert value == (run["test"] if block else run["eval"][name])[metric]
                if row["label"] == ref:
                    continue
                again = paired(from_csv[(ref, name, metric)], values).to_dict()
                saved = dict(row["diff"][name][metric])
                assert again.pop("diffs") == pytest.approx(saved.pop("diffs"))
                assert again.pop("seeds") == saved.pop("seeds") == [0, 1, 2]
                assert again == pytest.approx(saved), (row["label"], name, metric)
                checked += 1
        sharp = from_csv[(row["label"], "probe", "sharpness")]
        assert sharp == {s: by_run[(row["label"], s)]["sharpness"]["expected_full"] for s in (0, 1, 2)}
    assert checked == 2 * 2 * 3
    table = (root / "compare.md").read_text()
    assert "Per-seed values:" in table
    for run in report["runs"]:
        assert f"| {run['label']} | {run['seed']} | {run['test']['accuracy']:.4f} |" in table


def test_sweep_rows_and_their_chart(tiny_compare):
    rows = tiny_compare["report"]["summary"]["rows"]
    assert [r["label"] for r in rows] == ["lora", "flat_lora sigma=0.05", "flat_lora sigma=0.5"]
    assert [r["sweep"]["value"] for r in rows[1:]] == ["0.05", "0.5"] and rows[0]["sweep"] is None
    runs = tiny_compare["report"]["runs"]
    configs = [json.loads((Path(r["dir"]) / "config.json").read_text()) for r in runs]
    assert [c["method_config"]["sigma"] for c in configs[3:]] == [0.05] * 3 + [0.5] * 3
    for chart in ("compare.png", "compare_sweep.png", "compare_sharpness.png"):
        assert (tiny_compare["root"] / chart).stat().st_size > 10_000


def test_sharpness_against_accuracy_is_the_rank_correlation_of_every_run(tiny_compare):
    report = tiny_compare["report"]
    correlation = report["summary"]["correlation"]
    assert [(c["set"], c["paired"]) for c in correlation] == [
        ("test", False), ("test", True), (tiny_compare["ood"], False), (tiny_compare["ood"], True)
    ]  # fmt: skip
    rows = report["summary"]["rows"]
    for c in correlation[1::2]:  # Δ sharpness against Δ accuracy, every non-reference row and seed
        xs = [x for r in rows[1:] for x in r["sharpness_diff"]["diffs"]]
        ys = [y for r in rows[1:] for y in r["diff"][c["set"]]["accuracy"]["diffs"]]
        assert c == pytest.approx(spearman(xs, ys) | {"set": c["set"], "metric": "accuracy", "paired": True})
    for c in correlation[::2]:
        xs = [r["sharpness"]["expected_full"] for r in report["runs"]]
        ys = [(r["test"] if c["set"] == "test" else r["eval"][c["set"]])["accuracy"] for r in report["runs"]]
        assert c == pytest.approx(spearman(xs, ys) | {"set": c["set"], "metric": "accuracy", "paired": False})
        assert c["n"] == 9
        if c["rho"] is None:  # every run scored the same on this set: no ranks to correlate
            assert len(set(ys)) == 1 and c["set"] != "test"
        else:
            assert c["low"] < c["rho"] < c["high"]
    # Each run's probe carries its draws and standard error; the same noise for every run.
    probes = [r["sharpness"] for r in report["runs"]]
    assert {p["noise_seed"] for p in probes} == {0} and all(len(p["samples"]) == 2 for p in probes)
    assert probes[0]["stderr"] == pytest.approx(statistics.stdev(probes[0]["samples"]) / math.sqrt(2))
    flat = report["summary"]["rows"][1]["sharpness_diff"]
    seeds = flat["seeds"]
    lora = {r["seed"]: r["sharpness"] for r in report["runs"] if r["label"] == "lora"}
    mine = {r["seed"]: r["sharpness"] for r in report["runs"] if r["label"] == "flat_lora sigma=0.05"}
    per_seed = [statistics.stdev(a - b for a, b in zip(mine[s]["samples"], lora[s]["samples"], strict=True))
                / math.sqrt(2) for s in seeds]  # fmt: skip
    assert flat["probe_se"] == pytest.approx(math.sqrt(sum(e * e for e in per_seed)) / len(seeds))
    for s in seeds:  # common noise: the draws of two runs move together, their difference barely
        assert per_seed[seeds.index(s)] < 0.2 * statistics.stdev(lora[s]["samples"]) / math.sqrt(2)
