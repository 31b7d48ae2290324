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
   et al. 2024; RLOO's KL ``beta * sum_t (log pi - log pi_ref)`` in the reward, or GRPO's k3 as a loss term);
   ``online_dpo``, the best and worst of the k completions by the reward model as a DPO pair (Guo et al. 2024); or
   ``ppo`` (Ouyang et al. 2022, as TRL's PPOTrainer had it): a value adapter and head, copied from the reward model,
   train beside the policy; per-token rewards ``-beta * KL_t`` plus the score at the last token, GAE, whitened
   advantages, the clipped surrogate and clipped value loss, over ``rl.ppo_epochs`` steps of the same rollout.

PPO's steps: the run's steps (E - 1) * r + 1 ... E * r take rollout r's prompts (loop.Schedule.repeat, E =
``rl.ppo_epochs``); the first of them samples each micro-batch and stores its rollout (sequences, reference and
rollout log-probs, rewards, values, advantages, returns), the next E - 1 step on the stored one, each one PPO epoch
as one optimizer step over the rollout batch (TRL's num_mini_batches=1). A checkpoint between them keeps the stored
rollout and the value adapter, so a resumed run takes the uninterrupted run's steps.

Every pass runs with dropout off (set to 0 at attach): the log-probs of the rollout, the REINFORCE gradient and
PPO's ratio all assume the policy that sampled.

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
from ..losses import (KL_ESTIMATORS, gae, kl_k1, masked_mean, ppo_policy_loss, ppo_value_loss, preference_loss,
                      reinforce_loss, rloo_advantages, whiten)
from ..model import POLICY, REWARD, adapter_role, attach_reward, autocast, reference_mode, reward_adapter_dir
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


def reference_and_policy_logps(model, batch: dict, cfg, grad: bool = True):
    """The reference's per-token log-probs of ``batch``'s completions (adapters off, no grad), the mask, and the
    policy's, with grad or (``grad=False``, a rollout's own log-probs) without, in the same train-mode pass."""
    with autocast(cfg):
        with reference_mode(model):
            ref, mask = completion_token_logps(model, batch, cfg.logprob_chunk_size)
        with contextlib.nullcontext() if grad else torch.no_grad():
            logps, _ = completion_token_logps(model, batch, cfg.logprob_chunk_size)
    return ref, mask, logps


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


def kl_loss_term(logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """GRPO's KL as a loss term: the estimator's per-token KL, with grad, averaged over each row's completion tokens
    (N,)."""
    return masked_mean(KL_ESTIMATORS[estimator](logps, ref), mask, 1)


# ----------------------------------------------------------------------------------------------------------------
# The value role (ppo): a trainable copy of the reward adapter and its score head on the same base

VALUE = "value"


def no_dropout(model) -> int:
    """Set every dropout of the model to 0 (LoRA's ``lora_dropout`` modules, and attention dropout rates kept as
    numbers). Returns how many were on."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, count = 0.0, count + 1
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            module.attention_dropout, count = 0.0, count + 1
    return count


def attach_value(model, score_head: torch.nn.Linear) -> torch.nn.Linear:
    """The value model of InstructGPT's recipe, initialised from the reward model: a new adapter ``value`` on the
    same base, with the reward adapter's configuration (no dropout) and weights, and a trainable copy of its score
    head, returned. The policy stays the active adapter. Random draws of the new adapter's init (overwritten) come
    from a fork of the RNG, as attach_reward's (a resumed run attaches it after restoring the RNG)."""
    import copy

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    config = copy.deepcopy(model.peft_config[REWARD])
    config.inference_mode, config.lora_dropout = False, 0.0
    with torch.random.fork_rng(devices=devices):
        model.add_adapter(VALUE, config)
    model.set_adapter(POLICY)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in params:
            if f".{VALUE}." in name:
                params[name].copy_(params[name.replace(f".{VALUE}.", f".{REWARD}.")])
    head = torch.nn.Linear(score_head.in_features, 1, bias=False).to(score_head.weight.device)
    with torch.no_grad():
        head.weight.copy_(score_head.weight)
    return head


def value_parameters(model) -> list[torch.nn.Parameter]:
    """The value adapter's weights (PEFT's set_adapter turns their requires_grad on and off with the active
    adapter; the optimizer holds them whatever it is)."""
    return [p for n, p in model.named_parameters() if f".{VALUE}." in n]


@contextlib.contextmanager
def value_role(model):
    """The value adapter active and trainable (the policy's frozen meanwhile), in train mode; the policy after."""
    model.set_adapter(VALUE)
    try:
        yield model
    finally:
        model.set_adapter(POLICY)


def token_values(model, head: torch.nn.Linear, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """The value of each completion position with whatever adapter is active: the head on the hidden state that
    predicts completion token t + 1, (N, T - 1) fp32 as completion_token_logps lays out its log-probs (the state
    before each token, TRL's ``values[:, context_length - 1 : -1]``), 0 outside ``mask``."""
    decoder, _, _ = _decoder_and_head(model)
    dev = head.weight.device
    hidden = decoder(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                     use_cache=False).last_hidden_state
    picked = head(hidden[:, :-1][mask].to(head.weight.dtype)).squeeze(-1).float()
    return torch.zeros(mask.shape, dtype=torch.float32, device=dev).masked_scatter(mask, picked)


def save_value(model, head: torch.nn.Linear, reward_dir: Path, tokenizer, path: Path) -> None:
    """The value adapter and head as a reward run saves its model: the reward adapter's adapter_config.json (the
    value adapter's configuration is its copy) and its weights' names, with the value's weights."""
    import shutil

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reward_dir / "adapter_config.json", path / "adapter_config.json")
    reward_keys = load_file(str(reward_dir / "adapter_model.safetensors")).keys()
    (score_key,) = [k for k in reward_keys if k.split(".")[-2] == "score" or ".score." in k]
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=VALUE).items()}
    missing = set(reward_keys) - set(state) - {score_key}
    if missing:  # the names must be the reward run's, or the folder would not load as a reward model
        raise RuntimeError(f"value adapter weights are named unlike the reward model's: {sorted(missing)[:3]}")
    state[score_key] = head.weight.detach().cpu().contiguous()
    save_file(state, str(path / "adapter_model.safetensors"))
    tokenizer.save_pretrained(str(path))


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


