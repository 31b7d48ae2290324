"""The memory model against measured training peaks on real architectures (issue 18).

    python benchmarks/memory_check.py                              # every case below, CPU, one table
    python benchmarks/memory_check.py --archs smollm2 qwen2.5-0.5b --json out.json
    python benchmarks/memory_check.py --layouts                    # also: checkpointing on against off, speed A/B

Each case is one training run (`python -m lowrank_pref.run`, a fresh process, so the peak is its own) of a model
built from the architecture's config with random weights (SmolLM2-135M-Instruct: the real folder when it exists,
see ../shared/tools/smollm2.py). ``layers`` cuts an architecture's depth to keep the run short: the memory model is
given the same cut config, so what is checked is its per-layer, per-token and per-vocabulary arithmetic. The measured
figure is what training adds to the loaded model: the RSS high-water mark (reset through /proc after loading) minus
the RSS then, under a glibc that returns freed blocks to the OS (see benchmarks/bench.py), so RSS follows the live
tensors. On a GPU (``--gpu``, when torch sees one) it is torch.cuda.max_memory_allocated instead.

Data: "real" is the first 8 of the 32 ShareGPT pairs of ../shared/data that fit max_length=512 untruncated
(SmolLM2's tokenizer, its chat template): exactly the pairs a 2-step run of batch 4 takes, so the largest micro-step
the estimate plans for is one the run makes; "short" and "long" are synthetic pairs (prompt/answer tokens 64/32 and
384/128), so rows are the lengths the case says.

    python benchmarks/memory_check.py --presets            # GPU: the dpo presets that fit the card, at full depth
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = Path(os.path.expanduser("~/.cache/lowrank_pref/smollm2-135m-instruct"))
SHAREGPT = ROOT.parent / "shared" / "data" / "sharegpt_dpo_en_demo.json"
RETURNING = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

# Real architectures as their published configs give them (random weights here). Widths, heads, head_dim, vocabulary
# and tying are the real ones; "layers" is how many a case keeps (the real count in the comment).
ARCHS = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: the real folder when present
    "smollm2": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    tie_word_embeddings=True),
    # meta-llama/Llama-3.2-1B-Instruct (16 layers)
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        tie_word_embeddings=True, rope_theta=500000.0),
    # Qwen/Qwen2.5-0.5B-Instruct (24 layers; q/k/v biases)
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # google/gemma-3-1b-it (26 layers; head_dim 256 with 4 query heads on a 1152 width, one key/value head, q/k norms,
    # sliding-window layers, a 262k vocabulary)
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                      tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=256),
    # mistralai/Mistral-7B-Instruct-v0.3 (32 layers)
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                       tie_word_embeddings=False),
}

# name: (architecture, layers kept (None: all), data, task, batch, checkpointing), checkpointing as the config
# takes it ("true", "false", or a count of layers: memory_limit_gb is set so that the plan checkpoints that many)
CASES = {
    "smollm2 real ckpt on": ("smollm2", None, "real", "dpo", 4, "true"),
    "smollm2 real ckpt off": ("smollm2", None, "real", "dpo", 4, "false"),
    "smollm2 real ckpt 20/30": ("smollm2", None, "real", "dpo", 4, 20),
    "smollm2 short ckpt off": ("smollm2", 8, "short", "dpo", 4, "false"),
    "smollm2 sft long ckpt off": ("smollm2", 8, "long", "sft", 8, "false"),
    "llama3.2-1b long ckpt on": ("llama3.2-1b", 3, "long", "dpo", 2, "true"),
    "llama3.2-1b short ckpt off": ("llama3.2-1b", 3, "short", "dpo", 4, "false"),
    "qwen2.5-0.5b long ckpt off": ("qwen2.5-0.5b", 4, "long", "dpo", 2, "false"),
    "qwen2.5-0.5b long ckpt on": ("qwen2.5-0.5b", 4, "long", "dpo", 2, "true"),
    "gemma3-1b long ckpt off": ("gemma3-1b", 3, "long", "dpo", 2, "false"),
    "gemma3-1b short ckpt on": ("gemma3-1b", 3, "short", "dpo", 4, "true"),
    "mistral-7b long ckpt off": ("mistral-7b", 2, "long", "dpo", 2, "false"),
}
LENGTHS = {"short": (64, 32), "long": (384, 128)}


def build_model(arch: str, layers: int | None, workdir: Path, tok=None, vocab: int | None = None) -> Path:
    """A model folder for ``arch`` with ``layers`` decoder layers (None: all), random weights in bf16 (SmolLM2 at
    full depth: the real folder when present). ``tok``: the tokenizer to save with it (default SmolLM2's; the
    architectures' own aren't offline); ``vocab``: a vocabulary size other than the architecture's (the CI test's
    smaller ones). A vocabulary larger than the tokenizer only has tokens no row uses, which changes nothing the
    memory model counts."""
    if arch == "smollm2" and layers is None and vocab is None and (SMOLLM2 / "config.json").is_file():
        return SMOLLM2
    spec = dict(ARCHS[arch])
    spec["num_hidden_layers"] = layers or spec["num_hidden_layers"]
    spec["vocab_size"] = vocab or spec["vocab_size"]
    model_dir = workdir / f"model-{arch.replace('/', '_')}-{spec['num_hidden_layers']}-{spec['vocab_size']}"
    if (model_dir / "config.json").is_file():
        return model_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = tok or AutoTokenizer.from_pretrained(SMOLLM2)
    if len(tok) > spec["vocab_size"]:  # Mistral's 32k is smaller than SmolLM2's 49k: the bundled 768-token one
        from lowrank_pref.tiny import build_tokenizer

        tok = build_tokenizer()
    kind = spec.pop("model_type")
    config = AutoConfig.for_model(kind, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, max_position_embeddings=4096, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def synthetic_pairs(tok, path: Path, prompt: int, answer: int, n: int = 8) -> Path:
    """``n`` pairs of random words, ``prompt`` and ``answer`` tokens long in ``tok``."""
    rng = random.Random(0)
    vocab = [t for t in (tok.decode([i]) for i in range(len(tok))) if t.strip().isalpha() and len(t.strip()) > 2]

    def text(n: int) -> str:
        ids = tok(" ".join(rng.choice(vocab) for _ in range(n)))["input_ids"][:n - 1]
        return tok.decode(ids)

    rows = [{"prompt": text(prompt), "chosen": text(answer), "rejected": text(answer)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sharegpt_pairs(tok, n: int = 32, max_length: int = 512) -> list[dict]:
    """The first ``n`` ShareGPT pairs whose prompt (chat template applied) and longer answer fit ``max_length``."""
    keep = []
    for row in json.loads(SHAREGPT.read_text()):
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in row["conversations"]]
        prompt = len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
                     ["input_ids"])
        answer = max(len(tok(row[side]["value"])["input_ids"]) for side in ("chosen", "rejected"))
        if prompt <= max_length // 2 and prompt + answer + 4 <= max_length:
            keep.append(row)
        if len(keep) == n:
            return keep
    raise SystemExit(f"{SHAREGPT}: fewer than {n} pairs fit {max_length} tokens")


def build_data(kind: str, workdir: Path) -> tuple[Path, int, int]:
    """(data file, max_length, max_prompt_length) for ``kind``: real, short or long (see the module docstring)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    path = workdir / f"data-{kind}.json"
    if kind == "real":
        if not path.is_file():  # the 8 a 2-step run of batch 4 takes, so the largest micro-step is one it runs
            path.write_text(json.dumps(sharegpt_pairs(tok)[:8]))
        return path, 512, 256
    prompt, answer = LENGTHS[kind]
    if not path.is_file():
        synthetic_pairs(tok, path, prompt, answer)
    return path, prompt + answer + 16, prompt + 8


