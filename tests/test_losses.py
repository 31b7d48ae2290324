"""Each loss against its formula written out here, and the DPO family against TRL on the same batch."""

import math

import pytest
import torch
from conftest import OpCounter

from lowrank_pref.logps import selected_token_logps
from lowrank_pref.losses import LOSSES, dpo_loss, orpo_loss, preference_loss, reward_loss, simpo_loss


def _logsig(x):
    return math.log(1 / (1 + math.exp(-x)))


def _sig(x):
    return 1 / (1 + math.exp(-x))


# one pair, written as plain floats so the maths below reads like the papers
PC, PR, RC, RR = -12.0, -15.0, -13.0, -14.0  # policy/reference, chosen/rejected
LC, LR = 4.0, 6.0  # answer lengths
B = 0.1
H = (PC - RC) - (PR - RR)  # = 2.0


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


EXPECTED = {
    "sigmoid": -_logsig(B * H),
    "hinge": max(0.0, 1 - B * H),
    "ipo": ((PC - RC) / LC - (PR - RR) / LR - 1 / (2 * B)) ** 2,
    "bco_pair": -_logsig(B * (PC - RC)) - _logsig(-B * (PR - RR)),
    "sppo_hard": (PC - RC - 0.5 / B) ** 2 + (PR - RR + 0.5 / B) ** 2,
    "nca_pair": -_logsig(B * (PC - RC)) - 0.5 * _logsig(-B * (PC - RC)) - 0.5 * _logsig(-B * (PR - RR)),
    "apo_zero": (1 - _sig(B * (PC - RC))) + _sig(B * (PR - RR)),
    "apo_down": _sig(B * (PC - RC)) + (1 - _sig(B * H)),
}


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_dpo_family_matches_formula(loss_type):
    losses, cr, rr = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=B, loss_type=loss_type,
                              chosen_lengths=_t(LC), rejected_lengths=_t(LR))
    assert losses.item() == pytest.approx(EXPECTED[loss_type], rel=1e-9)
    assert cr.item() == pytest.approx(B * (PC - RC)) and rr.item() == pytest.approx(B * (PR - RR))


def test_every_table_entry_is_tested():
    """Each loss in the one table is checked against its formula here: the DPO family in EXPECTED, robust with the
    smoothing test, simpo and orpo in their own; the config's choices are the table's names."""
    from lowrank_pref.config import LOSS_TYPES

    assert set(LOSSES) == set(EXPECTED) | {"robust", "simpo", "orpo"}
    assert LOSS_TYPES == tuple(LOSSES)
    assert {n for n, s in LOSSES.items() if not s.needs_reference} == {"simpo", "orpo"}


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_table_entry_gives_the_formula_through_preference_loss(loss_type):
    """The loop's one entry reaches each table entry with its parameters by name."""
    params = {"label_smoothing": 0.0, "simpo_gamma": 0.5}
    losses, cr, rr = preference_loss(loss_type, _t(PC), _t(PR), _t(RC), _t(RR), chosen_lengths=_t(LC),
                                     rejected_lengths=_t(LR), beta=B, **params)
    if loss_type in EXPECTED:
        assert losses.item() == pytest.approx(EXPECTED[loss_type], rel=1e-9)
    elif loss_type == "robust":
        assert losses.item() == pytest.approx(EXPECTED["sigmoid"], rel=1e-9)
    elif loss_type == "simpo":
        assert losses.item() == pytest.approx(-_logsig(B * PC / LC - B * PR / LR - 0.5), rel=1e-9)
    else:
        assert losses.item() == pytest.approx(orpo_loss(_t(PC), _t(PR), _t(LC), _t(LR), beta=B)[0].item())


def test_label_smoothing_conservative_and_robust():
    eps = 0.2
    cdpo, _, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=B, label_smoothing=eps)
    assert cdpo.item() == pytest.approx(-(1 - eps) * _logsig(B * H) - eps * _logsig(-B * H))
    robust, _, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=B, loss_type="robust", label_smoothing=eps)
    assert robust.item() == pytest.approx((-(1 - eps) * _logsig(B * H) + eps * _logsig(-B * H)) / (1 - 2 * eps))
    # with no smoothing both reduce to plain DPO
    plain, _, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=B, loss_type="robust")
    assert plain.item() == pytest.approx(EXPECTED["sigmoid"])


