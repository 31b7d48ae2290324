"""The Gradio app: set up, check the data, train, watch, try and export, from a browser tab.

``app.py`` only calls :func:`main`. Training runs as the CLI in a child process (``runs.RunManager``), so an
out-of-memory error or a crash never takes the page down; the page reads the run folder. Every handler here turns
user errors into one plain message in the page (``gr.Error``), never a stack trace.
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from .artifacts import RunDir
from .config import Config, ConfigError, build_config, dump_yaml, field_help, list_presets, to_dict
from .diagnostics import diagnose
from .runs import RunBusy, RunManager, tail

log = logging.getLogger("lowrank_pref.ui")

# The settings the form shows: (config key, label). Everything else stays as the preset has it.
FORM = [("model", "Model (hub id or local folder)"), ("task", "Task"), ("dataset", "Dataset (hub id or path)"),
        ("loss_type", "Loss type"), ("beta", "beta"), ("learning_rate", "Learning rate"),
        ("max_steps", "Max steps (0: use epochs)"), ("num_epochs", "Epochs"), ("lora.r", "LoRA rank"),
        ("lora.alpha", "LoRA alpha"), ("max_length", "Max length (tokens)"),
        ("max_prompt_length", "Max prompt length (tokens)"), ("batch_size", "Batch size (pairs per micro-step)"),
        ("gradient_accumulation_steps", "Gradient accumulation steps")]
KEYS = [k for k, _ in FORM]
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class UserError(ValueError):
    pass


def _plain(fn):
    """Handlers raise gr.Error with one line for anything the user can fix, and a short line for the rest."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .data import DataError
        from .export import ExportError
        from .model import ModelError

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ConfigError, DataError, ModelError, ExportError, RunBusy, UserError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # an internal error: logged with its traceback, shown as one line
            log.exception("internal error in %s", fn.__name__)
            first = str(e).splitlines()[0] if str(e) else ""
            raise gr.Error(f"internal error: {type(e).__name__}: {first}", print_exception=False) from None
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Hardware, presets, settings

def detect_hardware() -> dict:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "memory_gb": round(props.total_memory / 2**30, 1)}
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"gpu": None, "memory_gb": round(ram, 1) if ram else None}


def suggest_preset(hw: dict, task: str = "dpo") -> str:
    """The largest GPU preset that fits the card; the CPU gets ``tiny``."""
    if not hw.get("gpu"):
        return "tiny"
    sizes = sorted(int(name.split("gb-")[0]) for name in list_presets() if name.endswith(f"gb-{task}"))
    fitting = [s for s in sizes if s <= hw["memory_gb"] + 0.5]
    return f"{fitting[-1] if fitting else sizes[0]}gb-{task}"


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def form_values(cfg: Config) -> list:
    return [0 if k == "max_steps" and _get(cfg, k) is None else _get(cfg, k) for k in KEYS]


def config_from_form(preset: str, upload: str | None, values: list, uploads_dir: Path | None = None) -> Config:
    """The preset with the form's values on top; an uploaded file becomes the dataset."""
    base = build_config(preset)
    overrides = {}
    for key, value in zip(KEYS, values):
        if key == "max_steps" and value in (0, None, ""):
            value = None
        if isinstance(value, float) and value.is_integer() and isinstance(_get(base, key), int):
            value = int(value)  # number boxes send floats
        if value != _get(base, key):
            overrides[key] = "null" if value is None else value
    if upload:
        overrides["dataset"] = str(store_upload(upload, uploads_dir) if uploads_dir else upload)
    return build_config(preset, overrides=overrides)


def store_upload(path: str, uploads_dir: Path) -> Path:
    """Keep an uploaded data file with the runs (it is read as data by `datasets`, never executed)."""
    src = Path(path)
    if src.suffix.lower() not in DATA_EXTENSIONS:
        raise UserError(f"'{src.name}': upload a {', '.join(DATA_EXTENSIONS)} file of preference pairs")
    import hashlib

    uploads_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:12]
    dest = uploads_dir / f"{digest}-{src.name}"  # by content: a run's data never changes under it
    if not dest.exists():
        shutil.copyfile(src, dest)
    return dest.resolve()


