"""The Train tab: start, stop, resume; the run list; the progress line with its ETA, the curves, the diagnostics and
the log of the selected run; for a run with a reward model its sample completions, and for a finished reward run
the way to RL against it.

The curves are the run's task's (``Task.plots``): the tab has as many plot slots as the task with the most plots,
and a run's task decides which are shown and what they are called. Nothing here knows a task by name.
"""

from __future__ import annotations

import html
import json
import math
import re
import statistics
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ..artifacts import RunDir
from ..config import ConfigError, build_config
from ..diagnostics import diagnose, eval_summary
from ..runs import tail
from ..tasks import TASKS, task_class
from .common import NO_SESSION, AppState, UserError, on, run_list, task_of
from .setup import (KEYS, SetupTab, form_config, makes_reward_model, memory_verdict, needs_reward_model,
                    no_reward_model, processes_of, reward_runs, rl_from_reward, run_name, sft_first_config)

PLOTS_PER_ROW = 2
LOG_LINES = 12  # log lines the Train tab shows
ETA_WINDOW = 10  # logged steps the ETA's speed is the median of
SAMPLES = "samples.jsonl"  # what a run with a reward model writes at each eval (tasks/rl.py: write_samples)
SAMPLE_COLUMNS = ["step", "prompt", "policy completion", "policy reward", "reference completion", "reference reward"]


def app_words(text: str) -> str:
    """A run's message in the app's words: the CLI's "--resume" is the Resume button here."""
    return re.sub(r"(continue|resume) with --resume", "press Resume to continue", text).replace("--resume", "Resume")


def plot_slots() -> int:
    """Plot slots on the page: enough for the task with the most plots."""
    return max(len(task_class(t).plots) for t in TASKS)


def plot_frames(metrics: list[dict], task: str | None, slots: int | None = None) -> list[pd.DataFrame | None]:
    """One long-format frame (step, value, series) per plot of the task, then None for the unused slots; None also
    for a plot with nothing yet (Gradio 6 draws no lines in a plot whose first value was an empty frame).

    Each frame is the whole plot, redrawn on every refresh, and names every series of the plot from its first
    draw: the browser fixes a plot's colour domain (its series) when it first draws it and only swaps the data
    afterwards, so a series that arrived later (the eval points of a run watched from its start) was never drawn.
    A series without points yet gets one empty row (its value NaN, which the plot skips). A series with one point
    (a run that evaluates only at its end) is drawn as a short dash ending at that step: a line needs two points."""
    frames = []
    for _, series in task_class(task).plots if task else []:
        points = {name: [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))
                         and math.isfinite(m[k])] for k, name in series.items()}
        if not any(points.values()):
            frames.append(None)
            continue
        steps = [step for pts in points.values() for step, _ in pts]
        dash = max(0.5, (max(steps) - min(steps)) / 40)
        rows = []
        for name, pts in points.items():
            if not pts:
                pts = [(min(steps), float("nan"))]
            elif len(pts) == 1:
                pts = [(pts[0][0] - dash, pts[0][1]), pts[0]]
            rows += [{"step": step, "value": value, "series": name} for step, value in pts]
        frames.append(pd.DataFrame(rows))
    slots = plot_slots() if slots is None else slots
    return (frames + [None] * slots)[:slots]


def plot_layout(app: AppState, name: str | None, message: str = "") -> list[dict]:
    """For another run in the list: each slot emptied, titled with the run's task's plot or hidden (no run, no
    plots: empty untitled frames said nothing); then the message box, cleared when it is about another run."""
    try:
        task = task_of(app.run_dir(name)) if name else None
    except ConfigError:  # a run folder removed under the page: nothing to show
        task = None
    titles = [title for title, _ in task_class(task).plots] if task else []
    slots = [gr.update(value=None, title=titles[i], visible=True) if i < len(titles) else
             gr.update(value=None, visible=False) for i in range(plot_slots())]
    about_it = bool(name) and f"**{name}**" in (message or "")
    return [*slots, gr.update() if about_it else ""]


def run_selected(app: AppState, name: str | None, message: str = "") -> list:
    """Another run selected (picked, or started): :func:`plot_layout`, and the progress, diagnostics and log emptied
    until the refresh that follows fills them with this run's; they showed the run selected before, "completed"
    included, while the new one was starting."""
    return [*plot_layout(app, name, message), "", "", ""]