def measure(model_dir: Path, data: Path, overrides: dict, out: Path, steps: int = 2, env: dict | None = None,
            preset: str = "tiny") -> dict:
    """One training run in its own process; returns its metrics' last line, status, config and the estimate."""
    from lowrank_pref.artifacts import read_metrics

    args = ["--preset", preset, "--model", str(model_dir), "--dataset", str(data), "--max-steps", str(steps), "--output-dir", str(out),
            *[f"{k}={v}" for k, v in overrides.items()]]
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lowrank_pref.run", *args], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), LOWRANK_PREF_PROGRESS="0", **(env or {})))
    if res.returncode != 0:
        raise RuntimeError(f"run failed ({res.returncode}): {res.stderr[-3000:]}")
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    return {"last": rows[-1], "rows": rows, "status": json.loads((out / "status.json").read_text()),
            "wall_s": time.perf_counter() - started}


def estimate_for(model_dir: Path, data: Path, overrides: dict, checkpointed: int, gpu: bool, preset: str = "tiny",
                 offload: bool = False) -> dict:
    """The memory model's parts for the run ``measure`` made, at its largest micro-step and checkpointing."""
    from lowrank_pref.config import build_config
    from lowrank_pref.loop import Schedule, largest_micro_step
    from lowrank_pref.memory import estimate
    from lowrank_pref.model import load_tokenizer
    from lowrank_pref.tasks import task_class

    cfg = build_config(preset, overrides={"model": str(model_dir), "dataset": str(data), **overrides})
    task = task_class(cfg.task)(cfg)
    items = task.load_data(load_tokenizer(cfg)).train
    schedule = Schedule(len(items), cfg.batch_size, 1, cfg.seed, sizes=[task.size(i) for i in items])
    tokens, answers = largest_micro_step(task, schedule, items)
    return estimate(cfg, gpu=gpu, tokens=tokens, answer_tokens=answers, checkpointed_layers=checkpointed,
                    offload=offload)


