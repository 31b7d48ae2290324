"""Preference losses as pure tensor functions, named after the maths. No model in here.

Every function takes per-pair sequence log-probabilities (the sum over answer tokens of log pi(y_t | x, y_<t)) and
returns per-pair tensors; the caller reduces. Shapes: ``(B,)`` for B pairs.

References:
- DPO, Rafailov et al. 2023 (arXiv 2305.18290), eq. 7; conservative DPO (label smoothing), Mitchell 2023, as in
  the reference implementation eric-mitchell/direct-preference-optimization ``preference_loss``.
- IPO, Azar et al. 2023 (arXiv 2310.12036), eq. 17, length-normalised as TRL does.
- Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), eq. 9. Hinge: SLiC, Zhao et al. 2023.
- BCO (pairwise), NCA, SPPO (hard), APO: as in TRL 1.16's DPOTrainer.
- SimPO, Meng et al. 2024 (arXiv 2405.14734), eq. 6. ORPO, Hong et al. 2024 (arXiv 2403.07691), eq. 6-7.
- KTO, Ethayarajh et al. 2024 (arXiv 2402.01306), eq. 7-8, with the reference point estimated as TRL's KTOTrainer.
- Reward modelling: Bradley-Terry, Ouyang et al. 2022 eq. 1; margin as in Llama 2; centring as TRL's RewardTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossOut = tuple[Tensor, Tensor, Tensor]  # (losses, chosen_rewards, rejected_rewards), each (B,)


# ----------------------------------------------------------------------------------------------------------------
# DPO and its variants (need the reference)

def _logits(pc, pr, rc, rr):
    """The DPO 'logit' h = (log pi(yw) - log pi_ref(yw)) - (log pi(yl) - log pi_ref(yl))."""
    return (pc - rc) - (pr - rr)


def _sigmoid(pc, pr, rc, rr, *, beta, label_smoothing=0.0, **_):
    h = _logits(pc, pr, rc, rr)
    # eq. 7 of the DPO paper; with label_smoothing eps the conservative DPO mix of both label directions
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def _hinge(pc, pr, rc, rr, *, beta, **_):
    return torch.relu(1 - beta * _logits(pc, pr, rc, rr))


def _ipo(pc, pr, rc, rr, *, beta, chosen_lengths, rejected_lengths, **_):
    # IPO eq. 17 with log-ratios averaged per answer token (TRL's normalisation, confirmed with the IPO authors)
    h = (pc - rc) / chosen_lengths.clamp(min=1) - (pr - rr) / rejected_lengths.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def _robust(pc, pr, rc, rr, *, beta, label_smoothing=0.0, **_):
    # Unbiased estimate of the clean loss under label noise rate eps (rDPO eq. 9)
    h = _logits(pc, pr, rc, rr)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _bco_pair(pc, pr, rc, rr, *, beta, **_):
    return -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))


def _sppo_hard(pc, pr, rc, rr, *, beta, **_):
    return (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2


def _nca_pair(pc, pr, rc, rr, *, beta, **_):
    cw, rw = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-rw)


def _apo_zero(pc, pr, rc, rr, *, beta, **_):
    return (1 - torch.sigmoid(beta * (pc - rc))) + torch.sigmoid(beta * (pr - rr))


def _apo_down(pc, pr, rc, rr, *, beta, **_):
    return torch.sigmoid(beta * (pc - rc)) + (1 - torch.sigmoid(beta * _logits(pc, pr, rc, rr)))


def _implicit_rewards(family_loss: Callable[..., Tensor]) -> Callable[..., LossOut]:
    """A DPO-family loss with the implicit rewards ``beta * (log pi - log pi_ref)`` (detached) beside it."""

    def loss(pc, pr, rc, rr, *, beta, **params) -> LossOut:
        losses = family_loss(pc, pr, rc, rr, beta=beta, **params)
        return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()

    loss.__name__ = loss.__qualname__ = family_loss.__name__.lstrip("_")
    return loss


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossOut:
    """Per-pair DPO-family loss and implicit rewards ``beta * (log pi - log pi_ref)`` (detached).

    ``chosen_lengths``/``rejected_lengths`` (answer token counts) are needed by ``ipo`` only.
    """
    if loss_type not in LOSSES or not LOSSES[loss_type].needs_reference:
        raise ValueError(f"unknown DPO-family loss_type '{loss_type}'; one of "
                         f"{', '.join(n for n, s in LOSSES.items() if s.needs_reference)}")
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("ipo needs chosen_lengths and rejected_lengths")
    return LOSSES[loss_type].fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                reference_rejected_logps, beta=beta, label_smoothing=label_smoothing,
                                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


# ----------------------------------------------------------------------------------------------------------------
# Reference-free

def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> LossOut:
    """SimPO eq. 6: -log sigmoid(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma); rewards are the
    length-normalised ``beta * mean log pi``. With ``label_smoothing`` the conservative mix, as TRL's CPOTrainer."""
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    h = chosen_rewards - rejected_rewards - gamma
    losses = -F.logsigmoid(h) * (1 - label_smoothing) - F.logsigmoid(-h) * label_smoothing
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, *, beta: float = 0.1) -> LossOut:
    """ORPO eq. 6-7: NLL of the chosen answer (per token) - beta * log sigmoid(log odds(yw) - log odds(yl)),
    odds(y) = P(y) / (1 - P(y)) with P the per-token geometric mean probability. Rewards: ``beta * mean log pi``."""
    mean_c = policy_chosen_logps / chosen_lengths.clamp(min=1)
    mean_r = policy_rejected_logps / rejected_lengths.clamp(min=1)
    # log(1 - exp(x)) for x < 0, stable: log(-expm1(x)); clamp keeps x = 0 (a certain answer) finite
    log_odds = (mean_c - mean_r) - (torch.log(-torch.expm1(mean_c.clamp(max=-1e-6)))
                                    - torch.log(-torch.expm1(mean_r.clamp(max=-1e-6))))
    losses = -mean_c - beta * F.logsigmoid(log_odds)
    return losses, (beta * mean_c).detach(), (beta * mean_r).detach()