def speed_key(task: str | None) -> str:
    """The metric a task's speed is logged as: items of its unit per second."""
    return f"{task_class(task).unit if task else 'pairs'}_per_second"


def progress_html(run: RunDir, metrics: list[dict], state: str, task: str | None = None, clean=None) -> str:
    """The progress bar and one status line: run, state, step, seconds per step and ETA while it trains. ``clean``:
    what the run's message goes through before it is shown (a public app's ``AppState.message``)."""
    status = run.read_status()
    step, total = status.get("step", 0) or 0, status.get("total_steps") or 0
    pct = 100 * step / total if total else 0
    eta = ""
    key = speed_key(task)
    speed = [m[key] for m in metrics if m.get(key)][-ETA_WINDOW:]
    if state == "running" and speed and total:
        try:
            cfg = build_config(config_file=str(run.config))
            # the median of the last steps' speed: one slow step (an eval, a checkpoint) made the ETA jump
            per_step = cfg.batch_size * cfg.gradient_accumulation_steps / statistics.median(speed)
            left = (total - step) * per_step
            eta = f" · {per_step:.2g} s/step · ETA {int(left // 60)}m {int(left % 60):02d}s"
        except (ConfigError, OSError):
            pass  # no config.yaml yet (the run is still loading): no ETA this time
    message = html.escape(app_words((clean or str)(status.get("message") or "")))
    then = status.get("then_run")
    after = f" · then <b>{html.escape(then)}</b>" if then else ""
    evals = last_eval(metrics, task)
    return (f'<div class="lp-progress"><div class="lp-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="lp-status">{html.escape(run.path.name)} · <b class="lp-state">{state}</b> · step {step}'
            f' / {total or "?"}{eta}{" · " + message if message else ""}{after}</div>'
            + (f'<div class="lp-eval">{evals}</div>' if evals else ""))


def last_eval(metrics: list[dict], task: str | None) -> str:
    """The latest eval's numbers, in the task's plot titles and series labels. A plot draws a series as a line, so
    an eval series with one point (a run that evaluates only at its end) is in the legend but not drawn: this line
    gives its values either way."""
    evals = [m for m in metrics if any(k.startswith("eval_") for k in m)]
    if not evals or not task:
        return ""
    last, parts = evals[-1], []
    for title, series in task_class(task).plots:
        values = [(label, last[key]) for key, label in series.items()
                  if key.startswith("eval_") and isinstance(last.get(key), (int, float))]
        if len(values) == 1 and values[0][0] == "eval":
            parts.append(f"{title} <b>{values[0][1]:.4g}</b>")
        elif values:
            parts.append(f"{title}: " + ", ".join(f"{label.removeprefix('eval ')} <b>{value:.4g}</b>"
                                                  for label, value in values))
    return f"Eval at step {last['step']}: {' · '.join(parts)}" if parts else ""


def diagnostics_md(metrics: list[dict], task: str | None, status: dict, clean=None) -> str:
    """The diagnostics in words (advice that fits the run's dtype; why a run failed), then the latest eval's
    numbers. ``status``: the run's status.json."""
    icon = {"ok": "✅", "warn": "⚠️", "error": "⛔"}
    message = app_words((clean or str)(status.get("message") or ""))
    found = diagnose(metrics, task, status.get("total_steps"), dtype=status.get("dtype"), state=status.get("state"),
                     message=message)
    lines = [f"{icon[level]} {html.escape(text, quote=False)}" for level, text in found]
    evals = eval_summary(metrics)
    if evals:
        lines.append(f"📊 {evals[0].upper()}{evals[1:]}.")
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Handlers: plain values in, plain values out (the run list is a dropdown update: its choices and value)

START_CHECK_ROWS = 100  # rows Start reads before it starts a run: a file that can't be read is refused in the page


