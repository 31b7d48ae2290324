"""DPO and its variants: the policy (adapters on) against the frozen reference (adapters off, or the starting
adapter frozen), on preference pairs.

The loss is ``losses.LOSSES[loss_type]``; its implicit rewards ``beta * (log pi - log pi_ref)`` are logged as
``rewards/chosen``, ``rewards/rejected``, their margin and how often chosen wins (``rewards/accuracies``). Reference
log-probs come from the on-disk cache when known (refcache.py), else from one no-grad pass before the policy's.
"""

from __future__ import annotations

import logging

import torch

from ..logps import sequence_logps, shared_sequence_logps
from ..losses import LOSSES, preference_loss
from ..model import autocast, reference_mode
from .pairs import PairTask

log = logging.getLogger("lowrank_pref")


class DpoTask(PairTask):
    name = "dpo"
    plots = [("Loss", {"loss": "train", "eval_loss": "eval"}),
             ("Rewards", {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin",
                          "eval_rewards/margins": "eval margin"}),
             ("Accuracy", {"rewards/accuracies": "train", "eval_rewards/accuracies": "eval"}),
             ("Log-probs", {"logps/chosen": "chosen", "logps/rejected": "rejected",
                            "eval_logps/chosen": "eval chosen", "eval_logps/rejected": "eval rejected"})]
    accuracy_key = "rewards/accuracies"
    reads_loss_type = True
    fields = ("loss_type", "beta", "rpo_alpha")

    @property
    def uses_reference(self) -> bool:
        return LOSSES[self.cfg.loss_type].needs_reference

    def reference(self, loaded: str) -> str:
        return loaded if self.uses_reference else "none"

    def score(self, model, batch: dict, shared: bool) -> torch.Tensor:
        return (shared_sequence_logps if shared else sequence_logps)(model, batch)[0]

    def losses(self, model, pairs: list):
        cfg = self.cfg
        batch, tokens = self.batch(pairs)
        logps_of = shared_sequence_logps if self.shared else sequence_logps
        n = len(pairs)
        ref_c = ref_r = None
        with autocast(cfg):
            if self.uses_reference:
                ref = self.ref_cache.get(pairs) if self.ref_cache is not None else None
                if ref is None:
                    with reference_mode(model):  # first, so its activations are gone before the policy graph is built
                        ref, _ = logps_of(model, batch, cfg.logprob_chunk_size)
                    if self.ref_cache is not None:
                        self.ref_cache.put(pairs, ref)
                ref = ref.to(next(model.parameters()).device)
                ref_c, ref_r = ref[:n], ref[n:]
            logps, lengths = logps_of(model, batch, cfg.logprob_chunk_size)
        pc, pr, lc, lr = logps[:n], logps[n:], lengths[:n], lengths[n:]
        losses, cr, rr = preference_loss(cfg.loss_type, pc, pr, ref_c, ref_r, chosen_lengths=lc, rejected_lengths=lr,
                                         beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                         simpo_gamma=cfg.simpo_gamma)
        if cfg.rpo_alpha:  # RPO: an SFT term on the chosen answer, per token
            losses = losses + cfg.rpo_alpha * (-pc / lc.clamp(min=1))
        sums = {"loss": losses.detach().sum(), "rewards/chosen": cr.sum(), "rewards/rejected": rr.sum(),
                "rewards/accuracies": (cr > rr).float().sum(), "rewards/margins": (cr - rr).sum(),
                "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
        return losses, sums, tokens

    @classmethod
    def diagnose(cls, metrics: list[dict]) -> list[tuple[str, str]]:
        """A policy that never leaves the reference (loss at log 2, zero rewards), and likelihood displacement (both
        log-probs falling)."""
        from ..diagnostics import LN2, likelihood_displacement, series

        out = []
        loss = series(metrics, "loss")
        margins = [abs(v) for _, v in series(metrics, "rewards/margins")[-3:]]
        if len(loss) >= 5 and all(abs(v - LN2) < 0.003 for _, v in loss[-3:]) and margins and max(margins) < 1e-3:
            out.append(("warn", "The loss sits at 0.693 (= log 2) and the rewards stay at zero: the policy still "
                                "equals the reference, so the adapter is not learning. Check that the learning rate "
                                "is not tiny, that beta is not near 0, and that the LoRA target modules exist."))
        out += likelihood_displacement(metrics, ("chosen", "rejected"),
                                       "Lower the learning rate, or add an SFT term (rpo_alpha=0.2).")
        return out


TASK = DpoTask
