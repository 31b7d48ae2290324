"""The memory model against measured CPU peaks, and gradient checkpointing chosen from it.

This test uses a small model (4 layers, 256 wide) rather than the suite's 64-wide ones: at width 64 the activations
are a few MB, below what the measurement can resolve. The peak is what training adds to the loaded model (the RSS
high-water mark reset after loading), in a process where glibc returns freed blocks to the OS, so that RSS follows
the live tensors instead of the heap's history (see benchmarks/bench.py).
"""

from __future__ import annotations

import json
import os
import random

import pytest

from conftest import run_cli
from lowrank_pref.artifacts import read_metrics
from lowrank_pref.config import build_config
from lowrank_pref.memory import choose_checkpointing, estimate, training_gb

RETURNING = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
LENGTHS = {"max_length": 160, "max_prompt_length": 96}


@pytest.fixture(scope="module")
def small_model(tokenizer, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama_256")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    words = ["river", "garden", "window", "letter", "market", "forest", "kitchen", "bridge", "island", "candle"]
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(120)),
             "chosen": " ".join(rng.choice(words) for _ in range(80)),
             "rejected": " ".join(rng.choice(words) for _ in range(80))} for _ in range(32)]
    data = path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, data


def _largest_step(cfg):
    from lowrank_pref.data import load_preference_data
    from lowrank_pref.model import load_tokenizer
    from lowrank_pref.train import Schedule, largest_micro_step

    tok = load_tokenizer(cfg)
    pairs = load_preference_data(cfg, tok).train
    schedule = Schedule(len(pairs), cfg.batch_size, 1, cfg.seed, sizes=[p.num_tokens for p in pairs])
    return largest_micro_step(cfg, schedule, pairs)


@pytest.mark.parametrize("checkpointing,shared", [(True, "auto"), (False, "auto"), (True, "off"), (False, "off")])
def test_estimate_within_15_percent_of_measured_cpu_peak(small_model, tmp_path, checkpointing, shared):
    model_dir, data = small_model
    overrides = {"batch_size": 8, "gradient_checkpointing": checkpointing, "shared_prompt": shared,
                 "lora.r": 16, "lora.alpha": 32, "reference_cache": False, "data.eval_fraction": 0, **LENGTHS}
    out = tmp_path / "run"
    res = run_cli("--model", str(model_dir), "--dataset", str(data), "--max-steps", "3", "--output-dir", str(out),
                  *[f"{k}={v}" for k, v in overrides.items()], env=RETURNING)
    assert res.returncode == 0, res.stderr
    last = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m][-1]
    measured = (last["peak_memory_mb"] - last["loaded_memory_mb"]) / 1024
    cfg = build_config("tiny", overrides={"model": str(model_dir), "dataset": str(data), **overrides})
    tokens, answers = _largest_step(cfg)
    estimated = training_gb(estimate(cfg, gpu=False, tokens=tokens, answer_tokens=answers))
    assert estimated == pytest.approx(measured, rel=0.15), (estimated * 1024, measured * 1024)


def test_checkpointing_auto_is_off_when_it_fits_and_on_when_not(small_model, tmp_path):
    model_dir, data = small_model
    cfg = build_config("tiny", overrides={"model": str(model_dir), "gradient_checkpointing": "auto",
                                          "batch_size": 8, **LENGTHS})
    assert cfg.gradient_checkpointing is None
    tokens, answers = _largest_step(cfg)
    need = estimate(cfg, gpu=False, tokens=tokens, answer_tokens=answers, checkpointing=False)["total"]
    assert choose_checkpointing(cfg, need * 2, gpu=False, tokens=tokens, answer_tokens=answers)[0] is False
    assert choose_checkpointing(cfg, need * 0.95, gpu=False, tokens=tokens, answer_tokens=answers)[0] is True
    fixed = build_config("tiny", overrides={"gradient_checkpointing": "true"})
    assert choose_checkpointing(fixed, 1000.0, gpu=False) == (True, "as configured")
    # the run says what it chose, and why
    out = tmp_path / "auto"
    res = run_cli("--model", str(model_dir), "--dataset", str(data), "--max-steps", "1", "--output-dir", str(out),
                  "gradient_checkpointing=auto", "batch_size=8", *[f"{k}={v}" for k, v in LENGTHS.items()])
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "status.json").read_text())["gradient_checkpointing"] is False  # 24 GB of RAM here
    assert "gradient checkpointing: off (the run needs about" in (out / "train.log").read_text()
    assert os.path.isdir(out / "adapter")
