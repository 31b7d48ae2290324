"""Our overrides of library internals (lowrank_pref/patches.py): ``patches=false`` gives the same numbers, each one
runs only on the library versions it was tested on, and the table matches the installed libraries and the call
sites. Real 4-bit models on bitsandbytes/PEFT (CPU), the 2-layer, 64-wide fixture."""

from __future__ import annotations

import dataclasses
import logging
import re
from importlib import metadata

import bitsandbytes as bnb
import pytest
import torch
from packaging.version import Version
from transformers import AttentionInterface

from lowrank_pref import patches
from lowrank_pref.config import all_keys, build_config, field_help
from lowrank_pref.data import collate, collate_shared
from lowrank_pref.logps import sequence_logps, shared_sequence_logps
from lowrank_pref.losses import dpo_loss
from lowrank_pref.model import load_model, load_tokenizer, reference_mode
from lowrank_pref.patches import PATCHES, SHARED_SDPA, apply_patch
from test_model import _randomize_lora
from test_shared import _pairs

INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers' / PEFT's names


def _cfg(model_dir, on: bool):
    # checkpointing on: transformers then adds its input-grad hook (no_input_grads' target), and backward runs the
    # fused LoRA forward again in the recompute
    return build_config("tiny", overrides={"model": str(model_dir), "patches": str(on).lower(),
                                           "gradient_checkpointing": "true", "lora.dropout": "0.0"})


def _load(cfg):
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)  # LoRA A's init draws from the RNG: the same adapter for both loads
    model, _ = load_model(cfg, tok)
    _randomize_lora(model)  # non-zero B (seeded): policy differs from reference
    return model, tok


def _fused(model) -> int:
    return sum("forward" in vars(m) and hasattr(m, "lora_A") for m in model.modules())


