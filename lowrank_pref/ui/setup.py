"""The Setup tab: a preset, the settings that matter, the memory estimate, and the command that repeats it all.

The form is three named rows of config keys; each value goes into the config exactly as the CLI's ``key=value``
would (:func:`config_from_form`), so the command shown repeats the run. The objective row holds every task's own
keys (``Task.fields``), made once; only the selected task's are shown, and only those are read. "SFT first" turns
one run into two: an SFT run on the chosen answers, then the run asked for, started from the SFT adapter
(:func:`sft_first_config`). The reward model is chosen among this app's finished reward runs (:func:`reward_runs`:
a visitor's own in public), named in the form and resolved to its folder here, on the server.
"""

from __future__ import annotations

import functools
import hashlib
import html
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import yaml

from ..artifacts import read_metrics
from ..config import (COLUMN_ROLES, Config, ConfigError, apply_mapping, build_config, dump_yaml,
                      field_help, list_presets, to_dict, validate)
from ..model import _same_base
from ..runs import RUN_NAME
from ..tasks import TASKS, task_class
from .common import AppState, UserError, clean_exports, clean_uploads, event, on, task_of

# Labels of the keys tasks declare in Task.fields; a key without one is labelled by its name.
FIELD_LABELS = {"loss_type": "Loss type", "beta": "beta", "rpo_alpha": "rpo_alpha (SFT term on chosen)",
                "kto.desirable_weight": "Desirable (thumbs-up) weight",
                "kto.undesirable_weight": "Undesirable (thumbs-down) weight",
                "sft.completion_only": "Loss on the answers only",
                "center_rewards_coefficient": "Center rewards coefficient",
                "reward_model": "Reward model (a finished reward run of this model)",
                "rl.algorithm": "RL algorithm", "rl.k": "Completions per prompt (k)",
                "rl.max_new_tokens": "Max new tokens per completion"}


def task_field_keys() -> list[str]:
    """Every task's objective keys (``Task.fields``), each once, in registry order: the form makes them all and
    shows the selected task's."""
    keys = []
    for task in TASKS:
        keys += [k for k in task_class(task).fields if k not in keys]
    return keys


# The form, row by row: (config key, label). Everything else stays as the preset has it.
REWARD_KEY = "reward_model"  # one of this app's finished reward runs (rl needs one; dpo, sft, kto may be judged)
WHAT_ROW = [("model", "Model (hub id or local folder)"), ("task", "Task"), ("dataset", "Dataset (hub id or path)"),
            (REWARD_KEY, FIELD_LABELS[REWARD_KEY])]
OBJECTIVE_ROW = [(k, FIELD_LABELS.get(k, k)) for k in task_field_keys() if k != REWARD_KEY] + [
    ("learning_rate", "Learning rate"), ("max_steps", "Max steps (0: use epochs)"), ("num_epochs", "Epochs")]
SIZE_ROW = [("lora.r", "LoRA rank"), ("lora.alpha", "LoRA alpha"), ("max_length", "Max length (tokens)"),
            ("max_prompt_length", "Max prompt length (tokens)"),
            ("batch_size", "Batch size (pairs or examples per micro-step)"),
            ("gradient_accumulation_steps", "Gradient accumulation steps")]
# Folded away under "Advanced": what people look for once the first run works. Two entries are not config keys:
# ``data.columns`` is the mapping as one "role=column, ..." text, ``run_name`` names the run folder.
ADVANCED_ROWS = {
    "LoRA": [("lora.dropout", "LoRA dropout"), ("lora.target_modules", "LoRA target modules")],
    "Memory and precision": [("gradient_checkpointing", "Gradient checkpointing"), ("dtype", "Compute dtype")],
    "Eval and checkpoints": [("eval_steps", "Eval every N steps (0: 4 times a run)"),
                             ("save_steps", "Checkpoint every N steps (0: 4 times a run)")],
    "Data": [("data.columns", "Column mapping"), ("eval_dataset", "Eval dataset (hub id or path; empty: held out)")],
    "Run": [("run_name", "Run name (empty: <task>-<date>-<time>)")],
}
ADVANCED_ROW = [item for row in ADVANCED_ROWS.values() for item in row]
KEYS = [key for row in (WHAT_ROW, OBJECTIVE_ROW, SIZE_ROW, ADVANCED_ROW) for key, _ in row]  # handlers' value order
LABELS = {key: label for row in (WHAT_ROW, OBJECTIVE_ROW, SIZE_ROW, ADVANCED_ROW) for key, label in row}
FORM_ONLY = ("run_name",)  # form values that are not config keys
ZERO_IS_DEFAULT = ("max_steps", "eval_steps", "save_steps")  # number boxes where 0 means "not set" (None)
CHECKPOINTING = {"auto": None, "on": True, "off": False}  # the gradient checkpointing choice -> its config value
COLUMNS_HELP = ("Your column names, when they differ from the task's: role=column, comma-separated, e.g. "
                "prompt=question, chosen=good, rejected=bad. Roles: " + ", ".join(COLUMN_ROLES) + ".")
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