def run_case(name: str, workdir: Path, gpu: bool) -> dict:
    from lowrank_pref.memory import training_gb

    arch, layers, kind, task, batch, ckpt = CASES[name]
    model_dir = build_model(arch, layers, workdir)
    data, max_length, max_prompt = build_data(kind, workdir)
    overrides = {"task": task, "batch_size": batch, "max_length": max_length, "max_prompt_length": max_prompt,
                 "lora.r": 16, "lora.alpha": 32, "reference_cache": False, "data.eval_fraction": 0,
                 "save_steps": 10**6, "eval_steps": 10**6}
    if isinstance(ckpt, int):  # a memory limit between what ckpt and ckpt - 1 checkpointed layers need
        n = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        overrides["gradient_checkpointing"] = "auto"
        need = estimate_for(model_dir, data, overrides, ckpt, gpu)["total"]
        overrides["memory_limit_gb"] = round(need / 0.9 * 1.0005, 4)
        assert ckpt < n
    else:
        overrides["gradient_checkpointing"] = ckpt
    env = {**({} if gpu else RETURNING),  # partial: the plan of a device kind whose faster layout is off
           **({"LOWRANK_PREF_FASTER_LAYOUT": "off"} if isinstance(ckpt, int) else {})}
    got = measure(model_dir, data, overrides, Path(tempfile.mkdtemp(dir=workdir)), env=env)
    checkpointed = got["status"]["checkpointed_layers"]
    parts = estimate_for(model_dir, data, overrides, checkpointed, gpu)
    measured = (got["last"]["peak_memory_mb"] - got["last"]["loaded_memory_mb"]) / 1024
    estimated = training_gb(parts)
    return {"case": name, "arch": arch, "layers": layers, "data": kind, "task": task, "batch": batch,
            "checkpointed_layers": checkpointed, "measured_gb": round(measured, 4),
            "estimated_gb": round(estimated, 4), "ratio": round(estimated / measured, 3), "parts": parts,
            "loaded_mb": got["last"]["loaded_memory_mb"], "wall_s": round(got["wall_s"], 1)}


def check_preset(name: str, workdir: Path) -> dict:
    """GPU: a preset's run at full depth (its model's architecture, random weights; rows of its max_length), the
    allocator's whole training peak (model included) against the estimate's total less the CUDA context."""
    import yaml

    from lowrank_pref.memory import KNOWN, training_gb

    preset = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    hidden, layers, ffn, vocab, heads, kv_heads, tied = KNOWN[preset["model"]]
    kind = "qwen2" if preset["model"].startswith("Qwen/") else "mistral" if "istral" in preset["model"] else "llama"
    ARCHS[preset["model"]] = dict(model_type=kind, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                  tie_word_embeddings=tied)
    import torch

    with torch.device("cuda"):  # random init of billions of weights: seconds on a GPU, minutes on its CPU
        model_dir = build_model(preset["model"], None, workdir)
    from transformers import AutoTokenizer

    answer = preset["max_length"] - preset["max_prompt_length"]
    data = synthetic_pairs(AutoTokenizer.from_pretrained(model_dir), workdir / f"pairs-{name}.jsonl",
                           preset["max_prompt_length"] - 8, answer - 8, n=2 * preset.get("batch_size", 1))
    overrides = {"data.eval_fraction": 0, "reference_cache": False, "save_steps": 10**6, "eval_steps": 10**6,
                 "gradient_accumulation_steps": 1}
    got = measure(model_dir, data, overrides, Path(tempfile.mkdtemp(dir=workdir)), preset=name)
    status = got["status"]
    parts = estimate_for(model_dir, data, overrides, status["checkpointed_layers"], True, preset=name,
                         offload=bool(status.get("checkpoint_offload")))
    estimated = (parts["total"] - parts["runtime"]) * 1024
    return {"preset": name, "model": preset["model"], "checkpointed_layers": status["checkpointed_layers"],
            "peak_allocated_mb": got["last"]["peak_memory_mb"], "estimated_peak_mb": round(estimated),
            "ratio": round(estimated / got["last"]["peak_memory_mb"], 3),
            "delta_mb": got["last"]["peak_memory_mb"] - got["last"]["loaded_memory_mb"],
            "estimated_delta_mb": round(training_gb(parts) * 1024), "parts": parts}