def _input_grad_hooks(model) -> list[str]:
    hooks = model.get_base_model().get_input_embeddings()._forward_hooks.values()
    return [fn.__name__ for fn in hooks if getattr(fn, "__name__", "") in INPUT_GRAD_HOOKS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_patches_off_gives_the_same_numbers(tiny_model_dir, monkeypatch):
    """The same tiny model loaded with and without the overrides: the reference log-probs are equal bit for bit,
    the policy log-probs and the gradient of the DPO loss equal to fp32 rounding, on two-sequence and shared-prompt
    rows; the overrides are there in one model and not in the other (but the CPU kernel pin, a fix kept by both)."""
    monkeypatch.setattr(patches, "CPU_SPLIT_MIN_WIDTH", 0)  # these rows are narrow: take the split attention anyway
    split = []  # whether each call of our attention got the rows' layout (the split path) or not
    results = {}
    for on in (True, False):
        model, tok = _load(_cfg(tiny_model_dir, on))
        # the overrides are applied exactly when asked for
        assert _fused(model) == (2 * 7 if on else 0)  # every targeted linear of both layers
        assert model.config._attn_implementation == (SHARED_SDPA if on else "sdpa")
        assert _input_grad_hooks(model) == ([] if on else ["make_inputs_require_grads"])
        linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert linears and not any(m.support_avx512bf16_for_cpu for m in linears)  # a fix: pinned either way
        # record our attention's calls (loading registers it, so after the load)
        monkeypatch.setitem(AttentionInterface._global_mapping, SHARED_SDPA, lambda *a, **kw: (
            split.append(kw.get("shared_layout") is not None), patches.shared_prompt_sdpa(*a, **kw))[1])

        pairs = _pairs(tok)
        two, shared = collate(pairs, tok.pad_token_id), collate_shared(pairs, tok.pad_token_id)
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        split.clear()
        with reference_mode(model):
            ref, _ = sequence_logps(model, two)
            ref_shared, _ = shared_sequence_logps(model, shared)
        # bitsandbytes repacks its weights in an eval, no-grad pass unless pinned; the packed kernel has no autograd
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)
        out = {"ref": ref, "ref_shared": ref_shared}
        for key, logps_fn, batch in (("two", sequence_logps, two), ("shared", shared_sequence_logps, shared)):
            logps, _ = logps_fn(model, batch)
            n = len(pairs)
            loss = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1)[0].mean()
            out[key], out[f"grad_{key}"] = logps.detach(), torch.autograd.grad(loss, params)
        # our attention ran only in the patched model: on the shared rows with the split (reference, policy and the
        # recompute of the checkpointed first layer), on the two-sequence rows without it
        assert split == ([False] * 2 + [True] * 2 + [False] * 3 + [True] * 3 if on else [])
        results[on] = out
    on, off = results[True], results[False]

    # the reference: adapters off, so the fused layers take PEFT's own forward, and our attention is SDPA's on
    # these rows: the same ops in the same order, so the same bits
    assert torch.equal(on["ref"], off["ref"])
    assert not torch.allclose(on["two"], on["ref"], atol=1e-2)  # the adapter matters: policy != reference
    # the policy: the fused layers add the same fp32 terms in another order (branch first, scaling as add's alpha),
    # and backward sums each layer's input gradient in another order; that moves the last bits only. ~1e-7
    # relative here; a wrong path is off by far more (PEFT without the kernel pin: 20-70% on these gradients)
    torch.testing.assert_close(on["two"], off["two"], rtol=1e-6, atol=1e-5)
    for a, b in zip(on["grad_two"], off["grad_two"], strict=True):
        assert b.norm() > 0 and _rel(a, b) < 1e-5, _rel(a, b)
    # shared-prompt rows give the two-sequence numbers, split (patches on) or masked (off): the attention sums in
    # another order, so to the precision test_shared.py holds them to
    for res in (on, off):
        torch.testing.assert_close(res["ref_shared"], res["ref"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(res["shared"], res["two"], atol=1e-4, rtol=1e-5)
        for a, b in zip(res["grad_shared"], res["grad_two"], strict=True):
            assert _rel(a, b) < 1e-3, _rel(a, b)
    for a, b in zip(on["grad_shared"], off["grad_shared"], strict=True):
        assert _rel(a, b) < 1e-3, _rel(a, b)


# what each override changes on a model loaded with patches=false (the arguments it takes, whether it ran)
EFFECTS = {
    "fuse_lora_adds": (lambda model: (model,), lambda model: _fused(model) == 2 * 7),
    "embeddings_in": (lambda model: (model, torch.bfloat16),
                      lambda model: model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16),
}


def _next_minor(version: str) -> str:
    release = Version(version).release
    return f"{release[0]}.{release[1] + 1}"


@pytest.mark.parametrize("name", sorted(EFFECTS))
def test_override_runs_only_on_its_tested_versions(tiny_model_dir, name, monkeypatch, caplog):
    """Outside its version range an override leaves the model as the library made it and says so in one line
    (patch, library, range, version found), once per process; inside it (bounds included) it runs."""
    model, _ = _load(_cfg(tiny_model_dir, on=False))
    args, ran = EFFECTS[name]
    assert not ran(model)
    on = _cfg(tiny_model_dir, on=True)
    real = PATCHES[name]
    found = metadata.version(real.library)
    # just above the range (its upper bound is exclusive), and just below it
    for outside in (dataclasses.replace(real, high=found), dataclasses.replace(real, low=_next_minor(found),
                                                                                 high=_next_minor(_next_minor(found)))):
        monkeypatch.setitem(PATCHES, name, outside)
        monkeypatch.setattr(patches, "_skipped_said", set())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lowrank_pref"):
            assert apply_patch(name, on, *args(model)) is None
            assert apply_patch(name, on, *args(model)) is None  # said once
        assert not ran(model)
        lines = [r.getMessage() for r in caplog.records if r.name == "lowrank_pref"]
        assert len(lines) == 1, lines
        said = (name, real.library, f">={outside.low},<{outside.high}", f"found {found}")
        assert all(s in lines[0] for s in said), lines[0]
    monkeypatch.setitem(PATCHES, name, dataclasses.replace(real, low=found, high=_next_minor(found)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowrank_pref"):
        assert apply_patch(name, build_config("tiny", overrides={"patches": "false"}), *args(model)) is None
        assert not ran(model)  # patches=false: not even in range
        assert apply_patch(name, on, *args(model))  # what it changed: layers fused, bytes saved
    assert ran(model)
    assert not [r for r in caplog.records if r.name == "lowrank_pref"]


def test_every_override_is_on_for_the_installed_libraries_and_called():
    """The shipped table covers the library versions installed here (requirements, CI): none is silently off; and
    every entry is applied by model.py, which applies no other, so the table and the call sites can't drift."""
    for name, patch in PATCHES.items():
        assert patch.skip_reason() is None, (name, patch.skip_reason())
    from lowrank_pref import model

    source = open(model.__file__, encoding="utf-8").read()
    assert set(re.findall(r"apply_patch\(\s*\"(\w+)\"", source)) == set(PATCHES)


def test_patches_key():
    assert build_config("tiny").patches is True
    assert build_config("tiny", overrides={"patches": "false"}).patches is False
    assert "patches" in all_keys() and "false" in field_help("patches")