def columns_text(columns: dict | None) -> str:
    return ", ".join(f"{role}={column}" for role, column in (columns or {}).items())


def parse_columns(text: str | None) -> dict:
    """"prompt=question, chosen=good" -> {"prompt": "question", "chosen": "good"}; roles are checked by the config."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        role, sep, column = part.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise ConfigError(f"'data.columns': write each mapping as role=column (e.g. chosen=good), got "
                              f"'{part.strip()}'")
        out[role.strip()] = column.strip()
    return out


def _form_value(cfg: Config, key: str):
    if key in FORM_ONLY:
        return ""
    if key == "data.columns":
        return columns_text(cfg.data.columns)
    value = _get(cfg, key)
    if key in ZERO_IS_DEFAULT and value is None:
        return 0
    if key == "gradient_checkpointing":
        return next(k for k, v in CHECKPOINTING.items() if v is value)
    if key == "lora.target_modules" and isinstance(value, list):
        return ", ".join(value)
    if key == "eval_dataset" and value is None:
        return ""
    return value


def form_values(cfg: Config) -> list:
    """The form's values for ``cfg``, in :data:`KEYS` order (None shows as 0 in the boxes where 0 means unset)."""
    return [_form_value(cfg, k) for k in KEYS]


def name_fields(text: str) -> str:
    """A config message with the form's label beside each key it names: "'lora.r' must be >= 1" -> "LoRA rank
    ('lora.r') must be >= 1", so the user finds the field (the key stays: it is what the command line takes); a
    column mapping the message suggests (data.columns.chosen=...) is written as the Column mapping field takes it."""
    def label(m):
        name = LABELS.get(m.group(1))
        return f"{name} ({m.group(0)})" if name else m.group(0)

    text = re.sub(r"'([a-z_]+(?:\.[a-z_]+)*)'", label, text)
    where = f"in {LABELS['data.columns']} (Setup, Advanced)"
    return re.sub(r"(?<![\w.])data\.columns\.([a-z_]+)=(<[^>]*>|[^\s,;]+)", rf"\1=\2 {where}", text)


def run_name(values: list) -> str | None:
    """The run name typed in the form (Advanced), checked; None for the default name."""
    name = str(dict(zip(KEYS, values)).get("run_name") or "").strip()
    if name and not RUN_NAME.match(name):
        raise UserError(f"{LABELS['run_name']}: use letters, digits, '.', '_' and '-' (up to 100, starting with a "
                        f"letter or digit); got '{name[:40]}'")
    return name or None


def is_remote(value) -> bool:
    """Whether a model/dataset/adapter value names nothing on this server: a hub id or a builtin: name, and no file or
    folder of that name where the app runs ("presets", "README.md")."""
    if not isinstance(value, str):
        return False
    if BUILTIN.match(value):
        return True
    return bool(HUB_ID.match(value)) and ".." not in value and not os.path.lexists(value)


REWARD_PUBLIC = (f"{REWARD_KEY}: this public app reads no files on its server; pick one of your finished reward "
                 "runs in the list")


def refuse_server_paths(values: dict, preset: Config) -> None:
    """A public app reads no files on its server: each source key in ``values`` must be a hub id or builtin: name, or
    the preset's own value (presets are the app's files). The value is not echoed: it may be a probe."""
    for key in SOURCE_KEYS:
        value = values.get(key)
        if value is None or value == getattr(preset, key) or is_remote(value):
            continue
        if key == REWARD_KEY:
            raise UserError(REWARD_PUBLIC)
        where = "upload the data file in the Data tab, or give" if "dataset" in key else "give"
        raise UserError(f"{key}: this public app reads no files on its server; {where} a hub id (user/name)")


def public_preset(preset: str) -> None:
    """A public app offers its presets by name; a preset path would read a file on the server."""
    if preset not in list_presets():
        raise UserError(f"preset: choose one of {', '.join(list_presets())}")