def start(app: AppState, preset: str, upload: str | None, sft_first: bool, *values) -> tuple[str, dict]:
    """Start the form's run (after an SFT run on the same data, with SFT first); refused while a run trains.
    Start refuses what Check the data refuses, in its words: the data's first rows are read as the task reads them
    (the whole file is the run's to read, in its own process), so a file with wrong columns or no usable rows is
    said here, not in a failed run; and a run the memory estimate says does not fit this machine, in the Setup
    tab's words."""
    from .data import data_refusal

    if app.public and not app.owner:  # before the upload is kept
        raise UserError(NO_SESSION)
    values, processes = processes_of(app, values)
    name = run_name(values)
    # checked where Gradio put the upload, as Check the data reads it (so its messages name the same file), then kept
    checked = form_config(app, preset, upload, values)
    if needs_reward_model(checked.task) and not checked.reward_model:
        raise UserError(no_reward_model(app, preset, checked.model))
    if checked.reward_model:  # a typed folder (locally): a reward model of this base, said here, not in a failed run
        from ..model import check_reward_model

        check_reward_model(checked)
    refusal = data_refusal(checked, START_CHECK_ROWS)
    if refusal:
        raise UserError(refusal)
    fits, line = memory_verdict(checked, app.hw)
    if fits is False:
        raise UserError(f"not started: {line.replace('**', '')}")
    cfg = form_config(app, preset, upload, values, app.uploads)
    if sft_first:
        sft = sft_first_config(preset, cfg)
        run = app.start(sft, then=cfg, name=name, processes=processes)
        return (f"Started **{run}**: SFT on the chosen answers. The {cfg.task} run starts from its adapter when it "
                "completes.", run_list(app, run))
    run = app.start(cfg, name=name, processes=processes)
    return f"Started **{run}**. The curves appear after the first steps.", run_list(app, run)


def stop(app: AppState, name: str | None) -> tuple[str, dict]:
    """SIGTERM now; SIGKILL if the run is still alive ``kill_after`` seconds later (runs.RunManager.stop)."""
    stopped = app.stop(name or None)
    return (f"Stopping **{stopped}**: it ends after its current micro-batch with a checkpoint. If it is still running "
            f"in {app.manager.kill_after:g} s it is killed; Resume then starts from its last checkpoint.",
            run_list(app, name))


def resume(app: AppState, name: str | None) -> tuple[str, dict]:
    if not name:
        raise UserError("select a run to resume")
    app.resume(name)
    return f"Resuming **{name}** from its last checkpoint.", run_list(app, name)


def rename_run(app: AppState, name: str | None, new: str) -> tuple[str, dict]:
    """Rename the selected run (not while it trains; in public, only your own)."""
    if not name:
        raise UserError("select a run to rename")
    app.run_dir(name)
    new = app.manager.rename(name, new)
    app.forget(name)
    return f"Renamed **{name}** to **{new}**.", run_list(app, new)


def delete_ask(app: AppState, name: str | None) -> tuple[str, dict]:
    """Delete's first click: what would go, and the button that confirms it."""
    if not name:
        raise UserError("select a run to delete")
    run = app.run_dir(name)
    size = sum(f.stat().st_size for f in run.path.rglob("*") if f.is_file())
    return (f"Delete **{name}** and all its files ({size / 2**20:,.1f} MB: checkpoints, adapter, logs)? This can't be "
            "undone.", gr.update(visible=True))


def delete_confirm(app: AppState, name: str | None) -> tuple[str, dict, dict]:
    """Delete the run and its folder (not while it trains; in public, only your own)."""
    if not name:
        raise UserError("select a run to delete")
    app.run_dir(name)
    app.manager.delete(name)
    app.forget(name)
    return f"Deleted **{name}** and its files.", gr.update(visible=False), run_list(app)


def delete_cancel() -> tuple[str, dict]:
    return "", gr.update(visible=False)


def refresh(app: AppState, name: str | None) -> list:
    """What the page shows of the selected run: progress, one frame per plot slot, diagnostics, the log's tail.
    Each refresh also starts a follow-up run that is due (SFT first)."""
    app.manager.poll()  # for every visitor's chain: a follow-up starts when it is due, whoever looks
    empty = plot_frames([], None)
    if not name:
        return ["", *empty, "No run selected. Start one, or pick one from the list.", ""]
    try:
        run = app.run_dir(name)
    except ConfigError as e:
        return ["", *empty, html.escape(app.message(str(e)), quote=False), ""]
    state, metrics, status = run.state(), run.read_metrics(), run.read_status()
    task = task_of(run)
    return [progress_html(run, metrics, state, task, app.message), *plot_frames(metrics, task),
            diagnostics_md(metrics, task, {**status, "state": state}, app.message),
            app.message(tail(run.log, LOG_LINES) or tail(run.path / "console.log", LOG_LINES))]


