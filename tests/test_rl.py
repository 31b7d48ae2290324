"""The rl task: its formulas against hand computations, its roles on one 4-bit base, and RLOO end to end from the
CLI (a reward run, then RL against it, then a resume after SIGKILL).

TRL 1.16 has none of these as functions any more (its RLOO and GRPO compute advantages and KL inline in their
trainers, and PPO left TRL), so each formula is checked against numbers worked out by hand here, and the KL
estimators against the exact KL of two small distributions.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, WORDS, run_cli
from lowrank_pref.artifacts import read_metrics
from lowrank_pref.losses import (gae, kl_k1, kl_k3, ppo_policy_loss, ppo_value_loss, reinforce_loss, rloo_advantages,
                                 whiten)

# Two threads per process thrash when several CPU-bound processes share the machine's two cores (a 2-layer forward
# went from 15 ms to 200 ms); the CLI runs here take one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------------------------
# Formulas

def test_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    a = rloo_advantages(r, k=4)
    # prompt 1: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0]
    assert a.tolist() == pytest.approx(expected)
    # the identity the RLOO paper states: k / (k - 1) * (r_i - mean r)
    g = r.view(2, 4)
    assert a.tolist() == pytest.approx((4 / 3 * (g - g.mean(1, keepdim=True))).reshape(-1).tolist())
    with pytest.raises(ValueError):
        rloo_advantages(r, k=1)


def test_reinforce_loss_gradient_is_minus_the_advantage():
    logps = torch.tensor([-3.0, -5.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0], requires_grad=True)
    loss = reinforce_loss(logps, adv)
    assert loss.tolist() == pytest.approx([6.0, -5.0])
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-2.0, 1.0])
    assert adv.grad is None  # the advantage is a constant of the gradient


def test_kl_estimators_by_hand_and_against_the_exact_kl():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert kl_k1(logp, ref).tolist() == pytest.approx([1.0, 0.0])
    assert kl_k3(logp, ref).tolist() == pytest.approx([math.exp(-1) + 1 - 1, 0.0])
    # both are unbiased estimates of KL(p || q) over samples drawn from p
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    assert float(kl_k1(lp, lq).mean()) == pytest.approx(exact, abs=0.01)
    assert float(kl_k3(lp, lq).mean()) == pytest.approx(exact, abs=0.01)
    assert float(kl_k3(lp, lq).min()) >= 0  # k3 never goes negative; k1 does
    assert float(kl_k1(lp, lq).min()) < 0


def test_k1_as_a_loss_term_is_refused_it_would_penalise_nothing():
    from lowrank_pref.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"rl.kl_estimator=k3"):
        build_config("tiny-rl", overrides={"rl.kl_in_reward": False, "rl.kl_estimator": "k1"})
    k3 = build_config("tiny-rl", overrides={"rl.kl_in_reward": False, "rl.kl_estimator": "k3"})
    assert k3.rl.kl_estimator == "k3"


def test_ppo_settings_are_checked_plainly():
    from lowrank_pref.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"max_steps=41 is not a multiple of rl.ppo_epochs=4.*max_steps=40 or 44"):
        build_config("tiny-rl", overrides={"rl.algorithm": "ppo", "max_steps": 41})
    with pytest.raises(ConfigError, match=r"rl.cliprange"):
        build_config("tiny-rl", overrides={"rl.algorithm": "ppo", "rl.cliprange": 0})
    with pytest.raises(ConfigError, match=r"rl.lam"):
        build_config("tiny-rl", overrides={"rl.algorithm": "ppo", "rl.lam": 1.5})
    cfg = build_config("tiny-rl", overrides={"rl.algorithm": "ppo", "max_steps": 41, "rl.ppo_epochs": 1})
    assert (cfg.rl.cliprange, cfg.rl.cliprange_value, cfg.rl.vf_coef, cfg.rl.gamma, cfg.rl.lam) == (
        0.2, 0.2, 0.1, 1.0, 0.95)  # TRL's PPOTrainer defaults


def test_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    # the unbiased variance of 1..4 around 2.5, (2.25 + 0.25 + 0.25 + 2.25) / (4 - 1), as TRL's masked_whiten
    std = math.sqrt(5 / 3)
    assert whiten(x, mask, eps=0).tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0])
    assert whiten(x, mask, shift_mean=False, eps=0).tolist() == pytest.approx(
        [2.5 - 1.5 / std, 2.5 - 0.5 / std, 2.5 + 0.5 / std, 2.5 + 1.5 / std, 0.0])
    assert whiten(x[:4], eps=0).tolist() == pytest.approx(((x[:4] - x[:4].mean()) / x[:4].std()).tolist())  # torch's
    assert whiten(torch.tensor([3.0]), eps=1e-8).tolist() == [0.0]  # one entry: variance 0, not a division by zero


def test_gae_by_hand():
    rewards = torch.tensor([[0.1, 0.2, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2 ends after two tokens: its third entries mean nothing
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: deltas 0.7, 0.2 + 0.9*0.3 - 0.4 = 0.07, 0.1 + 0.9*0.4 - 0.5 = -0.04; A_t = delta_t + 0.72 A_{t+1}
    a2, a1 = 0.7, 0.07 + 0.72 * 0.7
    a0 = -0.04 + 0.72 * a1
    # row 2: deltas 1 - 0.6 = 0.4 (V after the end is 0), 0.9*0.6 - 0.2 = 0.34
    b1, b0 = 0.4, 0.34 + 0.72 * 0.4
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2])
    assert adv.tolist()[1] == pytest.approx([b0, b1, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])
    assert ret.tolist()[1] == pytest.approx([b0 + 0.2, b1 + 0.6, 0.0])


def test_ppo_clipped_policy_loss_by_hand():
    logps = torch.tensor([[0.5, -0.1, 3.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac = ppo_policy_loss(logps, old, adv, mask, cliprange=0.2)
    # token 1: ratio e^0.5 = 1.65 > 1.2 with A > 0: the clipped -1.2 is the larger; token 2: ratio e^-0.1 = 0.905
    # is inside [0.8, 1.2], both terms equal -(-2) * 0.905
    assert loss.tolist() == pytest.approx([(-1.2 + 2 * math.exp(-0.1)) / 2])
    assert clipfrac.tolist() == pytest.approx([0.5])


def test_ppo_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 1.2]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 1.0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    # clipped values 0.7, 0.3, 0.7: squared errors (1.0 vs 0.49), (1.0 vs 0.49), (0.04 vs 0.09): the larger each
    assert loss.tolist() == pytest.approx([0.5 * (1.0 + 1.0 + 0.09) / 3])
    assert clipfrac.tolist() == pytest.approx([1 / 3])


# ----------------------------------------------------------------------------------------------------------------
# Roles on one base

def _rl_config(model_dir, reward_dir, **extra):
    from lowrank_pref.config import build_config

    overrides = {"task": "rl", "model": str(model_dir), "reward_model": str(reward_dir), "max_length": 64,
                 "max_prompt_length": 32, "rl.max_new_tokens": 4, "rl.k": 2, "batch_size": 2,
                 "gradient_accumulation_steps": 1, "lora.r": 8, "lora.dropout": 0.0, "learning_rate": 1e-2,
                 "gradient_checkpointing": False, **extra}
    return build_config("tiny-rl", overrides=overrides)


@pytest.fixture(scope="module")
def reward_adapter(tiny_model_dir, tokenizer, tmp_path_factory):
    """A reward model's adapter as a reward run saves it (SEQ_CLS LoRA + score head, model.save_adapter), its LoRA
    and head weights drawn at random so that every row scores differently."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rl import make_reward_adapter

    path = tmp_path_factory.mktemp("reward_run") / "adapter"
    make_reward_adapter(str(tiny_model_dir), path, scale=0.3)
    return path


