"""The Setup tab: a preset, the settings that matter, the memory estimate, and the command that repeats it all.

The form is three named rows of config keys; each value goes into the config exactly as the CLI's ``key=value``
would (:func:`config_from_form`), so the command shown repeats the run. The objective row holds every task's own
keys (``Task.fields``), made once; only the selected task's are shown, and only those are read. "SFT first" turns
one run into two: an SFT run on the chosen answers, then the run asked for, started from the SFT adapter
(:func:`sft_first_config`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..config import (LOSS_TYPES, Config, apply_mapping, build_config, dump_yaml, field_help, list_presets, to_dict,
                      validate)
from ..tasks import TASKS, task_class
from .common import AppState, UserError, clean_uploads, event

# Labels of the keys tasks declare in Task.fields; a key without one is labelled by its name.
FIELD_LABELS = {"loss_type": "Loss type", "beta": "beta", "rpo_alpha": "rpo_alpha (SFT term on chosen)",
                "kto.desirable_weight": "Desirable (thumbs-up) weight",
                "kto.undesirable_weight": "Undesirable (thumbs-down) weight",
                "sft.completion_only": "Loss on the answers only",
                "center_rewards_coefficient": "Center rewards coefficient",
                "reward_model": "Reward model (a finished reward run's folder, same model)",
                "rl.algorithm": "RL algorithm (rloo or online_dpo)", "rl.k": "Completions per prompt (k)",
                "rl.max_new_tokens": "Max new tokens per completion"}


def task_field_keys() -> list[str]:
    """Every task's objective keys (``Task.fields``), each once, in registry order: the form makes them all and
    shows the selected task's."""
    keys = []
    for task in TASKS:
        keys += [k for k in task_class(task).fields if k not in keys]
    return keys


# The form, row by row: (config key, label). Everything else stays as the preset has it.
WHAT_ROW = [("model", "Model (hub id or local folder)"), ("task", "Task"), ("dataset", "Dataset (hub id or path)")]
OBJECTIVE_ROW = [(k, FIELD_LABELS.get(k, k)) for k in task_field_keys()] + [
    ("learning_rate", "Learning rate"), ("max_steps", "Max steps (0: use epochs)"), ("num_epochs", "Epochs")]
SIZE_ROW = [("lora.r", "LoRA rank"), ("lora.alpha", "LoRA alpha"), ("max_length", "Max length (tokens)"),
            ("max_prompt_length", "Max prompt length (tokens)"),
            ("batch_size", "Batch size (pairs or examples per micro-step)"),
            ("gradient_accumulation_steps", "Gradient accumulation steps")]
KEYS = [key for row in (WHAT_ROW, OBJECTIVE_ROW, SIZE_ROW) for key, _ in row]  # the order handlers take values in
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
# The keys that name something to read; a public app takes hub ids and builtin: names in them, never server paths.
SOURCE_KEYS = ("model", "dataset", "eval_dataset", "adapter", "reward_model")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # "name" or "user/name"
BUILTIN = re.compile(r"^builtin:[a-z0-9-]+$")

SFT_TASK = "sft"  # what "SFT first" trains before the run asked for
# What the SFT step takes from the form when it has a preset of its own: the model and the data it sees, so its
# adapter fits the run that follows; how to train (learning rate, steps, LoRA) stays the SFT preset's.
SFT_CARRIES = ("model", "revision", "trust_remote_code", "dataset", "dataset_split", "eval_dataset", "eval_split",
               "data", "max_length", "max_prompt_length", "quantization", "dtype", "attn_implementation",
               "memory_limit_gb")
# Without an SFT preset, the SFT step is the form's run with these left as the preset has them: they belong to the
# preference objective, which the SFT task may refuse.
OBJECTIVE_KEYS = ("loss_type", "beta", "label_smoothing", "simpo_gamma", "rpo_alpha", "center_rewards_coefficient")


# ----------------------------------------------------------------------------------------------------------------
# Presets, the form and the config

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
    """The form's values for ``cfg``, in :data:`KEYS` order (max_steps None shows as 0)."""
    return [0 if k == "max_steps" and _get(cfg, k) is None else _get(cfg, k) for k in KEYS]