def samples_frame(run: RunDir) -> pd.DataFrame | None:
    """The run's samples.jsonl (an rl run, or a dpo/sft/kto run judged by a reward model) as the table shows it: one
    row per held-out prompt per eval, the policy's completion and the reference's, each with the reward model's
    score; newest eval first, each eval's prompts in its own order. None while there are none."""
    try:
        lines = (run.path / SAMPLES).read_text().splitlines()
    except FileNotFoundError:
        return None
    rows = []
    for line in lines:
        try:
            s = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill (the file is rewritten whole, not appended to)
            continue
        rows.append([s.get("step"), s.get("prompt"), s.get("completion"), s.get("reward"),
                     s.get("reference_completion"), s.get("reference_reward")])
    if not rows:
        return None
    rows.sort(key=lambda r: -(r[0] or 0))  # stable: an eval's prompts keep their order
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def run_extras(app: AppState, name: str | None, shown: str | None = None) -> tuple[dict, dict, str | None]:
    """What the selected run offers beside its curves: the table of sample completions with their rewards (a run
    with a reward model, once it has evaluated), and, for a finished reward run, the button that sets up RL
    against it. ``shown``: the run and samples.jsonl version the page's table shows (returned updated); the table
    is sent again only when they change, so a person reading it is not scrolled back on every refresh."""
    try:
        run = app.run_dir(name) if name else None
    except ConfigError:
        run = None
    if run is None:
        return gr.update(value=None, visible=False), gr.update(visible=False), None
    button = gr.update(visible=makes_reward_model(task_of(run)) and name in reward_runs(app))
    try:
        stat = (run.path / SAMPLES).stat()
        now = f"{name}:{stat.st_mtime_ns}:{stat.st_size}"
    except FileNotFoundError:
        now = f"{name}:none"
    if now == shown:
        return gr.update(), button, shown
    frame = samples_frame(run)
    return gr.update(value=frame, visible=frame is not None), button, now


def follow(app: AppState, name: str | None, followed: list) -> tuple[dict, list]:
    """Select a follow-up run (SFT first, then DPO) in the list once, when it has started; a run the user goes back
    to afterwards stays selected. ``followed``: the follow-ups this page has switched to."""
    if not name:
        return gr.update(), followed
    try:
        then = app.run_dir(name).read_status().get("then_run")
    except ConfigError:
        return gr.update(), followed
    if not then or then in followed:
        return gr.update(), followed
    return run_list(app, then), [*followed, then]


def relist(app: AppState, name: str | None, shown: str | None) -> tuple[dict, str | None, dict]:
    """Relist the runs when the selected run's state is not the one its label showed (it completed, stopped or
    failed since), so the list does not say "running" beside a completed run; a run that has ended also clears the
    message of the button that started it ("Resuming ..."). ``shown``: "name:state" as last listed here."""
    if not name:
        return gr.update(), shown, gr.update()
    try:
        state = app.run_dir(name).state()
    except ConfigError:
        return gr.update(), shown, gr.update()
    now = f"{name}:{state}"
    if now == shown:
        return gr.update(), shown, gr.update()
    ended = shown is not None and shown.startswith(f"{name}:") and state != "running"
    return run_list(app, name), now, "" if ended else gr.update()


# ----------------------------------------------------------------------------------------------------------------
# The tab

@dataclass
class TrainTab:
    run: gr.Dropdown  # the selected run: the Try it and Export tabs act on it
    plots: list