def config_from_form(preset: str, upload: str | None, values: list, uploads_dir: Path | None = None,
                     public: bool = False, reward_runs: dict | None = None) -> Config:
    """The preset with the form's values on top; an uploaded file becomes the dataset. Another task's objective keys
    (hidden in the form) are not read: the preset's values stay, so a value typed for dpo never reaches a kto run.
    ``public``: the preset must be a listed one and the sources hub ids (:func:`refuse_server_paths`).
    ``reward_runs``: the reward runs the form's reward model may name (:func:`reward_runs`), each resolved to its
    folder here, on the server; in public nothing else is taken, locally a typed folder is too. A run trained on
    another model than the form's is refused, naming both."""
    if public:
        public_preset(preset)
    base = build_config(preset)
    form = dict(zip(KEYS, values))
    task = form.get("task") if form.get("task") in TASKS else base.task
    hidden = set(task_field_keys()) - set(task_class(task).fields)
    if takes_reward_model(task):
        hidden.discard(REWARD_KEY)
    overrides, picked = {}, None
    for key, value in form.items():
        if key in hidden or key in FORM_ONLY:
            continue
        if key == REWARD_KEY:
            value = (value.strip() if isinstance(value, str) else value) or None
            picked = (reward_runs or {}).get(value)
            if picked:  # its adapter folder: the run manager then keeps the reward run from being deleted under it
                value = str(picked.path / "adapter")
            elif value and public:
                raise UserError(REWARD_PUBLIC)
        if key == "data.columns":
            columns = parse_columns(value)
            if columns != (base.data.columns or {}):
                overrides[key] = columns
            continue
        if key in ZERO_IS_DEFAULT and value in (0, None, ""):
            value = None
        if key == "gradient_checkpointing":
            value = CHECKPOINTING.get(value, value)
        if key == "eval_dataset" and isinstance(value, str) and not value.strip():
            value = None
        if key == "lora.target_modules" and isinstance(value, str) and "," in value:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, float) and value.is_integer() and isinstance(_get(base, key), int):
            value = int(value)  # number boxes send floats
        if value != _get(base, key):
            overrides[key] = "null" if value is None else value
    if public:  # before anything is stored, read or built; an upload replaces the dataset box, which is not read
        refuse_server_paths({k: v for k, v in overrides.items() if not (upload and k == "dataset")
                             and k != REWARD_KEY}, base)
    if upload:
        overrides["dataset"] = str(store_upload(upload, uploads_dir) if uploads_dir else upload)
    cfg = build_config(preset, overrides=overrides)
    if picked and not _same_base(picked.model, cfg.model):
        raise UserError(f"{REWARD_KEY}: the reward run '{picked.name}' was trained on the model '{picked.model}', but "
                        f"this run's model is '{cfg.model}': a reward model only scores on the base it was trained "
                        f"on. Pick a reward run of '{cfg.model}', or set Model to '{picked.model}'")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# The reward model: one of this app's finished reward runs

def takes_reward_model(task: str | None) -> bool:
    """Whether the form's reward model applies: the rl task trains against it; the tasks that generate (dpo, sft,
    kto) are judged by it at each eval when one is given."""
    return task in TASKS and task_class(task).head == "lm"


def needs_reward_model(task: str | None) -> bool:
    """Whether the task can't run without one: it lists the reward model among its own keys (rl)."""
    return task in TASKS and REWARD_KEY in task_class(task).fields


def makes_reward_model(task: str | None) -> bool:
    """Whether the task's runs are reward models: a score head (the reward task)."""
    return task in TASKS and task_class(task).head == "score"


@dataclass
class RewardRun:
    """A finished reward run as the reward model's list offers it: its folder, its base model, its last eval
    accuracy (None without an eval)."""
    name: str
    path: Path
    model: str
    accuracy: float | None


