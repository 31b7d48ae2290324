"""The contract between the run shell and a task.

The shell calls, in order: ``Task.validate(cfg)`` (with the config, before anything loads), ``load_data(tokenizer)``
(which reads rows through ``prepare_rows``, as the app's data doctor does),
``size``/``weight``/``micro_step_tokens`` (batching and the memory plan), ``reference(kind)`` and ``attach(model,
tokenizer)`` once the model is loaded (before the optimizer is built), ``load_state_dict`` when resuming,
``setup(model, data)``, then ``begin_step(step, weight)`` and ``losses(model, items)`` for every micro-batch of
training (``losses`` also for eval), ``state_dict(step)`` into each checkpoint and ``checkpoint()`` beside it,
``derived(record)`` on each logged record, and ``finish()`` and ``save(model, tokenizer, run)`` at the end.

Reductions are the shell's: a step's loss is ``sum(losses of its items) / sum(weight of its items)`` over all its
micro-batches, so the same effective batch gives the same update however it is split, and a logged metric is its
summed value over the window divided by the window's weight. A pair task weighs each pair 1 (metrics are per pair); a
token task weighs each example by its answer tokens (loss and accuracy are per token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .. import data as data_mod
from ..config import Config, ConfigError
from ..refcache import RefCache

log = logging.getLogger("lowrank_pref")


@dataclass
class TaskData:
    """What ``load_data`` returns: items to train and evaluate on, the data reports, and examples for the app."""
    train: list
    eval: list
    report: Any  # data.DataReport
    eval_report: Any | None
    examples: list[dict]


class Task:
    name = ""
    head = "lm"  # "lm": a causal LM scored through its LM head; "score": a one-output classifier (reward models)
    unit = "pairs"  # what one item is, in logs and in the speed metric ("<unit>_per_second")
    sequences_per_item = 2  # rows through the model per item, for the memory model's worst case
    shared_prompt = False  # whether items can go through as one [prompt | chosen | rejected] row
    uses_reference = False  # whether it reads the frozen reference (then a starting adapter is loaded twice)
    plots: list[tuple[str, dict[str, str]]] = []  # (title, {metric key: series label}) for the app's curves
    # A pairwise accuracy (how often the better answer wins), whose chance level is 0.5: the shared diagnostics
    # warn when its eval value stays near 0.5. "" for a task without one (a token accuracy is not: its chance level
    # is about 1 / vocabulary size).
    accuracy_key = ""
    reads_loss_type = False  # whether loss_type (losses.LOSSES) chooses its loss
    steps_per_batch = 1  # consecutive steps over the same micro-batches (loop.Schedule.repeat; ppo: its epochs)
    # The config keys of this task's objective that the app's Setup form shows (only the selected task's are shown,
    # and only those override the preset); how to train (learning rate, steps, sizes) is common to every task.
    fields: tuple[str, ...] = ()

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ref_cache = None  # a refcache.RefCache, when the task keeps reference log-probs on disk

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Cross-field checks that concern this task; raise ConfigError naming the key and the fix."""
        if not cls.reads_loss_type:
            if cfg.loss_type != "sigmoid":
                raise ConfigError(f"loss_type applies to the dpo task only; the {cls.name} task has its own loss "
                                  "(leave loss_type at sigmoid)")
            if cfg.rpo_alpha:
                raise ConfigError(f"rpo_alpha applies to the dpo task only; remove it for task={cls.name}")
        if cfg.reward_model and cls.head != "lm":
            raise ConfigError(f"reward_model applies to the rl task and to judging dpo, sft and kto runs; remove it "
                              f"for task={cls.name}")

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_rows(self, rows: list[dict], tokenizer, source: str) -> tuple[list, Any, list[dict]]:
        """Raw rows -> (usable items, ``data.DataReport``, examples). The run (through :meth:`load_data`) and the
        app's data doctor both read data with this, so the doctor reports what a run would train on.

        Each example is one display shape the doctor renders without knowing the task: ``{"row": i, "note": str,
        "sides": [{"name": str, "tokens": n, "loss_tokens": m, "pieces": [[text, "prompt"|"loss"|"cut"], ...]}]}``
        (``data.display_pieces``), beside whatever keys the task keeps for data_report.json."""
        raise NotImplementedError

    def load_data(self, tokenizer) -> TaskData:
        """Train and eval items (a given eval set, else held-out rows) and the reports, from :meth:`prepare_rows`."""
        if self.cfg.reward_model:  # a wrong reward model fails now, not after the model has loaded
            from ..model import check_reward_model

            check_reward_model(self.cfg)
        d = data_mod.load_task_data(self.cfg, tokenizer, self.prepare_rows, unit=self.unit)
        return TaskData(d.train, d.eval, d.report, d.eval_report, d.examples)

    def size(self, item) -> int:
        """Tokens of an item through the model (token-budget batches, the memory plan)."""
        return item.num_tokens

    def weight(self, item) -> float:
        """The item's share of a step's loss and of the logged metrics."""
        return 1.0

    def micro_step_tokens(self, items: list) -> tuple[int, int]:
        """(padded tokens through the model, answer tokens through the LM head) of a micro-batch."""
        raise NotImplementedError

    # -- the model -------------------------------------------------------------------------------------------------
    def reference(self, loaded: str) -> str | None:
        """What the frozen reference is for this run (``loaded``: "base" or "adapter", as the model was loaded), or
        None when the task has no reference."""
        return loaded if self.uses_reference else None

    def attach(self, model, tokenizer) -> list:
        """Before the optimizer is built: add the task's other roles to the model (rl: the reward adapter; ppo: the
        value adapter and head). Returns trainable parameters the optimizer must update beyond the model's own."""
        return []

    def setup(self, model, tokenizer, data: TaskData) -> dict:
        """After the model loads: choose layouts, open caches. Returns facts for status.json. The base keeps the
        padding id and, for a task that reads the reference (``reference_cache`` on), opens the reference cache."""
        self.pad_id = tokenizer.pad_token_id
        if self.uses_reference and self.cfg.reference_cache:
            self.ref_cache = RefCache.for_config(self.cfg)
            log.info("reference log-probs cache: %s (%d %s known)", self.ref_cache.path, len(self.ref_cache),
                     self.unit)
        if self.cfg.reward_model and not hasattr(self, "evaluate"):  # judge policy vs reference at each eval too
            from .rl import Judge

            self.judge = Judge(self.cfg, model, tokenizer, data.eval)
        return {}

    def losses(self, model, items: list) -> tuple[Any, dict, int]:
        """Per-item losses (B,) with grad, the metric sums over these items, and the real tokens processed."""
        raise NotImplementedError

    def begin_step(self, step: int, weight: float) -> None:
        """Before the micro-batches of training step ``step``, whose items weigh ``weight`` in all."""

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def state_dict(self, step: int) -> tuple[dict, dict] | None:
        """What a checkpoint after ``step`` keeps of the task: (tensors, json-able facts), or None for nothing."""
        return None

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        """Restore :meth:`state_dict`'s (empty dicts when the checkpoint holds none)."""

    def save(self, model, tokenizer, run) -> None:
        """At the end, beside the adapter: the task's other trained roles (``run``: the artifacts.RunDir)."""

    def checkpoint(self) -> None:
        """Persist what the task keeps beside a checkpoint: the reference cache."""
        if self.ref_cache is not None:
            self.ref_cache.save()

    def finish(self) -> dict:
        """At the end of the run: facts for status.json (how much the reference cache saved)."""
        if self.ref_cache is None:
            return {}
        self.ref_cache.save()
        log.info("reference log-probs: %d %s read from the cache, %d computed", self.ref_cache.hits, self.unit,
                 self.ref_cache.misses)
        return {"reference_cache": {"read": self.ref_cache.hits, "computed": self.ref_cache.misses}}

    def derived(self, record: dict, prefix: str = "") -> None:
        """Add metrics computed from the logged ones (e.g. perplexity from the loss) to ``record`` in place; eval
        records carry ``prefix`` "eval_" on every key."""

    @classmethod
    def diagnose(cls, metrics: list[dict]) -> list[tuple[str, str]]:
        """This task's own reading of its curves, beside the shared rules in ``diagnostics.py``: (level, message)
        pairs, level ``warn`` or ``error``, one per known way a run of this task goes wrong. ``metrics``: the records
        of metrics.jsonl, train and eval (eval keys carry ``eval_``)."""
        return []
