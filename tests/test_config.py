"""The typed config, overrides, and every shipped preset (GPU ones up to the point of loading weights)."""

import re

import pytest

from lowrank_pref.config import (ConfigError, Config, build_config, dump_yaml, from_dict, list_presets,
                                 set_key)
from lowrank_pref.memory import estimate


def test_overrides_are_parsed_by_type():
    cfg = build_config("tiny", overrides={"lora.r": "32", "learning_rate": "5e-6", "gradient_checkpointing": "true",
                                          "max_steps": "none", "lora.target_modules": "q_proj,v_proj",
                                          "data.columns.prompt": "question"})
    assert cfg.lora.r == 32 and cfg.learning_rate == 5e-6 and cfg.gradient_checkpointing is True
    assert cfg.max_steps is None and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.columns == {"prompt": "question"}


@pytest.mark.parametrize("key,value,message", [
    ("lora.rank", "8", "Did you mean 'lora.r'?"),
    ("learnig_rate", "1e-5", "Did you mean 'learning_rate'?"),
    ("r", "8", "Did you mean 'lora.r'?"),
    ("beta", "0", "'beta' must be > 0.0"),
    ("label_smoothing", "0.7", "'label_smoothing' must be <= 0.49"),
    ("quantization", "3bit", "must be one of 4bit, 8bit, none"),
    ("gradient_checkpointing", "maybe", "must be true or false"),
    ("data.columns.answer", "x", "unknown column role 'answer'"),
])
def test_bad_keys_and_values(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        set_key(Config(), key, value)


def test_resolved_config_round_trips():
    cfg = build_config("tiny", overrides={"lora.r": "4", "data.columns.chosen": "good"})
    again = from_dict(read_yaml_text(dump_yaml(cfg)))
    assert again == cfg


def read_yaml_text(text):
    import yaml

    return yaml.safe_load(text)


def test_every_task_has_a_preset_per_gpu_size():
    from lowrank_pref.tasks import TASKS

    names = set(list_presets())
    for task in TASKS:
        assert {f"{gb}gb-{task}" for gb in (6, 8, 12, 16, 24)} <= names, task
        assert task == "dpo" or f"tiny-{task}" in names, task  # tiny itself is dpo


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_loads_and_validates(name):
    from lowrank_pref.tasks import TASKS

    cfg = build_config(name)
    assert cfg.task in TASKS
    first = read_yaml_text(open(f"presets/{name}.yaml").read())
    assert first, "preset is empty"
    if name.startswith("tiny"):
        assert name == "tiny" or name == f"tiny-{cfg.task}"
        assert cfg.model == "builtin:tiny" and cfg.dataset.startswith("builtin:")
    elif name == "smollm2":  # a real model on a CPU: the Hub id (offline: --model with tools/smollm2.py's folder)
        assert cfg.model == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.dataset == "builtin:tiny-prefs"
        assert cfg.quantization == "4bit" and cfg.task == "dpo"
    else:
        assert name.endswith(f"gb-{cfg.task}")
        card = int(name.split("gb")[0])
        assert cfg.quantization == "4bit"
        # the estimate (offline: the architectures are known) leaves room on the card
        assert estimate(cfg)["total"] <= card - 1.5, estimate(cfg)


def test_tiny_is_the_default_and_offline():
    cfg = build_config("tiny")
    assert cfg.model == "builtin:tiny" and cfg.dataset == "builtin:tiny-prefs"


def test_memory_estimate_grows_with_what_should_grow():
    base = build_config("12gb-dpo")
    longer = build_config("12gb-dpo", overrides={"max_length": "2048", "max_prompt_length": "1024"})
    no_ckpt = build_config("12gb-dpo", overrides={"gradient_checkpointing": "false"})
    plain = build_config("12gb-dpo", overrides={"quantization": "none"})
    e = estimate(base)["total"]
    assert estimate(longer)["total"] > e and estimate(no_ckpt)["total"] > e and estimate(plain)["total"] > e + 5


def _keys_of_type(kind) -> list[str]:
    """Every dotted key whose field holds ``kind`` (or ``kind | None``), read from the dataclasses' type hints, so a
    key added later is covered without touching this test."""
    import dataclasses
    import typing

    from lowrank_pref.config import _resolve, all_keys

    out = []
    for key in all_keys():
        cls, name = _resolve(key)
        hint = typing.get_type_hints(cls)[name]
        if hint is kind or kind in typing.get_args(hint):
            out.append(key)
        assert dataclasses.fields(cls)  # a dataclass, as _resolve promises
    return out


FLOAT_KEYS = _keys_of_type(float)


def test_the_float_keys_are_found():
    assert {"learning_rate", "beta", "max_grad_norm", "lora.alpha", "kto.desirable_weight",
            "center_rewards_coefficient", "memory_limit_gb"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", float("nan"), float("inf")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_inf(key, raw):
    """nan passes every range check (nan < lo is false) and inf most: max_grad_norm=nan, learning_rate=inf and
    beta=nan trained (or failed as an internal error) until each float had to be finite."""
    with pytest.raises(ConfigError) as e:
        set_key(Config(), key, raw)
    assert f"'{key}' must be a finite number" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key", _keys_of_type(int))
def test_every_int_key_refuses_nan_and_inf(key):
    for raw in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be a whole number")):
            set_key(Config(), key, raw)


@pytest.mark.parametrize("key,value", [
    ("num_epochs", "1e9"), ("gradient_accumulation_steps", "1e12"), ("lora.r", "1e12"), ("batch_size", "1e7"),
    ("max_length", "1e9"), ("seed", "1e30"), ("seed", "-1"), ("max_steps", "1e12"), ("eval_batch_size", "1e9"),
])
def test_absurd_sizes_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be")):
        set_key(Config(), key, value)


def test_the_largest_allowed_sizes_are_accepted():
    from lowrank_pref.config import MAX_ITEMS, MAX_RANK, MAX_SEED

    cfg = build_config("tiny", overrides={"lora.r": str(MAX_RANK), "gradient_accumulation_steps": str(MAX_ITEMS),
                                          "seed": str(MAX_SEED), "num_epochs": "10000"})
    assert (cfg.lora.r, cfg.seed) == (MAX_RANK, MAX_SEED)