def reward_runs(app: AppState) -> dict[str, RewardRun]:
    """This session's finished reward runs (completed, with their adapter), newest first, by name: every run locally,
    a visitor's own in public (``AppState.runs`` keeps visitors' runs apart by their owner)."""
    out = {}
    for r in app.runs():
        run = app.manager.run_dir(r["name"])
        if r["state"] != "completed" or not makes_reward_model(r["task"] or task_of(run)) or \
                not (run.adapter / "adapter_config.json").is_file():
            continue
        try:
            model, accuracy = _reward_facts(str(run.config), str(run.metrics), _stamp(run.config), _stamp(run.metrics))
        except (OSError, yaml.YAMLError):
            continue
        out[r["name"]] = RewardRun(r["name"], run.path.resolve(), str(model), accuracy)
    return out


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of a file, None when it is missing: what :func:`_reward_facts` is cached by."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=256)
def _reward_facts(config: str, metrics: str, *stamps) -> tuple[str | None, float | None]:
    """A reward run's base model (its config.yaml) and last eval accuracy (its metrics.jsonl), read again only when
    either file changes (``stamps``): the list is built on every refresh tick and form change."""
    model = (yaml.safe_load(Path(config).read_text()) or {}).get("model")
    evals = [m["eval_accuracy"] for m in read_metrics(metrics) if isinstance(m.get("eval_accuracy"), (int, float))]
    return model, evals[-1] if evals else None


def reward_run_name(value: str) -> str:
    """The reward run a ``reward_model`` value names: its folder, or the folder its adapter/ is in."""
    path = Path(value)
    return path.parent.name if path.name == "adapter" else path.name


def form_config(app: AppState, preset: str, upload: str | None, values: list, uploads_dir: Path | None = None
                ) -> Config:
    """:func:`config_from_form` for this session: public as the app is, the reward model one of its reward runs."""
    return config_from_form(preset, upload, values, uploads_dir, public=app.public, reward_runs=reward_runs(app))


def sibling_preset(app: AppState, preset: str, task: str) -> str:
    """The preset of the same size for another task (12gb-rl -> 12gb-reward, tiny -> tiny-reward), else the one this
    machine is suggested, else the tiny one."""
    size = preset.rsplit("-", 1)[0] if preset.rsplit("-", 1)[-1] in TASKS else preset
    presets = list_presets()
    for name in (f"{size}-{task}", suggest_preset(app.hw, task), f"tiny-{task}"):
        if name in presets and build_config(name).task == task:
            return name
    return preset


def reward_label(run: RewardRun, model: str | None) -> str:
    """A reward run as the list shows it: name, base model, eval accuracy; marked when its model is not the form's."""
    accuracy = f"eval accuracy {run.accuracy:.2f}" if run.accuracy is not None else "no eval yet"
    label = f"{run.name} · {run.model} · {accuracy}"
    return label if not model or _same_base(run.model, model) else f"{label} · ⚠ another model than {model}"


def no_reward_note(app: AppState, preset: str, model: str | None = None) -> str:
    """What an rl run without a finished reward run of its model is told: train one first, and how. ``model``: the
    form's, named when there are reward runs, all of other models."""
    what = f"No finished reward run of `{model}` yet" if model else "No finished reward run yet"
    return (f"**{what}.** An rl run trains the policy against a reward model you trained here on the same model: "
            f"train one first (preset `{sibling_preset(app, preset, 'reward')}`, on preference pairs), then pick it "
            "under Reward model once it has completed.")


def reward_state(app: AppState, preset: str, task: str, model: str, current: str | None) -> tuple[dict, dict, dict]:
    """The reward model's list for this session and the form's model (runs of another model marked); an rl run with
    none chosen gets the newest of its model. For rl without any finished reward run: the note and the button that
    sets up a reward run first, when it has none of its model."""
    runs = reward_runs(app)
    same = [r.name for r in runs.values() if _same_base(r.model, model or "")]
    value = current or (same[0] if needs_reward_model(task) and same else None)
    none_yet = needs_reward_model(task) and not same and not current
    note = no_reward_note(app, preset, model if runs else None) if none_yet else ""
    reward_preset = sibling_preset(app, preset, "reward")
    return (gr.update(choices=[(app.message(reward_label(r, model)), r.name) for r in runs.values()], value=value),
            gr.update(value=app.message(note), visible=none_yet),
            gr.update(value=f"Set up a reward model run first ({reward_preset})", visible=none_yet))


def no_reward_model(app: AppState, preset: str, model: str) -> str:
    """Start's refusal of an rl run without a reward model."""
    runs = reward_runs(app)
    if any(_same_base(r.model, model) for r in runs.values()):
        return (f"{REWARD_KEY}: an rl run trains against a reward model: pick one of your finished reward runs in "
                f"Setup ({LABELS[REWARD_KEY]})")
    return f"{REWARD_KEY}: {no_reward_note(app, preset, model if runs else None).replace('**', '')}"


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


def gb(value: float) -> str:
    """A memory size for people: 2 decimals in GB, MB below a tenth of a GB."""
    return f"{value:.2f} GB" if value >= 0.1 else f"{max(value * 1024, 0.1):.1f} MB"