def _rows(tokenizer, n=6):
    """(prompt + answer) rows of varying lengths, right-padded, the answers marked."""
    from lowrank_pref.data import collate_rows

    rows = []
    for i in range(n):
        p = tokenizer(f"Tell me about the {WORDS[i]}.")["input_ids"]
        a = tokenizer(" " + " ".join(WORDS[i:i + 1 + i % 3]), add_special_tokens=False)["input_ids"]
        rows.append((p + a + [tokenizer.eos_token_id], [0] * len(p) + [1] * (len(a) + 1)))
    return collate_rows(rows, tokenizer.pad_token_id)


def test_reward_score_on_the_policys_base_equals_the_reward_runs_own(tiny_model_dir, reward_adapter):
    from peft import PeftModel

    from lowrank_pref.logps import reward_scores
    from lowrank_pref.model import POLICY, REWARD, adapter_role, attach_reward, load_base, load_model, load_tokenizer
    from lowrank_pref.tasks.rl import pooled_scores

    cfg = _rl_config(tiny_model_dir, reward_adapter)
    tok = load_tokenizer(cfg)
    batch = _rows(tok)
    model, _ = load_model(cfg, tok)
    head = attach_reward(model, cfg)
    with adapter_role(model, REWARD):
        ours = pooled_scores(model, head, batch["input_ids"], batch["attention_mask"], tok.pad_token_id)
    assert model.active_adapter == POLICY and model.training
    # the reward run's own model: a 4-bit sequence classifier with the adapter loaded by PEFT, pooled by transformers
    reward_cfg = _rl_config(tiny_model_dir, reward_adapter, task="reward", reward_model="null")
    own = PeftModel.from_pretrained(load_base(reward_cfg, tok, for_training=False), str(reward_adapter))
    own.eval()
    with torch.no_grad():
        theirs = reward_scores(own, batch)
    assert float(theirs.std()) > 0.05  # the rows really score differently
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # one base in memory: the reward role is a second adapter on the same 4-bit layers, not a second model
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 2 layers x 7 projections


