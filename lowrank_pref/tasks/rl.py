"""Reinforcement learning against the user's reward model, every role an adapter state of one 4-bit base.

    python -m lowrank_pref.run --preset tiny-reward --output-dir runs/rm
    python -m lowrank_pref.run --preset tiny-rl reward_model=runs/rm --output-dir runs/rl

Roles (model.py): the policy is the trainable adapter; the reference is adapters off (or the frozen starting
adapter, e.g. an SFT one); the reward model is the reward run's LoRA loaded as a second, frozen adapter ``reward``
plus its saved score head. Switching roles is a context manager, never a second copy of the weights.

One micro-batch of B prompts (one item = one prompt):

1. rollouts: the policy samples ``rl.k`` completions per prompt with transformers' ``generate`` (KV cache, batched,
   ``temperature``/``top_p``, stop at eos, at most ``rl.max_new_tokens``), in eval mode and without grad;
2. rewards: each completion is rendered as the reward model was trained (prompt + answer through the chat template,
   or + eos for plain text) and scored by the reward adapter and its head, at the last non-padding token, as
   transformers' sequence classifier pools; completions without eos can lose ``rl.missing_eos_penalty``;
3. the reference's per-token log-probs of the sampled tokens (adapters off), then the policy's with grad;
4. the loss (``rl.algorithm``): ``rloo``, REINFORCE with the leave-one-out baseline over the k completions (Ahmadian
   et al. 2024; RLOO's KL ``beta * sum_t (log pi - log pi_ref)`` in the reward, or GRPO's k3 as a loss term); or
   ``online_dpo``, the best and worst of the k completions by the reward model as a DPO pair (Guo et al. 2024).

Rollouts draw from the global torch RNG, which the run shell checkpoints, so a resumed run samples what an
uninterrupted one does. Eval samples k completions per held-out prompt from the policy and, with the same seed, k
from the reference, scores both with the reward model and logs the policy's mean reward against the reference's,
the win rate (ties count half) and the KL; a few of them go to ``samples.jsonl`` so a person reads what changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from .. import data as data_mod
from ..config import ConfigError
from ..data import DataError, DataReport, RowError
from ..logps import _decoder_and_head, head_token_logps
from ..losses import KL_ESTIMATORS, kl_k1, preference_loss, reinforce_loss, rloo_advantages, whiten
from ..model import REWARD, adapter_role, attach_reward, autocast, reference_mode
from .base import Task, TaskData

log = logging.getLogger("lowrank_pref")


class Prompt:
    """One prompt: its tokens (cut from the left to max_prompt_length), its text as rendered, and the raw prompt
    (text or messages) to render completions with for the reward model."""
    __slots__ = ("prompt_ids", "prompt", "text", "templated", "row")

    def __init__(self, prompt_ids: list[int], prompt, text: str, templated: bool, row: int = 0):
        self.prompt_ids, self.prompt, self.text, self.templated, self.row = prompt_ids, prompt, text, templated, row

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)


def prompt_format(rows: list[dict], source: str) -> str:
    """``prompts`` (a prompt column, text or messages, without answers) or a preference format whose prompts are
    used (data.detect_format, which names the missing columns when neither fits)."""
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    cols = set(rows[0])
    if "prompt" in cols and not {"chosen", "rejected"} <= cols:
        return "prompts"
    try:
        return data_mod.detect_format(rows, source)
    except DataError:
        raise DataError(f"{source}: rl data needs a prompt column (text or a message list), or preference data "
                        f"(prompt/chosen/rejected) whose prompts are used; columns are {', '.join(sorted(cols))}. "
                        "Map yours with e.g. data.columns.prompt=<your column>") from None


def prepare_prompts(rows: list[dict], tokenizer, *, source: str, cfg, n_examples: int = 3):
    """Validate, render and tokenize prompts. Returns usable prompts, the report, and a few shown examples."""
    rows = data_mod.apply_column_mapping(rows, cfg.data.columns, source)
    fmt = prompt_format(rows, source)
    report = DataReport(source=source, format=fmt if fmt == "prompts" else f"{fmt} (its prompts)",
                        total_rows=len(rows), usable=0, max_length=cfg.max_prompt_length, unit="prompts",
                        lengths_are="prompt", answer_cut="")
    prompts, shown = [], []
    for i, row in enumerate(rows, 1):
        try:
            if fmt == "prompts":
                raw = row.get("prompt")
                prompt = data_mod._text(row, "prompt") if isinstance(raw, str) else data_mod._messages(
                    raw, "prompt", default_role="user")
            else:
                prompt = data_mod.normalize_row(row, fmt)["prompt"]
            if isinstance(prompt, str):
                text, templated = prompt, False
            else:
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                templated = True
            ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
            if not ids:
                raise RowError("prompt", "is empty after tokenization")
        except RowError as e:
            if cfg.data.on_bad_rows == "error":
                raise DataError(f"{source}: row {i}, {e}. Fix the row, or set data.on_bad_rows=skip to skip rows like "
                                "it") from None
            report.drop(str(e), i)
            continue
        report.lengths.append(len(ids))
        head = ids[:max(0, len(ids) - cfg.max_prompt_length)]
        ids = ids[len(head):]
        report.truncated_prompts += bool(head)
        prompts.append(Prompt(ids, prompt, text, templated, row=i))
        if len(shown) < n_examples:
            side = {"name": "prompt", "tokens": len(ids), "loss_tokens": 0,
                    "pieces": data_mod.display_pieces(tokenizer, [(head, "cut"), (ids, "prompt")])}
            shown.append({"row": i, "prompt": text, "prompt_tokens": len(ids), "truncated": bool(head),
                          "templated": templated, "note": f"prompt {len(ids)} tokens; the policy writes the answers",
                          "sides": [side]})
    report.usable = len(prompts)
    return prompts, report, shown


class _Entropy:
    """A logits processor that records the entropy of the policy's next-token distribution at each generated
    position and changes nothing. transformers runs user processors before temperature and top-p, so these are the
    model's own logits."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        logp = scores.float().log_softmax(-1)
        self.steps.append(-(logp.exp() * logp).nan_to_num().sum(-1))
        return scores