def test_dpo_gradient_sign_pushes_chosen_up():
    pc = _t(PC).requires_grad_()
    pr = _t(PR).requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, _t(RC), _t(RR), beta=B)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert pc.grad.item() == pytest.approx(-B * _sig(-B * H))


def test_simpo_and_orpo_formulas():
    gamma = 0.5
    losses, cr, rr = simpo_loss(_t(PC), _t(PR), _t(LC), _t(LR), beta=2.0, gamma=gamma)
    assert losses.item() == pytest.approx(-_logsig(2.0 * PC / LC - 2.0 * PR / LR - gamma))
    assert cr.item() == pytest.approx(2.0 * PC / LC)
    mc, mr = PC / LC, PR / LR
    log_odds = (mc - mr) - (math.log(1 - math.exp(mc)) - math.log(1 - math.exp(mr)))
    losses, cr, _ = orpo_loss(_t(PC), _t(PR), _t(LC), _t(LR), beta=B)
    assert losses.item() == pytest.approx(-mc - B * _logsig(log_odds))
    assert cr.item() == pytest.approx(B * mc)


def test_preference_loss_reference_free_ignores_reference():
    a = preference_loss("simpo", _t(PC), _t(PR), None, None, chosen_lengths=_t(LC), rejected_lengths=_t(LR), beta=2.0)
    b = simpo_loss(_t(PC), _t(PR), _t(LC), _t(LR), beta=2.0)
    assert torch.equal(a[0], b[0])


def test_reward_loss_margin_and_centring():
    c, r, m = _t(1.5, -0.2), _t(0.5, 0.3), _t(0.25, 0.0)
    losses = reward_loss(c, r, margin=m)
    assert losses.tolist() == pytest.approx([-_logsig(1.5 - 0.5 - 0.25), -_logsig(-0.2 - 0.3)])
    centred = reward_loss(c, r, center_rewards_coefficient=0.01)
    plain = reward_loss(c, r)
    # TRL: loss.mean() + coef * mean((rc + rr)^2); ours is per pair, with the same mean
    assert centred.mean().item() == pytest.approx(plain.mean().item() + 0.01 * ((c + r) ** 2).mean().item())


