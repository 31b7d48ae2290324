"""The sft and kto tasks on the run shell: their data, their losses (against the formula and TRL), and runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli, write_pairs

from lowrank_pref.artifacts import read_metrics
from lowrank_pref.config import ConfigError, build_config
from lowrank_pref.losses import kto_loss


def _sig(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------------------
# KTO loss: the formula, and TRL's KTOTrainer on the same batch

def test_kto_loss_is_the_formula():
    pol, ref = [-10.0, -20.0, -12.0], [-11.0, -19.0, -12.5]
    pol_kl, ref_kl = [-30.0, -28.0, -25.0], [-31.0, -27.5, -26.0]
    labels = [True, False, True]
    beta, wd, wu = 0.1, 1.5, 0.7
    z0 = max(0.0, sum(p - r for p, r in zip(pol_kl, ref_kl)) / 3)
    expected = [wd * (1 - _sig(beta * ((p - r) - z0))) if lab else wu * (1 - _sig(beta * (z0 - (p - r))))
                for p, r, lab in zip(pol, ref, labels)]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    losses, rewards, kl = kto_loss(t(pol), t(ref), t(pol_kl), t(ref_kl), torch.tensor(labels), beta=beta,
                                   desirable_weight=wd, undesirable_weight=wu)
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(pol, ref)])
    assert kl.item() == pytest.approx(z0)
    # the reference point is clamped at 0 and carries no gradient
    _, _, kl = kto_loss(t(pol), t(ref), t([-40.0] * 3), t([-30.0] * 3), torch.tensor(labels))
    assert kl.item() == 0.0
    p = t(pol).requires_grad_()
    pk = t(pol_kl).requires_grad_()
    kto_loss(p, t(ref), pk, t(ref_kl), torch.tensor(labels))[0].sum().backward()
    assert pk.grad is None and p.grad[0] < 0 < p.grad[1]  # desirable pushed up, undesirable down


def test_kto_loss_matches_trl(tiny_model_dir, tokenizer, tmp_path):
    """TRL's KTOTrainer._compute_loss on its own collated batch (with its KL rows), against kto_loss on log-probs we
    compute from the same batch with our sequence_logps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from lowrank_pref.logps import sequence_logps
    from lowrank_pref.model import reference_mode

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=False)
    rows = [{"prompt": f"Question {i}: how do I fix it?", "completion": f"Carefully, step {i}." if i % 3 else "No.",
             "label": bool(i % 3)} for i in range(6)]
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.1, max_length=64,
                         report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                         desirable_weight=1.3, undesirable_weight=0.8)
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        trl_loss = trl_loss[0] if isinstance(trl_loss, tuple) else trl_loss
        m = trainer.model
        kl_batch = {"input_ids": batch["KL_input_ids"], "attention_mask": batch["KL_attention_mask"],
                    "completion_mask": batch["KL_completion_mask"]}
        logps, _ = sequence_logps(m, batch)
        pol_kl, _ = sequence_logps(m, kl_batch)
        with reference_mode(m):
            ref, _ = sequence_logps(m, batch)
            ref_kl, _ = sequence_logps(m, kl_batch)
    losses, _, kl = kto_loss(logps, ref, pol_kl, ref_kl, batch["label"].bool(), beta=0.1, desirable_weight=1.3,
                             undesirable_weight=0.8)
    assert float((logps - ref).abs().max()) > 1e-3  # the adapters make a difference, so the check means something
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-6)
    assert kl.item() == pytest.approx(trainer._metrics["eval"]["kl"][-1], rel=1e-4, abs=1e-6)


def test_kto_weight_advice_follows_eq_8():
    from lowrank_pref.tasks.kto import weight_advice

    assert weight_advice(50, 50, 1.0, 1.0) is None
    assert weight_advice(120, 100, 1.0, 1.0) is None  # 120 / 100 = 1.2: within [1, 4/3]
    assert "kto.desirable_weight in [0.5, 0.67] or kto.undesirable_weight in [1.5, 2.0]" in \
        weight_advice(100, 50, 1.0, 1.0)  # 100 / 50 = 2 > 4/3
    advice = weight_advice(20, 100, 1.0, 1.0)  # 20 / 100: desirable weight 5 - 6.65 would balance it
    assert "kto.desirable_weight in [5.0, 6.65]" in advice and "kto.undesirable_weight in [0.15, 0.2]" in advice
    assert weight_advice(20, 100, 5.5, 1.0) is None