def cli_command(preset: str, cfg: Config) -> str:
    """The terminal command that repeats this run."""
    base = to_dict(build_config(preset))
    mine = to_dict(cfg)
    parts = ["python -m lowrank_pref.run", f"--preset {preset}"]

    def diff(a, b, prefix=""):
        for k, v in b.items():
            if isinstance(v, dict):
                diff(a.get(k, {}), v, f"{prefix}{k}.")
            elif a.get(k) != v and k != "output_dir":
                text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                parts.append(f"{prefix}{k}={text}" if " " not in text else f"'{prefix}{k}={text}'")

    diff(base, mine)
    return " ".join(parts)


def memory_line(cfg: Config, hw: dict) -> str:
    """The memory model's verdict for these settings on this machine, with the checkpointing a run would choose
    (memory.choose_plan) when the machine's memory is known."""
    from .memory import choose_plan, plan_estimate

    gpu, have = bool(hw.get("gpu")), cfg.memory_limit_gb or hw.get("memory_gb")
    try:
        plan = choose_plan(cfg, have, gpu=gpu) if have else None
        est = plan_estimate(cfg, plan, gpu=gpu)
    except Exception as e:  # an unknown or unreachable model: say so, don't fail the page
        return f"Peak memory: no estimate ({type(e).__name__}: {str(e).splitlines()[0][:120]})."
    where = f"{hw['gpu']} ({hw['memory_gb']} GB)" if gpu else f"CPU RAM ({hw.get('memory_gb')} GB)"
    more = "" if plan and plan.checkpointing else ", or turn on checkpointing"
    verdict = "" if not have else (" fits" if est["total"] <= have * 0.95 else
                                   f" **does not fit**: lower batch_size or max_length{more}")
    how = f", gradient checkpointing {plan.describe()}" if plan else ""
    parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in est.items() if k != "total")
    return f"Estimated peak memory **{est['total']} GB** on {where}{how}:{verdict}. ({parts})"


# ----------------------------------------------------------------------------------------------------------------
# The data doctor