def test_chunked_token_logps_equal_direct_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    direct = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    chunked = selected_token_logps(hidden, weight, targets, chunk_size=8)
    assert torch.allclose(chunked, direct, atol=1e-5)
    g1 = torch.autograd.grad(direct.sum(), (hidden, weight))
    g2 = torch.autograd.grad(chunked.sum(), (hidden, weight))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)
    capped = selected_token_logps(hidden.detach(), weight.detach(), targets, chunk_size=8, softcap=5.0)
    ref = torch.log_softmax(torch.tanh((hidden @ weight.t()) / 5.0) * 5.0, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(capped, ref.detach(), atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_frozen_head_gradient_formed_in_forward(softcap):
    """A frozen LM head (ours: the base model's) gets the gradient for the hidden states while each chunk's logits
    exist: the same log-probs and gradients as the textbook computation, and backward runs no matmul at all (the
    checkpointed chunks recomputed their logits there)."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)  # a different upstream gradient per row, as the losses give
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    direct = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    chunked = selected_token_logps(hidden, weight, targets, chunk_size=8, softcap=softcap)
    assert torch.allclose(chunked, direct, atol=1e-5)
    expected = torch.autograd.grad((direct * upstream).sum(), hidden)[0]
    loss = (chunked * upstream).sum()
    with OpCounter() as backward:
        got = torch.autograd.grad(loss, hidden)[0]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not {"mm", "addmm", "matmul", "bmm"} & set(backward.counts), backward.counts
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, as on a GPU: the checkpointed path's numbers
        frozen = selected_token_logps(hidden, weight, targets, chunk_size=8, softcap=softcap)
        checkpointed = selected_token_logps(hidden, weight.requires_grad_(), targets, chunk_size=8, softcap=softcap)
    assert torch.equal(frozen, checkpointed)
    g_frozen = torch.autograd.grad((frozen * upstream).sum(), hidden)[0]
    g_checkpointed = torch.autograd.grad((checkpointed * upstream).sum(), hidden)[0]
    # bf16 rounds at other points (before or after the upstream scale): both within bf16's precision (0.4% here)
    assert torch.allclose(g_frozen, g_checkpointed, rtol=0, atol=1e-2 * g_checkpointed.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# Against TRL 1.x: the same batch from TRL's own collator, TRL's loss vs ours

TRL_CASES = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("bco_pair", 0.0),
             ("sppo_hard", 0.0), ("nca_pair", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0)]


@pytest.fixture(scope="module")
def trl_setup(tiny_model_dir, tokenizer, tmp_path_factory):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # random (non-zero) LoRA weights so the policy differs from the reference (adapters disabled, in both)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=False)
    rows = [{"prompt": f"Question {i}: how do I fix it?", "chosen": f"Carefully, step {i}, with patience.",
             "rejected": "No."} for i in range(6)]
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=6, beta=B,
                         max_length=64, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                         dataset_num_proc=None, loss_type=["sigmoid"])
    tok = tokenizer
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    return trainer, batch


@pytest.mark.parametrize("loss_type,smoothing", TRL_CASES)
def test_dpo_loss_matches_trl(trl_setup, loss_type, smoothing):
    from lowrank_pref.logps import sequence_logps
    from lowrank_pref.model import reference_mode

    trainer, batch = trl_setup
    trainer.loss_types, trainer.label_smoothing = [loss_type], smoothing
    trainer._metrics["eval"].clear()  # eval mode: TRL files metrics under "eval"
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        trl_loss = trl_loss[0] if isinstance(trl_loss, tuple) else trl_loss
        model = trainer.model
        logps, lengths = sequence_logps(model, batch)
        with reference_mode(model):
            ref, _ = sequence_logps(model, batch)
    n = batch["input_ids"].shape[0] // 2
    losses, cr, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=B, loss_type=loss_type,
                              label_smoothing=smoothing, chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)
    metrics = trainer._metrics["eval"]
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-4, abs=1e-5)
    assert rr.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], rel=1e-4, abs=1e-5)
    assert logps[:n].mean().item() == pytest.approx(metrics["logps/chosen"][-1], rel=1e-4)


def test_reward_loss_matches_trl(tiny_model_dir, tokenizer, tmp_path):
    """TRL's RewardTrainer.compute_loss (margin + centring) on its own collated batch, against reward_loss on the
    scores our reward path reads from the same model and batch."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from lowrank_pref.logps import reward_scores

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [{"prompt": f"Question {i}: how do I fix it?", "chosen": f"Carefully, step {i}, with patience.",
             "rejected": "No." if i % 2 else f"Maybe {i}.", "margin": 0.25 * i} for i in range(6)]
    args = trl.RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_length=64, report_to="none",
                            use_cpu=True, bf16=False, center_rewards_coefficient=0.01, dataset_num_proc=None)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        scores = reward_scores(trainer.model, batch)
    n = scores.shape[0] // 2
    ours = reward_loss(scores[:n], scores[n:], margin=batch["margin"], center_rewards_coefficient=0.01)
    assert ours.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert (scores[:n] - scores[n:]).mean().item() == pytest.approx(trainer._metrics["eval"]["margin"][-1], rel=1e-5)


def test_simpo_and_orpo_match_trl():
    """TRL's CPOTrainer.cpo_loss (loss_type simpo) and ORPOTrainer.odds_ratio_loss, called as plain functions on
    length-normalised log-probs (what those trainers feed them), against ours on summed log-probs and lengths."""
    from types import SimpleNamespace

    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(0)
    lc, lr = torch.tensor([5.0, 9.0, 3.0]), torch.tensor([7.0, 2.0, 4.0])
    pc, pr = -torch.rand(3) * 2 * lc, -torch.rand(3) * 2 * lr
    for smoothing in (0.0, 0.1):
        trl_self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0,
                                   label_smoothing=smoothing, accelerator=SimpleNamespace(device="cpu"))
        theirs, tc, tr = CPOTrainer.cpo_loss(trl_self, pc / lc, pr / lr)
        ours, oc, orr = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.7, label_smoothing=smoothing)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(oc, tc)
        torch.testing.assert_close(orr, tr)
    trl_self = SimpleNamespace(beta=B, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, tc, _, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, pc / lc, pr / lr)
    ours, oc, _ = orpo_loss(pc, pr, lc, lr, beta=B)
    # ORPO = per-pair NLL of the chosen answer (per token) - beta * log sigmoid(log odds ratio)
    torch.testing.assert_close(ours, -pc / lc - ratio_losses)
    torch.testing.assert_close(oc, tc)