# ----------------------------------------------------------------------------------------------------------------
# Data: which tokens carry the SFT loss, KTO rows

def _sft_cfg(**overrides):
    return build_config("tiny", overrides={"task": "sft", "max_length": 256, "max_prompt_length": 128, **overrides})


def test_sft_loss_is_on_the_assistant_turns_only(tokenizer):
    from lowrank_pref.data import ensure_chat_template
    from lowrank_pref.tasks.sft import prepare_sft

    ensure_chat_template(tokenizer)
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name a fruit."},
                          {"role": "assistant", "content": "Apple."},
                          {"role": "user", "content": "Another?"},
                          {"role": "assistant", "content": "Pear."}]},
            {"messages": [{"role": "user", "content": "Only a question"}]}]
    examples, report, shown = prepare_sft(rows, tokenizer, source="mem", cfg=_sft_cfg())
    assert report.format == "messages" and report.usable == 1
    assert report.dropped == {"column 'messages': has no assistant turn to learn from": 1}
    (e,) = examples
    trained = tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])
    untrained = tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if not m])
    assert "Apple." in trained and "Pear." in trained
    assert "fruit" not in trained and "Another" not in trained and "Be brief" not in trained
    assert "fruit" in untrained and "Apple" not in untrained
    assert tokenizer.decode(e.input_ids) == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert [s[1] for s in shown[0]["segments"]].count(True) == 2


def test_sft_prompt_completion_text_and_chosen_rows(tokenizer):
    from lowrank_pref.data import ensure_chat_template
    from lowrank_pref.tasks.sft import prepare_sft

    ensure_chat_template(tokenizer)
    (e,), report, _ = prepare_sft([{"prompt": "Say hi.", "completion": " Hi there."}], tokenizer, source="m",
                                  cfg=_sft_cfg())
    assert report.format == "prompt_completion"
    assert [t for t, m in zip(e.input_ids, e.loss_mask) if m] == \
        tokenizer(" Hi there.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    (e,), report, _ = prepare_sft([{"text": "All of this is learned."}], tokenizer, source="m", cfg=_sft_cfg())
    assert report.format == "text" and all(e.loss_mask)
    pairs = [{"prompt": "Q?", "chosen": " Good answer.", "rejected": " Bad."}]
    (e,), report, _ = prepare_sft(pairs, tokenizer, source="m", cfg=_sft_cfg(**{"sft.source": "chosen"}))
    assert report.format == "standard (chosen answers)"
    assert "Good answer." in tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])
    (e,), _, _ = prepare_sft([{"prompt": "Say hi.", "completion": " Hi."}], tokenizer, source="m",
                             cfg=_sft_cfg(**{"sft.completion_only": "false"}))
    assert all(e.loss_mask)


def test_kto_rows_unpaired_and_pairs_split(tokenizer):
    from lowrank_pref.data import DataError, ensure_chat_template
    from lowrank_pref.tasks.kto import prepare_kto

    ensure_chat_template(tokenizer)
    cfg = build_config("tiny", overrides={"task": "kto"})
    rows = [{"prompt": "Q1?", "completion": " Yes, gladly.", "label": True},
            {"prompt": "Q2?", "completion": " No.", "label": "thumbs_down"},
            {"prompt": "Q3?", "completion": " Maybe.", "label": "sometimes"},
            {"prompt": [{"role": "user", "content": "Q4?"}], "completion": [{"role": "assistant", "content": "Ok."}],
             "label": 1}]
    items, report, _ = prepare_kto(rows, tokenizer, source="m", cfg=cfg)
    assert [(e.row, e.label) for e in items] == [(1, True), (2, False), (4, True)]
    assert report.dropped == {"column 'label': must be true/false (or 1/0, up/down), got 'sometimes'": 1}
    items, report, _ = prepare_kto([{"prompt": "Q?", "chosen": " Good.", "rejected": " Bad."}], tokenizer,
                                   source="m", cfg=cfg)
    assert report.format == "standard (pairs split)" and [e.label for e in items] == [True, False]
    assert items[0].prompt_ids == items[1].prompt_ids and items[0].completion_ids != items[1].completion_ids
    with pytest.raises(DataError, match="no 'completion'"):
        prepare_kto([{"prompt": "Q?", "answer": "A", "label": True}], tokenizer, source="m", cfg=cfg)


