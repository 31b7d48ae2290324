"""The Try it tab: a run that trains a language model answers a prompt beside its reference (the base with adapters
off, or the starting adapter); a reward model scores two answers. Which one a run offers is its task's ``head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..config import ConfigError
from ..tasks import task_class
from .common import AppState, UserError, on, task_of


def head_of(app: AppState, name: str | None) -> str | None:
    """``lm`` (generates) or ``score`` (scores answers) for the selected run; None when unknown."""
    if not name:
        return None
    try:
        task = task_of(app.run_dir(name))
    except ConfigError:
        return None
    return task_class(task).head if task else None


def _selected(app: AppState, name: str | None, head: str) -> str:
    """The run's task, refused with the button to use instead when the run has the other head."""
    if not name:
        raise UserError("select a run in the Train tab first")
    task = task_of(app.run_dir(name))
    if task and task_class(task).head != head:
        use = "Score A and B" if head == "lm" else "Generate"
        does = "scores answers" if head == "lm" else "generates answers"
        raise UserError(f"run '{name}' is a {task} run that {does}: use '{use}'")
    return task


def generate(app: AppState, name: str | None, prompt: str, raw: bool) -> tuple[str, str]:
    """Greedy answers of the trained policy and of its reference to one prompt."""
    _selected(app, name, "lm")
    return app.trained(name).generate(prompt, raw=raw)


def score(app: AppState, name: str | None, prompt: str, answer_a: str, answer_b: str) -> str:
    """The reward model's scores of two answers to one prompt, and which it prefers."""
    _selected(app, name, "score")
    sa, sb = app.trained(name).score(prompt, answer_a, answer_b)
    better = "A" if sa > sb else "B"
    return f"Score A **{sa:.3f}**, score B **{sb:.3f}**: the reward model prefers **{better}**."


def try_layout(app: AppState, name: str | None) -> tuple[dict, dict]:
    """Show what the selected run can do: generate, score, or both while it is unknown."""
    head = head_of(app, name)
    return gr.update(visible=head in (None, "lm")), gr.update(visible=head in (None, "score"))


@dataclass
class TryTab:
    generate_box: gr.Column
    score_box: gr.Column


def create_try_tab(app: AppState, run: gr.Dropdown) -> TryTab:
    """Build the Try it tab inside the current ``gr.Tab``; it acts on the run selected in the Train tab."""
    gr.Markdown("Runs that train the language model: the trained policy and its reference (adapters off, or the "
                "starting adapter) answer the same prompt. Reward models: score two answers.")
    prompt = gr.Textbox(label="Prompt", value="What is the best way to sleep better?")
    with gr.Column() as generate_box:
        raw = gr.Checkbox(label="Raw prompt (no chat template)", value=False)
        generate_btn = gr.Button("Generate (policy vs reference)")
        with gr.Row():
            policy_out = gr.Textbox(label="Policy (trained adapter)", lines=4)
            reference_out = gr.Textbox(label="Reference", lines=4)
    with gr.Column() as score_box:
        with gr.Row():
            answer_a = gr.Textbox(label="Answer A", lines=2)
            answer_b = gr.Textbox(label="Answer B", lines=2)
        score_btn = gr.Button("Score A and B (reward model)")
        scores = gr.Markdown()
    on(generate_btn.click, generate, app, [run, prompt, raw], [policy_out, reference_out], api_name="generate")
    on(score_btn.click, score, app, [run, prompt, answer_a, answer_b], scores, api_name="score")
    on(run.change, try_layout, app, run, [generate_box, score_box], api_name=False, show_progress="hidden")
    return TryTab(generate_box, score_box)