def _simpo(pc, pr, rc, rr, *, beta, simpo_gamma=0.5, label_smoothing=0.0, chosen_lengths, rejected_lengths, **_):
    return simpo_loss(pc, pr, chosen_lengths, rejected_lengths, beta=beta, gamma=simpo_gamma,
                      label_smoothing=label_smoothing)


def _orpo(pc, pr, rc, rr, *, beta, chosen_lengths, rejected_lengths, **_):
    return orpo_loss(pc, pr, chosen_lengths, rejected_lengths, beta=beta)


# ----------------------------------------------------------------------------------------------------------------
# The table: every preference loss, whether it needs the reference pass, and the config keys it reads

@dataclass(frozen=True)
class LossSpec:
    """``fn(pc, pr, rc, rr, *, chosen_lengths, rejected_lengths, **params) -> (losses, chosen_rewards,
    rejected_rewards)``, each (B,); ``rc``/``rr`` are None when ``needs_reference`` is false. ``params``: the config
    keys (beside beta) it reads, passed by those names."""
    fn: Callable[..., LossOut]
    needs_reference: bool
    params: tuple[str, ...]
    about: str


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_implicit_rewards(_sigmoid), True, ("label_smoothing",),
                        "DPO (Bradley-Terry); label_smoothing > 0: conservative DPO"),
    "hinge": LossSpec(_implicit_rewards(_hinge), True, (), "SLiC hinge on the DPO logit"),
    "ipo": LossSpec(_implicit_rewards(_ipo), True, (), "IPO, per-token log-ratios"),
    "robust": LossSpec(_implicit_rewards(_robust), True, ("label_smoothing",),
                       "robust DPO under label noise rate label_smoothing"),
    "bco_pair": LossSpec(_implicit_rewards(_bco_pair), True, (), "BCO on pairs"),
    "sppo_hard": LossSpec(_implicit_rewards(_sppo_hard), True, (), "SPPO, hard labels"),
    "nca_pair": LossSpec(_implicit_rewards(_nca_pair), True, (), "NCA on pairs"),
    "apo_zero": LossSpec(_implicit_rewards(_apo_zero), True, (), "APO-zero (chosen better than the reference)"),
    "apo_down": LossSpec(_implicit_rewards(_apo_down), True, (), "APO-down (both worse than the reference)"),
    "simpo": LossSpec(_simpo, False, ("simpo_gamma", "label_smoothing"), "SimPO, length-normalised, no reference"),
    "orpo": LossSpec(_orpo, False, (), "ORPO: NLL + odds ratio, no reference"),
}


def preference_loss(loss_type: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    reference_chosen_logps: Tensor | None, reference_rejected_logps: Tensor | None, *,
                    chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float, **params) -> LossOut:
    """One entry for the training loop: ``LOSSES[loss_type]`` with its ``params`` (the keys it lists)."""
    spec = LOSSES[loss_type]
    return spec.fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                   **{k: params[k] for k in spec.params if k in params})


# ----------------------------------------------------------------------------------------------------------------
# Reward modelling

