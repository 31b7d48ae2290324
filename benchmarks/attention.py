"""Attention alone on shared-prompt rows: SDPA with the dense mask against the split (model.shared_prompt_sdpa).

    python benchmarks/attention.py            # forward + backward, median of 9 runs after 2 warm-up runs

Rows are [prompt | chosen | rejected] in the lengths below (the benchmark's cases, rows a token apart as real data
gives them, and a mixed batch), 4 query heads of 64 over 2 key/value heads. The split is timed everywhere, also where
training on the CPU keeps the masked call (model._split_pays). On a GPU in bf16, on the CPU in fp32. Prints each
path's median time, the ratio and the largest difference between the two (outputs at real positions and gradients).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lowrank_pref.model as model_mod  # noqa: E402
from lowrank_pref.data import Pair, collate_shared  # noqa: E402
from lowrank_pref.model import shared_prompt_sdpa  # noqa: E402

CASES = {"prompt-heavy 192/48/48 x4": [(192, 48, 48)] * 4,
         "prompt-heavy, +-1 token x4": [(192, 48, 47), (191, 48, 48), (192, 47, 48), (192, 48, 46)],
         "answer-heavy 32/128/128 x4": [(32, 128, 128)] * 4,
         "answer-heavy, +-1 token x4": [(32, 128, 127), (31, 128, 128), (32, 127, 128), (32, 128, 126)],
         "long 768/256/256 x2": [(768, 256, 256)] * 2,
         "mixed lengths x4": [(100, 30, 60), (40, 80, 10), (192, 48, 48), (12, 200, 150)]}


def main() -> int:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model_mod.CPU_SPLIT_MIN_WIDTH = 0  # time the split itself, also where training would keep the masked call
    gpu = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    module = type("Attention", (), {"num_key_value_groups": 2, "is_causal": True})()
    print(f"{'rows':28s} {'masked ms':>10s} {'split ms':>9s} {'speed x':>8s} {'max diff':>9s}   ({dev}, {dtype})")
    for name, layout in CASES.items():
        batch = collate_shared([Pair([1] * p, [2] * c, [3] * r) for p, c, r in layout], pad_id=0)
        mask, real = batch["allowed"][:, None].to(dev), (batch["input_ids"] != 0).to(dev)
        n, width = real.shape
        torch.manual_seed(0)
        q = torch.randn(n, 4, width, 64, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(n, 2, width, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        weights = torch.randn(n, width, 1, 1, device=dev, dtype=dtype) * real[:, :, None, None]
        paths = {"masked": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)[0],
                 "split": lambda: shared_prompt_sdpa(module, q, k, v, mask, scaling=0.125,
                                                     shared_layout=batch["layout"])[0]}
        times, results = {}, {}
        for _ in range(11):
            for path, fn in paths.items():  # interleaved, so drift in the machine's speed hits both
                if gpu:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn()
                grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
                if gpu:
                    torch.cuda.synchronize()
                times.setdefault(path, []).append(time.perf_counter() - t)
                results[path] = (out.detach()[real], *grads)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results["masked"], results["split"]))
        masked, split = (statistics.median(times[p][2:]) * 1000 for p in ("masked", "split"))
        print(f"{name:28s} {masked:10.2f} {split:9.2f} {masked / split:8.2f} {diff:9.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