def layouts_ab(model_dir: Path, data: Path, overrides: dict, rounds: int, partial: int | None = None) -> dict:
    """Step time with checkpointing on (every layer but the last), off, and on ``partial`` layers if given: one
    process, one loaded model, the layouts interleaved step by step (their order turning each round), each step the
    same micro-batch (forward, backward, optimizer step) under the default allocator. The machine's drift moves
    neighbouring steps alike, so the median of each round's own ratio is the figure; per-layout medians beside it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lowrank_pref.config import build_config
    from lowrank_pref.loop import make_optimizer
    from lowrank_pref.memory import MemoryPlan
    from lowrank_pref.model import load_model, load_tokenizer, trainable_parameters
    from lowrank_pref.tasks import task_class

    cfg = build_config("tiny", overrides={"model": str(model_dir), "dataset": str(data), **overrides,
                                          "gradient_checkpointing": True})
    task = task_class(cfg.task)(cfg)
    tok = load_tokenizer(cfg)
    items = task.load_data(tok)
    model, _ = load_model(cfg, tok, MemoryPlan(None, 0), keep_reference=task.uses_reference)
    task.setup(model, tok, items)
    model.train()
    batch = items.train[:cfg.batch_size]
    params = trainable_parameters(model)
    optimizer = make_optimizer(cfg, params)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    layouts = {"on": len(layers) - 1, "off": 0, **({f"{partial} layers": partial} if partial else {})}

    def step(k: int) -> float:
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < k
        started = time.perf_counter()
        losses, _, _ = task.losses(model, batch)
        losses.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for name, k in layouts.items():  # warm-up: one step each
        print(f"warm-up {name}: {step(k):.2f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    names = list(layouts)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(layouts[name]))
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), file=sys.stderr, flush=True)
    result = {"rounds": rounds, "step_s": {n: statistics.median(t) for n, t in times.items()}, "times": times}
    result["on_over_off"] = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), help="these cases (default: all)")
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), help="the cases of these architectures")
    p.add_argument("--workdir", help="build models and data here and reuse them (default: a new temp folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--layouts", action="store_true", help="instead: step time with checkpointing on, off and partial "
                   "(SmolLM2, the real pairs, batch 4), interleaved in one process")
    p.add_argument("--rounds", type=int, default=5, help="--layouts: rounds of one step per layout")
    p.add_argument("--partial", type=int, help="--layouts: also this many layers checkpointed")
    p.add_argument("--batch", type=int, default=4, help="--layouts: pairs per step")
    p.add_argument("--presets", nargs="*", help="GPU: instead, these presets' runs at full depth (no names: every "
                   "dpo preset whose card is no larger than this one)")
    args = p.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="memcheck_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.presets is not None:
        if not gpu:
            raise SystemExit("--presets measures allocated GPU memory: it needs a CUDA GPU")
        card = torch.cuda.get_device_properties(0).total_memory / 2**30
        names = args.presets or [p.stem for p in sorted((ROOT / "presets").glob("*gb-dpo.yaml"))
                                 if int(p.stem.split("gb")[0]) <= card]
        rows = []
        for name in names:
            rows.append(check_preset(name, workdir))
            r = rows[-1]
            print(f"{name:12s} ckpt {r['checkpointed_layers']:>2d}  peak allocated {r['peak_allocated_mb']:8.0f} MB  "
                  f"estimated {r['estimated_peak_mb']:8.0f} MB  est/measured {r['ratio']:.2f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "presets": rows},
                                                  indent=1))
        return 0
    if args.layouts:
        data, max_length, max_prompt = build_data("real", workdir)
        ab = layouts_ab(build_model("smollm2", None, workdir), data, {
            "task": "dpo", "batch_size": args.batch, "max_length": max_length, "max_prompt_length": max_prompt, "lora.r": 16,
            "lora.alpha": 32, "reference_cache": False, "data.eval_fraction": 0}, args.rounds, partial=args.partial)
        print("median step s: " + ", ".join(f"{n} {t:.2f}" for n, t in ab["step_s"].items())
              + f"; on/off (median of each round's ratio) {ab['on_over_off']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"device": "cpu", "layouts": ab}, indent=1))
        return 0
    names = args.cases or [n for n in CASES if not args.archs or CASES[n][0] in args.archs]
    results = []
    for name in names:
        r = run_case(name, workdir, gpu)
        results.append(r)
        print(f"{name:30s} ckpt {r['checkpointed_layers']:>2d}  measured {r['measured_gb'] * 1024:7.0f} MB  "
              f"estimated {r['estimated_gb'] * 1024:7.0f} MB  est/measured {r['ratio']:.2f}  ({r['wall_s']:.0f} s)",
              flush=True)
        if args.json:  # after each case, so a failing one keeps the others
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0) if gpu else "cpu",
                                                   "results": results}, indent=1))
    ratios = [r["ratio"] for r in results]
    print(f"median est/measured {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}, "
          f"within 15%: {sum(abs(x - 1) <= 0.15 for x in ratios)}/{len(ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0) if gpu else "cpu",
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
