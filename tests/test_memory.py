"""The memory model against measured CPU peaks, and gradient checkpointing chosen from it.

This test uses a small model (4 layers, 256 wide) rather than the suite's 64-wide ones: at width 64 the activations
are a few MB, below what the measurement can resolve. The peak is what training adds to the loaded model (the RSS
high-water mark reset after loading), in a process where glibc returns freed blocks to the OS, so that RSS follows
the live tensors instead of the heap's history (see benchmarks/bench.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from conftest import ROOT, largest_step, run_cli
from lowrank_pref.artifacts import read_metrics
from lowrank_pref.config import ConfigError, build_config
from lowrank_pref.memory import choose_plan, estimate, training_gb

RETURNING = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
LENGTHS = {"max_length": 160, "max_prompt_length": 96}


# dpo both ways and with two sequences per pair (shared off); sft and kto one way each (their terms differ from dpo's
# in the sequences per item, not in checkpointing's), so the suite keeps its budget with the real shapes below
@pytest.mark.parametrize("task,checkpointing,shared", [
    ("dpo", True, "auto"), ("dpo", False, "auto"), ("dpo", False, "off"), ("sft", True, "auto"), ("kto", False, "auto")])
def test_estimate_within_15_percent_of_measured_cpu_peak(small_model, tmp_path, task, checkpointing, shared):
    model_dir, data = small_model
    # sft and kto send one sequence per item with grad: twice the items put as many tokens through as a dpo pair
    overrides = {"task": task, "batch_size": 8 if task == "dpo" else 16, "gradient_checkpointing": checkpointing,
                 "shared_prompt": shared,
                 "lora.r": 16, "lora.alpha": 32, "reference_cache": False, "data.eval_fraction": 0, **LENGTHS}
    out = tmp_path / "run"
    res = run_cli("--model", str(model_dir), "--dataset", str(data), "--max-steps", "3", "--output-dir", str(out),
                  *[f"{k}={v}" for k, v in overrides.items()], env=RETURNING)
    assert res.returncode == 0, res.stderr
    last = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m][-1]
    measured = (last["peak_memory_mb"] - last["loaded_memory_mb"]) / 1024
    cfg = build_config("tiny", overrides={"model": str(model_dir), "dataset": str(data), **overrides})
    tokens, answers = largest_step(cfg)
    estimated = training_gb(estimate(cfg, gpu=False, tokens=tokens, answer_tokens=answers))
    assert estimated == pytest.approx(measured, rel=0.15), (estimated * 1024, measured * 1024)


def test_checkpointing_auto_is_off_when_it_fits_then_as_few_layers_as_fit(small_model, tmp_path, monkeypatch):
    """Where the faster layout of the device kind is "off" (a GPU's, see memory.FASTER_LAYOUT); where it is "on" (this
    CPU's, measured) auto checkpoints even when the run would fit without, for runs with large activations."""
    from lowrank_pref import memory

    monkeypatch.setitem(memory.FASTER_LAYOUT, "cpu", "off")
    model_dir, data = small_model
    cfg = build_config("tiny", overrides={"model": str(model_dir), "gradient_checkpointing": "auto",
                                          "batch_size": 8, **LENGTHS})
    assert cfg.gradient_checkpointing is None
    tokens, answers = largest_step(cfg)

    def need(k, offload=False):
        return estimate(cfg, gpu=False, tokens=tokens, answer_tokens=answers, checkpointed_layers=k,
                        offload=offload)["total"]

    assert need(0) > need(1) > need(2) > need(3)  # each checkpointed layer keeps one input instead of everything

    def chosen(available, gpu=False, c=cfg):
        return choose_plan(c, available, gpu=gpu, tokens=tokens, answer_tokens=answers)

    assert chosen(need(0) * 2).checkpointed == 0
    assert chosen(need(2) / 0.9 * 1.001).checkpointed == 2  # the fewest layers that fit
    assert chosen(need(3) / 0.9 * 1.001).checkpointed == 3
    tight = chosen(need(3) * 0.95)  # nothing fits: all but the last layer, and the log says it won't fit
    assert tight.checkpointed == 3 and not tight.offload and "more than fits" in tight.why
    # on a GPU the layers' inputs go to host RAM when even full checkpointing doesn't fit
    gpu_need = estimate(cfg, gpu=True, tokens=tokens, answer_tokens=answers, checkpointed_layers=3)["total"]
    offloaded = estimate(cfg, gpu=True, tokens=tokens, answer_tokens=answers, checkpointed_layers=3, offload=True)
    assert offloaded["total"] < gpu_need and offloaded["host_offload"] > 0
    plan = chosen(gpu_need * 0.99, gpu=True)
    assert plan.checkpointed == 3 and plan.offload and "host RAM" in plan.why
    assert not chosen(gpu_need * 0.99, gpu=True, c=dataclasses.replace(cfg, checkpoint_offload=False)).offload
    # set values win over the memory model
    fixed = build_config("tiny", overrides={"model": str(model_dir), "gradient_checkpointing": "true"})
    assert chosen(1000.0, c=fixed).checkpointed == 3
    assert chosen(1000.0, c=fixed).why.startswith("checkpointing as configured")
    forced = build_config("tiny", overrides={"model": str(model_dir), "gradient_checkpointing": "auto",
                                             "checkpoint_offload": "true"})
    assert chosen(1000.0, gpu=True, c=forced).offload and not chosen(1000.0, c=forced).offload  # CPU: nothing to do
    with pytest.raises(ConfigError, match="checkpoint_offload=true .* gradient_checkpointing is false"):
        build_config("tiny", overrides={"gradient_checkpointing": "false", "checkpoint_offload": "true"})
    # where checkpointing measured faster, auto takes it though the run fits without, and says why (for runs with
    # activations as large as the measurement's; this one's are far smaller, so the threshold is lowered here)
    monkeypatch.setitem(memory.FASTER_LAYOUT, "cpu", "on")
    assert chosen(need(0) * 2).checkpointed == 0  # small activations: off, the measurement doesn't reach them
    monkeypatch.setattr(memory, "FASTER_ON_FROM_GB", 0.0)
    faster = chosen(need(0) * 2)
    assert faster.checkpointed == 3 and "faster than off on this kind of device" in faster.why
    assert chosen(need(0) * 2, gpu=True).checkpointed == 0  # the GPU's own entry: off where it fits
    monkeypatch.undo()
    # the run says what it chose, and why: the shipped choice for this CPU
    out = tmp_path / "auto"
    res = run_cli("--model", str(model_dir), "--dataset", str(data), "--max-steps", "1", "--output-dir", str(out),
                  "gradient_checkpointing=auto", "batch_size=8", *[f"{k}={v}" for k, v in LENGTHS.items()])
    assert res.returncode == 0, res.stderr
    status = json.loads((out / "status.json").read_text())  # 24 GB of RAM here: both layouts fit, and the
    assert need(0) < memory.FASTER_ON_FROM_GB  # activations are too small for the CPU's preference for "on"
    assert status["gradient_checkpointing"] is False and status["checkpointed_layers"] == 0
    assert "gradient checkpointing: off (the run needs about" in (out / "train.log").read_text()
    assert os.path.isdir(out / "adapter")


def test_partial_checkpointing_fits_a_memory_limit_and_the_estimate(small_model, tmp_path):
    """memory_limit_gb between what 1 and 2 checkpointed layers need: where off is the faster layout (a GPU; here
    through LOWRANK_PREF_FASTER_LAYOUT), the run checkpoints the first 2 of 4 layers, and its measured peak is the
    estimate's for 2 (within 15%)."""
    model_dir, data = small_model
    overrides = {"batch_size": 8, "gradient_checkpointing": "auto", "lora.r": 16, "lora.alpha": 32,
                 "reference_cache": False, "data.eval_fraction": 0, **LENGTHS}
    cfg = build_config("tiny", overrides={"model": str(model_dir), "dataset": str(data), **overrides})
    tokens, answers = largest_step(cfg)
    parts = [estimate(cfg, gpu=False, tokens=tokens, answer_tokens=answers, checkpointed_layers=k) for k in range(4)]
    limit = parts[2]["total"] / 0.9 * 1.001
    assert parts[1]["total"] > 0.9 * limit
    out = tmp_path / "run"
    res = run_cli("--model", str(model_dir), "--dataset", str(data), "--max-steps", "3", "--output-dir", str(out),
                  f"memory_limit_gb={limit}", *[f"{k}={v}" for k, v in overrides.items()],
                  env={**RETURNING, "LOWRANK_PREF_FASTER_LAYOUT": "off"})  # this CPU's own choice: always on
    assert res.returncode == 0, res.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["gradient_checkpointing"] is True and status["checkpointed_layers"] == 2
    assert "gradient checkpointing: 2 of 4 layers (about" in (out / "train.log").read_text()
    last = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m][-1]
    measured = (last["peak_memory_mb"] - last["loaded_memory_mb"]) / 1024
    assert training_gb(parts[2]) == pytest.approx(measured, rel=0.15), (training_gb(parts[2]) * 1024, measured * 1024)
    # between none and all checkpointed, as the estimate says
    assert training_gb(parts[3]) < training_gb(parts[2]) < training_gb(parts[0])