def memory_verdict(cfg: Config, hw: dict) -> tuple[bool | None, str]:
    """(whether the run fits this machine: None when unknown, the line Setup shows). Start refuses what does not
    fit with this same line. The checkpointing is what a run would choose (memory.choose_plan) when the machine's
    memory is known."""
    from ..memory import choose_plan, plan_estimate

    gpu, have = bool(hw.get("gpu")), cfg.memory_limit_gb or hw.get("memory_gb")
    try:
        plan = choose_plan(cfg, have, gpu=gpu) if have else None
        est = plan_estimate(cfg, plan, gpu=gpu)
    except Exception as e:  # an unknown or unreachable model: say so, don't fail the page
        return None, f"Peak memory: no estimate ({type(e).__name__}: {str(e).splitlines()[0][:120]})."
    where = f"{hw['gpu']} ({hw['memory_gb']} GB)" if gpu else f"CPU RAM ({hw.get('memory_gb')} GB)"
    more = "" if plan and plan.checkpointing else ", or turn on gradient checkpointing (Advanced)"
    fits = None if not have else est["total"] <= have * 0.95
    verdict = "" if fits is None else (" fits" if fits else
                                       f" **does not fit**: lower Batch size or Max length{more}")
    how = f", gradient checkpointing {plan.describe()}" if plan else ""
    parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in est.items() if k != "total")
    return fits, f"Estimated peak memory **{gb(est['total'])}** on {where}{how}:{verdict}. ({parts})"


def memory_line(cfg: Config, hw: dict) -> str:
    """The memory model's verdict for these settings on this machine (:func:`memory_verdict`)."""
    return memory_verdict(cfg, hw)[1]


# ----------------------------------------------------------------------------------------------------------------
# Handlers: plain values in, plain values out

def preset_choices() -> list[tuple[str, str]]:
    """The presets as the dropdown lists them: tiny ones first, then the other CPU ones (smollm2), then by card size
    as a number (6gb before 12gb), each labelled once ("tiny-sft: ..." not "tiny-sft — tiny-sft: ...")."""
    def order(name: str):
        size = name.split("gb-")[0]
        if size.isdigit():
            return (2, int(size), name)
        return (0 if name.startswith("tiny") else 1, 0, name)

    out = []
    for name, about in sorted(list_presets().items(), key=lambda item: order(item[0])):
        about = about.removeprefix(f"{name}:").strip()
        out.append((f"{name}: {about}" if about else name, name))
    return out


def preset_changed(app: AppState, preset: str) -> list:
    """A new preset fills the form: its values, then the estimate, the command and the resolved YAML."""
    if app.public:
        public_preset(preset)
    cfg = build_config(preset)
    return [*form_values(cfg), memory_line(cfg, app.hw), cli_command(preset, cfg), dump_yaml(cfg)]


def reward_first_preset(app: AppState, preset: str, model: str | None = None) -> list:
    """"Set up a reward model run first": the reward preset of this size in the form, on the form's model when it is
    not the preset's (the reward model must be trained on the base the rl run will use). Returns the preset, the
    form's values and the summary (as :func:`preset_changed`)."""
    if app.public:  # a preset path or a server folder as the model would be read here (its config, for the estimate)
        public_preset(preset)
        refuse_server_paths({"model": model}, build_config(preset))
    name = sibling_preset(app, preset, "reward")
    mine = model and model != build_config(preset).model
    cfg = build_config(name, overrides={"model": model} if mine else {})
    return [gr.update(value=name), *form_values(cfg), memory_line(cfg, app.hw), cli_command(name, cfg),
            dump_yaml(cfg)]


def rl_from_reward(app: AppState, name: str | None) -> list:
    """"Train a policy against this reward model (RL)": the rl preset of the reward run's size (the one whose model
    is the run's; else this machine's, on the run's model) in the form, with this run as its reward model. Returns
    the preset, the form's values (:data:`KEYS` order), the summary and a message."""
    runs = reward_runs(app)
    if name not in runs:
        raise UserError(f"run '{name}' is not a finished reward run: RL needs a reward model that has completed")
    run = runs[name]
    rl = [p for p in list_presets() if p.endswith("-rl") and _same_base(build_config(p).model, run.model)]
    preset = rl[0] if rl else sibling_preset(app, suggest_preset(app.hw), "rl")
    cfg = build_config(preset, overrides={} if rl else {"model": run.model})
    values = form_values(cfg)
    values[KEYS.index(REWARD_KEY)] = gr.update(choices=[(app.message(reward_label(r, cfg.model)), r.name)
                                                        for r in runs.values()], value=name)
    cfg.reward_model = name if app.public else str(run.path / "adapter")
    return [gr.update(value=preset), *values, memory_line(cfg, app.hw), cli_command(preset, cfg), dump_yaml(cfg),
            f"Setup now holds an rl run (preset **{preset}**) against the reward model **{name}**: check its "
            "settings in the Setup tab, then press Start training."]