def is_remote(value) -> bool:
    """Whether a model/dataset/adapter value names nothing on this server: a hub id or a builtin: name, and no file or
    folder of that name where the app runs ("presets", "README.md")."""
    if not isinstance(value, str):
        return False
    if BUILTIN.match(value):
        return True
    return bool(HUB_ID.match(value)) and ".." not in value and not os.path.lexists(value)


def refuse_server_paths(values: dict, preset: Config) -> None:
    """A public app reads no files on its server: each source key in ``values`` must be a hub id or builtin: name, or
    the preset's own value (presets are the app's files). The value is not echoed: it may be a probe."""
    for key in SOURCE_KEYS:
        value = values.get(key)
        if value is None or value == getattr(preset, key) or is_remote(value):
            continue
        where = "upload the data file in the Data tab, or give" if "dataset" in key else "give"
        raise UserError(f"{key}: this public app reads no files on its server; {where} a hub id (user/name)")


def public_preset(preset: str) -> None:
    """A public app offers its presets by name; a preset path would read a file on the server."""
    if preset not in list_presets():
        raise UserError(f"preset: choose one of {', '.join(list_presets())}")


def config_from_form(preset: str, upload: str | None, values: list, uploads_dir: Path | None = None,
                     public: bool = False) -> Config:
    """The preset with the form's values on top; an uploaded file becomes the dataset. Another task's objective keys
    (hidden in the form) are not read: the preset's values stay, so a value typed for dpo never reaches a kto run.
    ``public``: the preset must be a listed one and the sources hub ids (:func:`refuse_server_paths`)."""
    if public:
        public_preset(preset)
    base = build_config(preset)
    form = dict(zip(KEYS, values))
    task = form.get("task") if form.get("task") in TASKS else base.task
    hidden = set(task_field_keys()) - set(task_class(task).fields)
    overrides = {}
    for key, value in form.items():
        if key in hidden:
            continue
        if key == "max_steps" and value in (0, None, ""):
            value = None
        if isinstance(value, float) and value.is_integer() and isinstance(_get(base, key), int):
            value = int(value)  # number boxes send floats
        if value != _get(base, key):
            overrides[key] = "null" if value is None else value
    if public:  # before anything is stored, read or built; an upload replaces the dataset box, which is not read
        refuse_server_paths({k: v for k, v in overrides.items() if not (upload and k == "dataset")}, base)
    if upload:
        overrides["dataset"] = str(store_upload(upload, uploads_dir) if uploads_dir else upload)
    return build_config(preset, overrides=overrides)


def store_upload(path: str, uploads_dir: Path) -> Path:
    """Keep an uploaded data file with the runs (it is read as data by `datasets`, never executed). Hashed in
    chunks: an upload may be as large as the app allows. Uploads no run refers to go after a day."""
    src = Path(path)
    if src.suffix.lower() not in DATA_EXTENSIONS:
        raise UserError(f"'{src.name}': upload a {', '.join(DATA_EXTENSIONS)} data file")
    uploads_dir.mkdir(parents=True, exist_ok=True)
    clean_uploads(uploads_dir, uploads_dir.parent)
    digest = hashlib.sha1()
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    dest = uploads_dir / f"{digest.hexdigest()[:12]}-{src.name}"  # by content: a run's data never changes under it
    if dest.exists():
        os.utime(dest)  # used again: a fresh day before it may be cleaned
    else:
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)  # whole or not at all: a half-copied upload would pass as the file
    return dest.resolve()