def test_reference_logps_are_the_bare_bases_and_the_policy_differs(tiny_model_dir, reward_adapter):
    from lowrank_pref.model import attach_reward, load_base, load_model, load_tokenizer, reference_mode
    from lowrank_pref.tasks.rl import completion_token_logps

    cfg = _rl_config(tiny_model_dir, reward_adapter)
    tok = load_tokenizer(cfg)
    batch = _rows(tok)
    model, _ = load_model(cfg, tok)
    attach_reward(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy that differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    with reference_mode(model):
        ref, mask = completion_token_logps(model, batch)
    with torch.no_grad():
        policy, _ = completion_token_logps(model, batch)
        bare, _ = completion_token_logps(load_base(cfg, tok, for_training=False), batch)
    torch.testing.assert_close(ref[mask], bare[mask], atol=1e-5, rtol=1e-5)
    assert float((policy[mask] - bare[mask]).abs().max()) > 1e-2


def test_a_step_changes_only_the_policy_adapter(tmp_path, tiny_model_dir, reward_adapter, pairs_file):
    from lowrank_pref.artifacts import RunDir
    from lowrank_pref.loop import Shell, _StopFlag

    cfg = _rl_config(tiny_model_dir, reward_adapter, dataset=str(pairs_file), max_steps=1, eval_steps=100)
    shell = Shell(cfg, RunDir(tmp_path / "run").create(), _StopFlag())
    shell.setup(resume=False)
    before = {n: p.detach().clone() for n, p in shell.model.named_parameters()}
    head = shell.task.score_head.weight.detach().clone()
    optimized = {id(p) for group in shell.optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in shell.model.named_parameters()}
    assert optimized and all(".default." in names[i] for i in optimized)
    shell.loop()
    changed = [n for n, p in shell.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all(".default." in n and "lora_" in n for n in changed), changed
    assert any(".reward." in n for n in before)  # the reward adapter is there, and did not move
    assert torch.equal(head, shell.task.score_head.weight)
    record = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m][-1]
    for key in ("reward", "reward_std", "kl", "entropy", "length", "eos"):
        assert math.isfinite(record[key]), key
    assert 1 <= record["length"] <= 4 and 0 <= record["eos"] <= 1


def test_online_dpo_trains_on_the_best_and_worst_of_k_by_hand(tmp_path, tiny_model_dir, reward_adapter, pairs_file):
    """online_dpo's loss is the DPO loss of each prompt's best and worst of k completions by the reward model, from
    log-probs of all k computed here; only those two go through the model (the tokens it reports)."""
    import torch.nn.functional as F

    from lowrank_pref.artifacts import RunDir
    from lowrank_pref.loop import Shell, _StopFlag
    from lowrank_pref.model import reference_mode
    from lowrank_pref.tasks.rl import completion_token_logps

    cfg = _rl_config(tiny_model_dir, reward_adapter, dataset=str(pairs_file), max_steps=1, eval_steps=100,
                     **{"rl.algorithm": "online_dpo", "rl.k": 4, "rl.max_new_tokens": 6, "beta": 0.5})
    shell = Shell(cfg, RunDir(tmp_path / "run").create(), _StopFlag())
    shell.setup(resume=False)
    task, model, prompts = shell.task, shell.model, shell.data.train[:2]
    torch.manual_seed(7)
    losses, sums, tokens = task.losses(model, prompts)
    torch.manual_seed(7)  # the same samples again, every one of the k through the model this time
    rollout, raw, rewards = task.sample(model, prompts)
    batch = task.sequences(rollout)
    with torch.no_grad():
        with reference_mode(model):
            ref, mask = completion_token_logps(model, batch)
        logps, _ = completion_token_logps(model, batch)
    margin = ((logps - ref) * mask).sum(1).view(2, 4)
    grouped = rewards.view(2, 4)
    best, worst = grouped.argmax(1), grouped.argmin(1)
    rows = torch.arange(2)
    want = -F.logsigmoid(cfg.beta * (margin[rows, best] - margin[rows, worst])) * (best != worst)
    torch.testing.assert_close(losses.detach(), want, rtol=1e-4, atol=1e-6)
    assert sums["pair/reward_gap"] == pytest.approx(float((grouped.max(1).values - grouped.min(1).values).sum()))
    pair_rows = torch.stack([rows * 4 + best, rows * 4 + worst], 1).view(-1)
    assert tokens == int(batch["attention_mask"][pair_rows].sum()) < int(batch["attention_mask"].sum())


@pytest.fixture(scope="module")
def ppo_shell(tiny_model_dir, reward_adapter, tmp_path_factory):
    """Four PPO steps in process, two epochs over each of two rollouts, a checkpoint after each of steps 1-3 (1 and
    3 between the epochs of a rollout), LoRA dropout asked for, the first layer checkpointed (recomputed in
    backward); the parameters before training kept."""
    from conftest import write_pairs
    from lowrank_pref.artifacts import RunDir
    from lowrank_pref.loop import Shell, _StopFlag

    root = tmp_path_factory.mktemp("ppo")
    cfg = _rl_config(tiny_model_dir, reward_adapter, dataset=str(write_pairs(root / "pairs.jsonl")), max_steps=4,
                     eval_steps=100, save_steps=1, save_total_limit=3, gradient_checkpointing=True,
                     **{"rl.algorithm": "ppo", "rl.ppo_epochs": 2, "lora.dropout": 0.1})
    shell = Shell(cfg, RunDir(root / "run").create(), _StopFlag())
    shell.setup(resume=False)
    before = {n: p.detach().clone() for n, p in shell.model.named_parameters()}
    before["value_head"] = shell.task.value_head.weight.detach().clone()
    optimized = {id(p) for group in shell.optimizer.param_groups for p in group["params"]}
    dropouts = [m.p for m in shell.model.modules() if isinstance(m, torch.nn.Dropout)]
    shell.loop()
    return shell, before, optimized, dropouts, root / "run"


def test_ppo_trains_the_policy_and_the_value_adapter_from_the_rollouts_policy(ppo_shell):
    shell, before, optimized, dropouts, run = ppo_shell
    model, task = shell.model, shell.task
    names = {id(p): n for n, p in model.named_parameters()}
    names[id(task.value_head.weight)] = "value_head"
    # the optimizer holds the policy's and the value's weights (adapter and head), nothing of the reward model
    assert {names[i].split(".")[-2] if "lora_" in names[i] else names[i]
            for i in optimized} == {"default", "value", "value_head"}
    # the value adapter and head start as copies of the reward model's
    for n, p in before.items():
        if ".value." in n:
            assert torch.equal(p, before[n.replace(".value.", ".reward.")]), n
    assert torch.equal(before["value_head"], task.score_head.weight)
    # lora.dropout=0.1 asked for, and every dropout of the model turned off for rl
    assert dropouts and all(p == 0 for p in dropouts)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(".default." in n or ".value." in n for n in changed), changed
    assert any(".value." in n for n in changed) and any(".default." in n for n in changed)
    assert not torch.equal(before["value_head"], task.value_head.weight)  # trained
    assert torch.equal(before["value_head"], task.score_head.weight)  # the reward model's head: untouched
    train = {m["step"]: m for m in read_metrics(run / "metrics.jsonl") if "loss" in m}
    assert sorted(train) == [1, 2, 3, 4]
    # the first epoch of each rollout: the policy that sampled, exactly (no dropout, the same pass): ratio 1
    for step in (1, 3):
        assert train[step]["val/ratio"] == 1.0 and train[step]["policy/clipfrac"] == 0.0, train[step]
        assert train[step]["policy/approxkl"] == 0.0 and train[step]["val/clipfrac"] == 0.0
    for step in (2, 4):  # the second epoch: the policy has moved from the one that sampled
        assert train[step]["policy/approxkl"] > 0 and train[step]["val/ratio"] != 1.0, train[step]
        assert train[step]["reward"] == train[step - 1]["reward"]  # the same rollout
    for m in train.values():
        for key in ("loss/policy", "loss/value", "kl", "entropy", "length", "eos"):
            assert math.isfinite(m[key]), key
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # the value adapter beside the policy's, in the reward model's format: it loads as a reward model
    import dataclasses

    from lowrank_pref.model import check_reward_model

    assert check_reward_model(dataclasses.replace(shell.cfg, reward_model=str(run / "value"))) == run / "value"


def test_ppo_rewards_and_gae_by_hand_on_a_stored_rollout(ppo_shell):
    shell, *_, run = ppo_shell
    cfg, (entry,) = shell.cfg, shell.task.buffer.values()  # rollout 2's (steps 3 and 4), one micro-batch
    mask, old, ref = entry["mask"], entry["old_logps"], entry["ref"]
    N = mask.shape[0]
    scores = []
    for i in range(N):
        pos = mask[i].nonzero().flatten().tolist()
        r = [-cfg.beta * float(old[i, t] - ref[i, t]) for t in pos]  # -beta * KL_t (k1) on every completion token
        score = float(entry["rewards"][i, pos[-1]]) - r[-1]
        scores.append(score)
        assert entry["rewards"][i, pos].tolist() == pytest.approx(r[:-1] + [r[-1] + score], abs=1e-6)
        # GAE by hand, gamma 1, lambda 0.95, the value after the last token 0; returns = advantages + values
        v = entry["old_values"][i, pos].tolist() + [0.0]
        a, adv = 0.0, []
        for t in reversed(range(len(pos))):
            a = entry["rewards"][i, pos[t]].item() + v[t + 1] - v[t] + 0.95 * a
            adv.insert(0, a)
        assert entry["returns"][i, pos].tolist() == pytest.approx([x + y for x, y in zip(adv, v)], abs=1e-5)
    # the score at the last token is the reward model's: its mean is the logged reward (k samples a prompt, summed
    # over the prompts, divided by them)
    assert sum(scores) / cfg.rl.k == pytest.approx(entry["sums"]["reward"], abs=1e-5)
    # advantages whitened over every completion token of the micro-batch, with the unbiased variance
    returns_minus_values = (entry["returns"] - entry["old_values"])[mask]
    expected = (returns_minus_values - returns_minus_values.mean()) / returns_minus_values.std()
    torch.testing.assert_close(entry["advantages"][mask], expected, atol=1e-4, rtol=1e-4)
    # step 3, the rollout's first epoch: ratio 1, so each row's surrogate is minus its mean advantage; the values
    # are the rollout's own, so the value loss is 0.5 (V - R)^2, each averaged over its row's tokens, then the rows
    step3 = [m for m in read_metrics(run / "metrics.jsonl") if m["step"] == 3 and "loss" in m][0]
    rows = [mask[i] for i in range(N)]
    assert step3["loss/policy"] == pytest.approx(
        sum(-float(entry["advantages"][i, m].mean()) for i, m in enumerate(rows)) / N, abs=1e-5)
    assert step3["loss/value"] == pytest.approx(sum(0.5 * float(((entry["old_values"] - entry["returns"])[i, m] ** 2)
                                                                .mean()) for i, m in enumerate(rows)) / N, abs=1e-5)


def test_ppo_resumes_exactly_between_the_epochs_of_a_rollout(ppo_shell, tmp_path):
    """What SIGKILL after step 3's checkpoint leaves (steps 1-3 checkpointed, the run gone before step 4's end):
    the resumed run's step 4 reads rollout 2 from the checkpoint's buffer, and logs what the uninterrupted run did.
    It resumes without gradient checkpointing: the same numbers also show that the checkpointed run's recompute in
    backward ran each pass's own adapter (the value loss's backward under the value adapter, not the policy)."""
    import dataclasses
    import shutil

    from lowrank_pref.artifacts import RunDir
    from lowrank_pref.loop import Shell, _StopFlag
    from lowrank_pref.model import checkpointed_layers

    shell, _, _, _, run = ppo_shell
    meta = {s: json.loads((run / f"checkpoint-{s}" / "task.json").read_text()) for s in (1, 2, 3)}
    assert list(meta[1]["entries"]) == ["0"] and meta[2]["entries"] == {} and list(meta[3]["entries"]) == ["0"]
    killed = tmp_path / "run"
    shutil.copytree(run, killed)
    for done in ("adapter", "value"):  # written at the end, which the killed run never reached
        shutil.rmtree(killed / done)
    metrics = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(metrics[:3]) + "\n")  # step 4's line was never written
    assert shell.cfg.gradient_checkpointing and checkpointed_layers(shell.model) == 1
    cfg = dataclasses.replace(shell.cfg, gradient_checkpointing=False)
    resumed = Shell(cfg, RunDir(killed).create(), _StopFlag())
    resumed.setup(resume=True)
    assert resumed.start == 3 and resumed.task.buffer_rollout == 2
    resumed.loop()
    a = {m["step"]: m for m in read_metrics(run / "metrics.jsonl") if "loss" in m}
    b = {m["step"]: m for m in read_metrics(killed / "metrics.jsonl") if "loss" in m}
    assert sorted(b) == [1, 2, 3, 4]
    for key in ("reward", "kl", "loss", "loss/value", "loss/policy", "policy/approxkl", "val/ratio"):
        assert b[4][key] == pytest.approx(a[4][key], rel=1e-5, abs=1e-7), key
    for n, p in resumed.model.named_parameters():
        if ".value." in n or ".default." in n:
            torch.testing.assert_close(p, dict(shell.model.named_parameters())[n], rtol=1e-5, atol=1e-6)