def test_sft_and_kto_examples_in_the_doctors_display_shape(tokenizer):
    """One side per example: an SFT conversation as alternating no-loss and loss runs with what max_length cut at the
    end struck through (here the whole second answer), a KTO example named by its label."""
    from lowrank_pref.data import ensure_chat_template
    from lowrank_pref.tasks import task_class

    ensure_chat_template(tokenizer)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another one, a long one?"},
            {"role": "assistant", "content": "Pear, and then a banana, and then a cherry, and many more fruits."}]
    sft = task_class("sft")(_sft_cfg(max_length=40, max_prompt_length=20))
    _, report, (shown,) = sft.prepare_rows([{"messages": msgs}], tokenizer, source="m")
    (side,) = shown["sides"]
    assert [kind for _, kind in side["pieces"]] == ["prompt", "loss", "prompt", "cut"]
    assert "".join(text for text, _ in side["pieces"]) == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert side["pieces"][1][0].startswith("Apple.") and "Pear" in side["pieces"][3][0]
    assert side["tokens"] == 40 and report.truncated_answers == 1 and report.unit == "examples"
    assert "1 example(s) (100%) had answers cut to max_length (40); the model never sees how" in report.summary()

    kto = task_class("kto")(build_config("tiny", overrides={"task": "kto"}))
    _, report, shown = kto.prepare_rows([{"prompt": "Q?", "chosen": " Good.", "rejected": " Bad."}], tokenizer,
                                        source="m")
    assert [e["sides"][0]["name"] for e in shown] == ["desirable", "undesirable"]
    assert [[kind for _, kind in e["sides"][0]["pieces"]] for e in shown] == [["prompt", "loss"]] * 2
    assert shown[1]["sides"][0]["pieces"][1][0] == " Bad.<|eos|>" and report.usable == 2


def test_kto_needs_two_examples_a_micro_batch():
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        build_config("tiny", overrides={"task": "kto", "batch_size": 1})
    with pytest.raises(ConfigError, match="rpo_alpha applies to the dpo task only"):
        build_config("tiny", overrides={"task": "sft", "rpo_alpha": 0.5})
    with pytest.raises(ConfigError, match="loss_type applies to the dpo task only"):
        build_config("tiny", overrides={"task": "kto", "loss_type": "ipo"})


# ----------------------------------------------------------------------------------------------------------------
# Runs

def test_sft_same_update_whatever_the_split(tmp_path, tiny_model_dir, pairs_file):
    """Each example weighs its answer tokens: 4 x 1 and 2 x 2 micro-steps give the same per-token loss and step."""
    from lowrank_pref.loop import train

    results = []
    for bs, accum in ((4, 1), (2, 2)):
        cfg = build_config("tiny", overrides={
            "task": "sft", "model": str(tiny_model_dir), "dataset": str(pairs_file), "max_steps": "2",
            "batch_size": str(bs), "gradient_accumulation_steps": str(accum), "max_grad_norm": "0",
            "lora.dropout": "0", "data.eval_fraction": "0", "warmup_ratio": "0", "lr_scheduler_type": "constant"})
        train(cfg, tmp_path / f"{bs}x{accum}")
        results.append([m for m in read_metrics(tmp_path / f"{bs}x{accum}" / "metrics.jsonl") if "loss" in m])
    for a, b in zip(*results):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["perplexity"] == pytest.approx(math.exp(b["loss"]))


