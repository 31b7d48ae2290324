"""Checks only a GPU can make; skipped without CUDA. On a lent GPU: ``python -m pytest tests/test_gpu.py -v``.

They cover what the CPU suite can't run: checkpoint offload (its pinned host memory needs an accelerator), the
16-bit embedding tables under CUDA autocast, the split attention on CUDA's kernels, the fused LoRA forward and the
frozen LM head's forward-pass gradient against PEFT's numbers, and the memory model against the allocator's peak. Written without a GPU to run them on (none was lent to the session that wrote them): a
failure here is a finding about the GPU path, or about the test, to settle on the machine.
"""

from __future__ import annotations

import pytest
import torch

from conftest import largest_step, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LENGTHS = {"max_length": 160, "max_prompt_length": 96}


def _cfg(model_dir, data, **overrides):
    from lowrank_pref.config import build_config

    return build_config("tiny", overrides={"model": str(model_dir), "dataset": str(data), "lora.dropout": 0.0,
                                           "batch_size": 8, "data.eval_fraction": 0, **LENGTHS, **overrides})


def _batch(cfg, tok):
    from lowrank_pref.data import collate_shared, load_preference_data

    return collate_shared(load_preference_data(cfg, tok).train[:8], tok.pad_token_id)


def test_offloaded_checkpoints_give_the_same_gradients_with_less_gpu_memory(small_model):
    """checkpoint_offload=true: the checkpointed layers' inputs wait in host RAM, so the peak drops by about that
    many (tokens x hidden x 4 bytes) each, and the recompute brings back the same values."""
    from lowrank_pref.logps import shared_sequence_logps
    from lowrank_pref.model import autocast, load_model, load_tokenizer

    model_dir, data = small_model
    runs = {}
    for offload in (False, True):
        cfg = _cfg(model_dir, data, gradient_checkpointing=True, checkpoint_offload=offload)
        tok = load_tokenizer(cfg)
        torch.manual_seed(0)
        model, _ = load_model(cfg, tok)
        model.train()
        batch = _batch(cfg, tok)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with autocast(cfg):
            logps, _ = shared_sequence_logps(model, batch)
        logps.sum().backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
        runs[offload] = (logps.detach().cpu(), grads, torch.cuda.max_memory_allocated() - before,
                         batch["input_ids"].numel() * model.config.hidden_size * 4)
        del model
        torch.cuda.empty_cache()
    (lp_on, g_on, peak_on, checkpoint), (lp_off, g_off, peak_off, _) = runs[False], runs[True]
    torch.testing.assert_close(lp_off, lp_on, atol=1e-3, rtol=1e-3)
    for name, g in g_on.items():
        torch.testing.assert_close(g_off[name], g, atol=1e-3, rtol=1e-2)
    assert peak_on - peak_off >= 1.5 * checkpoint, (peak_on, peak_off, checkpoint)  # 3 of 4 layers checkpointed


def test_16bit_tables_on_gpu_give_the_same_logps_and_save_their_memory(small_model, monkeypatch):
    """Under CUDA autocast the input embeddings and LM head stay bf16/fp16 (model.embeddings_in): the reference
    log-probs are bit for bit those of PEFT's fp32 copies, and the loaded model is 2 bytes per table entry smaller."""
    import lowrank_pref.model as model_mod
    from lowrank_pref.model import autocast, autocast_dtype, load_model, load_tokenizer, reference_mode

    model_dir, data = small_model
    cfg = _cfg(model_dir, data, gradient_checkpointing=False)
    tok = load_tokenizer(cfg)
    batch = _batch(cfg, tok)

    def load_and_score():
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model, _ = load_model(cfg, tok)
        loaded = torch.cuda.memory_allocated() - before
        with reference_mode(model), autocast(cfg):
            logps, _ = model_mod.shared_sequence_logps(model, batch)
        base = model.get_base_model()
        dtypes = (base.get_input_embeddings().weight.dtype, base.get_output_embeddings().weight.dtype)
        del model
        return logps.cpu(), loaded, dtypes

    assert autocast_dtype(cfg) in (torch.bfloat16, torch.float16)
    logps16, loaded16, dtypes16 = load_and_score()
    monkeypatch.setattr(model_mod, "embeddings_in", lambda model, dtype: 0)  # PEFT's fp32 copies, as before
    logps32, loaded32, dtypes32 = load_and_score()
    assert dtypes16 == (autocast_dtype(cfg),) * 2 and dtypes32 == (torch.float32,) * 2
    assert torch.equal(logps16, logps32)
    vocab, hidden = len(tok), 256
    assert loaded32 - loaded16 == pytest.approx(2 * 2 * vocab * hidden, rel=0.05)