def test_a_non_finite_ppo_rollout_is_dropped_not_replayed(ppo_shell):
    """A rollout whose value loss is not finite skips its step (NaN losses for the loop, no value backward) and leaves
    the buffer, so the rollout's next epoch samples that micro-batch anew instead of skipping every epoch in a row
    (max_nonfinite_steps would end the run). After the fixture's run: no optimizer step here, gradients cleared."""
    shell, *_ = ppo_shell
    task, model, prompts = shell.task, shell.model, shell.data.train[:2]
    try:
        task.begin_step(5, 2.0)  # a third rollout's first epoch
        first, _, _ = task.losses(model, prompts)
        assert torch.isfinite(first).all() and 0 in task.buffer
        task.buffer[0]["returns"] = torch.full_like(task.buffer[0]["returns"], float("nan"))
        task.begin_step(6, 2.0)  # its second epoch, on the stored rollout
        losses, sums, _ = task.losses(model, prompts)
        assert torch.isnan(losses).all() and sums == {} and 0 not in task.buffer
        task.begin_step(6, 2.0)
        again, sums, _ = task.losses(model, prompts)  # sampled anew (the warning in the log says so)
        assert torch.isfinite(again).all() and torch.isfinite(task.buffer[0]["returns"]).all() and sums
    finally:
        shell.optimizer.zero_grad(set_to_none=True)


