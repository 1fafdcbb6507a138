"""``flatpeft eval`` and ``compare --eval-tasks``: the LM Evaluation Harness on tiny LLaMA runs, the
built-in ``arith`` task (generator, final-number filter) and the refusals that write nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from flatpeft import _compare_report, _lmeval, _runfolder, cli, compare, eval_cli
from flatpeft import data as data_lib
from flatpeft.tasks import TASK_DIR, arith

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = ["--tasks", "arith", "--limit", "4", "--max-gen-toks", "12"]


def _train(out: Path, *extra: str) -> Path:
    args = ["train", "--model", "tiny", "--task", "causal-lm", "--data", "arith", "--train-size", "24"]
    args += ["--val-size", "0", "--test-size", "4", "--max-steps", "2", "--batch-size", "8"]
    args += ["--max-new-tokens", "0", "--no-progress", "--out", str(out), *extra]
    assert cli.main(args) == 0
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny causal-LM run on the built-in arith data, scored once on 4 problems."""
    run = _train(tmp_path_factory.mktemp("lmeval") / "run")
    before = _strict_json((run / "metrics.json").read_text())
    assert cli.main(["eval", str(run), *EVAL]) == 0
    return {"run": run, "before": before}


# -- the built-in task ------------------------------------------------------------------------------


def test_arith_problems_are_seeded_correct_and_train_never_meets_test():
    test, train = arith.rows("test"), arith.rows("train")
    assert len(test) == arith.SIZES["test"] and len(train) == arith.SIZES["train"]
    assert arith.rows("test", 5) == test[:5] == [arith.problem("test", i) for i in range(5)]  # seeded
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    for p in test[:100] + train[:100]:
        steps, _, final = p["answer"].rpartition("\n#### ")
        assert int(final) == p["number"] >= 0
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", steps):  # every step is right
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert str(p["number"]) in steps
    examples, _ = data_lib.load_examples("arith", task="causal-lm")
    assert examples[0].text == arith.PROMPT.format(question=train[0]["question"])
    assert examples[0].response.strip() == train[0]["answer"]


def _filters() -> dict[str, list]:
    """The filter chains of arith.yaml, built with the harness's own filter classes."""
    from lm_eval.api.registry import get_filter
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASK_DIR / "arith.yaml", resolve_func=False)
    return {
        f["name"]: [get_filter(c["function"])(**{k: v for k, v in c.items() if k != "function"})
                    for c in f["filter"]]
        for f in cfg["filter_list"]
    }  # fmt: skip


def test_final_number_filter_on_hand_set_generations():
    cases = {
        "5 * 3 = 15, 12 + 15 = 27, so the answer is #### 42": ("42", "42"),
        "Leo has 28 + 15 = 43 books.\n#### 43": ("43", "43"),
        "The answer is 1,234.": ("1,234", "[invalid]"),
        "It is -5 dollars": ("-5", "[invalid]"),
        "I do not know.": ("[invalid]", "[invalid]"),
    }
    chains = _filters()
    assert list(chains) == ["final-number", "strict-match"]  # the headline filter first
    for text, expected in cases.items():
        got = []
        for chain in chains.values():
            out = [[text]]
            for f in chain:
                out = list(f.apply(out, [{}]))
            got.append(out[0])
        assert tuple(got) == expected, text
    from lm_eval.api.metrics import exact_match_hf_evaluate

    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]  # arith.yaml's; the target "steps\n#### 1234" -> 1234
    score = exact_match_hf_evaluate(["1,234", "42", "[invalid]"], ["a\n#### 1234", "b\n#### 42", "#### 3"],
                                    regexes_to_ignore=ignore, ignore_case=True)  # fmt: skip
    assert score["exact_match"] == pytest.approx(2 / 3)


# -- flatpeft eval ----------------------------------------------------------------------------------


def test_eval_writes_the_harness_results_and_its_number(tiny_run):
    run = tiny_run["run"]
    results = _strict_json((run / "eval" / "arith.json").read_text())
    metrics = _strict_json((run / "metrics.json").read_text())
    score = metrics["lm_eval"]["arith"]
    assert score["metric"] == "exact_match" and score["filter"] == "final-number" and score["n"] == 4
    assert score["value"] == results["results"]["arith"]["exact_match,final-number"]
    assert score["settings"] == {"limit": 4, "num_fewshot": None, "max_gen_toks": 12}
    assert score["n_shot"] == results["n-shot"]["arith"] == 0
    samples = [json.loads(line) for line in (run / "eval" / "arith.samples.jsonl").read_text().splitlines()]
    final = [s for s in samples if s["filter"] == "final-number"]
    assert [s["doc"]["question"] for s in final] == [p["question"] for p in arith.rows("test", 4)]
    assert score["value"] == sum(s["exact_match"] for s in final) / 4
    assert {k: v for k, v in metrics.items() if k != "lm_eval"} == tiny_run["before"]  # the rest kept


