"""RL against a reward model, us beside TRL's RLOOTrainer with its separate reward model, on the same 4-bit model,
data and settings. Prints each side's median seconds per step and peak memory, and the ratios, from one run.

    python benchmarks/rl.py                       # SmolLM2-135M-Instruct if cached, else the offline tiny model
    python benchmarks/rl.py --steps 6 --model ~/.cache/lowrank_pref/smollm2-135m-instruct
    python benchmarks/rl.py --model builtin:tiny --ppo-epochs 4   # and our PPO beside both (TRL 1.16 has no PPO)

Each side runs in its own child process (so each peak is its own): ours is ``--task rl`` with the reward model as a
second adapter on the policy's base; TRL's is RLOOTrainer with the policy as a PEFT model (reference: adapters off)
and the reward model as a second 4-bit model with the reward adapter, as its docs show. Both: k completions per
prompt, the same prompts, max_new_tokens, LoRA rank, learning rate and beta. The reward adapter is made once, with
random weights, by our reward task's save path (what it scores does not matter for speed or memory).

``--ppo-epochs E`` adds a third child, ours with ``rl.algorithm=ppo`` (the value adapter, E steps a rollout), timed
per rollout (its E steps together) against RLOO's per step (one rollout a step); TRL removed its PPOTrainer, so
there is no TRL side for it.

Memory: on a GPU the peak of allocated CUDA memory; on the CPU the peak RSS, printed with and without the memory
the process held before the models loaded (torch's and Python's own, the same on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOL = Path("~/.cache/lowrank_pref/smollm2-135m-instruct").expanduser()


def rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec from the parent,
    which has loaded a model to make the reward adapter, so both children would report at least its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb()


def make_reward_adapter(model: str, out: Path, scale: float = 0.05) -> None:
    """A reward model's adapter as a reward run saves it (SEQ_CLS LoRA + score head), its LoRA B and head weights
    drawn at random (times ``scale``) so that every row scores differently. tests/test_rl.py uses it too."""
    import torch

    from lowrank_pref.config import build_config
    from lowrank_pref.model import load_model, load_tokenizer, save_adapter

    cfg = build_config("tiny-reward", overrides={"model": model, "gradient_checkpointing": False})
    tok = load_tokenizer(cfg)
    m, _ = load_model(cfg, tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name or "score" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(m, tok, out)


def prompts(n: int) -> list[str]:
    from lowrank_pref.tiny import TINY_PREFS

    rows = [json.loads(line) for line in TINY_PREFS.read_text().splitlines()]
    return [r["prompt"][0]["content"] for r in rows[:n]]


def run_ours(a) -> dict:
    # the libraries TRL's side has imported when it takes its baseline, imported before ours too: "over the process
    # before its models loaded" is then the models' and training's memory on both sides, not the imports'
    import importlib

    for name in ("bitsandbytes", "datasets", "peft", "transformers"):
        importlib.import_module(name)
    importlib.import_module("transformers").AutoModelForSequenceClassification  # its lazy modules too

    from lowrank_pref.artifacts import read_metrics
    from lowrank_pref.config import build_config
    from lowrank_pref.loop import train

    base = rss_mb()
    data = Path(a.work) / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n"
                            for p in prompts(a.prompts * a.steps + 8)))
    cfg = build_config("tiny-rl", overrides={
        "model": a.model, "dataset": str(data), "reward_model": a.reward, "rl.k": a.k, "batch_size": a.prompts,
        "gradient_accumulation_steps": 1, "rl.max_new_tokens": a.new, "max_length": 64 + a.new,
        "max_prompt_length": 64, "max_steps": a.steps, "eval_steps": 10_000, "save_steps": 10_000,
        "learning_rate": 1e-5, "beta": 0.05, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0,
        "data.eval_fraction": 0.0, "gradient_checkpointing": a.checkpointing == "on",
        "output_dir": str(Path(a.work) / a.side),
        **({"rl.algorithm": "ppo", "rl.ppo_epochs": a.ppo_epochs, "max_steps": a.steps * a.ppo_epochs}
           if a.side == "ppo" else {})})
    train(cfg, cfg.output_dir)
    steps = [m for m in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if "prompts_per_second" in m]
    times = [a.prompts / m["prompts_per_second"] for m in steps]
    E = a.ppo_epochs if a.side == "ppo" else 1  # one rollout: E steps (ppo's epochs over it), or one
    rollouts = [sum(times[i:i + E]) for i in range(0, len(times), E)]
    # the first rollout warms up
    return {"seconds_per_step": statistics.median(rollouts[1:]), "peak_mb": peak_mb(), "before_models_mb": base}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig, TrainerCallback)
    from trl import RLOOConfig, RLOOTrainer

    base = rss_mb()
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    where = {"": 0} if gpu else {"": "cpu"}
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=q, dtype=dtype, device_map=where)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, quantization_config=q,
                                                                dtype=dtype, device_map=where)
    reward.config.pad_token_id = tok.pad_token_id
    reward = PeftModel.from_pretrained(reward, a.reward).eval()
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts(a.prompts * a.steps + 8)])
    times, last = [], [None]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - last[0])

    args = RLOOConfig(output_dir=str(Path(a.work) / "trl"), per_device_train_batch_size=a.prompts * a.k,
                      num_generations=a.k, max_completion_length=a.new, max_steps=a.steps, learning_rate=1e-5,
                      beta=0.05, temperature=1.0, top_p=1.0, logging_steps=1, save_strategy="no", report_to=[],
                      use_cpu=not gpu, bf16=gpu, gradient_accumulation_steps=1, seed=0, top_k=0,
                      gradient_checkpointing=a.checkpointing == "on")  # the same on both sides
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          reward_processing_classes=tok, peft_config=peft, callbacks=[Clock()])
    trainer.train()
    return {"seconds_per_step": statistics.median(times[1:]), "peak_mb": peak_mb(), "before_models_mb": base}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SMOL) if (SMOL / "config.json").is_file() else "builtin:tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--k", type=int, default=4, help="completions per prompt")
    p.add_argument("--new", type=int, default=32, help="max new tokens")
    p.add_argument("--ppo-epochs", type=int, default=0, help="also time our PPO, this many epochs a rollout")
    p.add_argument("--checkpointing", choices=("off", "on"), default="off",
                   help="gradient checkpointing on both sides (on: RLOOConfig's default)")
    p.add_argument("--side", choices=("ours", "trl", "ppo"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--reward", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LOWRANK_PREF_PROGRESS", "0")
    if a.side:
        print(json.dumps((run_trl if a.side == "trl" else run_ours)(a)))
        return 0
    from lowrank_pref.tiny import resolve_model

    a.model = resolve_model(a.model)
    with tempfile.TemporaryDirectory() as work:
        reward = Path(work) / "reward"
        make_reward_adapter(a.model, reward)
        out = {}
        for side in ("ours", "trl", "ppo") if a.ppo_epochs else ("ours", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--work", work, "--reward", str(reward), "--model",
                   a.model, "--steps", str(a.steps), "--prompts", str(a.prompts), "--k", str(a.k), "--new",
                   str(a.new), "--ppo-epochs", str(a.ppo_epochs), "--checkpointing", a.checkpointing]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            out[side] = json.loads(res.stdout.strip().splitlines()[-1])
    o, t = out["ours"], out["trl"]
    print(f"model {a.model}, {a.prompts} prompts x k={a.k}, {a.new} new tokens, {a.steps} steps (median of the last "
          f"{a.steps - 1}), gradient checkpointing {a.checkpointing}")
    for name, r in out.items():
        print(f"  {name:5s} {r['seconds_per_step']:.2f} s/{'rollout' if name == 'ppo' else 'step'}   peak {r['peak_mb']:.0f} MB   "
              f"(+{r['peak_mb'] - r['before_models_mb']:.0f} MB over the process before its models loaded)")
    print(f"ratios ours/trl: time per step {o['seconds_per_step'] / t['seconds_per_step']:.2f}x, peak memory "
          f"{o['peak_mb'] / t['peak_mb']:.2f}x, peak over the bare process "
          f"{(o['peak_mb'] - o['before_models_mb']) / (t['peak_mb'] - t['before_models_mb']):.2f}x")
    if "ppo" in out:  # "seconds_per_step" of ppo: one rollout's ppo_epochs steps
        q = out["ppo"]
        over = (q["peak_mb"] - q["before_models_mb"]) / (o["peak_mb"] - o["before_models_mb"])
        print(f"ours ppo ({a.ppo_epochs} epochs a rollout): {q['seconds_per_step']:.2f} s/rollout, peak "
              f"{q['peak_mb']:.0f} MB; ratios ppo/rloo (ours): time per rollout "
              f"{q['seconds_per_step'] / o['seconds_per_step']:.2f}x, peak memory {q['peak_mb'] / o['peak_mb']:.2f}x, "
              f"peak over the bare process {over:.2f}x")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