def ppo_memory(cfg, arch, parts: dict) -> dict[str, float]:
    """GB that ppo adds: the value adapter and head with their gradients and optimizer state (as many bytes a
    parameter as the policy's LoRA: the memory model's ``lora_and_optimizer`` per parameter), and the rollout buffer
    of a step, k x batch_size x gradient_accumulation_steps rows of max_prompt_length + max_new_tokens positions, each
    three int64 (tokens, attention, completion mask), one bool and six fp32 (reference, rollout log-probs, rewards,
    values, advantages, returns). The value pass's activations are freed (its backward runs at once) before the
    policy pass: they add nothing to the peak."""
    GB = 1024 ** 3
    per_param = parts.get("lora_and_optimizer", 0) * GB / max(1, arch.lora_params(cfg.lora.r))
    value = (arch.lora_params(cfg.lora.r) + arch.hidden) * per_param
    rows = cfg.rl.k * cfg.batch_size * cfg.gradient_accumulation_steps
    buffer = rows * (cfg.max_prompt_length + cfg.rl.max_new_tokens) * (3 * 8 + 1 + 6 * 4)
    return {"value_adapter": value / GB, "rollout_buffer": buffer / GB}


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
             ("Entropy", {"entropy": "train"}),
             ("PPO: clipping and drift", {"policy/clipfrac": "policy clip fraction", "val/clipfrac": "value clip "
                                          "fraction", "policy/approxkl": "approx KL (rollout policy -> now)"}),
             ("PPO: losses", {"loss/policy": "policy", "loss/value": "value"})]
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
        E = cfg.rl.ppo_epochs
        if cfg.rl.algorithm == "ppo" and cfg.max_steps and cfg.max_steps % E:
            # each rollout takes ppo_epochs steps: a remainder would train the last rollout for fewer epochs
            raise ConfigError(f"max_steps={cfg.max_steps} is not a multiple of rl.ppo_epochs={E} (each rollout batch "
                              f"takes {E} steps, one per PPO epoch); use max_steps={cfg.max_steps // E * E or E} or "
                              f"{(cfg.max_steps // E + 1) * E}")

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
          beyond training's own activations and LM-head chunk adds to the peak;
        - ppo: ``value_adapter`` and ``rollout_buffer`` (:func:`ppo_memory`)."""
        GB = 1024 ** 3
        logits = 3 * cfg.rl.k * cfg.batch_size * arch.vocab * 4
        reward = arch.lora_params(cfg.lora.r) * 4 + arch.hidden * 4
        training = (parts.get("activations", 0) + parts.get("lm_head_chunk", 0)) * GB
        generation = kv_cache_bytes(cfg, arch, act_bytes) + logits
        out = {"reward_adapter": reward / GB, "generation": max(0.0, generation - training) / GB}
        if cfg.rl.algorithm == "ppo":
            out.update(ppo_memory(cfg, arch, parts))
        return out

    # -- the model -------------------------------------------------------------------------------------------------
    @property
    def steps_per_batch(self) -> int:
        """ppo: ``rl.ppo_epochs`` consecutive steps over one rollout batch (loop.Schedule.repeat)."""
        return self.cfg.rl.ppo_epochs if self.cfg.rl.algorithm == "ppo" else 1

    def attach(self, model, tokenizer) -> list:
        """The reward adapter (frozen), dropout off, and for ppo the value adapter and head (trainable, returned
        for the optimizer)."""
        from .. import distributed

        self.model = model
        self.attach_roles(model, tokenizer)
        # the rollouts' log-probs, the REINFORCE gradient and PPO's ratio all assume the policy that sampled: no
        # dropout in its passes (TRL's RL trainers turn it off too); eval mode can't, it also stops checkpointing
        off = no_dropout(model)
        if off:
            log.info("rl: dropout off in %d modules (lora.dropout=%s): every pass is the policy that sampled", off,
                     self.cfg.lora.dropout)
        if self.cfg.rl.algorithm != "ppo":
            return []
        if distributed.world().size > 1:
            raise ConfigError("rl.algorithm=ppo runs on one process (its rollout buffer is per process and is not "
                              "checkpointed across ranks); run it without --nproc-per-node, or use rl.algorithm=rloo")
        self.value_head = attach_value(model, self.score_head)
        self.buffer, self.buffer_rollout, self.step = {}, 0, 0
        params = value_parameters(model) + [self.value_head.weight]
        log.info("value model: adapter '%s' and a scalar head, initialised from the reward model (%s parameters)",
                 VALUE, f"{sum(p.numel() for p in params):,}")
        return params

    def setup(self, model, tokenizer, data: TaskData) -> dict:
        facts = super().setup(model, tokenizer, data)
        self.ref_cache = None  # reference log-probs of fresh samples are never asked for twice
        return {**facts, "reward_model": str(self.cfg.reward_model)}

    def begin_step(self, step: int, weight: float) -> None:
        """ppo: which epoch of which rollout this step is; the first epoch starts a new buffer."""
        E = self.steps_per_batch
        self.step_weight, self.micro, self.step = weight, 0, step
        self.epoch, rollout = (step - 1) % E, (step - 1) // E + 1
        if self.cfg.rl.algorithm == "ppo" and (self.epoch == 0 or self.buffer_rollout != rollout):
            self.buffer, self.buffer_rollout = {}, rollout

    # -- the loss --------------------------------------------------------------------------------------------------
    def sample(self, model, prompts: list) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """k completions per prompt from the policy, their raw scores and the scores as the objective takes them
        (clipped, the missing-eos penalty subtracted)."""
        cfg = self.cfg
        rollout = self.generate(model, prompts, cfg.rl.k)
        raw = self.rewards(model, rollout)
        scores = raw.clone()
        if cfg.rl.reward_clip:
            scores = scores.clamp(-cfg.rl.reward_clip, cfg.rl.reward_clip)
        if cfg.rl.missing_eos_penalty:
            ended = torch.tensor(rollout.ended, device=raw.device)
            scores = scores - cfg.rl.missing_eos_penalty * (~ended).float()
        return rollout, raw, scores

    def rollout_sums(self, rollout: Rollout, raw: torch.Tensor, seq_kl: torch.Tensor) -> dict:
        """The shared rl metrics of a rollout, summed over its prompts (each prompt's mean over its k; the KL's over
        the rows ``seq_kl`` has of each prompt, consecutive: online DPO's pair)."""
        k = self.cfg.rl.k
        B = len(rollout.prompts) // k
        lengths = torch.tensor([len(c) for c in rollout.completions], dtype=torch.float32)
        ended = torch.tensor(rollout.ended, dtype=torch.float32)
        return {"reward": raw.view(B, k).mean(1).sum(), "reward_std": raw.view(B, k).std(1, unbiased=False).sum(),
                "kl": seq_kl.view(B, -1).mean(1).sum(), "entropy": rollout.entropy.view(B, k).mean(1).sum(),
                "length": lengths.view(B, k).mean(1).sum(), "eos": ended.view(B, k).mean(1).sum()}

    def losses(self, model, prompts: list):
        if self.cfg.rl.algorithm == "ppo":
            return self.ppo_losses(model, prompts)
        cfg, k = self.cfg, self.cfg.rl.k
        rollout, raw, rewards = self.sample(model, prompts)
        if cfg.rl.whiten_rewards:
            rewards = whiten(rewards, shift_mean=False)
        if cfg.rl.algorithm == "online_dpo":
            return self.online_dpo_losses(model, rollout, raw, rewards)
        batch = self.sequences(rollout)
        ref, mask, logps = reference_and_policy_logps(model, batch, cfg)
        seq_logps = (logps * mask).sum(1)
        token_kl = KL_ESTIMATORS[cfg.rl.kl_estimator](logps.detach(), ref) * mask
        seq_kl = (kl_k1(logps.detach(), ref) * mask).sum(1)  # the logged KL: the k1 sum, whatever the estimator
        B = len(prompts)
        shaped = rewards - cfg.beta * token_kl.sum(1) if cfg.rl.kl_in_reward else rewards
        advantages = rloo_advantages(shaped, k)
        if cfg.rl.normalize_advantages:
            advantages = whiten(advantages)
        per = reinforce_loss(seq_logps, advantages)
        if not cfg.rl.kl_in_reward:  # GRPO's form: the KL estimate with grad, per token, as a loss term
            per = per + cfg.beta * kl_loss_term(logps, ref, mask, cfg.rl.kl_estimator)
        losses = per.view(B, k).mean(1)
        sums = {"loss": losses.detach().sum(), **self.rollout_sums(rollout, raw, seq_kl)}
        return losses, sums, int(batch["attention_mask"].sum())

    def online_dpo_losses(self, model, rollout: Rollout, raw: torch.Tensor, rewards: torch.Tensor):
        """Online DPO: the best and worst of each prompt's k completions by the (shaped) reward become a DPO pair.
        Only those 2 of the k go through the reference and the policy (with grad): the other k - 2 would cost a
        forward and backward each for no gradient. The logged KL is the pair's."""
        cfg, k = self.cfg, self.cfg.rl.k
        B, dev = len(rollout.prompts) // k, raw.device
        grouped = rewards.view(B, k)
        base = torch.arange(B, device=dev) * k
        rows = torch.stack([base + grouped.argmax(1), base + grouped.argmin(1)], 1).view(-1).tolist()  # c0 r0 c1 ..
        pair_rollout = Rollout([rollout.prompts[i] for i in rows], [rollout.completions[i] for i in rows],
                               [rollout.ended[i] for i in rows], rollout.entropy[rows])
        batch = self.sequences(pair_rollout)
        ref, mask, logps = reference_and_policy_logps(model, batch, cfg)
        seq_logps, ref_seq, lengths = (logps * mask).sum(1), (ref * mask).sum(1), mask.sum(1).float()
        c, r = slice(0, None, 2), slice(1, None, 2)
        pair, cr, rr = preference_loss("sigmoid", seq_logps[c], seq_logps[r], ref_seq[c], ref_seq[r],
                                       chosen_lengths=lengths[c], rejected_lengths=lengths[r], beta=cfg.beta)
        gap = grouped.max(1).values - grouped.min(1).values
        losses = pair * (gap > 0).float()  # all k scored alike: nothing to learn
        seq_kl = (kl_k1(logps.detach(), ref) * mask).sum(1)
        sums = {"loss": losses.detach().sum(), "rewards/margins": (cr - rr).sum(), "pair/reward_gap": gap.sum(),
                **self.rollout_sums(rollout, raw, seq_kl)}
        return losses, sums, int(batch["attention_mask"].sum())

    # -- PPO -------------------------------------------------------------------------------------------------------
    def ppo_rollout(self, model, prompts: list) -> dict:
        """One micro-batch's rollout for PPO's epochs (the first of them, or a buffer entry lost to a skipped step):
        the samples and their scores; the reference's and the sampling policy's per-token log-probs, the latter in
        a no-grad pass exactly like the training passes (train mode, no dropout), so the first epoch's ratio is 1;
        the per-token rewards (InstructGPT, TRL's PPOTrainer): ``-beta * KL_t`` on every completion token plus the
        score at the last one. Values, advantages and returns come in the first epoch's value pass."""
        cfg = self.cfg
        rollout, raw, scores = self.sample(model, prompts)
        batch = self.sequences(rollout)
        ref, mask, old = reference_and_policy_logps(model, batch, cfg, grad=False)
        seq_kl = (kl_k1(old, ref) * mask).sum(1)
        rewards = -cfg.beta * KL_ESTIMATORS[cfg.rl.kl_estimator](old, ref) * mask if cfg.rl.kl_in_reward else \
            torch.zeros_like(old)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask).argmax(1)  # (N,) each row's last completion token (every completion has one)
        rewards[torch.arange(len(last), device=mask.device), last] += scores
        if cfg.rl.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        sums = {k: float(v) for k, v in self.rollout_sums(rollout, raw, seq_kl).items()}
        return {"rows": [p.row for p in prompts], "batch": batch, "mask": mask, "ref": ref, "old_logps": old,
                "rewards": rewards, "sums": sums, "tokens": int(batch["attention_mask"].sum())}

    def ppo_losses(self, model, prompts: list):
        """One PPO epoch's losses on one micro-batch (Schulman et al. 2017; Ouyang et al. 2022, TRL's PPOTrainer).

        The value loss is backpropagated here, under the value adapter, scaled to its share of the step (as the
        shell scales the returned losses), so gradient checkpointing's recompute runs with the adapter that made the
        activations, and the value pass's activations are freed before the policy pass. The returned per-prompt
        losses are the policy's: the clipped surrogate (a row's token mean, the k rows' mean), plus ``beta`` times
        the mean per-token k3 KL when ``rl.kl_in_reward=false``."""
        cfg, k, B = self.cfg, self.cfg.rl.k, len(prompts)
        j, self.micro = self.micro, self.micro + 1
        entry = self.buffer.get(j)
        if entry is not None and entry["rows"] != [p.row for p in prompts]:
            raise RuntimeError(f"ppo buffer entry {j} holds rows {entry['rows'][:4]}, not this micro-batch's")
        if entry is None:
            if self.epoch:
                log.warning("ppo: no stored rollout for micro-batch %d in epoch %d (its first epoch was skipped): "
                            "sampling a new one", j, self.epoch + 1)
            entry = self.buffer[j] = {**self.ppo_rollout(model, prompts), "made_in_step": self.step}
        batch, mask = entry["batch"], entry["mask"]
        with value_role(model):
            with autocast(cfg):
                values = token_values(model, self.value_head, batch, mask)
            if "returns" not in entry:  # the rollout's own values: GAE's, the value clip's centre
                entry["old_values"] = values.detach()
                advantages, entry["returns"] = gae(entry["rewards"], entry["old_values"], mask, gamma=cfg.rl.gamma,
                                                   lam=cfg.rl.lam)
                entry["advantages"] = whiten(advantages, mask)
            vf, vf_clip = ppo_value_loss(values, entry["old_values"], entry["returns"], mask,
                                         cliprange_value=cfg.rl.cliprange_value)
            vf = vf.view(B, k).mean(1)
            if not torch.isfinite(vf).all():  # the loop skips the step; the next epoch samples this micro-batch anew
                self.buffer.pop(j, None)      # (replayed, a bad rollout would skip every epoch of it in a row)
                return torch.full((B,), float("nan"), device=vf.device), {}, entry["tokens"]
            (cfg.rl.vf_coef * vf.sum() / self.step_weight).backward()
        with autocast(cfg):
            logps, _ = completion_token_logps(model, batch, cfg.logprob_chunk_size)
        old = entry["old_logps"]
        pg, clipfrac = ppo_policy_loss(logps, old, entry["advantages"], mask, cliprange=cfg.rl.cliprange)
        if not cfg.rl.kl_in_reward:
            pg = pg + cfg.beta * kl_loss_term(logps, entry["ref"], mask, cfg.rl.kl_estimator)
        losses = pg.view(B, k).mean(1)
        if not torch.isfinite(losses).all():  # as a non-finite value loss: skipped, and sampled anew next epoch
            self.buffer.pop(j, None)
        d = logps.detach() - old
        per_prompt = lambda x: x.view(B, k).mean(1).sum()  # noqa: E731
        sums = {**entry["sums"], "loss": losses.detach().sum() + cfg.rl.vf_coef * vf.detach().sum(),
                "loss/policy": losses.detach().sum(), "loss/value": vf.detach().sum(),
                "policy/clipfrac": per_prompt(clipfrac), "val/clipfrac": per_prompt(vf_clip),
                "policy/approxkl": per_prompt(0.5 * masked_mean(d ** 2, mask, 1)),
                "val/ratio": per_prompt(masked_mean(d.exp(), mask, 1))}
        return losses, sums, entry["tokens"]

    # -- checkpoints: the value adapter and head, and the rollout buffer mid-rollout -----------------------------------
    BUFFERED = ("input_ids", "attention_mask", "completion_mask", "mask", "ref", "old_logps", "rewards",
                "old_values", "advantages", "returns")

    def state_dict(self, step: int) -> tuple[dict, dict] | None:
        """ppo: the value adapter and head; and, between the epochs of one rollout (not after its last), the buffer
        the next epochs read, so a resumed run takes exactly the uninterrupted run's steps."""
        if self.cfg.rl.algorithm != "ppo":
            return None
        tensors = {f"value/{n}": p for n, p in self.model.named_parameters() if f".{VALUE}." in n}
        tensors["value_head.weight"] = self.value_head.weight
        meta = {"rollout": self.buffer_rollout, "entries": {}}
        if step % self.steps_per_batch and (step - 1) // self.steps_per_batch + 1 == self.buffer_rollout:
            for j, e in self.buffer.items():
                # a micro-batch whose first epoch did not finish, or one sampled anew in the step a stop cut short
                if "returns" not in e or e.get("made_in_step", 0) > step:
                    continue
                meta["entries"][str(j)] = {"rows": e["rows"], "sums": e["sums"], "tokens": e["tokens"]}
                for name in self.BUFFERED:
                    tensors[f"buffer/{j}/{name}"] = e["batch"][name] if name in e["batch"] else e[name]
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        if self.cfg.rl.algorithm != "ppo":
            return
        if "value_head.weight" not in tensors:
            raise ConfigError("this checkpoint holds no value adapter: it was written by a run with another "
                              "rl.algorithm; resume with that algorithm, or start a new run for ppo")
        params = {f"value/{n}": p for n, p in self.model.named_parameters() if f".{VALUE}." in n}
        params["value_head.weight"] = self.value_head.weight
        try:
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(tensors[key])
            dev = self.value_head.weight.device
            self.buffer_rollout, self.buffer = int(meta.get("rollout", 0)), {}
            for j, facts in meta.get("entries", {}).items():
                e = {name: tensors[f"buffer/{j}/{name}"].to(dev) for name in self.BUFFERED}
                e["batch"] = {name: e.pop(name) for name in ("input_ids", "attention_mask", "completion_mask")}
                e["mask"] = e["mask"].bool()
                self.buffer[int(j)] = {**e, "rows": list(facts["rows"]), "sums": dict(facts["sums"]),
                                       "tokens": int(facts["tokens"])}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a missing name, a wrong shape
            raise ConfigError(f"the checkpoint's ppo state does not fit this run ({type(e).__name__}: {e}); start "
                              "a new run, or resume with the settings that wrote it") from None

    def save(self, model, tokenizer, run) -> None:
        """ppo: the trained value adapter and head in ``value/``, beside the policy's ``adapter/``, in the reward
        model's format (so it can be read, or given as ``reward_model=``)."""
        if self.cfg.rl.algorithm != "ppo":
            return
        import os

        tmp = run.path / f".value.tmp-{os.getpid()}"
        save_value(model, self.value_head, reward_adapter_dir(self.cfg.reward_model), tokenizer, tmp)
        run.install_dir(tmp, run.path / "value")

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