def completion_token_logps(model, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens: (N, T - 1) fp32, entry t the log-prob of token t + 1, and the
    (N, T - 1) bool mask of completion tokens. Only those positions go through the LM head (logps.py's kernel)."""
    decoder, head, softcap = _decoder_and_head(model)
    dev = head.weight.device
    ids = batch["input_ids"].to(dev)
    hidden = decoder(input_ids=ids, attention_mask=batch["attention_mask"].to(dev), use_cache=False).last_hidden_state
    mask = batch["completion_mask"][:, 1:].to(dev).bool()
    tokens = head_token_logps(head, softcap, hidden[:, :-1][mask], ids[:, 1:][mask], chunk_size)
    return torch.zeros(mask.shape, dtype=torch.float32, device=dev).masked_scatter(mask, tokens), mask


def pooled_scores(model, head: torch.nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  pad_id: int) -> torch.Tensor:
    """The score head on the hidden state of each row's last non-padding token, exactly as transformers' sequence
    classifier pools (``(arange(T) * (ids != pad)).argmax(-1)``), with whatever adapter is active. fp32 (N,)."""
    decoder, _, _ = _decoder_and_head(model)
    dev = head.weight.device
    input_ids = input_ids.to(dev)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask.to(dev), use_cache=False).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=dev, dtype=torch.int32)
    last = (positions * (input_ids != pad_id).to(torch.int32)).argmax(-1)
    pooled = hidden[torch.arange(input_ids.shape[0], device=dev), last]
    return head(pooled.to(head.weight.dtype)).squeeze(-1).float()


class Rollout:
    """k completions of each prompt of a micro-batch, flattened (B * k rows, a prompt's k consecutive)."""

    def __init__(self, prompts: list[Prompt], completions: list[list[int]], ended: list[bool],
                 entropy: torch.Tensor):
        self.prompts, self.completions, self.ended, self.entropy = prompts, completions, ended, entropy


def kv_cache_bytes(cfg, arch, act_bytes: int) -> int:
    """The KV cache of one rollout: keys and values of every layer for k x batch_size rows of max_prompt_length +
    max_new_tokens tokens, ``act_bytes`` each (2 under a GPU's 16-bit autocast, 4 in fp32)."""
    rows = cfg.rl.k * cfg.batch_size
    return 2 * arch.layers * arch.kv_dim * rows * (cfg.max_prompt_length + cfg.rl.max_new_tokens) * act_bytes


