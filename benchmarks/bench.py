"""Our DPO and reward-model steps against TRL's DPOTrainer and RewardTrainer: same 4-bit model, data and settings.

    python benchmarks/bench.py                          # DPO, prompt-heavy (192 / 48 tokens), 3 rounds
    python benchmarks/bench.py --prompt 32 --answer 128 --rounds 5 --json out.json
    python benchmarks/bench.py --task reward            # reward model against TRL's RewardTrainer
    python benchmarks/bench.py --prompt 768 --answer 256 --batch 2       # long pairs (1k+ tokens)
    python benchmarks/bench.py --vocab 32768            # a large vocabulary (LM head 32k wide)
    python benchmarks/bench.py --ours-checkpointing auto                 # ours picks checkpointing by memory
    python benchmarks/bench.py --ours-checkpoint-offload true            # GPU: ours keeps checkpoints in host RAM
    python benchmarks/bench.py --all --json results.json                 # all of the above, one table
    python benchmarks/bench.py --arch llama3-8b --workdir /tmp/bench      # GPU: Llama-3-8B's shapes, random weights
    python benchmarks/bench.py --cases "dpo smollm2 real"               # CPU: SmolLM2-135M on 32 ShareGPT pairs

On the CPU the model is a small Llama built from a config (--layers, --hidden, --ffn, --vocab); --arch builds a real
architecture instead (Llama-3.1-8B, Qwen2.5-7B, ...: widths, heads, vocabulary; random weights), --arch-layers cuts
its depth, and --workdir keeps the built model for the next command. --arch smollm2 is the real SmolLM2-135M-Instruct
folder (../shared/tools/smollm2.py builds it) with --pairs real: the first 32 ShareGPT pairs of ../shared/data that fit
512 tokens untruncated, as conversations, so each side applies the model's chat template to the same messages.

Each side runs in its own process (so peak memory is its own), TRL and ours interleaved round by round.
Throughput is the median over rounds of each round's median step time after the warm-up steps; the speed ratio is
the median over rounds of each round's own ratio (both sides of a round run back to back, so drift in the machine's
speed cancels); "fastest x" is the same from each round's fastest step per side, a check on it. Memory is each side's
peak over what it held when training began (model, adapters, data, optimizer loaded): allocated memory on a GPU; on the
CPU the RSS high-water mark (reset through /proc), read in extra rounds where glibc returns freed blocks to the OS (see
main()), so that RSS follows the memory the steps use. Beside ours' measured memory goes what lowrank_pref.memory
estimates for the same run. Prints a table, the ratios (ours / TRL) and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --arch: real architectures with random weights (the GPU benchmark), by the memory model's name for them
ARCHS = {"llama3-8b": "meta-llama/Llama-3.1-8B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
         "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
         "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "smollm2": "smollm2"}


def build_model(workdir: Path, args, tok) -> Path:
    """A model folder from a config, with random weights: ``--arch small`` a Llama of --layers x --hidden (fp32),
    else the named architecture at its real widths (bf16 on disk; --arch-layers cuts the depth). Reused when the folder
    already exists (``--workdir``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from lowrank_pref.memory import KNOWN

    if args.arch == "smollm2":  # the real model (see the module docstring)
        from memory_check import SMOLLM2

        if not (SMOLLM2 / "config.json").is_file():
            raise SystemExit(f"no SmolLM2 at {SMOLLM2}: run python ../shared/tools/smollm2.py first")
        return SMOLLM2
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if args.arch == "small":
        model_dir = workdir / f"model-small-{args.layers}x{args.hidden}-{args.vocab or len(tok)}"
        config = LlamaConfig(vocab_size=max(len(tok), args.vocab or 0), hidden_size=args.hidden,
                             intermediate_size=args.ffn, num_hidden_layers=args.layers,
                             num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
                             max_position_embeddings=4096, **special)
        dtype = torch.float32
    else:
        name = ARCHS[args.arch]
        hidden, layers, ffn, vocab, heads, kv_heads, tied = KNOWN[name]
        layers = args.arch_layers or layers
        model_dir = workdir / f"model-{args.arch}-{layers}"
        kind = Qwen2Config if name.startswith("Qwen/") else MistralConfig if "istral" in name else LlamaConfig
        config = kind(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                      max_position_embeddings=8192, **special)
        dtype = torch.bfloat16
    if (model_dir / "config.json").is_file():
        return model_dir
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 8B weights: seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(model_dir)
    del model
    tok.save_pretrained(model_dir)
    return model_dir


def build_assets(workdir: Path, args) -> tuple[Path, Path]:
    """A model (see build_model) and a jsonl of pairs with the asked lengths."""
    import random

    from lowrank_pref.tiny import _corpus, build_tokenizer

    tok = build_tokenizer()
    model_dir = build_model(workdir, args, tok)
    if args.pairs == "real":
        from transformers import AutoTokenizer

        from memory_check import sharegpt_pairs

        data = workdir / "pairs-sharegpt-32.jsonl"
        pairs = sharegpt_pairs(AutoTokenizer.from_pretrained(model_dir), 32, args.prompt + args.answer)
        data.write_text("".join(json.dumps({
            "prompt": [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                       for t in row["conversations"]],
            "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}]}) + "\n" for row in pairs))
        return model_dir, data
    words = " ".join(_corpus()).split()
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        out = []
        while len(tok(" ".join(out))["input_ids"]) < n_tokens:
            out.append(rng.choice(words))
        ids = tok(" ".join(out))["input_ids"][:n_tokens]
        return tok.decode(ids)

    rows = [{"prompt": text(args.prompt), "chosen": " " + text(args.answer - 1),
             "rejected": " " + text(args.answer - 1)} for _ in range(args.batch * 4)]
    data = workdir / f"pairs-{args.prompt}-{args.answer}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


class WeightPasses:
    """Counts the passes over the 4-bit weights a training step makes (each reads and de-quantizes them): forward
    calls of the 4-bit linear layers (reference, policy and checkpoint recompute) and backward passes that compute
    the gradient of a layer's input (bitsandbytes skips those whose input needs no gradient)."""

    def __init__(self):
        import bitsandbytes as bnb
        from bitsandbytes.autograd._functions import MatMul4Bit

        self.calls = self.modules = 0
        self.started = False
        original = bnb.nn.Linear4bit.forward

        def counting(module, *a, **kw):
            self.calls += 1
            return original(module, *a, **kw)

        bnb.nn.Linear4bit.forward = counting
        original_backward = MatMul4Bit.backward

        def counting_backward(ctx, grad_output):
            self.calls += bool(ctx.needs_input_grad[0])
            return original_backward(ctx, grad_output)

        MatMul4Bit.backward = staticmethod(counting_backward)
        original_init = bnb.nn.Linear4bit.__init__

        def counting_init(module, *a, **kw):
            self.modules += 1
            original_init(module, *a, **kw)

        bnb.nn.Linear4bit.__init__ = counting_init

    def start(self) -> None:
        """Count from here: the training steps, not the set-up before them."""
        if not self.started:
            self.started, self.calls = True, 0

    def per_step(self, steps: int) -> float:
        return self.calls / max(1, self.modules) / steps


def memory_estimate(cfg, out: Path, args) -> dict:
    """What lowrank_pref.memory predicts for this run (with the checkpointing it chose), in MB: what training adds to
    the loaded model, to set beside the measured delta, and on a GPU the whole peak the allocator sees (the CUDA
    context, the estimate's "runtime" part, is not allocated memory)."""
    import torch

    from lowrank_pref.memory import estimate, micro_step_tokens, training_gb

    status = json.loads((out / "status.json").read_text())
    gpu = torch.cuda.is_available()
    tokens, answers = micro_step_tokens(cfg, args.prompt, args.answer)
    if args.pairs == "real":  # rows of their own lengths: the largest micro-step, as the run plans by
        from lowrank_pref.loop import Schedule, largest_micro_step
        from lowrank_pref.model import load_tokenizer
        from lowrank_pref.tasks import task_class

        task = task_class(cfg.task)(cfg)
        items = task.load_data(load_tokenizer(cfg)).train
        schedule = Schedule(len(items), cfg.batch_size, 1, cfg.seed, sizes=[task.size(i) for i in items])
        tokens, answers = largest_micro_step(task, schedule, items)
    parts = estimate(cfg, gpu=gpu, tokens=tokens, answer_tokens=answers,
                     checkpointed_layers=status.get("checkpointed_layers"), offload=status.get("checkpoint_offload"))
    result = {"estimated_delta_mb": training_gb(parts) * 1024}
    if gpu:  # on the CPU the RSS peak also holds the libraries, which the estimate leaves out
        result["estimated_peak_mb"] = (parts["total"] - parts["runtime"]) * 1024
    return result


def worker(side: str, model_dir: str, data: str, args) -> dict:
    import torch

    from lowrank_pref.run import quiet_libraries

    quiet_libraries()
    os.environ["LOWRANK_PREF_PROGRESS"] = "0"
    steps = args.warmup + args.steps
    passes = WeightPasses()
    common = dict(max_length=args.prompt + args.answer, lr=1e-4, beta=0.1)
    if side == "ours":
        from lowrank_pref.artifacts import read_metrics
        from lowrank_pref.config import build_config
        from lowrank_pref.loop import train

        out = tempfile.mkdtemp()
        cfg = build_config("tiny", overrides={
            "model": model_dir, "dataset": data, "batch_size": args.batch, "gradient_accumulation_steps": 1,
            "max_steps": steps, "max_length": common["max_length"], "max_prompt_length": args.prompt,
            "learning_rate": common["lr"], "beta": common["beta"], "lora.r": 16, "lora.alpha": 32,
            "lora.dropout": 0.0, "data.eval_fraction": 0,
            "gradient_checkpointing": args.checkpointing if args.ours_checkpointing == "same" else None,
            "checkpoint_offload": args.ours_checkpoint_offload,
            # off unless asked: with the few pairs here, later steps would reuse cached reference log-probs, which a
            # one-epoch run on real data doesn't (--ours-reference-cache shows what later epochs gain)
            "reference_cache": args.ours_reference_cache,
            "logging_steps": 1, "save_steps": 10**6, "warmup_ratio": 0.0, "task": args.task,
            "shared_prompt": args.shared_prompt})
        from lowrank_pref.tasks import task_class

        task_cls = task_class(cfg.task)
        step_losses = task_cls.losses

        def counted(*a, **kw):  # the first micro-step starts the count (after ours' one-off shared-prompt check)
            passes.start()
            return step_losses(*a, **kw)

        task_cls.losses = counted
        train(cfg, out)
        rows = [m for m in read_metrics(Path(out) / "metrics.jsonl") if "pairs_per_second" in m]
        times = [args.batch / m["pairs_per_second"] for m in rows][args.warmup:]
        tokens = sum(m["tokens_per_second"] / m["pairs_per_second"] for m in rows) / len(rows)
        return {"step_s": statistics.median(times), "step_min_s": min(times), "tokens_per_pair": tokens,
                "peak_mb": rows[-1]["peak_memory_mb"],
                "loaded_mb": rows[-1]["loaded_memory_mb"], "weight_passes_per_step": passes.per_step(steps),
                **memory_estimate(cfg, Path(out), args)}
    # TRL: the same 4-bit model, LoRA config, data, batch and lengths
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from lowrank_pref.memory import current_memory_mb, peak_memory_mb, reset_peak_memory
    from lowrank_pref.model import nf4_config
    from lowrank_pref.patches import pin_cpu_4bit_kernel

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32  # what ours picks
    tok = AutoTokenizer.from_pretrained(model_dir)
    load = dict(quantization_config=nf4_config(dtype), dtype=dtype, device_map={"": "cuda:0" if gpu else "cpu"})
    if args.task == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    pin_cpu_4bit_kernel(model)  # the same kernel on both sides
    times, loaded = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            reset_peak_memory()  # the same meter as ours, started at the same point
            loaded.append(current_memory_mb())
            passes.start()

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    common_args = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=steps,
                       max_length=common["max_length"], learning_rate=common["lr"],
                       gradient_checkpointing=args.checkpointing, logging_steps=1, report_to="none", use_cpu=not gpu,
                       bf16=dtype == torch.bfloat16, save_strategy="no", dataset_num_proc=None, warmup_steps=0,
                       lr_scheduler_type="cosine",
                       # on a GPU ours (optimizer=auto) keeps 8-bit paged Adam states: the same for TRL, so the
                       # memory ratio is about the steps; on the CPU both use torch's AdamW (TRL its fused form)
                       **({"optim": "paged_adamw_8bit"} if gpu else {}))
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    dataset = load_dataset("json", data_files=data, split="train")
    if args.task == "reward":
        from trl import RewardConfig, RewardTrainer

        trainer = RewardTrainer(model=model, args=RewardConfig(**common_args), train_dataset=dataset,
                                processing_class=tok, callbacks=[Timer()],
                                peft_config=LoraConfig(task_type="SEQ_CLS", **lora))
        if dtype == torch.float32:  # TRL casts trainable weights to bf16 for QLoRA; its fp32 score head can't run so
            for param in trainer.model.parameters():
                if param.requires_grad and param.dtype == torch.bfloat16:
                    param.data = param.data.float()
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(beta=common["beta"], **common_args), train_dataset=dataset,
                             processing_class=tok, callbacks=[Timer()], peft_config=LoraConfig(**lora))
    trainer.train()
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    per_pair = logged[-1] / (steps * args.batch) if logged else float("nan")
    return {"step_s": statistics.median(times[args.warmup:]), "step_min_s": min(times[args.warmup:]),
            "tokens_per_pair": per_pair, "peak_mb": peak_memory_mb(),
            "loaded_mb": loaded[0], "weight_passes_per_step": passes.per_step(steps)}


CASES = {  # name: overrides of the command-line defaults
    "dpo prompt-heavy": {},
    "dpo answer-heavy": {"prompt": 32, "answer": 128},
    "reward prompt-heavy": {"task": "reward"},
    "dpo long (1k tokens)": {"prompt": 768, "answer": 256, "batch": 2, "steps": 3},
    "dpo vocab 32k": {"vocab": 32768},
    "dpo prompt-heavy, ckpt auto": {"ours_checkpointing": "auto"},
    "dpo prompt-heavy, epoch 2+": {"ours_reference_cache": True, "warmup": 4},  # timed steps all in epoch 2+
    # a real architecture on the CPU: SmolLM2-135M (30 layers, GQA 9/3, a tied 49k vocabulary), 32 real pairs, one
    # epoch of 8 steps of 4; TRL's DPOTrainer keeps its gradient checkpointing, ours chooses (auto)
    "dpo smollm2 real": {"arch": "smollm2", "pairs": "real", "prompt": 256, "answer": 256, "batch": 4, "warmup": 2,
                         "steps": 6, "ours_checkpointing": "auto"},
}


def run_case(args, workdir: Path) -> dict:
    import torch

    model_dir, data = build_assets(workdir, args)
    own = ("worker", "model_dir", "data", "json", "rounds", "memory_rounds", "all", "cases", "workdir")
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in own and v is not None]
    gpu = torch.cuda.is_available()
    # On the CPU, memory is read in separate rounds under an allocator that returns freed blocks to the OS (glibc's
    # tunables, the same for both sides): with glibc's default, RSS keeps whatever the heap once grew to, so it says
    # more about allocation order than about the memory a step needs. Speed is read under the default allocator.
    returning = dict(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    plan = [("speed", r) for r in range(args.rounds)] + ([] if gpu else [("memory", r)
                                                                      for r in range(args.memory_rounds)])
    results: dict[str, dict[str, list[dict]]] = {"speed": {"ours": [], "trl": []}, "memory": {"ours": [], "trl": []}}
    sides = ("trl", "ours") if args.sides == "both" else (args.sides,)
    for kind, r in plan:
        for side in sides if r % 2 == 0 else sides[::-1]:
            cmd = [sys.executable, __file__, "--worker", side, "--model-dir", str(model_dir), "--data", str(data),
                   *passthrough]
            env = dict(os.environ, PYTHONPATH=str(ROOT), **(returning if kind == "memory" else {}))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{side} worker failed")
            results[kind][side].append(json.loads(line[0][7:]))
            print(f"{kind} round {r + 1} {side}: {results[kind][side][-1]}", file=sys.stderr)
    summary = {}
    for side in sides:
        speed, memory = results["speed"][side], results["memory"][side] or results["speed"][side]
        step = statistics.median(x["step_s"] for x in speed)
        summary[side] = {"pairs_per_s": args.batch / step, "step_s": step,
                         "tokens_per_pair": statistics.median(x["tokens_per_pair"] for x in speed),
                         "weight_passes_per_step": statistics.median(x["weight_passes_per_step"] for x in speed),
                         "peak_mb": statistics.median(x["peak_mb"] for x in memory),
                         "memory_delta_mb": statistics.median(x["peak_mb"] - x["loaded_mb"] for x in memory)}
        if side == "ours":  # the memory model's figures for the same run (see memory_estimate)
            summary[side].update({k: v for k, v in memory[0].items() if k.startswith("estimated_")})
    ratios = {}
    if len(sides) == 2:
        # each round runs both sides back to back, so a round's own ratio is what the machine's drift (which moved
        # whole rounds by 30% here) disturbs least: the headline is their median; the per-side medians stay in the
        # summary
        paired = [t["step_s"] / o["step_s"] for o, t in zip(results["speed"]["ours"], results["speed"]["trl"])]
        # the same from each round's fastest step per side: the machine's slow spells only add time, so this is the
        # ratio with the least of them in it (a check on the median, quoted beside it)
        fastest = [t["step_min_s"] / o["step_min_s"] for o, t in zip(results["speed"]["ours"],
                                                                     results["speed"]["trl"])]
        ratios = {"throughput_ours_over_trl": statistics.median(paired), "throughput_by_round": paired,
                  "throughput_fastest_steps_ours_over_trl": statistics.median(fastest),
                  "throughput_fastest_steps_by_round": fastest,
                  "memory_delta_ours_over_trl": summary["ours"]["memory_delta_mb"] / summary["trl"]["memory_delta_mb"],
                  "peak_memory_ours_over_trl": summary["ours"]["peak_mb"] / summary["trl"]["peak_mb"]}
    case = {"task": args.task, "prompt": args.prompt, "answer": args.answer, "batch": args.batch,
            "arch": args.arch, **model_shape(model_dir),
            "checkpointing": args.checkpointing, "ours_checkpointing": args.ours_checkpointing,
            "ours_reference_cache": args.ours_reference_cache, "ours_checkpoint_offload": args.ours_checkpoint_offload,
            "shared_prompt": args.shared_prompt, "rounds": args.rounds,
            "memory_rounds": 0 if gpu else args.memory_rounds,
            "device": torch.cuda.get_device_name(0) if gpu else "cpu"}
    return {"case": case, "summary": summary, "ratios": ratios}


def model_shape(model_dir: Path) -> dict:
    c = json.loads((model_dir / "config.json").read_text())
    return {"layers": c["num_hidden_layers"], "hidden": c["hidden_size"], "vocab": c["vocab_size"]}


def print_table(payloads: dict[str, dict]) -> None:
    print(f"\n{'case':22s} {'side':5s} {'pairs/s':>8s} {'tokens/pair':>12s} {'4bit passes':>12s} {'peak MB':>8s} "
          f"{'delta MB':>9s} {'est. peak':>9s} {'est. delta':>10s} {'speed x':>8s} {'fastest x':>9s} {'memory x':>9s}")
    for name, p in payloads.items():
        for side in ("ours", "trl"):
            if side not in p["summary"]:
                continue
            s, r = p["summary"][side], p["ratios"]
            peak = f"{s['estimated_peak_mb']:9.0f}" if "estimated_peak_mb" in s else f"{'-':>9s}"
            estimates = f"{peak} {s['estimated_delta_mb']:10.0f}" if side == "ours" else " " * 20
            ratios = (f"{r['throughput_ours_over_trl']:8.2f} {r['throughput_fastest_steps_ours_over_trl']:9.2f} "
                      f"{r['memory_delta_ours_over_trl']:9.2f}" if side == "ours" and r else "")
            label = name if side == "ours" else ""
            print(f"{label:22s} {side:5s} {s['pairs_per_s']:8.2f} {s['tokens_per_pair']:12.1f} "
                  f"{s['weight_passes_per_step']:12.2f} {s['peak_mb']:8.0f} {s['memory_delta_mb']:9.0f} {estimates} "
                  f"{ratios}")
    print("(speed x: median over rounds of each round's ours/TRL pairs per second; fastest x: the same from each "
          "round's fastest step per side; memory x: ours/TRL peak memory over the loaded model; 4bit passes: passes "
          "over each 4-bit layer's weights per optimizer step, forward calls and input-gradient backward passes; "
          "est. peak / est. delta: what lowrank_pref.memory predicts for ours' peak allocated memory (GPU only: RSS "
          "also holds the libraries) and for its delta over the loaded model)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("dpo", "reward"), default="dpo")
    p.add_argument("--prompt", type=int, default=192)
    p.add_argument("--answer", type=int, default=48)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=None, help="model vocabulary (default: the tokenizer's, 768)")
    p.add_argument("--arch", choices=("small", *ARCHS), default="small",
                   help="small: a Llama of --layers x --hidden (--ffn, --vocab); else that model's real architecture "
                        "with random weights, bf16 on disk (for a GPU)")
    p.add_argument("--pairs", choices=("synthetic", "real"), default="synthetic",
                   help="real: 32 ShareGPT pairs (../shared/data) as conversations (with --arch smollm2)")
    p.add_argument("--arch-layers", type=int, default=None, help="with --arch: this many layers, not the model's")
    p.add_argument("--sides", choices=("both", "ours", "trl"), default="both", help="run only one side")
    p.add_argument("--workdir", help="build the model and data here and reuse them (default: a new temp folder)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-rounds", type=int, default=2, help="CPU: rounds that read memory (see above)")
    p.add_argument("--checkpointing", type=lambda s: s.lower() == "true", default=True)
    p.add_argument("--shared-prompt", choices=("auto", "on", "off"), default="auto", help="ours: shared_prompt")
    p.add_argument("--ours-checkpointing", choices=("same", "auto"), default="same",
                   help="ours: TRL's checkpointing, or gradient_checkpointing=auto (TRL keeps --checkpointing)")
    p.add_argument("--ours-checkpoint-offload", type=lambda s: s.lower() == "true", default=None,
                   help="ours: true to hold checkpointed layers' inputs in host RAM (GPU; default: auto, on only when "
                        "the run would not fit)")
    p.add_argument("--ours-reference-cache", type=lambda s: s.lower() == "true", default=False,
                   help="ours: true to reuse cached reference log-probs, as later epochs do (default false)")
    p.add_argument("--all", action="store_true", help="run every case in CASES and print one table")
    p.add_argument("--cases", nargs="+", choices=list(CASES), help="run these cases of CASES")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model_dir, args.data, args)))
        return 0
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LOWRANK_PREF_CACHE", str(workdir / "cache"))
    cases = {name: CASES[name] for name in (args.cases or CASES)} if args.all or args.cases else {"this case": {}}
    from memory_check import SMOLLM2

    if not args.cases and "dpo smollm2 real" in cases and not (SMOLLM2 / "config.json").is_file():
        print(f"(skipping 'dpo smollm2 real': no SmolLM2 at {SMOLLM2}; ../shared/tools/smollm2.py builds it)",
              file=sys.stderr)
        del cases["dpo smollm2 real"]
    payloads = {}
    for name, overrides in cases.items():
        case_args = argparse.Namespace(**{**vars(args), **overrides})
        print(f"== {name}", file=sys.stderr)
        payloads[name] = run_case(case_args, workdir)
    print_table(payloads)
    print(json.dumps(payloads))
    if args.json:
        Path(args.json).write_text(json.dumps(payloads, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