def doctor(cfg: Config) -> tuple[str, pd.DataFrame, str]:
    """Report (markdown), token-length histogram, and the first pairs as the model sees them (HTML)."""
    from .data import ensure_chat_template, load_rows, prepare, tokenize_rendered, truncate
    from .model import load_tokenizer

    tok = load_tokenizer(cfg)
    ensure_chat_template(tok, cfg.data.chat_template)
    rows = load_rows(cfg.dataset, cfg.dataset_split, cfg.trust_remote_code)
    pairs, report, examples = prepare(rows, tok, source=cfg.dataset, columns=cfg.data.columns,
                                      max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    lines = [f"**Format:** {report.format} · **rows:** {report.total_rows} · **usable pairs:** {report.usable}"]
    dropped = sum(report.dropped.values())
    if dropped:
        lines.append(f"**Skipped {dropped} row(s):**")
        for reason, n in report.dropped.most_common():
            rows_ = ", ".join(map(str, report.dropped_rows[reason]))
            lines.append(f"- {n} × {reason} (rows {rows_}{', …' if n > 5 else ''})")
    else:
        lines.append("No rows skipped: no empty, identical or malformed pairs.")
    over = sum(n > cfg.max_length for n in report.lengths)
    lines.append(f"**Lengths:** {over} of {len(report.lengths)} pairs are longer than max_length ({cfg.max_length}); "
                 f"{report.truncated_prompts} prompt(s) cut from the left to max_prompt_length "
                 f"({cfg.max_prompt_length}).")
    share = report.truncated_answers / max(report.usable, 1)
    lines.append(f"**Truncation cuts into the answers** (where chosen and rejected differ) in "
                 f"{report.truncated_answers} pair(s), {share:.0%}."
                 + (" Raise max_length, or these pairs teach from a partial difference." if share > 0.1 else ""))
    if not report.usable:
        lines.append("**No usable pairs: training would stop at once.**")
    hist = length_histogram(report.lengths, cfg.max_length)

    shown = []
    rendered = [(e["prompt"], e["chosen"], e["rejected"], e["templated"]) for e in examples]
    for e, (p, c, r) in zip(examples, tokenize_rendered(tok, rendered) if rendered else []):
        p2, c2, r2, _, _ = truncate(p, c, r, cfg.max_length, cfg.max_prompt_length)
        cut_prompt = p[:len(p) - len(p2)]

        def piece(ids, cls):
            return f'<span class="{cls}">{html.escape(tok.decode(ids))}</span>' if ids else ""

        sides = []
        for name, full, kept in (("chosen", c, c2), ("rejected", r, r2)):
            sides.append(f'<div class="lp-side"><b>{name}</b> ({len(kept)} tokens)<pre>'
                         f'{piece(cut_prompt, "lp-cut")}{piece(p2, "lp-prompt")}{piece(kept, "lp-loss")}'
                         f'{piece(full[len(kept):], "lp-cut")}</pre></div>')
        shown.append(f'<div class="lp-example"><div>row {e["row"]} · prompt {len(p2)} tokens'
                     f'{" · chat template applied" if e["templated"] else ""}</div>{"".join(sides)}</div>')
    legend = ('<div class="lp-legend"><span class="lp-prompt">prompt (no loss)</span> '
              '<span class="lp-loss">answer tokens that carry the loss</span> '
              '<span class="lp-cut">cut by truncation</span></div>')
    return "\n\n".join(lines), hist, legend + "".join(shown)


def length_histogram(lengths: list[int], max_length: int, bins: int = 16) -> pd.DataFrame | None:
    if not lengths:
        return None
    top = max(max(lengths), max_length)
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return pd.DataFrame({"tokens": [i * width for i in range(bins)], "pairs": counts,
                         "fits": ["within max_length" if (i + 1) * width <= max_length else "over max_length"
                                  for i in range(bins)]})


# ----------------------------------------------------------------------------------------------------------------
# Watching a run

PLOTS = {
    "dpo": [("Loss", {"loss": "train", "eval_loss": "eval"}),
            ("Rewards", {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin",
                         "eval_rewards/margins": "eval margin"}),
            ("Accuracy", {"rewards/accuracies": "train", "eval_rewards/accuracies": "eval"}),
            ("Log-probs", {"logps/chosen": "chosen", "logps/rejected": "rejected", "eval_logps/chosen": "eval chosen",
                           "eval_logps/rejected": "eval rejected"})],
    "reward": [("Loss", {"loss": "train", "eval_loss": "eval"}),
               ("Accuracy", {"accuracy": "train", "eval_accuracy": "eval"}),
               ("Margin (chosen - rejected score)", {"margin": "train", "eval_margin": "eval"}),
               ("Learning rate", {"learning_rate": "lr"})],
}


def plot_frames(metrics: list[dict], task: str) -> list[pd.DataFrame | None]:
    """One long-format frame (step, value, series) a plot; None for a plot with nothing yet. (Gradio 6 draws no
    lines in a plot whose first value was an empty frame, so a plot starts empty, not with an empty frame.)"""
    frames = []
    for _, series in PLOTS.get(task, PLOTS["dpo"]):
        rows = [{"step": m["step"], "value": m[k], "series": name} for m in metrics for k, name in series.items()
                if isinstance(m.get(k), (int, float))]
        frames.append(pd.DataFrame(rows) if rows else None)
    return frames


def progress_html(run: RunDir, metrics: list[dict], state: str) -> str:
    status = run.read_status()
    step, total = status.get("step", 0) or 0, status.get("total_steps") or 0
    pct = 100 * step / total if total else 0
    eta = ""
    speed = [m for m in metrics if m.get("pairs_per_second")]
    if state == "running" and speed and total:
        try:
            cfg = build_config(config_file=str(run.config))
            per_step = cfg.batch_size * cfg.gradient_accumulation_steps / speed[-1]["pairs_per_second"]
            left = (total - step) * per_step
            eta = f" · {per_step:.2g} s/step · ETA {int(left // 60)}m {int(left % 60):02d}s"
        except (ConfigError, OSError):
            pass
    message = html.escape(status.get("message") or "")
    return (f'<div class="lp-progress"><div class="lp-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="lp-status">{html.escape(run.path.name)} · <b class="lp-state">{state}</b> · step {step}'
            f' / {total or "?"}{eta}{" · " + message if message else ""}</div>')


def diagnostics_md(metrics: list[dict], task: str, total: int | None) -> str:
    icon = {"ok": "✅", "warn": "⚠️", "error": "⛔"}
    return "\n\n".join(f"{icon[level]} {text}" for level, text in diagnose(metrics, task, total))


# ----------------------------------------------------------------------------------------------------------------
# The page

CSS = """
.lp-progress {height: 12px; background: #e5e7eb; border-radius: 6px; overflow: hidden}
.lp-bar {height: 100%; background: #f97316; transition: width .5s}
.lp-status {margin-top: 4px}
.lp-example {border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px; margin: 6px 0}
.lp-side pre {white-space: pre-wrap; margin: 2px 0}
.lp-loss {background: #bbf7d0}
.lp-prompt {color: #6b7280}
.lp-cut {text-decoration: line-through; color: #dc2626}
"""


def build_app(runs_root: str | os.PathLike | None = None) -> gr.Blocks:
    manager = RunManager(runs_root)
    uploads = manager.root / ".uploads"
    hw = detect_hardware()
    presets = list_presets()
    default = suggest_preset(hw)
    cfg0 = build_config(default)
    trained_cache: dict[str, object] = {}

    def trained(name: str):
        from .infer import Trained

        if manager.active() and hw.get("gpu"):
            raise UserError("a run is training on the GPU; try the model when it is done or stopped")
        run = manager.run_dir(name)
        key = f"{name}:{run.adapter.exists()}:{run.latest_checkpoint()}"
        if key not in trained_cache:
            trained_cache.clear()  # one model in memory at a time
            trained_cache[key] = Trained(run.path)
        return trained_cache[key]

    def run_choices(select: str | None = None):
        runs = manager.runs()
        choices = [(f"{r['name']} · {r['state']} · step {r['step']}/{r['total_steps'] or '?'}", r["name"])
                   for r in runs]
        names = [r["name"] for r in runs]
        value = select if select in names else (manager.active() or (names[0] if names else None))
        return gr.update(choices=choices, value=value)

    with gr.Blocks(title="lowrank-pref") as demo:
        gr.Markdown("# lowrank-pref\nAlign an open model to preference data on one GPU: QLoRA DPO or a reward "
                    "model. Pick a preset, check your data, train, watch, try it, take the adapter home.")
        where = f"GPU: {hw['gpu']} ({hw['memory_gb']} GB)" if hw["gpu"] else \
            "No GPU found: the `tiny` preset trains a toy model on the CPU in about a minute."
        gr.Markdown(f"**Hardware.** {where} Suggested preset: `{default}`.")
        with gr.Tab("1 · Setup"):
            with gr.Row():
                preset = gr.Dropdown([(f"{k} — {v}", k) for k, v in presets.items()], value=default, label="Preset",
                                     info="One per GPU size; tiny runs offline on a CPU.", scale=3)
            inputs = {}
            with gr.Row():
                for key, label in FORM[:3]:
                    if key == "task":
                        inputs[key] = gr.Radio(["dpo", "reward"], label=label, info=field_help(key),
                                               value=_get(cfg0, key))
                    else:
                        inputs[key] = gr.Textbox(label=label, info=field_help(key), value=_get(cfg0, key))
            with gr.Row():
                from .config import LOSS_TYPES

                for key, label in FORM[3:8]:
                    if key == "loss_type":
                        inputs[key] = gr.Dropdown(list(LOSS_TYPES), label=label, info=field_help(key),
                                                  value=_get(cfg0, key))
                    else:
                        inputs[key] = gr.Number(label=label, info=field_help(key),
                                                value=form_values(cfg0)[KEYS.index(key)])
            with gr.Row():
                for key, label in FORM[8:]:
                    inputs[key] = gr.Number(label=label, info=field_help(key), value=_get(cfg0, key), precision=0)
            estimate = gr.Markdown(memory_line(cfg0, hw))
            with gr.Accordion("Repeat this in a terminal", open=False):
                command = gr.Code(cli_command(default, cfg0), language="shell", label="Command")
                yaml_box = gr.Code(dump_yaml(cfg0), language="yaml", label="Resolved config")
        form = [inputs[k] for k in KEYS]

        with gr.Tab("2 · Data"):
            gr.Markdown("Upload a `.jsonl`, `.json`, `.csv` or `.parquet` file of preference pairs, or leave it empty "
                        "to use the dataset named in Setup. Formats are detected: prompt/chosen/rejected strings or "
                        "messages, HH-style transcripts, UltraFeedback, ShareGPT.")
            upload = gr.File(label="Preference data", file_types=list(DATA_EXTENSIONS), type="filepath")
            check = gr.Button("Check the data", variant="secondary")
            report = gr.Markdown()
            hist = gr.BarPlot(x="tokens", y="pairs", color="fits", title="Tokens per pair (prompt + longer answer)",
                              height=220)
            examples = gr.HTML()

        with gr.Tab("3 · Train"):
            with gr.Row():
                start = gr.Button("Start training", variant="primary")
                stop = gr.Button("Stop (writes a checkpoint)", variant="stop")
                resume = gr.Button("Resume selected run")
            with gr.Row():
                run_dd = gr.Dropdown(label="Run", choices=[], interactive=True, scale=4)
                refresh_runs = gr.Button("Refresh list", scale=1)
            message = gr.Markdown()
            progress = gr.HTML()
            with gr.Row():
                plots = [gr.LinePlot(x="step", y="value", color="series", title=title, height=240)
                         for title, _ in PLOTS["dpo"][:2]]
            with gr.Row():
                plots += [gr.LinePlot(x="step", y="value", color="series", title=title, height=240)
                          for title, _ in PLOTS["dpo"][2:]]
            diagnostics = gr.Markdown()
            log_tail = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True)
            timer = gr.Timer(2.0)

        with gr.Tab("4 · Try it"):
            gr.Markdown("DPO runs: the trained policy and the reference (adapters off) answer the same prompt. "
                        "Reward runs: score two answers.")
            prompt = gr.Textbox(label="Prompt", value="What is the best way to sleep better?")
            raw = gr.Checkbox(label="Raw prompt (no chat template)", value=False)
            generate = gr.Button("Generate (policy vs reference)")
            with gr.Row():
                policy_out = gr.Textbox(label="Policy (trained adapter)", lines=4)
                reference_out = gr.Textbox(label="Reference", lines=4)
            with gr.Row():
                answer_a = gr.Textbox(label="Answer A", lines=2)
                answer_b = gr.Textbox(label="Answer B", lines=2)
            score = gr.Button("Score A and B (reward model)")
            scores = gr.Markdown()

        with gr.Tab("5 · Export"):
            zip_btn = gr.Button("Download the adapter (zip)")
            zip_file = gr.File(label="Adapter")
            merge_btn = gr.Button("Merge into the base (fp16, on the CPU) and save")
            repo = gr.Textbox(label="Hub repo id (user/name)")
            token = gr.Textbox(label="Hub token (write access)", type="password")
            push_btn = gr.Button("Push the adapter to the Hub")
            export_msg = gr.Markdown()

        # -- handlers ----------------------------------------------------------------------------------------------
        @_plain
        def on_preset(name):
            cfg = build_config(name)
            return [*form_values(cfg), memory_line(cfg, hw), cli_command(name, cfg), dump_yaml(cfg)]

        @_plain
        def on_settings(name, up, *values):
            cfg = config_from_form(name, None, list(values))
            if up:
                cfg.dataset = f"<uploaded: {Path(up).name}>"
            return memory_line(cfg, hw), cli_command(name, cfg), dump_yaml(cfg)

        @_plain
        def on_doctor(name, up, *values):
            return doctor(config_from_form(name, up, list(values), uploads))

        @_plain
        def on_start(name, up, *values):
            cfg = config_from_form(name, up, list(values), uploads)
            from .data import load_rows

            load_rows(cfg.dataset, cfg.dataset_split, cfg.trust_remote_code)  # unreadable data: say so now
            run = manager.start(cfg)
            return f"Started **{run}**. The curves appear after the first steps.", run_choices(run)

        @_plain
        def on_stop(name):
            stopped = manager.stop(name or None)
            return f"Stopping **{stopped}**: it finishes the current step and writes a checkpoint.", run_choices(name)

        @_plain
        def on_resume(name):
            if not name:
                raise UserError("select a run to resume")
            manager.resume(name)
            return f"Resuming **{name}** from its last checkpoint.", run_choices(name)

        def on_refresh(name):
            empty = plot_frames([], "dpo")
            if not name:
                return ["", *empty, "No run selected. Start one, or pick one from the list.", ""]
            try:
                run = manager.run_dir(name)
            except ConfigError as e:
                return ["", *empty, str(e), ""]
            state = run.state()
            metrics = run.read_metrics()
            status = run.read_status()
            task = status.get("task") or "dpo"
            return [progress_html(run, metrics, state), *plot_frames(metrics, task),
                    diagnostics_md(metrics, task, status.get("total_steps")),
                    tail(run.log) or tail(run.path / "console.log")]

        @_plain
        def on_generate(name, text, raw_prompt):
            if not name:
                raise UserError("select a run in the Train tab first")
            model = trained(name)
            if model.task != "dpo":
                raise UserError(f"run '{name}' is a reward model: use 'Score A and B'")
            return model.generate(text, raw=raw_prompt)

        @_plain
        def on_score(name, text, a, b):
            if not name:
                raise UserError("select a run in the Train tab first")
            model = trained(name)
            if model.task != "reward":
                raise UserError(f"run '{name}' is a DPO policy: use 'Generate'")
            sa, sb = model.score(text, a, b)
            better = "A" if sa > sb else "B"
            return f"Score A **{sa:.3f}**, score B **{sb:.3f}**: the reward model prefers **{better}**."

        @_plain
        def on_zip(name):
            from .infer import adapter_of

            if not name:
                raise UserError("select a run in the Train tab first")
            adapter = adapter_of(manager.run_dir(name))
            out = Path(tempfile.mkdtemp(prefix="lowrank_pref_")) / f"{name}-adapter"
            return shutil.make_archive(str(out), "zip", adapter)

        @_plain
        def on_merge(name):
            from .export import merge
            from .infer import adapter_of

            if not name:
                raise UserError("select a run in the Train tab first")
            run = manager.run_dir(name)
            out = merge(adapter_of(run), run.path / "merged")
            return f"Merged model saved to `{out}` (fp16, safetensors)."

        @_plain
        def on_push(name, repo_id, hub_token):
            from .export import push
            from .infer import adapter_of

            if not name:
                raise UserError("select a run in the Train tab first")
            if not repo_id or "/" not in repo_id:
                raise UserError("give the Hub repo id as user/name")
            if not hub_token:
                raise UserError("give a Hub token with write access")
            return f"Pushed to {push(adapter_of(manager.run_dir(name)), repo_id, hub_token)}"

        preset.change(on_preset, preset, [*form, estimate, command, yaml_box], api_name="preset")
        for comp in form:
            comp.change(on_settings, [preset, upload, *form], [estimate, command, yaml_box], api_name=False,
                        show_progress="hidden")
        check.click(on_doctor, [preset, upload, *form], [report, hist, examples], api_name="doctor")
        start.click(on_start, [preset, upload, *form], [message, run_dd], api_name="start")
        stop.click(on_stop, run_dd, [message, run_dd], api_name="stop")
        resume.click(on_resume, run_dd, [message, run_dd], api_name="resume")
        refresh_outputs = [progress, *plots, diagnostics, log_tail]
        refresh_runs.click(lambda name: run_choices(name), run_dd, run_dd, api_name="runs")
        # another run: clear the plots first, so each is drawn afresh with its own series
        run_dd.change(lambda: [None] * len(plots), None, plots, api_name=False, show_progress="hidden").then(
            on_refresh, run_dd, refresh_outputs, api_name=False, show_progress="hidden")
        timer.tick(on_refresh, run_dd, refresh_outputs, api_name="refresh", show_progress="hidden")
        generate.click(on_generate, [run_dd, prompt, raw], [policy_out, reference_out], api_name="generate")
        score.click(on_score, [run_dd, prompt, answer_a, answer_b], scores, api_name="score")
        zip_btn.click(on_zip, run_dd, zip_file, api_name="export_zip")
        merge_btn.click(on_merge, run_dd, export_msg, api_name="merge")
        push_btn.click(on_push, [run_dd, repo, token], export_msg, api_name="push")
        demo.load(lambda: run_choices(), None, run_dd, api_name=False)
    demo.manager = manager  # for scripts and tests
    return demo


def server_name() -> str:
    """127.0.0.1 unless asked; a Hugging Face Space (SPACE_ID set) must listen on all interfaces."""
    if os.environ.get("SPACE_ID"):
        return "0.0.0.0"
    return os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")


def main(argv: list[str] | None = None) -> None:
    from .run import quiet_libraries

    p = argparse.ArgumentParser(prog="python app.py", description="The lowrank-pref app.")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; 0.0.0.0 in a Space)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--runs", default=None, help="runs folder (default: $LOWRANK_PREF_RUNS or ./runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    demo = build_app(args.runs)
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host or server_name(), server_port=args.port,
                                                   css=CSS, show_error=True)


if __name__ == "__main__":
    main()
