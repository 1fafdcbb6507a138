"""The axolotl plugin and the LLaMA-Factory launcher without the hosts installed: YAML key validation,
the fused-kernel rule, the refusals, the trainer class, and the idempotent export. Where a host is
importable its real classes are used too; otherwise those tests are skipped with the reason.
End-to-end runs in the hosts' own environments: ``make check-integrations``."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import flatpeft
from flatpeft import cli
from flatpeft.integrations import _hosts, llamafactory
from flatpeft.integrations import axolotl as ax
from flatpeft.integrations.transformers import FlatTrainerMixin
from helpers import defaults_for, tiny_llama

HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
HAS_LLAMAFACTORY = importlib.util.find_spec("llamafactory") is not None


def attach_error(method: str, **options) -> str:
    """The message flatpeft.attach gives for this method and these options."""
    with pytest.raises((ValueError, TypeError)) as info:
        flatpeft.attach(tiny_llama(), method, **options)
    return str(info.value)


def lora_cfg(**extra) -> dict:
    return {"adapter": "lora", "flatpeft_method": "flat_lora", "flatpeft_config": {"sigma": 0.05}, **extra}


# -- the two YAML keys ---------------------------------------------------------------------------------


def test_read_method_returns_the_validated_keys():
    assert _hosts.read_method(lora_cfg()) == ("flat_lora", {"sigma": 0.05})
    assert _hosts.read_method({"flatpeft_method": "bi_lora"}) == ("bi_lora", {})
    assert _hosts.read_method({"adapter": "lora"}) is None


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("flat_lorra", {}),
        ("flat_lora", {"sigmaa": 0.1}),
        ("flat_lora", {"sigma": -1.0}),
        ("bi_lora", {"rho": "x"}),
    ],
)
def test_bad_keys_get_the_error_of_attach(method, options):
    expected = attach_error(method, **options)
    with pytest.raises((ValueError, TypeError)) as info:
        _hosts.read_method({"flatpeft_method": method, "flatpeft_config": options})
    assert str(info.value) == expected


def test_config_without_method_or_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="flatpeft_config is set but flatpeft_method is not"):
        _hosts.read_method({"flatpeft_config": {"sigma": 0.1}})
    with pytest.raises(TypeError, match="flatpeft_config must be a mapping"):
        _hosts.read_method({"flatpeft_method": "flat_lora", "flatpeft_config": [0.1]})
    with pytest.raises(TypeError, match="flatpeft_method must be a method name"):
        _hosts.read_method({"flatpeft_method": 3})


def test_declared_pydantic_keys_validate_with_the_same_error():
    pydantic = pytest.importorskip("pydantic")
    args = ax.FlatPeftArgs(flatpeft_method="flat_lora", flatpeft_config={"sigma": 0.05})
    assert args.flatpeft_config == {"sigma": 0.05}
    assert ax.FlatPeftArgs().flatpeft_method is None  # the plugin listed, no method: plain axolotl
    with pytest.raises(pydantic.ValidationError) as info:
        ax.FlatPeftArgs(flatpeft_method="flat_lora", flatpeft_config={"sigmaa": 0.1})
    assert attach_error("flat_lora", sigmaa=0.1) in str(info.value)


# -- axolotl: the kernel rule and the refusals ----------------------------------------------------------


def test_unset_kernels_are_switched_off_and_explicit_false_is_kept():
    cfg = lora_cfg(lora_qkv_kernel=False)
    assert ax.check_config(cfg) == ("flat_lora", {"sigma": 0.05})
    assert {k: cfg[k] for k in ax.KERNEL_KEYS} == dict.fromkeys(ax.KERNEL_KEYS, False)


@pytest.mark.parametrize("key", ax.KERNEL_KEYS)
def test_a_kernel_forced_on_is_refused_naming_the_key(key):
    with pytest.raises(ValueError, match=rf"^{key}: true cannot be used with flatpeft_method.*bypass"):
        ax.check_config(lora_cfg(**{key: True}))


def test_without_a_method_the_config_is_left_alone():
    cfg = {"adapter": "lora", "lora_mlp_kernel": True}
    assert ax.check_config(cfg) is None
    assert cfg == {"adapter": "lora", "lora_mlp_kernel": True}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rl": "dpo"}, r"^rl: dpo cannot be used with flatpeft_method \(axolotl's RL trainers"),
        ({"reward_model": True}, r"^reward_model: True cannot be used"),
        ({"process_reward_model": True}, r"^process_reward_model: True cannot be used"),
        ({"adapter": None}, r"needs adapter: lora or adapter: qlora .* got adapter: None"),
        ({"adapter": "ia3"}, r"got adapter: ia3"),
    ],
)
def test_rl_reward_and_non_lora_configs_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        ax.check_config(lora_cfg(**extra))


def test_bilevel_methods_refuse_sample_packing_others_keep_it():
    bilevel = [m for m in flatpeft.list_methods() if flatpeft.get_method(m).needs_upper_loss]
    assert bilevel  # BiLoRA
    for method in flatpeft.list_methods():
        cfg = {"adapter": "qlora", "flatpeft_method": method, "sample_packing": True}
        if method in bilevel:
            with pytest.raises(ValueError, match=r"^sample_packing: true cannot be used with .*multipack"):
                ax.check_config(cfg)
        else:
            assert ax.check_config(cfg)[0] == method


def test_plugin_hooks_without_a_method_change_nothing():
    plugin = ax.FlatPeftPlugin()
    assert plugin.get_input_args() == "flatpeft.integrations.axolotl.FlatPeftArgs"
    cfg = {"adapter": "lora"}
    plugin.register(cfg)
    assert cfg == {"adapter": "lora"}
    assert plugin.get_trainer_cls(cfg) is None
    plugin.post_train(cfg, tiny_llama())  # nothing attached: nothing to export


# -- the trainer class ---------------------------------------------------------------------------------


def test_flat_trainer_class_mixes_the_method_into_the_host_trainer(tmp_path):
    cls = _hosts.flat_trainer_class(Trainer, "flat_lora", {"sigma": 0.05})
    assert cls.__name__ == "FlatTrainer" and cls.__mro__[1:3] == (FlatTrainerMixin, Trainer)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, seed=7)
    trainer = cls(model=tiny_llama(), args=args)
    assert trainer.flat_config.method == "flat_lora" and trainer.flat_config.sigma == 0.05
    assert trainer.flat_config.seed == 7  # the host's seed, as FlatTrainer takes it
    other = cls(model=tiny_llama(), args=args, method="bi_lora", method_config={"rho": 0.1})
    assert other.flat_config.method == "bi_lora"  # explicit arguments win


# -- export ---------------------------------------------------------------------------------------------


def test_export_is_idempotent_and_leaves_a_stock_adapter(method_name, tmp_path):
    plain = tiny_llama()
    plain.save_pretrained(tmp_path / "plain")
    stock_keys = set(load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    model = tiny_llama()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    assert _hosts.attached_method(model) is method
    assert _hosts.export_adapter(model) is True
    assert _hosts.attached_method(model) is None
    for folder in ("first", "second"):
        model.save_pretrained(tmp_path / folder)  # what axolotl's final save does
        saved = tmp_path / folder
        assert set(load_file(saved / "adapter_model.safetensors")) == stock_keys
        assert not list(saved.glob("*/adapter_config.json")), "an auxiliary adapter was saved"
        assert _hosts.export_adapter(model) is False  # again: nothing left to do
    first = load_file(tmp_path / "first" / "adapter_model.safetensors")
    second = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_plugin_post_train_exports_through_the_hook():
    model = tiny_llama()
    flatpeft.attach(model, "bi_lora")
    assert len(model.peft_config) == 2  # the primary and Bi-LoRA's auxiliary adapter
    ax.FlatPeftPlugin().post_train({}, model)
    ax.FlatPeftPlugin().post_train({}, model)
    assert list(model.peft_config) == ["default"]


# -- against axolotl's real classes --------------------------------------------------------------------


@pytest.mark.skipif(not HAS_AXOLOTL, reason="axolotl is not installed here (make check-integrations runs it)")
def test_plugin_is_an_axolotl_plugin_and_extends_axolotls_trainer():
    from axolotl.core.trainers import AxolotlTrainer
    from axolotl.integrations.base import BasePlugin, load_plugin
    from axolotl.utils.dict import DictDefault

    plugin = load_plugin("flatpeft.integrations.axolotl.FlatPeftPlugin")
    assert isinstance(plugin, BasePlugin)
    cls = plugin.get_trainer_cls(DictDefault(lora_cfg()))
    assert issubclass(cls, AxolotlTrainer) and issubclass(cls, FlatTrainerMixin)


# -- LLaMA-Factory --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stage": "dpo"}, r"stage: sft or pt, got stage: dpo"),
        ({"finetuning_type": "full"}, r"needs finetuning_type: lora"),
        ({"use_unsloth": True}, r"^use_unsloth: true cannot be used .*bypass PEFT's lora.Linear.forward"),
        ({"use_kt": True}, r"^use_kt: true"),
        ({"use_mca": True}, r"^use_mca: true"),
        ({"enable_liger_kernel": True, "lora_target": "q_proj,lm_head"}, r"reads lm_head.weight directly"),
    ],
)
def test_llamafactory_options_that_bypass_peft_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        llamafactory.check_options({"stage": "sft", "finetuning_type": "lora", **extra}, "flat_lora")


def test_llamafactory_options_that_keep_peft_forward_are_allowed():
    for args in (
        {},
        {"stage": "pt"},
        {"enable_liger_kernel": True, "lora_target": "all"},
        {"use_unsloth_gc": True},
    ):
        llamafactory.check_options(args, "flat_lora")


@pytest.fixture
def fake_workflows(monkeypatch):
    """Modules named like LLaMA-Factory's workflows, holding Trainer subclasses (the names the
    launcher patches), for the scoping logic without LLaMA-Factory installed."""
    made = {}
    for module_name, name in llamafactory.WORKFLOW_TRAINERS.items():
        module = types.ModuleType(module_name)
        setattr(module, name, type(name, (Trainer,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)
        made[name] = (module, getattr(module, name))
    return made


def test_workflow_trainers_are_extended_inside_the_block_and_restored_after(fake_workflows):
    flat = llamafactory.flat_workflows("flat_lora", {"sigma": 0.05})
    with pytest.raises(RuntimeError, match="inside"), flat as classes:
        for name, (module, base) in fake_workflows.items():
            patched = getattr(module, name)
            assert patched is classes[name] and patched.__mro__[1:3] == (FlatTrainerMixin, base)
        raise RuntimeError("inside")  # restored even when training fails
    for name, (module, base) in fake_workflows.items():
        assert getattr(module, name) is base


def test_llamafactory_verb_reports_a_missing_host_or_file(tmp_path, capsys):
    code = cli.main(["llamafactory", str(tmp_path / "missing.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    expected = "config file not found" if HAS_LLAMAFACTORY else "pip install llamafactory==0.9.5"
    assert err.startswith("flatpeft llamafactory: error:") and expected in err


@pytest.mark.skipif(
    not HAS_LLAMAFACTORY, reason="LLaMA-Factory is not installed here (make check-integrations)"
)
def test_llamafactory_config_is_read_by_its_own_parser(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        json.dumps({"stage": "sft", "flatpeft_method": "flat_lora", "flatpeft_config": {"sigma": 0.1}})
    )
    args, method = llamafactory.read_config([str(path), "learning_rate=0.5"])
    assert method == ("flat_lora", {"sigma": 0.1})
    assert args == {"stage": "sft", "learning_rate": 0.5}
    with llamafactory.flat_workflows(*method) as classes:
        from llamafactory.train.sft import workflow

        assert workflow.CustomSeq2SeqTrainer is classes["CustomSeq2SeqTrainer"]
    assert workflow.CustomSeq2SeqTrainer.__name__ == "CustomSeq2SeqTrainer"