def task_changed(app: AppState, task: str) -> list[dict]:
    """Show the selected task's objective keys, hide the others' (in :func:`task_field_keys` order); the reward model
    for every task that takes one (:func:`takes_reward_model`)."""
    shown = set(task_class(task).fields) if task in TASKS else set()
    if takes_reward_model(task):
        shown.add(REWARD_KEY)
    return [gr.update(visible=key in shown) for key in task_field_keys()]


def bad_key(text: str) -> str | None:
    """The form key a config message is about ("key: ..." at its start, its first quoted key, or a data.columns
    role), if the form has it."""
    for m in re.finditer(r"^([a-z_]+(?:\.[a-z_]+)*):|'([a-z_]+(?:\.[a-z_]+)*)'|(data\.columns)\.[a-z_]+", text):
        key = m.group(1) or m.group(2) or m.group(3)
        for candidate in (key, key.rsplit(".", 1)[0]):
            if candidate in LABELS:
                return candidate
    return None


def field_id(key: str) -> str:
    """The element id of a form field (the marker's CSS finds a refused field by it)."""
    return "lp-field-" + re.sub(r"[^a-z0-9]+", "-", key)


def marker_html(bad: str | None = None, upload: str | None = None) -> str:
    """What settings_changed says about the fields without updating them (an update of a field the user is typing
    in could race with the typing): a style rule that marks the refused field, and a note when an upload replaces
    the Dataset box."""
    parts = []
    if bad:
        parts.append(f"<style>#{field_id(bad)} input, #{field_id(bad)} textarea, #{field_id(bad)} .wrap "
                     "{border: 2px solid #dc2626 !important}</style>")
    if upload:
        parts.append(f'<div class="lp-upload-note">Dataset: the uploaded file <b>{html.escape(Path(upload).name)}'
                     "</b> (Data tab) is used; the Dataset box is not read.</div>")
    return "".join(parts)


def settings_changed(app: AppState, preset: str, upload: str | None, sft_first: bool, *values) -> list:
    """Any change in the form: the estimate, the command and the resolved YAML for what Start would run, and the
    marker (:func:`marker_html`). A refused setting is said in the estimate's place with the field's label, and
    the field is marked."""
    values, processes = processes_of(app, values)
    try:
        cfg = form_config(app, preset, upload, values)
        run_name(values)
    except (ConfigError, UserError) as e:
        key = bad_key(str(e)) or ("run_name" if str(e).startswith(LABELS["run_name"]) else None)
        text = html.escape(app.message(name_fields(str(e))), quote=False)
        return [f"⛔ **Not a valid setting**: {text}", gr.update(), gr.update(), marker_html(key, upload)]
    if upload:
        cfg.dataset = f"<uploaded: {Path(upload).name}>"
    if app.public and cfg.reward_model:  # the run's name, not its folder on the server
        cfg.reward_model = reward_run_name(cfg.reward_model)
    command = chain_command(preset, cfg, processes) if sft_first else cli_command(preset, cfg, processes)
    return [memory_line(cfg, app.hw), command, dump_yaml(cfg), marker_html(None, upload)]


SETTINGS_FILE = "lowrank-pref-settings.yaml"


def save_settings(app: AppState, preset: str, upload: str | None, *values) -> str:
    """The form's settings as one YAML file to download (the resolved config: loading it back, or giving it to
    ``python -m lowrank_pref.run --config``, repeats them). An uploaded dataset is named by its file name."""
    import tempfile

    cfg = form_config(app, preset, None, processes_of(app, values)[0])
    if upload:
        cfg.dataset = Path(upload).name
    if app.public and cfg.reward_model:  # loaded back, the name is one of the visitor's runs again
        cfg.reward_model = reward_run_name(cfg.reward_model)
    cfg.output_dir = None
    app.exports.mkdir(parents=True, exist_ok=True)
    clean_exports(app.exports)
    out = Path(tempfile.mkdtemp(prefix="settings-", dir=app.exports)) / SETTINGS_FILE
    out.write_text(f"# lowrank-pref settings, from preset {preset}; run with: python -m lowrank_pref.run --config "
                   f"{SETTINGS_FILE}\n" + dump_yaml(cfg))
    return str(out)


