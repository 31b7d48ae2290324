"""What the pair tasks (dpo, reward) share: preference pairs, their two layouts, and the shared-prompt decision.

A pair goes through the model as two rows (``[prompt + chosen; prompt + rejected]``, ``data.collate``) or as one
``[prompt | chosen | rejected]`` row (``data.collate_shared``), which sends the prompt through once. The shared
layout is checked on the first pairs against the two-row one before it is used.
"""

from __future__ import annotations

import logging

import torch

from .. import data as data_mod
from ..memory import shared_layout_possible
from ..model import autocast, compute_dtype, reference_mode
from .base import Task, TaskData

log = logging.getLogger("lowrank_pref")


class PairTask(Task):
    unit = "pairs"
    sequences_per_item = 2
    shared_prompt = True

    def prepare_rows(self, rows: list[dict], tokenizer, source: str):
        return data_mod.prepare_pairs(rows, tokenizer, source=source, cfg=self.cfg)

    def micro_step_tokens(self, items: list) -> tuple[int, int]:
        rows = data_mod.row_lengths(items, shared_layout_possible(self.cfg))
        return len(rows) * max(rows), sum(len(p.chosen_ids) + len(p.rejected_ids) for p in items)

    def setup(self, model, tokenizer, data: TaskData) -> dict:
        facts = super().setup(model, tokenizer, data)
        self.shared, why = self.shared_prompt_works(model, data.train)
        log.info("shared-prompt forward: %s", why)
        return {**facts, "shared_prompt": self.shared}

    def batch(self, pairs: list) -> tuple[dict, int]:
        """The micro-batch in this run's layout, and its real (unpadded) tokens."""
        if self.shared:
            return data_mod.collate_shared(pairs, self.pad_id), sum(p.num_tokens for p in pairs)
        batch = data_mod.collate(pairs, self.pad_id)
        return batch, int(batch["attention_mask"].sum())

    def score(self, model, batch: dict, shared: bool) -> torch.Tensor:
        """(2B,) chosen then rejected: sequence log-probs (dpo) or reward scores (reward)."""
        raise NotImplementedError

    def shared_prompt_works(self, model, pairs: list) -> tuple[bool, str]:
        """Decide the shared-prompt forward for this model: on when it gives the two-row numbers on a few pairs.

        A model whose attention ignores or rewrites a custom 4D mask (flash-attention, sliding windows shorter than
        the rows, architectures with their own mask logic) gives different numbers and falls back, with the reason
        logged."""
        cfg = self.cfg
        if not shared_layout_possible(cfg):
            return False, "off" if cfg.shared_prompt == "off" else "off (flash_attention_2 takes no custom mask)"
        if cfg.shared_prompt == "on":
            return True, "on"
        sample = pairs[:2]
        try:
            with reference_mode(model), autocast(cfg):
                two = self.score(model, data_mod.collate(sample, self.pad_id), shared=False)
                one = self.score(model, data_mod.collate_shared(sample, self.pad_id), shared=True)
        except Exception as e:  # a model that refuses the mask or the position ids
            return False, f"off ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        tol = 1e-3 if compute_dtype(cfg) == torch.float32 else 2e-2
        diff = float((one - two).abs().max())
        if diff > tol * max(1.0, float(two.abs().max())):
            return False, f"off (this model's outputs differ by {diff:.2g} with the shared layout)"
        return True, "on (checked equal to two sequences per pair)"