def reward_loss(chosen_scores: Tensor, rejected_scores: Tensor, *, margin: Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> Tensor:
    """Bradley-Terry: ``-log sigmoid(r_chosen - r_rejected - margin)`` per pair, plus
    ``coef * (r_chosen + r_rejected)^2`` to centre the scores (its mean equals TRL's ``coef * mean(...)``)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


# ----------------------------------------------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable answers

def kto_loss(policy_logps: Tensor, reference_logps: Tensor, policy_kl_logps: Tensor, reference_kl_logps: Tensor,
             desirable: Tensor, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example KTO loss (KTO eq. 7-8), the implicit rewards ``beta * (log pi - log pi_ref)`` (detached), and the
    reference point z0.

    ``policy_logps``/``reference_logps`` (B,): each example's answer; ``desirable`` (B,) bool: thumbs up. z0 is the
    KL(pi || pi_ref) estimate ``mean(policy_kl_logps - reference_kl_logps)`` over mismatched (prompt, another
    example's answer) pairs of the batch, detached and clamped at 0:
    ``lambda_D (1 - sigmoid(beta (r - z0)))`` for desirable answers, ``lambda_U (1 - sigmoid(beta (z0 - r)))`` for
    undesirable ones, r the log-ratio. Returns (losses (B,), rewards (B,), z0 ())."""
    z0 = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    return losses, beta * logratios.detach(), z0


# ----------------------------------------------------------------------------------------------------------------
# Reinforcement learning against a reward model (tasks/rl.py)
#
# Shapes: ``(B * k,)`` for B prompts with k completions each, the k of a prompt consecutive; ``(N, T)`` per-token
# tensors with a ``mask`` (N, T) of the completion tokens. References:
# - RLOO, Ahmadian et al. 2024 (arXiv 2402.14740), eq. 4-5: REINFORCE with the leave-one-out baseline.
# - KL estimators k1 and k3: Schulman, "Approximating KL divergence" (2020); k3 as GRPO (arXiv 2402.03300, eq. 4).
# - PPO, Schulman et al. 2017 (arXiv 1707.06347), eq. 7 (clipped surrogate) and eq. 11 (GAE, arXiv 1506.02438);
#   value clipping and whitening as in InstructGPT's recipe (Ouyang et al. 2022) and TRL's former PPOTrainer.

def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages: ``A_i = r_i - mean_{j != i} r_j`` over the k completions of the same prompt.

    ``rewards`` (B * k,), grouped k per prompt. Equal to ``k / (k - 1) * (r_i - mean_j r_j)``."""
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 completions per prompt")
    grouped = rewards.view(-1, k)  # (B, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(pi || pi_ref) on tokens sampled from pi: ``log pi - log pi_ref``. Unbiased, can
    be negative per token; summed over a sequence it is that sequence's log-ratio (RLOO's KL in the reward)."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate: ``exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1``, >= 0, unbiased, lower variance
    than k1 (GRPO's KL term)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries, with the unbiased (Bessel-corrected, n - 1)
    variance, as TRL's ``masked_whiten`` (its PPOTrainer's, after the published PPO-for-LMs code) and torch's
    ``std()`` that its RLOOTrainer's ``normalize_advantages`` uses; one entry alone has variance 0.
    ``shift_mean=False`` adds the mean back (reward whitening keeps the rewards' level, advantage whitening centres
    them). Unmasked entries come back as 0."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def reinforce_loss(logps: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE with a baseline (RLOO eq. 5): ``-A_i * log pi(y_i | x)`` per completion, the advantage a constant.
    ``logps`` (N,) sequence log-probs with grad; returns (N,)."""
    return -advantages.detach() * logps


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the completion tokens (GAE eq. 16).

    ``rewards``, ``values``, ``mask`` (N, T); the value after a row's last masked token is 0 (the episode ends).
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``; returns (advantages, returns =
    advantages + values), both (N, T) and 0 outside the mask."""
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        # a masked position (padding after the end) passes nothing back: the next real step sees V = 0, A = 0
        next_value = values[:, t] * mask[:, t]
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, cliprange: float = 0.2
                    ) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (eq. 7), per token: ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(log pi
    - log pi_old)``, averaged over each row's completion tokens. Returns (loss (N,), clip fraction (N,): the share of
    tokens where the clipped term was the larger)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask, 1), masked_mean((clipped > unclipped).float(), mask, 1)


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, cliprange_value: float = 0.2
                   ) -> tuple[Tensor, Tensor]:
    """The clipped value loss: ``0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)`` averaged over each
    row's tokens. Returns (loss (N,), clip fraction (N,))."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(plain, clipped), mask, 1), masked_mean((clipped > plain).float(), mask, 1)