def load_settings(app: AppState, preset: str, path: str | None) -> list:
    """A settings YAML (saved here, or written by hand) into the form, checked as a run would check it. Keys the
    form has no field for are named: they are not used (the command line takes them)."""
    if not path:
        return [gr.update() for _ in KEYS] + [""]
    name = Path(path).name
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"'{name}': load a .yaml settings file (the Save button writes one)")
    try:
        cfg = build_config(config_file=path)
    except ConfigError as e:
        raise ConfigError(str(e).replace(str(path), name)) from None
    if app.public:
        refuse_server_paths({k: getattr(cfg, k) for k in SOURCE_KEYS}, build_config(preset))
    base, mine = _flat(to_dict(build_config(preset))), _flat(to_dict(cfg))
    covered = set(KEYS) | {"output_dir"}
    unused = [k for k, v in mine.items() if v != base.get(k) and k not in covered and not k.startswith("data.columns")]
    note = f"Loaded **{html.escape(name)}** into the form."
    if unused:
        note += (" Not used, the form has no field for them (the command line takes them): "
                 + ", ".join(f"`{k}={mine[k]}`" for k in unused) + ".")
    return [*form_values(cfg), note]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "columns":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    reward: tuple | None = None  # (inputs, outputs) of reward_state: the page's load lists the session's runs too

    @property
    def form(self) -> list:
        """The form's inputs (in :data:`KEYS` order), then the GPUs box where there is one."""
        return [self.inputs[k] for k in KEYS] + ([self.all_gpus] if self.all_gpus is not None else [])


def _field(key: str, label: str, cfg: Config, public: bool = False):
    """The input for one form key: a choice where the config has choices, a number or a text box otherwise. The
    reward model is a list of this app's finished reward runs (filled per session, :func:`reward_state`); locally a
    folder may be typed in it too."""
    value = form_values(cfg)[KEYS.index(key)]
    if key == "task":
        tasks = TASKS
        about = "; ".join(f"{name}: {TASKS[name][1]}" for name in tasks)
        return gr.Radio(tasks, label=label, info=about + ".", value=value, elem_id=field_id(key))
    if key == REWARD_KEY:
        return gr.Dropdown([], label=label, value=value, allow_custom_value=True, elem_id=field_id(key), scale=2,
                           visible=takes_reward_model(cfg.task),
                           info="rl trains the policy against it; dpo, sft and kto runs given one are judged by it "
                                "at each eval (policy against reference). A finished reward run of this app on the "
                                "same model" + ("." if public else "; or type a reward run's folder."))
    if key == "run_name":
        return gr.Textbox(label=label, value=value, elem_id=field_id(key),
                          info="The run's folder and its name in the run list; you can rename a run later in the "
                               "Train tab.")
    info = COLUMNS_HELP if key == "data.columns" else field_help(key)
    visible = key not in task_field_keys() or key in task_class(cfg.task).fields
    common = {"label": label, "info": info, "value": value, "visible": visible, "elem_id": field_id(key)}
    if key == "gradient_checkpointing":
        return gr.Dropdown(list(CHECKPOINTING), **{**common, "info": info.replace("null", "auto")})
    choices = choices_of(key)
    if choices:
        return gr.Dropdown(list(choices), **common)
    if isinstance(value, bool):
        return gr.Checkbox(**common)
    if isinstance(value, str) or key in ("eval_dataset", "data.columns", "lora.target_modules"):
        return gr.Textbox(**common)
    return gr.Number(precision=0 if isinstance(value, int) else None, **common)


def choices_of(key: str) -> tuple | None:
    """The config's choices for a key (loss_type, dtype, ...), None for a free value."""
    import dataclasses

    from ..config import _resolve

    cls, name = _resolve(key)
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")