def sft_first_config(preset: str, cfg: Config) -> Config:
    """The SFT run that goes before ``cfg`` when "SFT first" is ticked: the same model and data, the chosen answers
    as SFT targets (``sft.source=chosen``). It uses the SFT preset of the same size when there is one (``12gb-dpo``
    -> ``12gb-sft``: SFT wants other learning rates than DPO), else the form's own settings. The run after it starts
    from its adapter, which is then also its frozen reference."""
    if cfg.task == SFT_TASK:
        raise UserError("SFT first: this run is SFT already; untick SFT first")
    head = task_class(cfg.task).head
    if head != "lm":
        raise UserError(f"SFT first: a {cfg.task} run trains a {head} head from the base model, not from an SFT "
                        "adapter; untick SFT first")
    own = sft_preset(preset, cfg)
    mine = to_dict(cfg)
    if own != preset:
        d = to_dict(build_config(own))
        d.update({k: mine[k] for k in SFT_CARRIES})
    else:
        d = {**mine, **{k: to_dict(build_config(preset))[k] for k in OBJECTIVE_KEYS}}
    d.update(task=SFT_TASK, sft={"source": "chosen"}, output_dir=None)
    sft = _config(d, "SFT first (the SFT run)")
    # the run asked for must accept the adapter the SFT run will write: check it now, not after the SFT run
    _config({**mine, "adapter": "sft-first/adapter", "output_dir": None}, f"SFT first (the {cfg.task} run)")
    return sft


def _config(mapping: dict, source: str) -> Config:
    cfg = Config()
    apply_mapping(cfg, mapping, source=source)
    validate(cfg)
    return cfg


def sft_preset(preset: str, cfg: Config) -> str:
    """The preset an SFT-first step starts from: the SFT preset of the same size if there is one, else ``preset``."""
    own = preset.replace(f"-{cfg.task}", f"-{SFT_TASK}")
    return own if own != preset and own in list_presets() else preset


def cli_command(preset: str, cfg: Config, processes: int = 1) -> str:
    """The terminal command that repeats this run (on ``processes`` GPUs: through torchrun)."""
    base = to_dict(build_config(preset))
    mine = to_dict(cfg)
    launch = f"torchrun --nproc-per-node {processes} -m" if processes > 1 else "python -m"
    parts = [f"{launch} lowrank_pref.run", f"--preset {preset}"]

    def diff(a, b, prefix=""):
        for k, v in b.items():
            if isinstance(v, dict):
                diff(a.get(k, {}), v, f"{prefix}{k}.")
            elif a.get(k) != v and k != "output_dir":
                text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                parts.append(f"{prefix}{k}={text}" if " " not in text else f"'{prefix}{k}={text}'")

    diff(base, mine)
    return " ".join(parts)


def chain_command(preset: str, cfg: Config, processes: int = 1) -> str:
    """The two commands of an SFT-first run: the SFT run into a folder, then the run asked for from its adapter."""
    sft = sft_first_config(preset, cfg)
    folder = f"runs/{SFT_TASK}-first"
    return (f"{cli_command(sft_preset(preset, cfg), sft, processes)} --output-dir {folder} &&\n"
            f"{cli_command(preset, cfg, processes)} adapter={folder}/adapter")


def processes_of(app: AppState, values: tuple) -> tuple[list, int]:
    """The form's values and the processes to run on: the "use all N GPUs" box, when the machine has more than one
    GPU, comes after the form's values (:func:`create_setup_tab`)."""
    if len(values) > len(KEYS):
        return list(values[:len(KEYS)]), app.hw.get("gpus", 1) if values[len(KEYS)] else 1
    return list(values), 1


def memory_line(cfg: Config, hw: dict) -> str:
    """The memory model's verdict for these settings on this machine, with the checkpointing a run would choose
    (memory.choose_plan) when the machine's memory is known."""
    from ..memory import choose_plan, plan_estimate

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
# Handlers: plain values in, plain values out

def preset_changed(app: AppState, preset: str) -> list:
    """A new preset fills the form: its values, then the estimate, the command and the resolved YAML."""
    if app.public:
        public_preset(preset)
    cfg = build_config(preset)
    return [*form_values(cfg), memory_line(cfg, app.hw), cli_command(preset, cfg), dump_yaml(cfg)]


def task_changed(app: AppState, task: str) -> list[dict]:
    """Show the selected task's objective keys, hide the others' (in :func:`task_field_keys` order)."""
    shown = set(task_class(task).fields) if task in TASKS else set()
    return [gr.update(visible=key in shown) for key in task_field_keys()]


