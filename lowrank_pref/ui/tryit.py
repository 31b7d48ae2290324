"""The Try it tab: a run that trains a language model answers a prompt beside its reference (the base with adapters
off, or the starting adapter), each answer scored by the run's reward model when it has one (rl, or a judged run);
a reward model scores two answers. Which one a run offers is its task's ``head``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import gradio as gr

from ..config import ConfigError, build_config
from ..tasks import task_class
from .common import AppState, UserError, on, task_of
from .setup import reward_run_name


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
        use = "Score A and B" if head == "lm" else "Send to both"
        does = "scores answers" if head == "lm" else "generates answers"
        raise UserError(f"run '{name}' is a {task} run that {does}: use '{use}'")
    return task


MAX_NEW_TOKENS = 1024  # the most Try it generates in one answer
TOY_MODELS = ("builtin:",)  # models built in code for offline use: random weights, a minute of training


def _sampling(max_new_tokens, sample, temperature, top_p) -> dict:
    """The generation settings, checked: finite and within bounds, each refusal naming its field."""
    def number(value, label, lo, hi, whole=False):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{label}: give a number from {lo:g} to {hi:g}") from None
        if not math.isfinite(value) or not lo <= value <= hi or (whole and not value.is_integer()):
            raise UserError(f"{label}: give a {'whole ' if whole else ''}number from {lo:g} to {hi:g}, got {value:g}")
        return int(value) if whole else value

    return {"max_new_tokens": number(max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS, whole=True),
            "sample": bool(sample), "temperature": number(temperature, "Temperature", 0.01, 5),
            "top_p": number(top_p, "Top-p", 0.01, 1)}


def generate(app: AppState, name: str | None, prompt: str, raw: bool, max_new_tokens: float = 64,
             sample: bool = False, temperature: float = 0.7, top_p: float = 0.9) -> tuple[str, str]:
    """The answers of the trained policy and of its reference to one prompt: greedy, or sampled (``sample``) at
    ``temperature`` with nucleus ``top_p``."""
    _selected(app, name, "lm")
    return app.trained(name).generate(prompt, raw=raw, **_sampling(max_new_tokens, sample, temperature, top_p))


def chat(app: AppState, name: str | None, prompt: str, raw: bool, max_new_tokens: float, sample: bool,
         temperature: float, top_p: float, policy_chat: list | None, reference_chat: list | None
         ) -> tuple[list, list, str]:
    """One more turn of the two conversations: the message goes to the policy and to the reference, each answering
    its own conversation so far (a raw prompt has no conversation: each turn stands alone). Returns both chats and
    the emptied prompt box."""
    _selected(app, name, "lm")
    if not (prompt or "").strip():
        raise UserError("write a message first")
    settings = _sampling(max_new_tokens, sample, temperature, top_p)
    model = app.trained(name)
    chats = []
    for history, reference in ((policy_chat or [], False), (reference_chat or [], True)):
        turns = turns_of(history)
        turns.append({"role": "user", "content": prompt})
        answer = model.reply(prompt if raw else turns, reference=reference, raw=raw, **settings)
        chats.append([*turns, {"role": "assistant", "content": answer}])
    return chats[0], chats[1], ""


def turns_of(history: list | None) -> list[dict]:
    """A Chatbot's messages as chat turns: role and text."""
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in history or []
            if m.get("role") in ("user", "assistant")]


def reward_scores(app: AppState, name: str | None, raw: bool, policy_chat: list | None, reference_chat: list | None
                  ) -> tuple[str, str]:
    """Under each conversation, the run's reward model's score of its last answer (to the conversation before it),
    for a run that has a reward model (an rl run, or a run judged by one); nothing for a run without."""
    if not name or not policy_chat:
        return "", ""
    _selected(app, name, "lm")
    model = app.trained(name)
    if not model.cfg.reward_model:
        return "", ""
    scores = []
    for history in (policy_chat, reference_chat):
        turns = turns_of(history)
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            scores.append(None)
            continue
        prompt = turns[-2]["content"] if raw else turns[:-1]
        scores.append(model.reward(prompt, turns[-1]["content"], raw=raw))
    rm = html.escape(reward_run_name(model.cfg.reward_model))
    out = []
    for mine, theirs in (scores, scores[::-1]):
        if mine is None:
            out.append("")
            continue
        higher = " · the higher" if theirs is not None and mine > theirs else ""
        out.append(f"Reward model **{rm}**: **{mine:.3f}**{higher}")
    return out[0], out[1]


def text_of(content) -> str:
    """A chat message's text: Gradio 6's Chatbot hands a message's content back as a list of parts
    (``{"type": "text", "text": ...}``), not the string it was given."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content or [])


def score(app: AppState, name: str | None, prompt: str, answer_a: str, answer_b: str) -> str:
    """The reward model's scores of two answers to one prompt, and which it prefers."""
    _selected(app, name, "score")
    sa, sb = app.trained(name).score(prompt, answer_a, answer_b)
    better = "A" if sa > sb else "B"
    return f"Score A **{sa:.3f}**, score B **{sb:.3f}**: the reward model prefers **{better}**."


