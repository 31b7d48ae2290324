"""The reward model: a one-output classifier head on the base, trained with the Bradley-Terry loss on pairs.

``-log sigmoid(r_chosen - r_rejected - margin)`` per pair (losses.reward_loss). The score head is trained and saved
with the adapter; the policy's later RL runs read it.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..logps import reward_scores, shared_reward_scores
from ..losses import reward_loss
from ..model import autocast
from .pairs import PairTask


class RewardTask(PairTask):
    name = "reward"
    head = "score"
    plots = [("Loss", {"loss": "train", "eval_loss": "eval"}),
             ("Accuracy", {"accuracy": "train", "eval_accuracy": "eval"}),
             ("Margin (chosen - rejected score)", {"margin": "train", "eval_margin": "eval"}),
             ("Learning rate", {"learning_rate": "lr"})]
    accuracy_key = "accuracy"
    fields = ("center_rewards_coefficient",)

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.adapter:
            raise ConfigError("adapter: starting from an adapter is for the dpo task; a reward model starts fresh")

    def score(self, model, batch: dict, shared: bool) -> torch.Tensor:
        return (shared_reward_scores if shared else reward_scores)(model, batch)

    def losses(self, model, pairs: list):
        batch, tokens = self.batch(pairs)
        n = len(pairs)
        with autocast(self.cfg):
            scores = self.score(model, batch, self.shared)
            chosen, rejected = scores[:n], scores[n:]
            losses = reward_loss(chosen, rejected, margin=batch["margin"].to(scores.device),
                                 center_rewards_coefficient=self.cfg.center_rewards_coefficient)
        d = (chosen - rejected).detach()
        sums = {"loss": losses.detach().sum(), "accuracy": (d > 0).float().sum(), "margin": d.sum()}
        return losses, sums, tokens

    @classmethod
    def diagnose(cls, metrics: list[dict]) -> list[tuple[str, str]]:
        """A reward model that scores chosen and rejected alike (loss at log 2, accuracy at chance)."""
        from ..diagnostics import LN2, series

        loss = series(metrics, "loss")
        accs = [v for _, v in series(metrics, "accuracy")[-3:]]
        if len(loss) >= 5 and all(abs(v - LN2) < 0.003 for _, v in loss[-3:]) and accs and all(
                abs(a - 0.5) < 0.1 for a in accs):
            return [("warn", "The loss sits at 0.693 (= log 2): the reward model scores chosen and rejected alike. "
                             "Raise the learning rate or check the data.")]
        return []


TASK = RewardTask