def test_the_headline_is_the_harness_score_of_hand_set_generations(tiny_run, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def answers(self, requests, disable_tqdm=False):  # right on even problems, one wrong number on odd
        return [f"so the answer is #### {r.doc['number']}" if r.doc_id % 2 == 0
                else f"It is {r.doc['number'] + 1}." for r in requests]  # fmt: skip

    monkeypatch.setattr(HFLM, "generate_until", answers)
    run = Path(shutil.copytree(tiny_run["run"], tmp_path / "run"))
    scores = eval_cli.evaluate_run(run, eval_cli.EvalOptions(tasks=("arith",), limit=6, num_fewshot=2))
    assert scores["arith"]["value"] == 0.5  # 3 of 6
    assert scores["arith"]["n_shot"] == 2  # few-shot examples come from the disjoint train split
    sample = json.loads((run / "eval" / "arith.samples.jsonl").read_text().splitlines()[0])
    prompt = sample["arguments"][0][0]  # (context, generation options)
    assert prompt.count("Question:") == 3 and "#### " in prompt
    results = _strict_json((run / "eval" / "arith.json").read_text())["results"]["arith"]
    assert results["exact_match,strict-match"] == 0.5 and results["exact_match,final-number"] == 0.5
    assert _strict_json((run / "metrics.json").read_text())["lm_eval"]["arith"]["value"] == 0.5


def test_the_adapter_is_loaded_another_adapter_generates_otherwise(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    other = Path(shutil.copytree(tiny_run["run"], tmp_path / "other"))
    shutil.rmtree(other / "eval")
    file = other / "adapter" / "adapter_model.safetensors"
    weights = load_file(file)
    g = torch.Generator().manual_seed(0)
    changed = {k: torch.randn(v.shape, generator=g) if "lora_B" in k else v for k, v in weights.items()}
    save_file(changed, file)
    assert cli.main(["eval", str(other), *EVAL]) == 0

    def generations(run: Path) -> list[str]:
        lines = (run / "eval" / "arith.samples.jsonl").read_text().splitlines()
        return [json.loads(line)["resps"][0][0] for line in lines]

    assert len(generations(other)) == 8
    assert generations(other) != generations(tiny_run["run"])


def test_the_base_model_is_scored_without_the_adapter(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run["run"], tmp_path / "run"))
    assert cli.main(["eval", str(run), *EVAL, "--base"]) == 0
    metrics = _strict_json((run / "metrics.json").read_text())
    assert metrics["lm_eval_base"]["arith"]["file"] == "eval/base/arith.json"
    assert metrics["lm_eval"] == _strict_json((tiny_run["run"] / "metrics.json").read_text())["lm_eval"]
    base = (run / "eval" / "base" / "arith.samples.jsonl").read_text()
    assert base != (run / "eval" / "arith.samples.jsonl").read_text()  # trained B != 0


def test_the_run_is_loaded_in_its_precision_with_its_seeded_base(tmp_path, monkeypatch):
    run = _train(tmp_path / "bf16", "--precision", "bf16", "--seed", "3")
    seen = {}

    def capture(model, tokenizer, tasks, name, **kwargs):
        seen["dtype"] = model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        seen["base"] = model.get_base_model().lm_head.weight.float().clone()
        raise ValueError("captured")  # stop before the harness runs: nothing is written

    monkeypatch.setattr(_lmeval, "run_harness", capture)
    before = _tree(run)
    with pytest.raises(ValueError, match="captured"):
        eval_cli.evaluate_run(run, eval_cli.EvalOptions(tasks=("arith",), limit=1))
    assert seen["dtype"] == torch.bfloat16 and seen["autocast"] == torch.bfloat16
    from flatpeft.models import load_model

    expected = load_model("tiny", "causal-lm", seed=3)[0].lm_head.weight.to(torch.bfloat16).float()
    assert torch.equal(seen["base"], expected)  # the base built from the run's seed
    assert _tree(run) == before


# -- refusals: a clear error, nothing written --------------------------------------------------------


def _refused(run: Path, args: list[str], match: str, capsys) -> None:
    before = _tree(run)
    assert cli.main(["eval", str(run), *args]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert _tree(run) == before


UNSAFE = "task: toy_code\nunsafe_code: true\ndataset_path: json\noutput_type: generate_until\n"


def test_code_tasks_are_refused_without_the_flag(tiny_run, tmp_path, capsys):
    task = tmp_path / "tasks" / "toy_code.yaml"
    task.parent.mkdir()
    task.write_text(UNSAFE + "test_split: test\ndoc_to_text: x\ndoc_to_target: y\n")
    _refused(
        tiny_run["run"], ["--tasks", str(task)], r"toy_code executes the code.*--allow-code-execution", capsys
    )
    allowed = _lmeval.resolve_tasks([str(task)], allow_code_execution=True)
    assert allowed.names == allowed.unsafe == ["toy_code"]
    assert _lmeval.resolve_tasks(["arith"]).unsafe == []


def test_missing_lm_eval_unknown_task_and_no_adapter_are_refused(tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run["run"]
    _refused(run, ["--tasks", "arith_typo.yaml"], r"task file not found", capsys)
    _refused(run, ["--tasks", "arith", "--limit", "0"], r"--limit takes an integer >= 1", capsys)
    no_adapter = Path(shutil.copytree(run, tmp_path / "no_adapter"))
    shutil.rmtree(no_adapter / "adapter")
    _refused(no_adapter, ["--tasks", "arith"], r"no trained weights \(adapter/adapter_config.json", capsys)
    real = _lmeval.importlib.util.find_spec
    monkeypatch.setattr(
        _lmeval.importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n)
    )
    _refused(run, ["--tasks", "arith"], r"needs lm-eval: pip install 'flatpeft\[eval\]'", capsys)


def test_a_run_folder_in_use_is_refused_and_left_alone(tiny_run, capsys):
    held = _runfolder.RunLock(tiny_run["run"])  # another writer (a resumed training run, another eval)
    held.acquire()
    try:
        _refused(tiny_run["run"], ["--tasks", "arith", "--limit", "2"], r"in use by another flatpeft", capsys)
    finally:
        held.release()


def test_an_unknown_task_name_is_refused_with_the_closest_names(tiny_run, capsys):
    # Not built in and not a file: the harness's whole task index is read (~15 s on 2 loaded cores).
    _refused(tiny_run["run"], ["--tasks", "gsm8kk"], r"unknown task 'gsm8kk' \(did you mean gsm8k", capsys)


# -- compare --eval-tasks ---------------------------------------------------------------------------


def test_harness_sets_are_paired_by_seed_on_hand_set_runs():
    def run(label, seed, test, harness):
        entry = {"metric": "exact_match", "filter": "final-number", "value": harness}
        return {"label": label, "seed": seed, "test": {"loss": test}, "lm_eval": {"arith": entry}}

    results = [run("lora", s, 1.0, v) for s, v in enumerate([0.50, 0.40, 0.60])]
    results += [run("flat_lora", s, 1.1, v) for s, v in enumerate([0.55, 0.50, 0.65])]
    rows = compare.expand_specs(["lora", "flat_lora"])
    summary = _compare_report.summarise(results, rows, "causal-lm", "lora")
    assert summary["sets"] == ["test", "lm-eval:arith"] and summary["metrics"] == ["loss", "exact_match"]
    d = summary["rows"][1]["diff"]["lm-eval:arith"]["exact_match"]
    assert d["diffs"] == pytest.approx([0.05, 0.10, 0.05]) and d["mean"] == pytest.approx(0.2 / 3)
    assert _compare_report.set_metrics(summary, "lm-eval:arith") == ["exact_match"]
    assert _compare_report.set_metrics(summary, "test") == ["loss"]  # no empty harness-only column
    line = _compare_report.console_lines(summary)[0]
    assert "+6.7 pt [" in line and "on arith (lm-eval)" in line


def test_compare_eval_tasks_puts_the_harness_metric_in_the_paired_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", "tiny", "--task", "causal-lm", "--data", "arith", "--train-size", "16"]
    args += ["--val-size", "0", "--test-size", "4", "--max-steps", "1", "--batch-size", "8"]
    args += ["--max-new-tokens", "0", "--no-progress", "--methods", "lora", "flat_lora", "--seeds", "0-2"]
    args += ["--eval-tasks", "arith", "--eval-limit", "2", "--eval-max-gen-toks", "4", "--out", str(out)]
    monkeypatch.setattr(compare, "_launch", lambda f: cli.main(["train", "--config", str(f)]))
    assert cli.main(args) == 0
    report = _strict_json((out / "compare.json").read_text())
    assert report["lm_eval"]["tasks"] == ["arith"] and "lm-eval:arith" in report["summary"]["sets"]
    for r in report["runs"]:
        on_disk = _strict_json((Path(r["dir"]) / "metrics.json").read_text())["lm_eval"]["arith"]
        assert r["lm_eval"]["arith"] == on_disk and on_disk["n"] == 2
    flat = next(row for row in report["summary"]["rows"] if row["label"] == "flat_lora")
    assert flat["diff"]["lm-eval:arith"]["exact_match"]["seeds"] == [0, 1, 2]
    table = (out / "compare.md").read_text()
    assert "Δ exact match (pt) (arith (lm-eval))" in table.splitlines()[0]
    assert "on arith (lm-eval)" in capsys.readouterr().out
    assert (out / "compare.png").is_file() or pytest.importorskip("matplotlib") is None
    csv_sets = {key[1] for key in _compare_report.read_csv(out / "compare.csv")}
    assert "lm-eval:arith" in csv_sets