def run_note(app: AppState, name: str | None) -> str:
    """Which run Try it uses and which of its adapters (the final one, or the latest checkpoint's), and a word on
    toy models: the offline model has random weights and trains for a minute, so it answers in gibberish."""
    from ..infer import adapter_of

    if not name:
        return "No run selected: pick one in the Train tab's run list."
    try:
        run = app.run_dir(name)
        task = task_of(run)
        adapter = adapter_of(run)
    except ConfigError as e:
        return html.escape(app.message(str(e)), quote=False)
    which = "its final adapter" if adapter == run.adapter else f"the adapter of its checkpoint at step " \
        f"{adapter.parent.name.removeprefix('checkpoint-')} (it has not completed)"
    try:
        model = build_config(config_file=str(run.config)).model
    except (ConfigError, OSError):
        model = "?"
    text = (f"Using run **{html.escape(name)}** ({task or 'unknown task'}), {which}; model "
            f"`{html.escape(app.message(model))}`.")
    if model.startswith(TOY_MODELS):
        text += (" ⚠️ This is a toy model: random weights and a vocabulary of a few hundred tokens, trained for a "
                 "minute on the CPU. It answers in gibberish; what to look for is that the policy's answers differ "
                 "from the reference's. A real model (a GPU preset) answers in words.")
    return text


def try_layout(app: AppState, name: str | None) -> tuple[dict, dict, str, list, list]:
    """Show what the selected run can do (generate, score, or both while it is unknown), which run it is, and
    start the conversations afresh: they belonged to the run selected before."""
    head = head_of(app, name)
    return (gr.update(visible=head in (None, "lm")), gr.update(visible=head in (None, "score")), run_note(app, name),
            [], [])


@dataclass
class TryTab:
    generate_box: gr.Column
    score_box: gr.Column


def create_try_tab(app: AppState, run: gr.Dropdown, tab: gr.Tab | None = None) -> TryTab:
    """Build the Try it tab inside the current ``gr.Tab`` (``tab``: it, so the note is read again when it is opened:
    the run may have written its adapter since it was selected); it acts on the run selected in the Train tab."""
    gr.Markdown("Runs that train the language model: chat with the trained policy and with its reference (adapters "
                "off, or the starting adapter) side by side. Reward models: score two answers.")
    note = gr.Markdown("No run selected: pick one in the Train tab's run list.", elem_classes="lp-try-run")
    with gr.Column() as generate_box:
        with gr.Row():
            policy_chat = gr.Chatbot(label="Policy (trained adapter)", height=320)
            reference_chat = gr.Chatbot(label="Reference", height=320)
        with gr.Row():  # a run with a reward model (rl, or judged by one): its score of each last answer
            policy_reward = gr.Markdown(elem_classes="lp-reward-policy")
            reference_reward = gr.Markdown(elem_classes="lp-reward-reference")
        prompt = gr.Textbox(label="Message", value="What is the best way to sleep better?")
        with gr.Row():
            send = gr.Button("Send to both", variant="primary")
            clear = gr.Button("New conversation")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
                sample = gr.Checkbox(label="Sample (off: greedy, the most likely token each time)", value=False)
                temperature = gr.Slider(0.01, 2.0, value=0.7, step=0.01, label="Temperature (when sampling)")
                top_p = gr.Slider(0.01, 1.0, value=0.9, step=0.01, label="Top-p (when sampling)")
            raw = gr.Checkbox(label="Raw prompt (no chat template; each message stands alone)", value=False)
    with gr.Column() as score_box:
        score_prompt = gr.Textbox(label="Prompt", value="What is the best way to sleep better?")
        with gr.Row():
            answer_a = gr.Textbox(label="Answer A", lines=2)
            answer_b = gr.Textbox(label="Answer B", lines=2)
        score_btn = gr.Button("Score A and B (reward model)")
        scores = gr.Markdown()
    settings = [max_new, sample, temperature, top_p]
    rewards = [policy_reward, reference_reward]
    for trigger, api in ((send.click, "chat"), (prompt.submit, False)):
        sent = on(trigger, chat, app, [run, prompt, raw, *settings, policy_chat, reference_chat],
                  [policy_chat, reference_chat, prompt], api_name=api)
        on(sent.success, reward_scores, app, [run, raw, policy_chat, reference_chat], rewards,
           api_name="reward_scores" if api else False)
    clear.click(lambda: ([], [], "", ""), None, [policy_chat, reference_chat, *rewards], api_name=False)
    on(score_btn.click, score, app, [run, score_prompt, answer_a, answer_b], scores, api_name="score")
    on(run.change, try_layout, app, run, [generate_box, score_box, note, policy_chat, reference_chat],
       api_name=False, show_progress="hidden")
    run.change(lambda: ("", ""), None, rewards, api_name=False, show_progress="hidden")
    if tab is not None:
        on(tab.select, run_note, app, run, note, api_name=False, show_progress="hidden")
    return TryTab(generate_box, score_box)