class RewardRoles:
    """Sampling from the policy (or the reference) and scoring with the reward adapter, on one base. Needs ``cfg``,
    and, after :meth:`attach_roles`, the tokenizer, the padding and eos ids and the reward model's score head."""

    def attach_roles(self, model, tokenizer) -> None:
        self.tokenizer, self.pad_id, self.eos_id = tokenizer, tokenizer.pad_token_id, tokenizer.eos_token_id
        self.score_head = attach_reward(model, self.cfg)
        log.info("reward model: %s (adapter '%s' on the same base, with its score head)", self.cfg.reward_model,
                 REWARD)

    def generate(self, model, prompts: list[Prompt], k: int, role=None) -> Rollout:
        """k sampled completions per prompt from the policy (or, with ``role``, e.g. ``reference_mode``, from that
        role), left-padded prompts through ``generate`` with the KV cache, without grad, in eval mode."""
        cfg = self.cfg
        rows = [p.prompt_ids for p in prompts for _ in range(k)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is generated at the same position
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        dev = next(model.parameters()).device
        entropy = _Entropy()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (role(model) if role else contextlib.nullcontext()), autocast(cfg):
                out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                                     temperature=cfg.rl.temperature, top_p=cfg.rl.top_p, top_k=0,
                                     max_new_tokens=cfg.rl.max_new_tokens, eos_token_id=self.eos_id,
                                     pad_token_id=self.pad_id, use_cache=True, logits_processor=[entropy],
                                     # samples from pi itself: no sampling rule of the model's generation_config
                                     # (Qwen's repetition_penalty, ...) may reshape it (the gradient and KL assume pi)
                                     repetition_penalty=1.0, no_repeat_ngram_size=0, min_p=0.0, typical_p=1.0,
                                     epsilon_cutoff=0.0, eta_cutoff=0.0)
        finally:
            model.train(was_training)
        completions, ended = [], []
        for row in out[:, width:].tolist():
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            completions.append(row[:end])
            ended.append(self.eos_id in row)
        steps = torch.stack(entropy.steps, 1) if entropy.steps else torch.zeros(len(rows), 0)
        lengths = torch.tensor([len(c) for c in completions])
        valid = torch.arange(steps.shape[1])[None, :] < lengths[:, None]
        per_row = (steps.cpu() * valid).sum(1) / lengths.clamp(min=1)
        return Rollout([p for p in prompts for _ in range(k)], completions, ended, per_row)

    def reward_rows(self, rollout: Rollout) -> list[list[int]]:
        """Each (prompt, completion) as the reward model was trained on it: the completion's text rendered after the
        prompt by the chat template (message prompts) or followed by eos (text prompts), as data.py renders
        answers."""
        tok = self.tokenizer
        texts = []
        for p, c in zip(rollout.prompts, rollout.completions):
            answer = tok.decode(c, skip_special_tokens=True)
            if p.templated:
                _, (answer,), _ = data_mod.render_answers(p.prompt, {"completion": [
                    {"role": "assistant", "content": answer}]}, tok)
            texts.append((p.text, [answer], p.templated))
        answers = data_mod.tokenize_answers(tok, texts)
        return [p.prompt_ids + a[0] for p, (_, a) in zip(rollout.prompts, answers)]

    def rewards(self, model, rollout: Rollout) -> torch.Tensor:
        """The reward model's score of each completion (B * k,), fp32."""
        batch = data_mod.collate_rows([(r, [0] * len(r)) for r in self.reward_rows(rollout)], self.pad_id)
        with adapter_role(model, REWARD), autocast(self.cfg):
            return pooled_scores(model, self.score_head, batch["input_ids"], batch["attention_mask"], self.pad_id)

    def sequences(self, rollout: Rollout) -> dict:
        """prompt + sampled completion rows (right-padded), completion tokens marked, for the log-prob passes."""
        return data_mod.collate_rows([(p.prompt_ids + c, [0] * len(p.prompt_ids) + [1] * len(c))
                                      for p, c in zip(rollout.prompts, rollout.completions)], self.pad_id)



