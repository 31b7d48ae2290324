"""What a run trains: one module per task, one line each in :data:`TASKS`.

The run shell (``loop.py``) owns everything tasks share: the run folder, resume, checkpoints, stop, the metrics
window, eval and save schedules, the non-finite guard, the memory plan. A task supplies its data, the losses of a
micro-batch, the metric names the app plots, and its terms of the memory model (``tasks/base.py`` says how). A new
task is a new module with a ``Task`` subclass named ``TASK`` and a line here; nothing else tests a task's name.

This module imports nothing heavy, so the config can take its choices from here.
"""

from __future__ import annotations

import importlib

# name -> (module in this package, one line for --help and the app)
TASKS: dict[str, tuple[str, str]] = {
    "sft": ("sft", "supervised fine-tuning: next-token loss on the answers (assistant turns) only"),
    "dpo": ("dpo", "preference-tune the policy on chosen/rejected pairs (DPO and its variants)"),
    "kto": ("kto", "preference-tune on unpaired thumbs-up / thumbs-down answers (KTO)"),
    "reward": ("reward", "train a scalar reward model on chosen/rejected pairs (Bradley-Terry)"),
    "rl": ("rl", "reinforcement learning against your reward model (reward_model=<reward run>): RLOO, online DPO, PPO"),
}


def task_class(name: str):
    """The Task subclass of task ``name`` (imports its module on first use)."""
    module, _ = TASKS[name]
    return importlib.import_module(f"{__name__}.{module}").TASK