def test_split_attention_on_cuda_equals_the_masked_one():
    """shared_prompt_sdpa on CUDA (always taken there) against SDPA with the dense mask, in bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lowrank_pref.data import Pair, collate_shared
    from lowrank_pref.patches import _split_pays, shared_prompt_sdpa

    pairs = [Pair([1] * p, [2] * c, [3] * r) for p, c, r in
             [(50, 30, 40), (50, 30, 40), (20, 60, 10), (0, 40, 30), (70, 20, 20), (128, 64, 64)]]
    batch = collate_shared(pairs, pad_id=0)
    mask, layout = batch["allowed"][:, None].cuda(), batch["layout"]
    n, width = batch["input_ids"].shape
    module = type("Attention", (), {"num_key_value_groups": 2, "is_causal": True})()
    torch.manual_seed(0)
    q = torch.randn(n, 8, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(n, 4, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    assert _split_pays(q, layout)
    real = (batch["input_ids"] != 0).cuda()
    weights = torch.randn(n, width, 1, 1, device="cuda", dtype=torch.bfloat16) * real[:, :, None, None]
    masked = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)[0]
    split = shared_prompt_sdpa(module, q, k, v, mask, scaling=0.125, shared_layout=layout)[0]
    torch.testing.assert_close(split[real].float(), masked[real].float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(torch.autograd.grad((split * weights).sum(), (q, k, v)),
                    torch.autograd.grad((masked * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_fused_lora_and_frozen_head_on_cuda_give_pefts_numbers(small_model):
    """The two rewrites of the policy's step, on CUDA's kernels under its autocast: the fused LoRA forward (the branch
    added in place into the fp32 base output) and the frozen LM head's gradient formed in the forward pass, against
    PEFT's own forward and checkpointed LM-head chunks. CPU autocast checks the same in test_model/test_losses; this
    body under CPU autocast gave log-probs within 0.03 (of about -425) and gradients within 1.4% of their largest
    entry, well inside the bounds below."""
    from lowrank_pref.logps import shared_sequence_logps
    from lowrank_pref.model import autocast, load_model, load_tokenizer

    model_dir, data = small_model
    # a scaling of 1.5 (not a power of two: PEFT's bf16 product rounds) and a different upstream gradient per row
    cfg = _cfg(model_dir, data, gradient_checkpointing=True, **{"lora.r": 16, "lora.alpha": 24})
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model, _ = load_model(cfg, tok)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.train()
    batch = _batch(cfg, tok)
    head = model.get_base_model().get_output_embeddings().weight
    upstream = torch.randn(2 * batch["input_ids"].shape[0], device="cuda")

    def logps_and_grads():
        model.zero_grad()
        with autocast(cfg):
            logps, _ = shared_sequence_logps(model, batch)
        (logps * upstream).sum().backward()
        return logps.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()
                                              if p.requires_grad and "lora" in n}

    ours, our_grads = logps_and_grads()
    fused = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    assert len(fused) == 4 * 7
    for module in fused:
        del module.forward  # PEFT's forward
    head.requires_grad_(True)  # a trainable head takes the checkpointed chunks
    peft, peft_grads = logps_and_grads()
    head.requires_grad_(False)
    torch.testing.assert_close(ours, peft, atol=0.05, rtol=1e-3)
    for name, g in peft_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(our_grads[name], g, atol=0.03 * scale, rtol=0.03, msg=name)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_estimate_within_15_percent_of_the_gpu_peak(small_model, tmp_path, checkpointing):
    """What the memory model says training adds to the loaded model, against the allocator's peak over it."""
    import json

    from lowrank_pref.artifacts import read_metrics
    from lowrank_pref.memory import estimate, training_gb

    model_dir, data = small_model
    overrides = {"gradient_checkpointing": checkpointing, "lora.r": 16, "lora.alpha": 32, "reference_cache": False}
    out = tmp_path / "run"
    res = run_cli("--model", str(model_dir), "--dataset", str(data), "--max-steps", "3", "--output-dir", str(out),
                  "batch_size=8", "data.eval_fraction=0", *[f"{k}={v}" for k, v in {**LENGTHS, **overrides}.items()])
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "status.json").read_text())["gradient_checkpointing"] is checkpointing
    last = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m][-1]
    measured = (last["peak_memory_mb"] - last["loaded_memory_mb"]) / 1024
    cfg = _cfg(model_dir, data, **overrides)
    tokens, answers = largest_step(cfg)
    estimated = training_gb(estimate(cfg, gpu=True, tokens=tokens, answer_tokens=answers))
    assert estimated == pytest.approx(measured, rel=0.15), (estimated * 1024, measured * 1024)


@pytest.mark.parametrize("checkpointing", ["true", "false"])
@pytest.mark.parametrize("arch", ["smollm2", "llama3.2-1b", "qwen2.5-0.5b", "gemma3-1b"])
def test_estimate_within_15_percent_of_the_gpu_peak_on_real_architectures(tokenizer, tmp_path_factory, arch,
                                                                         checkpointing):
    """The real architectures of benchmarks/memory_check.py (their widths, heads and vocabularies; 4 layers, random
    weights) on 384/128-token pairs: training's peak allocated memory over the loaded model against the estimate."""
    import sys

    from conftest import ROOT
    from lowrank_pref.memory import training_gb

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_check import build_model, estimate_for, measure, synthetic_pairs

    work = tmp_path_factory.getbasetemp() / "gpu_shapes"
    work.mkdir(exist_ok=True)
    model_dir = build_model(arch, 4, work, tok=tokenizer)
    data = synthetic_pairs(tokenizer, work / "pairs-384-128.jsonl", 384, 128, n=4)
    overrides = {"task": "dpo", "batch_size": 2, "max_length": 528, "max_prompt_length": 392,
                 "gradient_checkpointing": checkpointing, "checkpoint_offload": False, "lora.r": 16, "lora.alpha": 32,
                 "reference_cache": False, "data.eval_fraction": 0, "save_steps": 100, "eval_steps": 100}
    got = measure(model_dir, data, overrides, work / f"run-{arch}-{checkpointing}", steps=2)
    measured = (got["last"]["peak_memory_mb"] - got["last"]["loaded_memory_mb"]) / 1024
    estimated = training_gb(estimate_for(model_dir, data, overrides, got["status"]["checkpointed_layers"], gpu=True))
    assert estimated == pytest.approx(measured, rel=0.15), (estimated * 1024, measured * 1024)
