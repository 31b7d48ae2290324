"""The shared-prompt forward: one [prompt | chosen | rejected] row per pair gives the two-sequence log-probs."""

from __future__ import annotations

import pytest
import torch

from transformers import AttentionInterface

from lowrank_pref.data import Pair, collate, collate_shared
from lowrank_pref.patches import SHARED_SDPA, shared_prompt_sdpa


def _pairs(tokenizer):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [Pair([tokenizer.bos_token_id] + enc("What is the capital of France? Answer briefly."), enc(" Paris."),
                 enc(" I do not know, sorry about that.")),
            Pair([tokenizer.bos_token_id] + enc("Say hi."), enc(" Hello there, my friend!"), enc(" No.")),
            Pair([tokenizer.bos_token_id] + enc("Count to three for me please, slowly."), enc(" One, two, three."),
                 enc(" One, two, three, four, five."))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_logps_equal_two_sequences(tiny_model_dir, tokenizer, attn, monkeypatch):
    from lowrank_pref.config import build_config
    from lowrank_pref.logps import sequence_logps, shared_sequence_logps
    from lowrank_pref.model import load_model, load_tokenizer, reference_mode
    from test_model import _randomize_lora

    cfg = build_config("tiny", overrides={"model": str(tiny_model_dir), "attn_implementation": attn,
                                          "gradient_checkpointing": True})
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    _randomize_lora(model)
    model.train()  # checkpointing on: backward recomputes the layers, with the rows' layout
    pairs = _pairs(tok)
    two, shared = collate(pairs, tok.pad_token_id), collate_shared(pairs, tok.pad_token_id)
    assert shared["input_ids"].numel() < two["input_ids"].numel()  # the prompt is there once
    with reference_mode(model):
        ref_two, len_two = sequence_logps(model, two)
        ref_shared, len_shared = shared_sequence_logps(model, shared)
    torch.testing.assert_close(ref_shared, ref_two, atol=1e-4, rtol=1e-5)
    assert torch.equal(len_shared, len_two)

    params = [p for p in model.parameters() if p.requires_grad]
    split = []  # with sdpa, the shared rows take the split attention (not the dense mask), in forward and recompute
    if attn == "sdpa":
        assert model.config._attn_implementation == SHARED_SDPA
        monkeypatch.setattr("lowrank_pref.patches.CPU_SPLIT_MIN_WIDTH", 0)  # these rows are narrow: split them anyway
        monkeypatch.setitem(AttentionInterface._global_mapping, SHARED_SDPA,
                            lambda *a, **kw: (split.append(kw.get("shared_layout") is not None),
                                              shared_prompt_sdpa(*a, **kw))[1])
    logps, _ = sequence_logps(model, two)
    g_two = torch.autograd.grad((logps * torch.arange(1.0, 7.0)).sum(), params)
    logps_shared, _ = shared_sequence_logps(model, shared)
    torch.testing.assert_close(logps_shared, logps, atol=1e-4, rtol=1e-5)
    g_shared = torch.autograd.grad((logps_shared * torch.arange(1.0, 7.0)).sum(), params)
    for a, b in zip(g_shared, g_two):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    if attn == "sdpa":  # 2 layers: two-sequence forward + recompute of layer 0 (3 calls), then the same shared
        assert split == [False] * 3 + [True] * 3


@pytest.mark.parametrize("groups", [1, 2])
def test_split_attention_equals_the_masked_one(groups, monkeypatch):
    """shared_prompt_sdpa with the rows' layout computes what SDPA computes with collate_shared's dense mask:
    outputs at every real position and gradients, with padding, runs of rows of the same lengths, an empty prompt,
    an answer of one token and grouped-query heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr("lowrank_pref.patches.CPU_SPLIT_MIN_WIDTH", 0)  # narrow rows: split them anyway
    pairs = [Pair([1] * p, [2] * c, [3] * r) for p, c, r in
             [(5, 3, 4), (5, 3, 4), (2, 6, 1), (0, 4, 3), (7, 2, 2), (5, 3, 4)]]
    batch = collate_shared(pairs, pad_id=0)
    mask, layout = batch["allowed"][:, None], batch["layout"]
    n, width = batch["input_ids"].shape
    module = type("Attention", (), {"num_key_value_groups": groups, "is_causal": True})()
    torch.manual_seed(0)
    q = torch.randn(n, 4, width, 8, requires_grad=True)
    k, v = (torch.randn(n, 4 // groups, width, 8, requires_grad=True) for _ in range(2))
    weights = torch.randn(n, width, 1, 1) * (batch["input_ids"] != 0)[:, :, None, None]  # real positions only
    masked = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    split = shared_prompt_sdpa(module, q, k, v, mask, scaling=0.3, shared_layout=layout)[0]
    real = batch["input_ids"] != 0
    torch.testing.assert_close(split[real], masked[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad((split * weights).sum(), (q, k, v)),
                    torch.autograd.grad((masked * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_split_attention_is_chosen_where_it_pays():
    """On the CPU: rows of at least one key block of its flash kernel, or batches with a fifth of padding; narrow
    dense rows keep the single masked call (see model._split_pays for the measurements)."""
    from lowrank_pref.patches import CPU_SPLIT_MIN_WIDTH, _split_pays

    def query(width):
        return torch.zeros(2, 4, width, 8)

    wide = CPU_SPLIT_MIN_WIDTH
    assert _split_pays(query(wide), [(wide - 100, 50, 50)] * 2)
    assert not _split_pays(query(300), [(200, 50, 50), (200, 49, 50)])
    assert _split_pays(query(300), [(200, 50, 50), (60, 49, 50)])  # 141 of the 600 positions are padding


def test_shared_prompt_reward_scores_equal_two_sequences(tiny_model_dir, tokenizer):
    from lowrank_pref.config import build_config
    from lowrank_pref.logps import reward_scores, shared_reward_scores
    from lowrank_pref.model import load_model, load_tokenizer

    cfg = build_config("tiny", overrides={"model": str(tiny_model_dir), "task": "reward"})
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.2)
    pairs = _pairs(tok)
    pairs[1].chosen_ids = pairs[1].chosen_ids + [tok.pad_token_id]  # a trailing pad-id token is not scored
    two, shared = collate(pairs, tok.pad_token_id), collate_shared(pairs, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.arange(1.0, 7.0)
    a = reward_scores(model, two)
    b = shared_reward_scores(model, shared)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    for x, y in zip(torch.autograd.grad((b * weights).sum(), params), torch.autograd.grad((a * weights).sum(), params)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