def create_setup_tab(app: AppState, preset_name: str, upload: gr.File, tab_select=None) -> SetupTab:
    """Build the Setup tab inside the current ``gr.Tab``. ``upload`` is the Data tab's file box: an uploaded file
    replaces the dataset in the command shown here. ``tab_select``: the tab's select listener (the reward runs are
    listed again when the tab is opened)."""
    cfg0 = build_config(preset_name)
    with gr.Row():
        preset = gr.Dropdown(preset_choices(), value=preset_name, label="Preset",
                             info="One per GPU size; tiny runs offline on a CPU.", scale=3)
    inputs = {}
    for title, row in (("What to train", WHAT_ROW), ("Objective and length of training", OBJECTIVE_ROW),
                       ("Size: adapter, sequences, batch", SIZE_ROW)):
        with gr.Group():
            gr.Markdown(f"**{title}**", elem_classes="lp-group")
            with gr.Row():
                for key, label in row:
                    inputs[key] = _field(key, label, cfg0, app.public)
        if row is WHAT_ROW:
            marker = gr.HTML("", elem_classes="lp-marker")
            with gr.Row():
                no_reward = gr.Markdown("", visible=False, elem_classes="lp-no-reward")
                reward_first = gr.Button("Set up a reward model run first", visible=False, scale=0, min_width=360)
    with gr.Accordion("Advanced: LoRA dropout and targets, checkpointing, dtype, eval and save steps, columns, eval "
                      "data, run name", open=False):
        for title, row in ADVANCED_ROWS.items():
            with gr.Group():
                gr.Markdown(f"**{title}**", elem_classes="lp-group")
                with gr.Row():
                    for key, label in row:
                        inputs[key] = _field(key, label, cfg0, app.public)
    sft_first = gr.Checkbox(label="SFT first", value=False,
                            info="Train an SFT adapter on the chosen answers first, then this run from it (the SFT "
                                 "adapter is then also the frozen reference). Two runs, one after the other.")
    gpus = app.hw.get("gpus") or 1
    all_gpus = gr.Checkbox(label=f"use all {gpus} GPUs", value=True, info="One process per GPU (torchrun), the same "
                           "steps as on one card with the batch split over them.") if gpus > 1 else None
    estimate = gr.Markdown(memory_line(cfg0, app.hw))
    with gr.Accordion("Save or load these settings; repeat them in a terminal", open=False):
        with gr.Row():
            save_btn = gr.Button("Save settings (YAML)")
            saved = gr.File(label="Settings file", interactive=False)
            load = gr.File(label="Load settings (.yaml)", file_types=[".yaml", ".yml"], type="filepath")
        loaded = gr.Markdown()
        command = gr.Code(cli_command(preset_name, cfg0), language="shell", label="Command")
        yaml_box = gr.Code(dump_yaml(cfg0), language="yaml", label="Resolved config")
    tab = SetupTab(preset, inputs, sft_first, [estimate, command, yaml_box], all_gpus)

    # .select, not .change: the buttons that set up another run (reward model first, RL from a reward run) set the
    # preset and fill the form themselves; a change event would fill it again, from the bare preset, after them.
    # Nor .input, which Gradio's dropdown fires twice a choice: the second fill could land after the user's first edit
    chosen = preset.select(event(preset_changed, app), preset, [*(tab.inputs[k] for k in KEYS), *tab.summary],
                          api_name="preset")
    # the reward model: this session's finished reward runs, listed again whenever they may have changed (a preset
    # empties the choice: the newest of its model is chosen again for rl)
    reward_inputs = [preset, inputs["task"], inputs["model"], inputs[REWARD_KEY]]
    reward_outputs = [inputs[REWARD_KEY], no_reward, reward_first]
    hidden = {"api_name": False, "show_progress": "hidden"}
    for trigger in (chosen.then, inputs["task"].change, inputs["model"].change,
                    *([tab_select] if tab_select else [])):
        on(trigger, reward_state, app, reward_inputs, reward_outputs, **hidden)
    tab.reward = (reward_inputs, reward_outputs)
    on(reward_first.click, reward_first_preset, app, [preset, inputs["model"]],
       [preset, *(tab.inputs[k] for k in KEYS), *tab.summary], api_name=False)
    # a new task (chosen, or set by a preset) shows its own objective keys
    inputs["task"].change(event(task_changed, app), inputs["task"], [inputs[k] for k in task_field_keys()],
                          api_name=False, show_progress="hidden")
    for comp in [*tab.form, sft_first, upload]:
        # with the session (common.on): the reward model names one of this visitor's runs, in public their own
        on(comp.change, settings_changed, app, [preset, upload, sft_first, *tab.form], [*tab.summary, marker],
           api_name=False, show_progress="hidden")
    on(save_btn.click, save_settings, app, [preset, upload, *tab.form], saved, api_name="save_settings")
    load.upload(event(load_settings, app), [preset, load], [*(tab.inputs[k] for k in KEYS), loaded],
                api_name="load_settings")
    return tab