def test_sft_then_dpo_from_the_sft_adapter(tmp_path, tiny_model_dir, pairs_file):
    """The pipeline's first two steps from the CLI: SFT on the chosen answers, then DPO whose reference is the SFT
    adapter (frozen), not the bare base."""
    sft = tmp_path / "sft"
    res = run_cli("--task", "sft", "--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir",
                  str(sft), "max_steps=12", "eval_steps=6")
    assert res.returncode == 0, res.stderr
    metrics = read_metrics(sft / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert train[-1]["loss"] < train[0]["loss"] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"token_accuracy", "perplexity", "examples_per_second"} <= set(train[-1])
    assert {"eval_token_accuracy", "eval_perplexity"} <= set(evals[-1])
    assert "reference" not in (sft / "config.yaml").read_text().split("\n", 2)[1]  # sft has none
    dpo = tmp_path / "dpo"
    res = run_cli("--task", "dpo", "--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir",
                  str(dpo), "max_steps=4", f"adapter={sft / 'adapter'}")
    assert res.returncode == 0, res.stderr
    assert f"reference: adapter (the starting adapter {sft / 'adapter'}, frozen)" in (dpo / "train.log").read_text()
    assert "reference: adapter" in (dpo / "config.yaml").read_text()
    first = [m for m in read_metrics(dpo / "metrics.jsonl") if "loss" in m][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == its reference at the start


def test_kto_learns_from_unpaired_imbalanced_data(tmp_path, tiny_model_dir):
    """Thumbs-up / thumbs-down rows, twice as many up as down: the log suggests weights, and on held-out rows the
    desirable answers gain log-ratio over the undesirable ones."""
    pairs = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", n=120, seed=3).read_text().splitlines()]
    rows = []
    for i, p in enumerate(pairs):
        if i % 3:
            rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        else:
            rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    data = tmp_path / "thumbs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "kto"
    res = run_cli("--task", "kto", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out),
                  "max_steps=24", "eval_steps=12", "data.eval_fraction=0.2")
    assert res.returncode == 0, res.stderr
    log = (out / "train.log").read_text()
    assert "kto.desirable_weight in [" in log and "reference: base" in log
    evals = [m for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m]
    last = evals[-1]
    assert last["eval_rewards/chosen"] > last["eval_rewards/rejected"]
    assert last["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0
    assert last["eval_kl"] >= 0
    train = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert train[-1]["loss"] < train[0]["loss"]


def test_a_reward_models_adapter_is_refused_as_a_starting_policy(tmp_path, tiny_model_dir, pairs_file):
    """PEFT would attach a SEQ_CLS adapter to a causal LM; the run refuses it, in one line, before the base loads."""
    adapter = tmp_path / "reward-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    res = run_cli("--task", "dpo", "--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir",
                  str(tmp_path / "out"), f"adapter={adapter}")
    assert res.returncode == 2, res.stderr
    assert f"error: adapter '{adapter}' is a reward model's (a score head), but task=dpo" in res.stderr
    assert "Traceback" not in res.stderr
    assert "trainable parameters" not in (tmp_path / "out" / "train.log").read_text()  # refused before loading


def test_sft_loss_and_token_accuracy_are_the_textbook_ones(tiny_model_dir, pairs_file):
    """The task's per-token NLL and token accuracy on a micro-batch equal cross-entropy and argmax hits computed from
    the model's full logits over the loss positions (the LM-head chunks and the frozen-head path change nothing)."""
    import torch.nn.functional as F

    from lowrank_pref.data import collate_rows
    from lowrank_pref.model import load_model, load_tokenizer
    from lowrank_pref.tasks import task_class

    cfg = build_config("tiny", overrides={"task": "sft", "model": str(tiny_model_dir), "dataset": str(pairs_file),
                                          "logprob_chunk_size": 7})
    tok = load_tokenizer(cfg)
    task = task_class("sft")(cfg)
    items = task.load_data(tok).train[:5]
    torch.manual_seed(0)
    model, _ = load_model(cfg, tok, keep_reference=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a policy that differs from the base
    task.setup(model, tok, None)
    losses, sums, _ = task.losses(model, items)
    weight = sum(task.weight(e) for e in items)
    batch = collate_rows([(e.input_ids, e.loss_mask) for e in items], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:][mask]
    picked = logits[:, :-1][mask]
    assert weight == mask.sum().item()
    assert (losses.sum() / weight).item() == pytest.approx(F.cross_entropy(picked, targets).item(), rel=1e-5)
    assert sums["token_accuracy"].item() == (picked.argmax(-1) == targets).sum().item()
    losses.sum().backward()  # the gradient reaches the adapters through the frozen-head kernel
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