class Judge(RewardRoles):
    """The eval of a dpo, sft or kto run given ``reward_model=``: its policy against its reference on the held-out
    prompts, judged by the reward model (:func:`judge`), beside the task's own eval metrics."""

    def __init__(self, cfg, model, tokenizer, eval_items: list):
        self.cfg = cfg
        self.attach_roles(model, tokenizer)
        # the held-out rows' prompts, read again as prompts (the task's items keep tokens, not the prompt to render
        # completions after)
        # the held-out rows as load_task_data chose them: a separate eval source or split, else held out of training
        if cfg.eval_dataset or (cfg.eval_split and data_mod.has_named_splits(cfg.dataset)):
            source, split = cfg.eval_dataset or cfg.dataset, cfg.eval_split or "train"
        else:
            source, split = cfg.dataset, cfg.dataset_split
        rows = data_mod.load_rows(source, split, cfg.trust_remote_code)
        prompts, _, _ = prepare_prompts(rows, tokenizer, source=source, cfg=cfg)
        wanted = {item.row for item in eval_items}
        self.prompts = [p for p in prompts if p.row in wanted]

    def __call__(self, model, batch_size: int, *, should_stop=None, step: int = 0, run_dir=None) -> dict | None:
        """The judgement under ``eval_judge_*`` names, apart from the task's own eval metrics (kto has an eval_kl of
        its own, its reference point)."""
        out = judge(self, model, self.prompts, batch_size, should_stop=should_stop, step=step, run_dir=run_dir)
        return None if out is None else {"eval_judge_" + k.removeprefix("eval_"): v for k, v in out.items()}


