"""Scaling from 1 to N GPUs (DDP, or FSDP-QLoRA) and each rank's peak memory, for a lent multi-GPU machine.

    python benchmarks/distributed.py                                   # every GPU: 1, 2, 4, ... up to all, DDP
    python benchmarks/distributed.py --gpus 1,2 --mode fsdp            # FSDP-QLoRA on 1 and 2 cards
    python benchmarks/distributed.py --arch llama3-8b --arch-layers 8 --workdir /tmp/bench   # real widths
    python benchmarks/distributed.py --gpus 1,2 --json out.json        # the numbers as JSON too

Offline and as it is: the model is built from a config with random weights (benchmarks/bench.py's build_model:
--arch small is a --layers x --hidden Llama, --arch a real architecture's shapes) and the pairs are generated
(--prompt / --answer tokens). Each case is the real CLI (``torchrun --nproc-per-node N -m lowrank_pref.run``), so
loading, the collectives and rank 0's writes are all in it; the cases of a round run back to back, rounds
interleaved, so drift in the machine's speed falls on every case alike.

Weak scaling: every rank keeps --batch pairs x --accum micro-steps, so N cards take N times the pairs per step.
Throughput is the median over rounds of each run's median step (pairs per second, the first --warmup steps left
out, from metrics.jsonl); efficiency = throughput on N / (N x throughput on 1), the median of each round's own
ratio. Memory: each rank's peak (status.json, ``rank_peak_memory_mb``: allocated GPU memory over training) beside
what ``python -m lowrank_pref.memory --processes N`` estimates per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_case(n: int, args, model: Path, data: Path, out: Path) -> dict:
    """One run on ``n`` GPUs; returns its per-step throughput (pairs/s) and each rank's peak memory."""
    settings = {"model": model, "dataset": data, "max_steps": args.steps, "batch_size": args.batch,
                "gradient_accumulation_steps": args.accum, "max_length": args.prompt + args.answer + 8,
                "max_prompt_length": args.prompt + 4, "eval_steps": 10**6, "save_steps": 10**6,
                "data.eval_fraction": 0.0, "reference_cache": "false",
                "distributed": "auto" if args.mode == "ddp" else args.mode,
                "gradient_checkpointing": args.checkpointing}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    cmd = [*launch, "-m", "lowrank_pref.run", "--output-dir", str(out), *(f"{k}={v}" for k, v in settings.items())]
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOWRANK_PREF_PROGRESS="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{n} GPU(s) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["pairs_per_second"] for m in metrics if "pairs_per_second" in m][args.warmup:]
    status = json.loads((out / "status.json").read_text())
    peaks = status.get("rank_peak_memory_mb") or [metrics[-1]["peak_memory_mb"]]
    return {"gpus": n, "pairs_per_second": statistics.median(speeds), "rank_peak_memory_mb": peaks}


def estimate_gb(n: int, args, model: Path) -> float:
    from lowrank_pref.config import build_config
    from lowrank_pref.memory import estimate, per_rank

    cfg = build_config("tiny", overrides={"model": str(model), "batch_size": args.batch, "distributed": args.mode,
                                          "max_length": args.prompt + args.answer + 8,
                                          "max_prompt_length": args.prompt + 4,
                                          "gradient_checkpointing": args.checkpointing})
    try:
        return per_rank(estimate(cfg, gpu=True), cfg, n)["total"]
    except Exception as e:  # a shape the estimate can't read: the table says so
        print(f"no estimate: {type(e).__name__}: {e}", file=sys.stderr)
        return float("nan")


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", help="comma-separated GPU counts (default: 1, 2, 4, ... up to every GPU)")
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--arch", default="small", help="small, or an architecture of benchmarks/bench.py's ARCHS")
    p.add_argument("--arch-layers", type=int, default=None)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--answer", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="pairs per micro-step per rank")
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step per rank")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpointing", default="false", help="gradient_checkpointing for every case")
    p.add_argument("--workdir", help="keep the built model here for the next command")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA GPUs: this benchmark measures runs on 1 to N cards")
    total = torch.cuda.device_count()
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else \
        sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k <= total], total})
    if max(counts) > total:
        raise SystemExit(f"--gpus asks for {max(counts)} GPUs; this machine has {total}")

    import bench

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lowrank-dist-"))
    workdir.mkdir(parents=True, exist_ok=True)
    asset_args = argparse.Namespace(arch=args.arch, arch_layers=args.arch_layers, layers=args.layers,
                                    hidden=args.hidden, ffn=args.ffn, vocab=args.vocab, prompt=args.prompt,
                                    answer=args.answer, batch=args.batch * args.accum * max(counts) * args.steps // 4)
    model, data = bench.build_assets(workdir, asset_args)
    rounds: list[dict[int, dict]] = []
    for r in range(args.rounds):
        rounds.append({n: run_case(n, args, model, data, workdir / f"run-{r}-{n}") for n in counts})
        print(f"round {r + 1}: " + ", ".join(f"{n} GPU(s) {c['pairs_per_second']:.2f} pairs/s"
                                               for n, c in rounds[-1].items()), flush=True)
    base = counts[0]
    print(f"\n{args.mode}, {args.batch} pairs x {args.accum} per rank, {args.prompt}+{args.answer} tokens, "
          f"{args.rounds} rounds; efficiency = speedup / (n / {base})")
    print(f"{'GPUs':>5} {'pairs/s':>9} {'speedup':>8} {'efficiency':>10} {'peak MB per rank (max)':>24} "
          f"{'estimate GB/rank':>17}")
    results = []
    for n in counts:
        speed = statistics.median(rd[n]["pairs_per_second"] for rd in rounds)
        speedup = statistics.median(rd[n]["pairs_per_second"] / rd[base]["pairs_per_second"] for rd in rounds)
        efficiency = speedup / (n / base)
        peak = max(max(rd[n]["rank_peak_memory_mb"]) for rd in rounds)
        est = estimate_gb(n, args, model)
        results.append({"gpus": n, "pairs_per_second": speed, "speedup": speedup, "efficiency": efficiency,
                        "rank_peak_memory_mb": [rd[n]["rank_peak_memory_mb"] for rd in rounds],
                        "estimate_gb_per_rank": est})
        print(f"{n:>5} {speed:>9.2f} {speedup:>8.2f} {efficiency:>10.2f} {peak:>24.0f} {est:>17.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