def create_train_tab(app: AppState, setup: SetupTab, upload: gr.File, tabs: gr.Tabs | None = None) -> TrainTab:
    """Build the Train tab inside the current ``gr.Tab``; Start reads Setup's form and the Data tab's upload.
    ``tabs``: the page's tabs, which "Train a policy against this reward model" switches to Setup."""
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary")
        stop_btn = gr.Button("Stop (writes a checkpoint)", variant="stop")
        resume_btn = gr.Button("Resume selected run")
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], interactive=True, scale=4)
        list_btn = gr.Button("Refresh list", scale=1)
    with gr.Accordion("Rename or delete the selected run", open=False):
        with gr.Row():
            new_name = gr.Textbox(label="New name", scale=3)
            rename_btn = gr.Button("Rename", scale=1)
            delete_btn = gr.Button("Delete…", variant="stop", scale=1)
        with gr.Row(visible=False) as confirm_row:
            confirm_btn = gr.Button("Yes, delete the run and its files", variant="stop")
            cancel_btn = gr.Button("Cancel")
    message = gr.Markdown()
    progress = gr.HTML()
    rl_btn = gr.Button("Train a policy against this reward model (RL)", variant="primary", visible=False)
    plots = []
    slots = plot_slots()
    for row in range(math.ceil(slots / PLOTS_PER_ROW)):
        with gr.Row():
            for i in range(row * PLOTS_PER_ROW, min(slots, (row + 1) * PLOTS_PER_ROW)):
                # hidden until a run is selected (plot_layout titles and shows the run's task's plots)
                plots.append(gr.LinePlot(x="step", y="value", color="series", height=240, visible=False))
    diagnostics = gr.Markdown(elem_classes="lp-diagnostics")
    samples = gr.Dataframe(headers=SAMPLE_COLUMNS, label="Sample completions on held-out prompts, newest eval first "
                           "(samples.jsonl): the policy's and the reference's, each with the reward model's score",
                           wrap=True, interactive=False, visible=False, max_height=480, elem_classes="lp-samples",
                           column_widths=["5%", "23%", "27%", "9%", "27%", "9%"])
    # the log's last lines, in a box tall enough for them: a scrolled box showed its top, not the end
    log_tail = gr.Textbox(label=f"Log (the last {LOG_LINES} lines; the whole log is train.log in the run's folder)",
                          lines=LOG_LINES, max_lines=2 * LOG_LINES, autoscroll=True)
    timer = gr.Timer(2.0)
    followed = gr.State([])
    listed = gr.State(None)  # the selected run's state as the run list last showed it
    samples_shown = gr.State(None)  # the run and samples.jsonl version the table shows (run_extras)

    # every event that touches a run carries the session's key (common.on): each visitor acts on their own runs
    on(start_btn.click, start, app, [setup.preset, upload, setup.sft_first, *setup.form], [message, run],
       api_name="start")
    on(stop_btn.click, stop, app, run, [message, run], api_name="stop")
    on(resume_btn.click, resume, app, run, [message, run], api_name="resume")
    on(list_btn.click, run_list, app, run, run, api_name="runs")
    on(rename_btn.click, rename_run, app, [run, new_name], [message, run], api_name="rename")
    on(delete_btn.click, delete_ask, app, run, [message, confirm_row], api_name=False)
    on(confirm_btn.click, delete_confirm, app, run, [message, confirm_row, run], api_name="delete")
    cancel_btn.click(delete_cancel, None, [message, confirm_row], api_name=False)
    shown = [progress, *plots, diagnostics, log_tail]
    hidden = {"api_name": False, "show_progress": "hidden"}
    changed = on(run.change, run_selected, app, [run, message], [*plots, message, progress, diagnostics, log_tail],
                 **hidden)
    on(changed.then, refresh, app, run, shown, **hidden)
    on(changed.then, run_extras, app, run, [samples, rl_btn, samples_shown], **hidden)
    ticked = on(timer.tick, refresh, app, run, shown, api_name="refresh", show_progress="hidden")
    on(ticked.then, run_extras, app, [run, samples_shown], [samples, rl_btn, samples_shown], api_name="samples",
       show_progress="hidden")
    switched = on(rl_btn.click, rl_from_reward, app, run, [setup.preset, *(setup.inputs[k] for k in KEYS),
                                                           *setup.summary, message], api_name="rl_from_reward")
    if tabs is not None:
        switched.then(lambda: gr.Tabs(selected="setup"), None, tabs, api_name=False, show_progress="hidden")
    followed_up = on(ticked.then, follow, app, [run, followed], [run, followed], **hidden)
    on(followed_up.then, relist, app, [run, listed], [run, listed, message], **hidden)
    return TrainTab(run, plots)