class RlTask(RewardRoles, Task):
    name = "rl"
    unit = "prompts"
    sequences_per_item = 4  # the default rl.k; the memory plan's own numbers come from micro_step_tokens
    shared_prompt = False
    uses_reference = True
    plots = [("Reward", {"reward": "train (policy samples)", "eval_reward": "eval policy",
                         "eval_reward_reference": "eval reference"}),
             ("KL to the reference", {"kl": "train", "eval_kl": "eval"}),
             ("Win rate over the reference", {"eval_win_rate": "eval"}),
             ("Completions", {"length": "tokens", "eos": "share ending in eos"}),
             ("Entropy", {"entropy": "train"})]
    fields = ("reward_model", "rl.algorithm", "beta", "rl.k", "rl.max_new_tokens")

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.max_prompt_length + cfg.rl.max_new_tokens > cfg.max_length:
            raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) + rl.max_new_tokens "
                              f"({cfg.rl.max_new_tokens}) exceed max_length ({cfg.max_length}); raise max_length or "
                              "lower one of them")
        if not cfg.rl.kl_in_reward and cfg.rl.kl_estimator == "k1":
            # as a loss term k1's gradient is grad log pi, whose expectation under pi is zero: no penalty at all
            raise ConfigError("rl.kl_in_reward=false with rl.kl_estimator=k1 puts no KL penalty on the policy (k1's "
                              "gradient averages to zero under the policy's own samples); use rl.kl_estimator=k3 "
                              "(GRPO's), or rl.kl_in_reward=true")

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_rows(self, rows, tokenizer, source):
        return prepare_prompts(rows, tokenizer, source=source, cfg=self.cfg)

    def load_data(self, tokenizer) -> TaskData:
        # before the data and the model: a missing or wrong reward model fails in seconds (the presets leave it to the
        # command line, so it is not a config check)
        if not self.cfg.reward_model:
            raise ConfigError("task=rl needs reward_model=<a reward run folder>: train one first with --task reward "
                              "on the same model, then give its run folder (or its adapter/)")
        return super().load_data(tokenizer)

    def size(self, item: Prompt) -> int:
        return item.num_tokens + self.cfg.rl.max_new_tokens

    def micro_step_tokens(self, items: list) -> tuple[int, int]:
        rows = self.cfg.rl.k * len(items)
        return rows * (max(p.num_tokens for p in items) + self.cfg.rl.max_new_tokens), rows * self.cfg.rl.max_new_tokens

    @classmethod
    def memory_terms(cls, cfg, arch, act_bytes: int, parts: dict) -> dict[str, float]:
        """GB this task adds to the memory model's parts (memory.estimate), from the architecture alone:

        - ``reward_adapter``: the reward model's LoRA (fp32, at this run's rank; the reward run's own may differ) and
          its score head, held for the whole run;
        - ``generation``: while sampling, the KV cache of k x batch_size rows of (max_prompt_length + max_new_tokens)
          tokens (keys and values, every layer) and each step's fp32 logits (the sampler's and the entropy
          record's). Generation runs without grad before the training pass builds its graph, so only what it needs
          beyond training's own activations and LM-head chunk adds to the peak."""
        GB = 1024 ** 3
        logits = 3 * cfg.rl.k * cfg.batch_size * arch.vocab * 4
        reward = arch.lora_params(cfg.lora.r) * 4 + arch.hidden * 4
        training = (parts.get("activations", 0) + parts.get("lm_head_chunk", 0)) * GB
        generation = kv_cache_bytes(cfg, arch, act_bytes) + logits
        return {"reward_adapter": reward / GB, "generation": max(0.0, generation - training) / GB}

    # -- the model -------------------------------------------------------------------------------------------------
    def setup(self, model, tokenizer, data: TaskData) -> dict:
        facts = super().setup(model, tokenizer, data)
        self.ref_cache = None  # reference log-probs of fresh samples are never asked for twice
        self.attach_roles(model, tokenizer)
        return {**facts, "reward_model": str(self.cfg.reward_model)}

    # -- the loss --------------------------------------------------------------------------------------------------
    def losses(self, model, prompts: list):
        cfg, k = self.cfg, self.cfg.rl.k
        rollout = self.generate(model, prompts, k)
        raw = self.rewards(model, rollout)
        dev = raw.device
        ended = torch.tensor(rollout.ended, device=dev)
        rewards = raw.clone()
        if cfg.rl.reward_clip:
            rewards = rewards.clamp(-cfg.rl.reward_clip, cfg.rl.reward_clip)
        if cfg.rl.missing_eos_penalty:
            rewards = rewards - cfg.rl.missing_eos_penalty * (~ended).float()
        if cfg.rl.whiten_rewards:
            rewards = whiten(rewards, shift_mean=False)
        batch = self.sequences(rollout)
        with autocast(cfg):
            with reference_mode(model):
                ref, mask = completion_token_logps(model, batch, cfg.logprob_chunk_size)
            logps, _ = completion_token_logps(model, batch, cfg.logprob_chunk_size)
        seq_logps = (logps * mask).sum(1)
        token_kl = KL_ESTIMATORS[cfg.rl.kl_estimator](logps.detach(), ref) * mask
        seq_kl = (kl_k1(logps.detach(), ref) * mask).sum(1)  # the logged KL: the k1 sum, whatever the estimator
        B = len(prompts)
        sums = {}
        if cfg.rl.algorithm == "rloo":
            shaped = rewards - cfg.beta * token_kl.sum(1) if cfg.rl.kl_in_reward else rewards
            advantages = rloo_advantages(shaped, k)
            if cfg.rl.normalize_advantages:
                advantages = whiten(advantages)
            per = reinforce_loss(seq_logps, advantages)
            if not cfg.rl.kl_in_reward:  # GRPO's form: the KL estimate with grad, per token, as a loss term
                kl_grad = KL_ESTIMATORS[cfg.rl.kl_estimator](logps, ref) * mask
                per = per + cfg.beta * kl_grad.sum(1) / mask.sum(1).clamp(min=1)
            losses = per.view(B, k).mean(1)
        else:  # online DPO: best and worst completion of each prompt by the (shaped) reward
            grouped = rewards.view(B, k)
            best, worst = grouped.argmax(1), grouped.argmin(1)
            base = torch.arange(B, device=dev) * k
            c, r = base + best, base + worst
            ref_seq = (ref * mask).sum(1)
            lengths = mask.sum(1).float()
            pair, cr, rr = preference_loss("sigmoid", seq_logps[c], seq_logps[r], ref_seq[c], ref_seq[r],
                                           chosen_lengths=lengths[c], rejected_lengths=lengths[r], beta=cfg.beta)
            decided = (grouped.max(1).values > grouped.min(1).values).float()  # all k scored alike: nothing to learn
            losses = pair * decided
            sums.update({"rewards/margins": (cr - rr).sum(), "pair/reward_gap": (grouped.max(1).values
                                                                                - grouped.min(1).values).sum()})
        lengths = torch.tensor([len(c) for c in rollout.completions], dtype=torch.float32)
        sums.update({"loss": losses.detach().sum(), "reward": raw.view(B, k).mean(1).sum(),
                     "reward_std": raw.view(B, k).std(1, unbiased=False).sum(),
                     "kl": seq_kl.view(B, k).mean(1).sum(), "entropy": rollout.entropy.view(B, k).mean(1).sum(),
                     "length": lengths.view(B, k).mean(1).sum(), "eos": ended.float().view(B, k).mean(1).sum()})
        tokens = int(batch["attention_mask"].sum())
        return losses, sums, tokens

    # -- eval: policy against the reference, judged by the reward model ---------------------------------------------
    def evaluate(self, model, items: list, batch_size: int, *, should_stop=None, step: int = 0,
                 run_dir: Path | None = None) -> dict | None:
        return judge(self, model, items, batch_size, should_stop=should_stop, step=step, run_dir=run_dir)

    @classmethod
    def diagnose(cls, metrics: list[dict]) -> list[tuple[str, str]]:
        """The policy drifting far from the reference (reward hacking), and the reward model not preferring it."""
        from ..diagnostics import series

        out = []
        kl = series(metrics, "kl")
        if kl and kl[-1][1] > 20:
            out.append(("warn", f"The KL to the reference reached {kl[-1][1]:.1f} nats a completion: the policy has "
                                "moved far from the reference and may be exploiting the reward model. Raise beta, "
                                "lower the learning rate, or read samples.jsonl."))
        win = series(metrics, "eval_win_rate")
        if len(win) >= 2 and win[-1][1] < 0.5:
            out.append(("warn", "The reward model prefers the reference's completions to the policy's on held-out "
                                "prompts (win rate below one half): raise the learning rate or the number of steps, "
                                "or check the reward model's own eval accuracy."))
        return out


