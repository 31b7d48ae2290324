"""Use a trained run: generate from the policy and the reference side by side, or score answers with a reward model.

The run's own ``config.yaml`` says how its base was loaded; the adapter is the run's final one, or the latest
checkpoint's for a run that was stopped. The reference is what training used: the base with adapters off, or the
starting adapter.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import torch

from .artifacts import RunDir
from .config import ConfigError, build_config
from .data import Pair, collate, ensure_chat_template, render, tokenize_rendered
from .logps import reward_scores
from .model import POLICY, REFERENCE, device, load_base, reference_mode


def adapter_of(run: RunDir) -> Path:
    if (run.adapter / "adapter_config.json").is_file():
        return run.adapter
    latest = run.latest_checkpoint()
    if latest and (latest[1] / "adapter" / "adapter_config.json").is_file():
        return latest[1] / "adapter"
    raise ConfigError(f"run '{run.path.name}' has no adapter yet: it is written at the first checkpoint and at the "
                      "end of training")


def _one_at_a_time(method):
    """One call at a time on a loaded run: its roles switch the one model's active adapter (the app answers up to four
    requests at once, and two tabs may ask the same run)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class Trained:
    """A run's base model (quantized as in training) with its adapter, loaded once for inference."""

    def __init__(self, run_path: str | Path):
        from peft import PeftModel
        from transformers import AutoTokenizer

        self.run = RunDir(run_path)
        if not self.run.config.is_file():
            raise ConfigError(f"run '{self.run.path.name}' has no config.yaml yet")
        self.cfg = build_config(config_file=str(self.run.config))
        self.adapter = adapter_of(self.run)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.adapter))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ensure_chat_template(self.tokenizer, self.cfg.data.chat_template)
        base = load_base(self.cfg, self.tokenizer, for_training=False)
        self.model = PeftModel.from_pretrained(base, str(self.adapter), adapter_name=POLICY)
        if self.cfg.adapter:
            self.model.load_adapter(self.cfg.adapter, adapter_name=REFERENCE)
            self.model.set_adapter(POLICY)
        self.model.eval()
        self.task = self.cfg.task
        self._reward = None  # the run's reward model (tasks/rl.py's RewardRoles), attached when first asked
        self._lock = threading.RLock()

    def _prompt_ids(self, prompt: str | list[dict], raw: bool) -> torch.Tensor:
        """Token ids of a prompt: a user message, a conversation (a list of chat messages, the user's last), or with
        ``raw`` the text as written. Cut from the left to max_prompt_length, as training cut prompts."""
        if raw:  # the prompt as written, for models trained on plain-text transcripts (HH-RLHF style)
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids[:, -self.cfg.max_prompt_length:].to(device())

    @_one_at_a_time
    @torch.no_grad()
    def reply(self, prompt: str | list[dict], *, reference: bool = False, raw: bool = False, max_new_tokens: int = 64,
              sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
        """One answer of the policy (or, ``reference``, of the reference) to a prompt or conversation: greedy, or
        sampled at ``temperature`` with nucleus ``top_p`` (seeded, so one setting gives one answer)."""
        ids = self._prompt_ids(prompt, raw)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, use_cache=True,
                      pad_token_id=self.tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
            torch.manual_seed(seed)
        else:  # the model's generation_config may carry sampling defaults that greedy decoding warns about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if reference:
            with reference_mode(self.model):
                out = self.model.generate(input_ids=ids, **kwargs)
        else:
            out = self.model.generate(input_ids=ids, **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def generate(self, prompt: str, max_new_tokens: int = 64, raw: bool = False, **sampling) -> tuple[str, str]:
        """The answers of the policy and of the reference to one user message (or a raw prompt); greedy unless
        ``sampling`` says ``sample=True`` (with ``temperature``, ``top_p``)."""
        return (self.reply(prompt, raw=raw, max_new_tokens=max_new_tokens, **sampling),
                self.reply(prompt, reference=True, raw=raw, max_new_tokens=max_new_tokens, **sampling))

    @_one_at_a_time
    @torch.no_grad()
    def reward(self, prompt: str | list[dict], answer: str, raw: bool = False) -> float:
        """The score the run's reward model (``reward_model=``: an rl run's, or a judged run's) gives one answer to a
        prompt (a user message, a conversation, or with ``raw`` the text as written), as the rl task scores a
        completion: the reward adapter and its score head join this same base as a second adapter
        (``RewardRoles.attach_roles``), and the answer is rendered as the reward model was trained."""
        import copy

        from .tasks.rl import RewardRoles, Rollout, prepare_prompts

        if not self.cfg.reward_model:
            raise ConfigError(f"run '{self.run.path.name}' has no reward model (reward_model=)")
        if self._reward is None:
            roles = RewardRoles()
            roles.cfg = self.cfg
            roles.attach_roles(self.model, self.tokenizer)
            self._reward = roles
        if not raw and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        cfg = copy.deepcopy(self.cfg)
        cfg.data.columns = None  # the row below is in the task's own columns, whatever the run's data used
        cfg.data.on_bad_rows = "error"  # an empty prompt is refused in words, not dropped
        prompts, _, _ = prepare_prompts([{"prompt": prompt}], self.tokenizer, source="Try it", cfg=cfg)
        # cut to max_length with the prompt, as training cut answers: no longer than the reward model was trained on
        room = max(1, self.cfg.max_length - prompts[0].num_tokens)
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][:room]
        rollout = Rollout(prompts, [answer_ids], [True], torch.zeros(1))
        return float(self._reward.rewards(self.model, rollout)[0])

    @_one_at_a_time
    @torch.no_grad()
    def score(self, prompt: str, answer_a: str, answer_b: str) -> tuple[float, float]:
        """Reward-model scores of two answers to one prompt, rendered exactly as training rendered pairs."""
        pair = {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": answer_a}],
                "rejected": [{"role": "assistant", "content": answer_b}]}
        (p, a, b), = tokenize_rendered(self.tokenizer, [render(pair, self.tokenizer)])
        p = p[-self.cfg.max_prompt_length:]
        room = self.cfg.max_length - len(p)
        batch = collate([Pair(p, a[:room], b[:room])], self.tokenizer.pad_token_id)
        scores = reward_scores(self.model, batch)
        return float(scores[0]), float(scores[1])