def settings_changed(app: AppState, preset: str, upload: str | None, sft_first: bool, *values) -> tuple[str, str, str]:
    """Any change in the form: the estimate, the command and the resolved YAML, for what Start would run."""
    values, processes = processes_of(app, values)
    cfg = config_from_form(preset, upload, values, public=app.public)
    if upload:
        cfg.dataset = f"<uploaded: {Path(upload).name}>"
    command = chain_command(preset, cfg, processes) if sft_first else cli_command(preset, cfg, processes)
    return memory_line(cfg, app.hw), command, dump_yaml(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The tab

@dataclass
class SetupTab:
    """The components other tabs read: the preset, the form (in :data:`KEYS` order) and the SFT-first box."""
    preset: gr.Dropdown
    inputs: dict
    sft_first: gr.Checkbox
    summary: list  # estimate, command, resolved YAML: what a settings change updates
    all_gpus: gr.Checkbox | None = None  # "use all N GPUs", on a machine with several

    @property
    def form(self) -> list:
        """The form's inputs (in :data:`KEYS` order), then the GPUs box where there is one."""
        return [self.inputs[k] for k in KEYS] + ([self.all_gpus] if self.all_gpus is not None else [])


def _field(key: str, label: str, cfg: Config):
    """The input for one config key: a choice where the config has choices, a number or a text box otherwise."""
    value = form_values(cfg)[KEYS.index(key)]
    if key == "task":
        tasks = TASKS
        about = "; ".join(f"{name}: {TASKS[name][1]}" for name in tasks)
        return gr.Radio(tasks, label=label, info=about + ".", value=value)
    visible = key not in task_field_keys() or key in task_class(cfg.task).fields
    if key == "loss_type":
        return gr.Dropdown(list(LOSS_TYPES), label=label, info=field_help(key), value=value, visible=visible)
    if isinstance(value, bool):
        return gr.Checkbox(label=label, info=field_help(key), value=value, visible=visible)
    if isinstance(value, str):
        return gr.Textbox(label=label, info=field_help(key), value=value, visible=visible)
    return gr.Number(label=label, info=field_help(key), value=value, precision=0 if isinstance(value, int) else None,
                     visible=visible)


def create_setup_tab(app: AppState, preset_name: str, upload: gr.File) -> SetupTab:
    """Build the Setup tab inside the current ``gr.Tab``. ``upload`` is the Data tab's file box: an uploaded file
    replaces the dataset in the command shown here."""
    cfg0 = build_config(preset_name)
    with gr.Row():
        preset = gr.Dropdown([(f"{k} — {v}", k) for k, v in list_presets().items()], value=preset_name,
                             label="Preset", info="One per GPU size; tiny runs offline on a CPU.", scale=3)
    inputs = {}
    for row in (WHAT_ROW, OBJECTIVE_ROW, SIZE_ROW):
        with gr.Row():
            for key, label in row:
                inputs[key] = _field(key, label, cfg0)
    sft_first = gr.Checkbox(label="SFT first", value=False,
                            info="Train an SFT adapter on the chosen answers first, then this run from it (the SFT "
                                 "adapter is then also the frozen reference). Two runs, one after the other.")
    gpus = app.hw.get("gpus") or 1
    all_gpus = gr.Checkbox(label=f"use all {gpus} GPUs", value=True, info="One process per GPU (torchrun), the same "
                           "steps as on one card with the batch split over them.") if gpus > 1 else None
    estimate = gr.Markdown(memory_line(cfg0, app.hw))
    with gr.Accordion("Repeat this in a terminal", open=False):
        command = gr.Code(cli_command(preset_name, cfg0), language="shell", label="Command")
        yaml_box = gr.Code(dump_yaml(cfg0), language="yaml", label="Resolved config")
    tab = SetupTab(preset, inputs, sft_first, [estimate, command, yaml_box], all_gpus)

    preset.change(event(preset_changed, app), preset, [*(tab.inputs[k] for k in KEYS), *tab.summary],
                  api_name="preset")
    # a new task (chosen, or set by a preset) shows its own objective keys
    inputs["task"].change(event(task_changed, app), inputs["task"], [inputs[k] for k in task_field_keys()],
                          api_name=False, show_progress="hidden")
    for comp in [*tab.form, sft_first, upload]:
        comp.change(event(settings_changed, app), [preset, upload, sft_first, *tab.form], tab.summary,
                    api_name=False, show_progress="hidden")
    return tab