def judge(task, model, prompts: list, batch_size: int, *, should_stop=None, step: int = 0,
          run_dir: Path | None = None) -> dict | None:
    """Eval of the policy against the reference by the reward model, on held-out prompts: ``rl.k`` completions each
    from the policy and, with the same seed, from the reference; their mean rewards, the policy's win rate over the
    paired samples (ties count half), its KL and completion length. A few go to ``samples.jsonl``. The RNG is forked
    and seeded, so eval neither moves training's RNG nor depends on when it runs. None when ``should_stop()`` turns
    true between batches."""
    cfg, k = task.cfg, task.cfg.rl.k
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    totals = {"reward": 0.0, "reward_reference": 0.0, "win_rate": 0.0, "kl": 0.0, "length": 0.0, "eos": 0.0}
    samples = []
    for start in range(0, len(prompts), batch_size):
        if should_stop is not None and should_stop():
            return None
        batch = prompts[start:start + batch_size]
        rolls = {}
        for name, role in (("policy", None), ("reference", reference_mode)):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(cfg.seed * 1_000_003 + start)  # the same draws for both: a paired comparison
                rolls[name] = task.generate(model, batch, k, role=role)
        mine, theirs = task.rewards(model, rolls["policy"]), task.rewards(model, rolls["reference"])
        seqs = task.sequences(rolls["policy"])
        with autocast(cfg):
            with reference_mode(model):
                ref, mask = completion_token_logps(model, seqs, cfg.logprob_chunk_size)
            with torch.no_grad():
                was = model.training
                model.eval()
                try:
                    logps, _ = completion_token_logps(model, seqs, cfg.logprob_chunk_size)
                finally:
                    model.train(was)
        totals["reward"] += float(mine.sum())
        totals["reward_reference"] += float(theirs.sum())
        totals["win_rate"] += float((mine > theirs).float().sum() + 0.5 * (mine == theirs).float().sum())
        totals["kl"] += float(((logps - ref) * mask).sum())
        totals["length"] += sum(len(c) for c in rolls["policy"].completions)
        totals["eos"] += sum(rolls["policy"].ended)
        for i, p in enumerate(batch):
            if start + i >= cfg.rl.eval_samples:
                break
            decode, j = task.tokenizer.decode, i * k  # each prompt's first sample
            samples.append({"step": step, "row": p.row, "prompt": p.text,
                            "completion": decode(rolls["policy"].completions[j], skip_special_tokens=True),
                            "reward": round(float(mine[j]), 4),
                            "reference_completion": decode(rolls["reference"].completions[j],
                                                           skip_special_tokens=True),
                            "reference_reward": round(float(theirs[j]), 4)})
    n = max(len(prompts) * k, 1)
    if run_dir is not None and samples:
        write_samples(Path(run_dir) / "samples.jsonl", samples, step)
    return {f"eval_{k}": v / n for k, v in totals.items()}


def write_samples(path: Path, samples: list[dict], step: int) -> None:
    """Append this eval's samples; lines of this step or later from before a resume are dropped first, so a resumed
    run's file reads as an uninterrupted one's."""
    from ..artifacts import atomic_write_text

    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) < step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
    atomic_write_text(path, "".join(line + "\n" for line in kept + [json.dumps(s) for s in samples]))


TASK = RlTask