def test_memory_command_plans_for_a_card_and_refuses_bad_input(capsys):
    from lowrank_pref.memory import main

    assert main(["--preset", "12gb-dpo", "--gpu-gb", "12", "max_length=8192", "max_prompt_length=4096"]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.startswith("gradient checkpointing: on, inputs offloaded to host RAM (")
    parts = json.loads(rest)
    assert parts["host_offload"] > 0 and parts["total"] == pytest.approx(sum(
        v for k, v in parts.items() if k not in ("total", "host_offload")), abs=1e-3)
    assert main(["--preset", "12gb-dpo", "lora.rank=8"]) == 2
    assert "unknown config key 'lora.rank'" in capsys.readouterr().err


# Real architectures' shapes, cut to 2 layers and SmolLM2's 49k vocabulary so each run takes seconds (the benchmark,
# benchmarks/memory_check.py, runs them deeper and with their own vocabularies, and SmolLM2 itself on real pairs):
# grouped-query heads (9/3, 14/2), Gemma 3's 256-wide heads on a 1152 width with one key/value head, q/k norms and
# four norms a layer.
REAL_SHAPES = [pytest.param("smollm2", "false", 4, (192, 96), id="smollm2"),
               pytest.param("qwen2.5-0.5b", "true", 4, (192, 96), id="qwen2.5-0.5b"),
               pytest.param("gemma3-1b", "false", 2, (160, 64), id="gemma3-1b")]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.mark.parametrize("arch,checkpointing,batch,lengths", REAL_SHAPES)
def test_estimate_within_15_percent_on_real_architecture_shapes(tokenizer, shapes_dir, arch, checkpointing, batch,
                                                                lengths):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_check import build_model, estimate_for, measure, synthetic_pairs

    model_dir = build_model(arch, 2, shapes_dir, tok=tokenizer, vocab=49152)
    prompt, answer = lengths
    data = synthetic_pairs(tokenizer, shapes_dir / f"pairs-{prompt}-{answer}-{batch}.jsonl", prompt, answer, n=batch * 2)
    overrides = {"task": "dpo", "batch_size": batch, "max_length": prompt + answer + 16, "max_prompt_length": prompt + 8,
                 "gradient_checkpointing": checkpointing, "lora.r": 16, "lora.alpha": 32, "reference_cache": False,
                 "data.eval_fraction": 0, "save_steps": 100, "eval_steps": 100}
    got = measure(model_dir, data, overrides, shapes_dir / f"run-{arch}", steps=2, env=RETURNING)
    assert got["status"]["checkpointed_layers"] == (1 if checkpointing == "true" else 0)
    measured = (got["last"]["peak_memory_mb"] - got["last"]["loaded_memory_mb"]) / 1024
    estimated = training_gb(estimate_for(model_dir, data, overrides, got["status"]["checkpointed_layers"], gpu=False))
    assert estimated == pytest.approx(measured, rel=0.15), (estimated * 1024, measured * 1024)
