"""Public API: registry, configs, attach/detach/bind, and clear errors for bad input."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import flatpeft
from flatpeft.config import MethodConfig
from helpers import make_batch, tiny_bert


def test_registry_lists_methods_and_rejects_unknown():
    names = flatpeft.list_methods()
    assert {"lora", "lora_sam", "sam_full", "flat_lora"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(ValueError, match=r"unknown method 'flatlora'.*flat_lora"):
        flatpeft.get_method("flatlora")
    with pytest.raises(ValueError, match="known methods"):
        flatpeft.attach(tiny_bert(), "sharp_lora")


def test_every_config_round_trips_through_json(method_name):
    cls = flatpeft.get_method(method_name).config_class
    config = flatpeft.make_config(
        method_name, **({"total_steps": 7} if "total_steps" in _fields(cls) else {})
    )
    again = cls.from_json(config.to_json())
    assert again == config and again.to_dict()["method"] == method_name
    assert all(help_text for _, _, help_text in cls.describe())
    with pytest.raises(ValueError, match="unknown option"):
        cls.from_dict({**config.to_dict(), "not_a_field": 1})
    with pytest.raises(Exception, match=r"frozen|cannot assign"):
        config.seed = 3


def _fields(cls) -> set[str]:
    return {name for name, *_ in cls.describe()}


# Every strength field any method declares (ρ, σ): each method either validates it or refuses it.
STRENGTH_NAMES = sorted(
    {f for m in flatpeft.list_methods() for f in flatpeft.get_method(m).config_class.strength_fields()}
)


@pytest.mark.parametrize("field", STRENGTH_NAMES)
@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_bad_strength_values_are_rejected(method_name, field, value):
    """A method's own strength field rejects negative and non-finite values by name; a strength field
    the method does not have (``rho`` for ``lora``) is an unknown option, not silently ignored."""
    assert STRENGTH_NAMES  # the registry declares strength fields at all
    own = flatpeft.get_method(method_name).config_class.strength_fields()
    message = rf"\.{field} must be" if field in own else rf"unknown option\(s\) \['{field}'\]"
    with pytest.raises(ValueError, match=message):
        flatpeft.make_config(method_name, **{field: value})
    with pytest.raises(ValueError, match=message):
        flatpeft.attach(tiny_bert(), method_name, total_steps=3, **{field: value})


def test_config_type_and_choice_errors():
    with pytest.raises(TypeError, match="sigma must be a number"):
        flatpeft.make_config("flat_lora", sigma="0.1", schedule="constant")
    with pytest.raises(ValueError, match="schedule must be one of"):
        flatpeft.make_config("flat_lora", schedule="cosinus", total_steps=3)
    with pytest.raises(ValueError, match="total_steps is required"):
        flatpeft.make_config("flat_lora")
    with pytest.raises(ValueError, match=r"unknown option.*'rho'"):
        flatpeft.attach(tiny_bert(), "flat_lora", rho=0.1, total_steps=3)
    config = flatpeft.make_config("lora_sam", rho=0.2)
    assert flatpeft.make_config(config, rho=0.3).rho == 0.3 and config.rho == 0.2


def test_non_peft_model_and_model_without_lora_are_rejected():
    with pytest.raises(TypeError, match="get_peft_model"):
        flatpeft.attach(tiny_bert(base_only=True), "lora")
    ia3 = peft.get_peft_model(
        tiny_bert(base_only=True), peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[])
    )
    with pytest.raises(ValueError, match="no LoRA layers"):
        flatpeft.attach(ia3, "lora")


def test_attach_twice_and_after_detach():
    model = tiny_bert()
    method = flatpeft.attach(model, "lora_sam")
    with pytest.raises(ValueError, match=r"already attached.*detach"):
        flatpeft.attach(model, "flat_lora", total_steps=3)
    method.detach()
    with pytest.raises(RuntimeError, match="detached"):
        method.backward(lambda: model(**make_batch()).loss)
    flatpeft.attach(model, "flat_lora", total_steps=3).detach()  # attaching again is fine


def test_bind_is_idempotent_and_unwraps_accelerate():
    from accelerate import Accelerator

    model = tiny_bert()
    method = flatpeft.attach(model, "lora")
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    method.bind(opt).bind(opt)
    method.backward(lambda: model(**make_batch()).loss)
    opt.step()
    assert method.step == 1
    wrapped = Accelerator(cpu=True).prepare_optimizer(opt)
    method.bind(wrapped)
    wrapped.step()
    assert method.step == 2
    with pytest.raises(TypeError, match="Optimizer"):
        method.bind(object())
    method.detach()
    opt.step()
    assert method.step == 2  # hooks removed


def test_state_dict_rejects_other_method_or_config():
    model = tiny_bert()
    state = flatpeft.attach(model, "lora_sam", rho=0.1).state_dict()
    model.__dict__.pop("_flatpeft_method")
    other = flatpeft.attach(model, "lora_sam", rho=0.2)
    with pytest.raises(ValueError, match=r"different configuration.*rho"):
        other.load_state_dict(state)
    other.detach()
    with pytest.raises(ValueError, match="for method 'lora_sam'"):
        flatpeft.attach(model, "lora").load_state_dict(state)


def test_param_groups_cover_parameters_once():
    model = tiny_bert()
    method = flatpeft.attach(model, "lora")
    groups = method.param_groups(weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in method.parameters()) and len(set(ids)) == len(ids)


def test_custom_config_subclass_validation():
    from dataclasses import dataclass

    from flatpeft.config import option

    @dataclass(frozen=True)
    class Demo(MethodConfig):
        method = "demo"
        rate: float = option(0.5, "a rate", min=0.0, max=1.0, min_exclusive=True)

    assert Demo(rate=1).rate == 1.0
    with pytest.raises(ValueError, match=r"Demo.rate must be in \(0.0, 1.0\]"):
        Demo(rate=0.0)
    with pytest.raises(TypeError, match="integer"):
        Demo(seed=1.5)