def test_a_ppo_checkpoint_resumed_as_another_algorithm_is_refused_plainly(ppo_shell, tmp_path):
    """Resuming with an override that changes what trains (rloo has no value adapter; another LoRA rank) is one plain
    message naming the checkpoint, not torch's load errors."""
    import dataclasses
    import shutil

    from lowrank_pref.artifacts import RunDir
    from lowrank_pref.config import ConfigError
    from lowrank_pref.loop import Shell, _StopFlag

    shell, _, _, _, run = ppo_shell
    cfg = shell.cfg
    for name, changed in (("rloo", dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, algorithm="rloo"))),
                          ("rank", dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=cfg.lora.r // 2)))):
        other = tmp_path / name
        shutil.copytree(run, other)
        with pytest.raises(ConfigError, match=r"checkpoint-\d+ was written by a run that trained other weights"):
            Shell(changed, RunDir(other).create(), _StopFlag()).setup(resume=True)


def test_reward_model_of_another_base_is_refused_plainly(tmp_path, unseen_model_dir, reward_adapter, pairs_file):
    res = run_cli("--preset", "tiny-rl", "--model", str(unseen_model_dir), "--dataset", str(pairs_file),
                  f"reward_model={reward_adapter}", "--output-dir", str(tmp_path / "rl"), env=ONE_THREAD)
    assert res.returncode == 2, res.stderr
    assert "was trained on the base model" in res.stderr and str(unseen_model_dir) in res.stderr
    assert "Traceback" not in res.stderr


def test_rl_needs_a_reward_model(tmp_path, tiny_model_dir, pairs_file):
    res = run_cli("--preset", "tiny-rl", "--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir",
                  str(tmp_path / "rl"), env=ONE_THREAD)
    assert res.returncode == 2 and "needs reward_model=" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------------------------------------------
# End to end from the CLI: SFT -> reward model -> RL, on a toy model

@pytest.fixture(scope="module")
def rl_world(tokenizer, tmp_path_factory):
    """The pipeline's first two steps on a 2-layer, 64-wide Llama: an SFT adapter that answers either kindly ("Thank
    you for asking. The x is near the y.") or curtly ("The x is near the y."), and a reward model trained on pairs
    that prefer the kind answer. (The model is initialised with std 0.2, not transformers' 0.02: at 0.02 a 64-wide
    LM head cannot make any token much likelier than the others, and SFT barely moves it.)"""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("rl_world")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    pairs, sft = [], []
    for _ in range(120):
        a, b = rng.sample(WORDS, 2)
        prompt = f"Tell me about the {a} and the {b}."
        kind, curt = f"Thank you for asking. The {a} is near the {b}.", f"The {a} is near the {b}."
        pairs.append({"prompt": prompt, "chosen": kind, "rejected": curt})
        sft.append({"prompt": prompt, "completion": kind if rng.random() < 0.5 else curt})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    model = ["--model", str(root / "model")]
    res = run_cli("--preset", "tiny-sft", *model, "--dataset", str(root / "sft.jsonl"), "--output-dir",
                  str(root / "sft"), "max_steps=60", "eval_steps=60", "save_steps=60", "learning_rate=1e-2",
                  env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    res = run_cli("--preset", "tiny-reward", *model, "--dataset", str(root / "pairs.jsonl"), "--output-dir",
                  str(root / "rm"), "max_steps=30", "eval_steps=30", "save_steps=30", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    return root


def _rl_args(world, *extra):
    return ["--preset", "tiny-rl", "--model", str(world / "model"), "--dataset", str(world / "pairs.jsonl"),
            f"adapter={world / 'sft' / 'adapter'}", f"reward_model={world / 'rm'}", "rl.max_new_tokens=16",
            "learning_rate=2e-3", "beta=0.1", "max_steps=40", "eval_steps=20", "save_steps=10", "seed=1", *extra]


@pytest.fixture(scope="module")
def rloo_run(rl_world):
    out = rl_world / "rloo"
    res = run_cli(*_rl_args(rl_world), "--output-dir", str(out), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    return out


def test_rloo_from_the_cli_beats_the_reference_on_heldout_prompts(rloo_run):
    metrics = read_metrics(rloo_run / "metrics.jsonl")
    final = [m for m in metrics if "eval_reward" in m][-1]
    assert final["step"] == 40
    assert final["eval_reward"] > final["eval_reward_reference"] + 0.2, final
    assert final["eval_win_rate"] > 0.5, final
    assert 0 < final["eval_kl"] < 40, final  # reported, and bounded by the KL penalty
    train = [m for m in metrics if "loss" in m]
    assert len(train) == 40
    for key in ("reward", "reward_std", "kl", "entropy", "length", "eos", "prompts_per_second", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in train), key
    assert abs(train[0]["kl"]) < 1.0  # it starts at the reference (the frozen SFT adapter)
    config = (rloo_run / "config.yaml").read_text()
    assert "reference: adapter" in config
    samples = [json.loads(line) for line in (rloo_run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [20, 40]
    for s in samples:
        assert s["prompt"].startswith("Tell me about") and isinstance(s["completion"], str)
        assert math.isfinite(s["reward"]) and math.isfinite(s["reference_reward"])
    status = json.loads((rloo_run / "status.json").read_text())
    assert status["state"] == "completed" and status["reward_model"].endswith("rm")
    assert (rloo_run / "adapter" / "adapter_model.safetensors").is_file()


def test_rl_resume_after_sigkill_samples_what_the_uninterrupted_run_did(rl_world, rloo_run):
    killed = rl_world / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **ONE_THREAD)
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_pref.run", *_rl_args(rl_world), "--output-dir",
                             str(killed)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (killed / "checkpoint-20" / "state.json").exists():
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.wait()
    assert (killed / "checkpoint-20").exists() and not (killed / "adapter").exists()
    res = run_cli("--output-dir", str(killed), "--resume", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    a = {m["step"]: m for m in read_metrics(rloo_run / "metrics.jsonl") if "loss" in m}
    b = {m["step"]: m for m in read_metrics(killed / "metrics.jsonl") if "loss" in m}
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:  # the same rollouts (RNG restored), so the same rewards, KL and loss
        for key in ("reward", "kl", "length", "loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    samples = (killed / "samples.jsonl").read_text().splitlines()
    assert samples == (rloo_run / "samples.jsonl").read_text().splitlines()


def test_memory_model_counts_generation_and_the_reward_adapter():
    from lowrank_pref.config import build_config
    from lowrank_pref.memory import arch_of, estimate
    from lowrank_pref.tasks.rl import kv_cache_bytes

    cfg = build_config("8gb-rl")
    a = arch_of(cfg.model)  # Qwen2.5-1.5B: 28 layers, kv width 1536 / 12 x 2 = 256
    # keys and values x 28 layers x 256 x (4 completions x 1 prompt) rows x (512 + 128) tokens x 2 bytes (bf16)
    assert kv_cache_bytes(cfg, a, 2) == 2 * 28 * 256 * 4 * 640 * 2
    parts = estimate(cfg)
    assert parts["reward_adapter"] == pytest.approx(a.lora_params(16) * 4 / 2**30, abs=1e-3)
    bigger = estimate(build_config("8gb-rl", overrides={"rl.k": "64", "batch_size": "16",
                                                        "gradient_checkpointing": "true"}))
    assert bigger["generation"] > parts["generation"] and bigger["total"] > parts["total"]
    dpo = estimate(build_config("8gb-dpo"))
    assert "generation" not in dpo and "reward_adapter" not in dpo
    assert "value_adapter" not in parts
    ppo = estimate(build_config("8gb-rl", overrides={"rl.algorithm": "ppo"}))
    # one more LoRA + a 1536-wide head at the policy's 10 B a parameter (paged 8-bit AdamW); the buffer: 4 x 1 x 16
    # rows of 640 positions, 3 int64 + 1 bool + 6 fp32 each
    assert ppo["value_adapter"] == pytest.approx((a.lora_params(16) + 1536) * 10 / 2**30, abs=1e-3)
    assert ppo["rollout_buffer"] == pytest.approx(64 * 640 * 49 / 2**30, abs=1e-4)
    assert ppo["total"] == pytest.approx(parts["total"] + ppo["value_adapter"] + ppo["rollout_buffer"], abs=1e-3)


def _beats_the_reference(rl_world, algorithm: str, *extra: str) -> list[dict]:
    """An rl run of ``algorithm`` from the CLI whose held-out mean reward beats the reference's, with its win rate
    above one half and its KL reported and bounded; returns its train records."""
    out = rl_world / algorithm
    res = run_cli(*_rl_args(rl_world, f"rl.algorithm={algorithm}", "save_steps=100", *extra), "--output-dir",
                  str(out), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    final = [m for m in metrics if "eval_reward" in m][-1]
    assert final["eval_reward"] > final["eval_reward_reference"] + 0.2 and final["eval_win_rate"] > 0.5, final
    assert 0 < final["eval_kl"] < 40, final
    return [m for m in metrics if "loss" in m]


def test_online_dpo_from_the_cli_beats_the_reference(rl_world):
    train = _beats_the_reference(rl_world, "online_dpo")
    assert all("rewards/margins" in m and "pair/reward_gap" in m for m in train)


def test_ppo_from_the_cli_beats_the_reference(rl_world):
    """PPO at its defaults (4 epochs over each rollout: 40 steps are 10 rollouts of 4 prompts x 4 completions), a
    learning rate half RLOO's: each rollout is stepped on four times."""
    train = _beats_the_reference(rl_world, "ppo", "learning_rate=1e-3")
    assert len(train) == 40 and all(0 <= m["policy/clipfrac"] <= 1 and m["loss/value"] >= 0 for m in train)
    assert all(m["val/ratio"] == 1.0 for m in train[::4])  # each rollout's first epoch: the sampling policy itself
    out = rl_world / "ppo"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "value" / "adapter_model.safetensors").is_file()


def test_a_dpo_run_given_a_reward_model_is_judged_against_its_reference(rl_world):
    out = rl_world / "dpo"
    res = run_cli("--preset", "tiny", "--model", str(rl_world / "model"), "--dataset", str(rl_world / "pairs.jsonl"),
                  f"adapter={rl_world / 'sft' / 'adapter'}", f"reward_model={rl_world / 'rm'}", "max_steps=4",
                  "eval_steps=4", "save_steps=4", "rl.max_new_tokens=8", "--output-dir", str(out), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    final = [m for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m][-1]
    for key in ("eval_rewards/accuracies", "eval_judge_reward", "eval_judge_reward_reference", "eval_judge_win_rate",
                "eval_judge_kl"):
        assert math.isfinite(final[key]), key  # the task's own eval and the reward model's judgement, side by side
    assert 0 <= final["eval_judge_win_rate"] <= 1 and 1 <= final["eval_judge_length"] <= 8
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["step"] == 4 for s in samples)


def test_rl_diagnostics_read_the_kl_and_the_win_rate():
    from lowrank_pref.tasks.rl import RlTask

    calm = [{"step": s, "kl": 2.0} for s in range(1, 5)] + [{"step": 4, "eval_win_rate": 0.7},
                                                           {"step": 8, "eval_win_rate": 0.8}]
    assert RlTask.diagnose(calm) == []
    drifting = [{"step": s, "kl": 5.0 * s} for s in range(1, 6)] + [{"step": 2, "eval_win_rate": 0.4},
                                                                   {"step": 5, "eval_win_rate": 0.3}]
    messages = " ".join(m for _, m in RlTask.diagnose(drifting))
    assert "25.0 nats" in messages and "Raise beta" in messages and "win rate below one half" in messages


# ----------------------------------------------------------------------------------------------------------------
# The app on these runs (their folder as its runs folder): no run of its own, the CLI's runs read as the app reads

def test_the_app_lists_the_reward_run_shows_the_samples_and_scores_answers(rl_world, rloo_run):
    """Setup offers the reward run trained above (its model and eval accuracy), and nothing else; the Train tab's
    table is the rl run's samples.jsonl, newest eval first; Try it's score under each answer is the reward run's
    own scoring of it (the reward adapter loaded on the rl run's base, as RewardRoles does in training)."""
    import re

    from lowrank_pref.infer import Trained
    from lowrank_pref.model import POLICY, REWARD
    from lowrank_pref.ui import AppState
    from lowrank_pref.ui import setup as setup_tab
    from lowrank_pref.ui import train as train_tab
    from lowrank_pref.ui import tryit as try_tab

    app = AppState(rl_world, hw={"gpu": None, "memory_gb": 16.0})
    model = str(rl_world / "model")
    accuracy = [m["eval_accuracy"] for m in read_metrics(rl_world / "rm" / "metrics.jsonl") if "eval_accuracy" in m]
    dropdown, note, _ = setup_tab.reward_state(app, "tiny-rl", "rl", model, None)
    assert dropdown["choices"] == [(f"rm · {model} · eval accuracy {accuracy[-1]:.2f}", "rm")]  # not sft, not rl runs
    assert dropdown["value"] == "rm" and not note["visible"]

    table, button, _ = train_tab.run_extras(app, "rloo")
    samples = [json.loads(line) for line in (rloo_run / "samples.jsonl").read_text().splitlines()]
    newest_first = sorted(samples, key=lambda s: -s["step"])
    assert table["visible"] and not button["visible"] and list(table["value"]["step"]) == [40] * 4 + [20] * 4
    assert table["value"].values.tolist() == [[s["step"], s["prompt"], s["completion"], s["reward"],
                                               s["reference_completion"], s["reference_reward"]] for s in newest_first]
    assert train_tab.run_extras(app, "rm")[1]["visible"] and not train_tab.run_extras(app, "sft")[0]["visible"]

    prompt = "Tell me about the river and the garden."
    policy, reference, _ = try_tab.chat(app, "rloo", prompt, False, 16, False, 0.7, 0.9, [], [])
    shown = try_tab.reward_scores(app, "rloo", False, policy, reference)
    own = Trained(rl_world / "rm").score(prompt, policy[-1]["content"], reference[-1]["content"])
    trained = app.trained("rloo")
    ours = (trained.reward(prompt, policy[-1]["content"]), trained.reward(prompt, reference[-1]["content"]))
    assert ours == pytest.approx(own, abs=1e-4)
    for text, score in zip(shown, ours):
        assert re.search(rf"Reward model \*\*rm\*\*: \*\*{score:.3f}\*\*", text), text
    assert ("the higher" in shown[0]) == (ours[0] > ours[1]) and ("the higher" in shown[1]) == (ours[1] > ours[0])
    # an answer longer than the run's max_length is scored as its first tokens, as training cut answers
    long = " ".join(["the river is near the garden"] * 400)
    room = trained.cfg.max_length - trained._prompt_ids(prompt, False).shape[1]
    cut = trained.tokenizer.decode(trained.tokenizer(long, add_special_tokens=False)["input_ids"][:room])
    assert trained.reward(prompt, long) == pytest.approx(trained.reward(prompt, cut), abs=1e-5)
    # the reward adapter joined the run's own base: one set of 4-bit layers, the policy still the active adapter
    assert trained.model.active_adapter == POLICY and REWARD in trained.model.peft_config
