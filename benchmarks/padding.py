"""How much of each micro-step is padding, with a fixed pair count and with a token budget, on a real dataset.

    python benchmarks/padding.py                                   # ../shared/data's ShareGPT file, tiny tokenizer
    python benchmarks/padding.py dataset=my.jsonl model=path/to/model max_length=2048 batch_size=8 token_budget=8192

Takes the same key=value overrides as the CLI (the tiny preset underneath). For each layout (one shared row per pair,
or two rows per pair as TRL sends them) and each way of batching, prints the share of positions the model computes
that are padding, over one epoch. Padding is the most a padding-free (packed) layout could save on the linear
layers; on a CPU, packing several pairs into one row makes attention's dense mask grow with the square of the packed
length, so it only pays when this share is large. No model is run: it reads the data path and the batch schedule.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def padding_share(pairs, batches, shared: bool) -> tuple[float, int]:
    """(padding / computed positions, computed positions) over these micro-batches."""
    from lowrank_pref.data import row_lengths

    computed = real = 0
    for batch in batches:
        rows = row_lengths([pairs[i] for i in batch], shared)
        computed += max(rows) * len(rows)
        real += sum(rows)
    return 1 - real / max(computed, 1), computed


def main(argv: list[str]) -> int:
    from lowrank_pref.config import build_config, parse_override
    from lowrank_pref.data import load_preference_data
    from lowrank_pref.model import load_tokenizer
    from lowrank_pref.run import quiet_libraries
    from lowrank_pref.loop import Schedule

    quiet_libraries()
    overrides = {"dataset": str(ROOT.parent / "shared" / "data" / "sharegpt_dpo_en_demo.json"), "max_length": 1024,
                 "max_prompt_length": 512, "batch_size": 8, "data.eval_fraction": 0}
    overrides.update(dict(parse_override(a) for a in argv))
    budget = int(overrides.pop("token_budget", 0)) or None
    cfg = build_config("tiny", overrides=overrides)
    tokenizer = load_tokenizer(cfg)
    pairs = load_preference_data(cfg, tokenizer).train
    sizes = [p.num_tokens for p in pairs]
    budget = budget or cfg.batch_size * sorted(sizes)[len(sizes) // 2]  # the fixed batch's median size
    print(f"{cfg.dataset}: {len(pairs)} pairs, shared-row lengths median {sorted(sizes)[len(sizes) // 2]}, "
          f"max {max(sizes)} tokens (max_length {cfg.max_length}, {cfg.model} tokenizer)")
    print(f"{'batching':34s} {'layout':10s} {'padding':>8s} {'positions':>10s} {'micro-steps':>12s}")
    for label, schedule in ((f"fixed, {cfg.batch_size} pairs", Schedule(len(pairs), cfg.batch_size, 1, cfg.seed)),
                            (f"token_budget={budget}", Schedule(len(pairs), cfg.batch_size, 1, cfg.seed, sizes=sizes,
                                                                 token_budget=budget))):
        batches = schedule.epoch_batches(0)
        for shared in (True, False):
            share, computed = padding_share(pairs, batches, shared)
            layout = "shared" if shared else "two rows"
            print(f"{label:34s} {layout:10s} {share:8.1%} {computed:10d} {len(batches):12d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
