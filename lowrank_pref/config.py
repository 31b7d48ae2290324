"""The one typed config: dataclasses with a help line per field, presets, and key=value overrides.

Everything a run needs is here and is validated before any model loads. The CLI and the app only apply
overrides (``lora.r=16 beta=0.05``); unknown keys are refused with a did-you-mean, values are parsed by the
field's declared type (so ``learning_rate=5e-6`` is a float, not YAML's string) and checked against the
field's range or choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .losses import LOSSES
from .tasks import TASKS

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A user error in the config: the message names the key and says what would fix it."""


# Upper bounds of the sizes: far above any real run on one GPU, low enough that an absurd value (num_epochs=1e9,
# gradient_accumulation_steps=1e12, lora.r=1e12) is refused here instead of making a run that never ends its first
# step or its step count. A help line that has one says "at most N".
MAX_TOKENS = 1 << 20  # max_length, max_prompt_length: a million tokens a sequence
MAX_ITEMS = 65_536  # batch_size, eval_batch_size, gradient_accumulation_steps
MAX_RANK = 4096  # lora.r
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits


def _f(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False, factory=None):
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


LOSS_TYPES = tuple(LOSSES)
COLUMN_ROLES = ("prompt", "chosen", "rejected", "margin", "system", "completion", "label", "messages", "text")


@dataclass
class LoraSettings:
    r: int = _f(16, f"LoRA rank: higher gives more capacity and more memory (at most {MAX_RANK}).", min=1,
                max=MAX_RANK)
    alpha: float = _f(32, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).", min=0,
                      min_exclusive=True)
    dropout: float = _f(0.05, "Dropout on the LoRA input; 0 makes steps deterministic.", min=0.0, max=0.99)
    target_modules: Any = _f("all-linear", "Modules that get adapters: 'all-linear' or a list of names.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale alpha / sqrt(r).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA): slower, sometimes better.")


@dataclass
class DataSettings:
    columns: dict = _f(None, "Map our names to your columns, e.g. data.columns.prompt=question "
                             "(keys: prompt, chosen, rejected, margin, system, completion, label, messages, text).",
                       factory=dict)
    on_bad_rows: str = _f("skip", "What to do with rows that can't be used: skip them (counted and reported) "
                                  "or error (stop at the first).", choices=("skip", "error"))
    eval_fraction: float = _f(0.05, "Share of the data held out for eval when no eval dataset is given.",
                              min=0.0, max=0.5)
    eval_max_pairs: int = _f(256, "At most this many held-out items (pairs, examples) are split off for eval.", min=1)
    max_pairs: int | None = _f(None, "Use at most this many training items (pairs, examples) after shuffling with "
                                     "the seed.", min=1)
    chat_template: str | None = _f(None, "A Jinja chat template to use instead of the tokenizer's own.")


@dataclass
class SftSettings:
    source: str = _f("auto", "sft task: auto reads conversations (messages), prompt/completion or text rows, and the "
                             "chosen answers of preference data; chosen insists on preference data.",
                     choices=("auto", "chosen"))
    completion_only: bool = _f(True, "sft task: loss on the answers (assistant turns) only; false also trains on "
                                     "the prompts.")


@dataclass
class KtoSettings:
    desirable_weight: float = _f(1.0, "kto task: weight of the thumbs-up (desirable) rows' loss; raise it when they "
                                      "are fewer (the run's log suggests values).", min=0.0, min_exclusive=True)
    undesirable_weight: float = _f(1.0, "kto task: weight of the thumbs-down (undesirable) rows' loss.", min=0.0,
                                   min_exclusive=True)


@dataclass
class RlSettings:
    """rl task (tasks/rl.py). Defaults follow the published recipes: RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer),
    online DPO (Guo et al. 2024) and PPO (Ouyang et al. 2022; TRL's PPOTrainer before its removal). The KL coefficient
    is the top-level ``beta``."""
    algorithm: str = _f("rloo", "rl task: rloo (REINFORCE, leave-one-out baseline over the k samples of a prompt; no "
                                "value model), online_dpo (the best and worst of the k samples by the reward model "
                                "become a DPO pair) or ppo (InstructGPT's: a value adapter initialised from the "
                                "reward model, GAE, clipped policy and value losses, rl.ppo_epochs passes over each "
                                "rollout).", choices=("rloo", "online_dpo", "ppo"))
    k: int = _f(4, "rl task: completions sampled per prompt (RLOO's k; 2 to 64). More: a better baseline and more "
                   "generation memory (k x batch_size sequences in the KV cache).", min=2, max=64)
    temperature: float = _f(1.0, "rl task: sampling temperature of the rollouts (1.0: the policy's own distribution, "
                                 "which the KL and the REINFORCE gradient assume).", min=0.0, min_exclusive=True,
                            max=10.0)
    top_p: float = _f(1.0, "rl task: nucleus sampling of the rollouts (1.0: off, as the recipes sample).", min=0.0,
                      min_exclusive=True, max=1.0)
    max_new_tokens: int = _f(64, "rl task: longest completion in tokens; generation stops earlier at the eos token.",
                             min=1, max=MAX_TOKENS)
    kl_estimator: str = _f("k1", "rl task: per-token KL estimator: k1 = log pi - log pi_ref (RLOO's, summed into the "
                                 "reward), k3 = exp(-d) + d - 1 >= 0 (GRPO's, as a loss term).", choices=("k1", "k3"))
    kl_in_reward: bool = _f(True, "rl task: subtract beta x the sequence's KL from its reward before the advantages "
                                  "(RLOO paper; for ppo, beta x each token's KL from that token's reward, as "
                                  "InstructGPT); false adds beta x the mean per-token KL to the loss instead (GRPO).")
    missing_eos_penalty: float | None = _f(None, "rl task: subtract this from the reward of completions cut at "
                                                 "max_new_tokens without eos (TRL's missing_eos_penalty; 1.0 is "
                                                 "typical when answers run on).", min=0.0, max=1e6)
    reward_clip: float | None = _f(None, "rl task: clip rewards to [-x, x] before anything else (guards against a "
                                         "reward model's outliers).", min=0.0, min_exclusive=True, max=1e6)
    whiten_rewards: bool = _f(False, "rl task: whiten the rewards of each micro-batch (mean kept), so the KL term's "
                                     "weight does not depend on the reward model's scale (ppo: the per-token "
                                     "rewards, as TRL's PPOTrainer).")
    normalize_advantages: bool = _f(False, "rl task, rloo: scale the advantages of each micro-batch to zero mean, "
                                           "unit std (TRL's normalize_advantages; off in the RLOO paper). ppo always "
                                           "whitens its per-token advantages, as its recipe does.")
    ppo_epochs: int = _f(4, "rl.algorithm=ppo: optimizer steps over each rollout batch (TRL's num_ppo_epochs); each "
                            "is one run step, so max_steps counts them: max_steps=40 with 4 is 10 rollouts.", min=1,
                         max=64)
    cliprange: float = _f(0.2, "rl.algorithm=ppo: the policy ratio's clip, [1 - x, 1 + x] (PPO's epsilon).", min=0.0,
                          min_exclusive=True, max=10.0)
    cliprange_value: float = _f(0.2, "rl.algorithm=ppo: how far a value may move from the rollout's before its loss "
                                     "is clipped.", min=0.0, min_exclusive=True, max=1e6)
    vf_coef: float = _f(0.1, "rl.algorithm=ppo: the value loss's weight beside the policy loss (TRL's vf_coef).",
                        min=0.0, max=1e3)
    gamma: float = _f(1.0, "rl.algorithm=ppo: discount per token in GAE (1.0: the recipes' choice for text).", min=0.0,
                      max=1.0)
    lam: float = _f(0.95, "rl.algorithm=ppo: GAE's lambda: 1.0 uses the whole return (more variance), lower leans on "
                          "the value adapter (more bias).", min=0.0, max=1.0)
    eval_samples: int = _f(4, "rl task (and runs given reward_model): held-out prompts whose completions go to "
                              "samples.jsonl at each eval.", min=0, max=MAX_ITEMS)


@dataclass
class Config:
    # what to train
    task: str = _f("dpo", "; ".join(f"{name}: {about}" for name, (_, about) in TASKS.items()) + ".",
                   choices=tuple(TASKS))
    model: str = _f("builtin:tiny", "Hub id or local folder of a causal LM; builtin:tiny builds an offline toy model.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model.")
    reward_model: str | None = _f(None, "A reward run folder (or its adapter/) on the same base: the rl task's "
                                        "reward; for dpo, sft and kto runs it judges policy vs reference at eval.")
    adapter: str | None = _f(None, "Start from this LoRA adapter (e.g. your SFT adapter); it is also the frozen "
                                   "reference.")
    trust_remote_code: bool = _f(False, "Run model code shipped in the model repo. Off unless you trust it.")
    # data
    dataset: str = _f("builtin:tiny-prefs", "Local .jsonl/.json/.csv/.parquet file or folder, or a hub dataset id.")
    dataset_split: str = _f("train", "Split of the dataset to train on.")
    eval_dataset: str | None = _f(None, "Separate eval file or hub id; default: hold out part of the training data.")
    eval_split: str | None = _f(None, "Split of the (eval) dataset to evaluate on, e.g. test_prefs.")
    max_length: int = _f(1024, "Longest prompt + answer in tokens; answers are cut from the right (at most "
                               f"{MAX_TOKENS:,}).", min=8, max=MAX_TOKENS)
    max_prompt_length: int = _f(512, "Longest prompt in tokens; prompts are cut from the left.", min=1,
                                max=MAX_TOKENS)
    data: DataSettings = field(default_factory=DataSettings)
    # model numerics
    quantization: str = _f("4bit", "4bit (QLoRA, NF4 + double quantization), 8bit, or none (plain LoRA).",
                           choices=("4bit", "8bit", "none"))
    dtype: str = _f("auto", "Compute dtype: auto picks bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU.",
                    choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool | None = _f(None, "Recompute activations in backward: much less memory. auto "
                                                   "(null): the layout measured faster where both fit (GPU: off; "
                                                   "CPU: on), else as few layers as make it fit.")
    checkpoint_offload: bool | None = _f(None, "GPU, with checkpointing: keep the checkpointed layers' inputs "
                                               "(layers x tokens x hidden x 4 bytes) in pinned host RAM, not on the "
                                               "card; a copy each way per layer and step. auto (null): on when the "
                                               "run would not fit otherwise.")
    memory_limit_gb: float | None = _f(None, "Memory the run may plan for, in GB (e.g. to leave room for other "
                                             "programs on the card); default: the GPU's memory, or the free RAM.",
                                       min=0.0, min_exclusive=True)
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, or flash_attention_2 (if installed).",
                                  choices=("sdpa", "eager", "flash_attention_2"))
    shared_prompt: str = _f("auto", "Send each prompt through the model once, as [prompt | chosen | rejected] with "
                                    "a mask; auto checks on the first pairs that the model gives the same outputs "
                                    "this way, else falls back to two sequences per pair.",
                            choices=("auto", "on", "off"))
    reference_cache: bool = _f(True, "dpo and kto: keep reference log-probs on disk (by model, starting adapter and "
                                     "the pair's tokens), so later epochs, evals, resumed runs and runs that change "
                                     "only beta or the loss type skip the reference forward.")
    patches: bool = _f(True, "Our overrides of PEFT / bitsandbytes / transformers internals (fused LoRA add, split "
                             "shared-prompt attention, 16-bit tables, ...), each only on the library versions it was "
                             "tested on; false runs the libraries' own code paths, except where those give wrong "
                             "results (the CPU 4-bit kernel pin).")
    token_budget: int | None = _f(None, "Pack each micro-step to about this many tokens (pairs x longest pair, pairs "
                                        "grouped by length) instead of batch_size pairs: many short pairs or few long "
                                        "ones, little padding.", min=8, max=MAX_ITEMS * MAX_TOKENS)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sft: SftSettings = field(default_factory=SftSettings)
    kto: KtoSettings = field(default_factory=KtoSettings)
    rl: RlSettings = field(default_factory=RlSettings)
    # the objective
    beta: float = _f(0.1, "DPO / KTO temperature, the rl task's KL coefficient: higher keeps the policy closer to "
                          "the reference.", min=0.0, min_exclusive=True)
    loss_type: str = _f("sigmoid", "Preference loss (dpo task). simpo and orpo need no reference pass.",
                        choices=LOSS_TYPES)
    label_smoothing: float = _f(0.0, "Assumed share of flipped labels (conservative DPO / robust DPO).", min=0.0,
                                max=0.49)
    simpo_gamma: float = _f(0.5, "SimPO target reward margin.", min=0.0)
    rpo_alpha: float | None = _f(None, "Add this times the chosen answers' NLL (an SFT term; RPO). Counters "
                                       "falling chosen log-probs.", min=0.0)
    center_rewards_coefficient: float | None = _f(None, "Reward task: pull scores towards zero mean (TRL's "
                                                        "centring; 0.01 is typical).", min=0.0)
    # optimisation
    batch_size: int = _f(1, f"Items per micro-step: pairs (dpo, reward), examples (sft, kto); at most {MAX_ITEMS:,}.",
                         min=1, max=MAX_ITEMS)
    eval_batch_size: int | None = _f(None, "Items per eval micro-step (default: batch_size).", min=1, max=MAX_ITEMS)
    gradient_accumulation_steps: int = _f(8, "Micro-steps per optimizer step: batch_size x this = items per step "
                                             f"(at most {MAX_ITEMS:,}).", min=1, max=MAX_ITEMS)
    learning_rate: float = _f(5e-6, "Peak learning rate of the adapters.", min=0.0, min_exclusive=True)
    lr_scheduler_type: str = _f("cosine", "Schedule after warmup (transformers' names).",
                                choices=("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                                         "polynomial", "inverse_sqrt"))
    warmup_ratio: float = _f(0.1, "Share of the steps spent warming up the learning rate.", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapters.", min=0.0)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 disables).", min=0.0)
    optimizer: str = _f("auto", "auto: paged 8-bit AdamW on GPU, torch AdamW on CPU.",
                        choices=("auto", "adamw_torch", "paged_adamw_8bit", "adamw_8bit"))
    distributed: str = _f("auto", "Several processes (started by torchrun or accelerate launch): auto runs them "
                                  "data-parallel (ddp), the single-process run's batches split over them; fsdp: "
                                  "FSDP-QLoRA, the 4-bit layers sharded over the GPUs; none refuses a launch on "
                                  "several.",
                          choices=("auto", "none", "ddp", "fsdp"))
    num_epochs: float = _f(1.0, f"Passes over the training data (ignored when max_steps is set; at most "
                                f"{MAX_EPOCHS:,}).", min=0.0, min_exclusive=True, max=MAX_EPOCHS)
    max_steps: int | None = _f(None, f"Stop after this many optimizer steps (at most {MAX_STEPS:,}).", min=1,
                               max=MAX_STEPS)
    seed: int = _f(42, "Seed for data order, adapter init and dropout (0 to 2**63 - 1).", min=0, max=MAX_SEED)
    max_nonfinite_steps: int = _f(5, "Stop after this many optimizer steps in a row with a NaN/inf loss.", min=1)
    logprob_chunk_size: int | None = _f(None, "Answer tokens per chunk of the LM head, so full-vocabulary logits "
                                              "never exist for the whole batch (default: ~256 MB of fp32 logits).",
                                        min=1)
    # bookkeeping
    output_dir: str | None = _f(None, "Run folder (default: runs/<task>-<time>).")
    logging_steps: int = _f(1, "Log train metrics every N optimizer steps.", min=1)
    eval_steps: int | None = _f(None, "Evaluate every N steps (and always at the end); default: 4 times a run.",
                                min=1)
    save_steps: int | None = _f(None, "Write a resumable checkpoint every N steps (default: 4 times a run).", min=1)
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.", min=1)
    report_to: str = _f("none", "Also send the metrics to: tensorboard, wandb, mlflow, trackio (comma list), or none.")


# ----------------------------------------------------------------------------------------------------------------
# Introspection helpers (the app builds its settings form from these too)

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_help(key: str) -> str:
    """The one-line help of a dotted key, e.g. ``field_help("lora.r")``."""
    cls, name = _resolve(key)
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key a user may set."""
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _resolve(key: str):
    """(dataclass, field name) for a dotted key, or ConfigError with a did-you-mean."""
    parts = key.split(".")
    cls = Config
    for i, part in enumerate(parts):
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(_unknown(key))
        if i == len(parts) - 1:
            return cls, part
        cls = _hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(_unknown(key))
    raise ConfigError(_unknown(key))


def _unknown(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # a bare name that lives under a group, e.g. 'r' for 'lora.r'
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} (python -m lowrank_pref.run --list-keys shows them all)"


# ----------------------------------------------------------------------------------------------------------------
# Parsing values by type

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _parse_value(key: str, raw: Any, hint: Any) -> Any:
    """Turn a raw value (a CLI string or a YAML value) into the field's type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "", "auto")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _parse_value(key, raw, inner)
    if hint is Any:  # lora.target_modules: a string or a list of strings
        if isinstance(raw, str) and raw.startswith("["):
            raw = yaml.safe_load(raw)
        if isinstance(raw, str) and "," in raw:
            raw = [s.strip() for s in raw.split(",") if s.strip()]
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw) or isinstance(raw, str):
            return raw
        raise ConfigError(f"'{key}' must be a name or a list of names, got {raw!r}")
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"'{key}' must be true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, bool):
            raise ConfigError(f"'{key}' must be a whole number, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:  # exactly, as written: through a float, 2**63 - 1 would round up past the seed's range
            return int(str(raw).replace("_", "").strip())
        except ValueError:
            pass
        try:
            value = float(str(raw).replace("_", ""))
        except ValueError:
            raise ConfigError(f"'{key}' must be a whole number, got {raw!r}") from None
        if not value.is_integer():
            raise ConfigError(f"'{key}' must be a whole number, got {raw!r}")
        return int(value)
    if hint is float:
        if isinstance(raw, bool):
            raise ConfigError(f"'{key}' must be a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number, got {raw!r}") from None
        if not math.isfinite(value):  # nan passes every range check (nan < lo is false), inf most of them
            raise ConfigError(f"'{key}' must be a finite number, got {raw!r}")
        return value
    if hint is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"'{key}' must be a single value, got {raw!r}")
        return str(raw)
    if hint is dict:
        if not isinstance(raw, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {raw!r}")
        return {str(k): str(v) for k, v in raw.items()}
    raise ConfigError(f"'{key}': unsupported type {hint}")  # a bug in this file, not the user's


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'{key}' must be one of {', '.join(meta['choices'])}; got '{value}'.{hint}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        op = ">" if meta.get("min_exclusive") else ">="
        raise ConfigError(f"'{key}' must be {op} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"'{key}' must be <= {hi}, got {value}")


def set_key(cfg: Config, key: str, raw: Any) -> None:
    """Set one dotted key from a raw value, parsed and checked."""
    key = key.strip().replace("-", "_")
    parts = key.split(".")
    if len(parts) == 3 and parts[:2] == ["data", "columns"]:
        allowed = COLUMN_ROLES
        if parts[2] not in allowed:
            raise ConfigError(f"unknown column role '{parts[2]}' in '{key}'; roles are {', '.join(allowed)}")
        cfg.data.columns[parts[2]] = str(raw)
        return
    cls, name = _resolve(key)
    target = cfg
    for part in parts[:-1]:
        target = getattr(target, part)
    fld = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = _hints(cls)[name]
    if dataclasses.is_dataclass(hint):
        if not isinstance(raw, dict):
            raise ConfigError(f"'{key}' is a group; set its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
        for sub, val in raw.items():
            set_key(cfg, f"{key}.{sub}", val)
        return
    value = _parse_value(key, raw, hint)
    if name == "columns":
        for role in value:
            set_key(cfg, f"data.columns.{role}", value[role])
        return
    _check_range(key, value, fld.metadata)
    setattr(target, name, value)


# Keys a run folder's config.yaml carries for people to read (which reference was active); not settings.
RUN_INFO_KEYS = ("reference",)


def apply_mapping(cfg: Config, mapping: dict, source: str = "") -> None:
    """Apply a nested mapping (a preset or config file) key by key."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source or 'config'} must be a mapping of keys to values")
    mapping = {k: v for k, v in mapping.items() if k not in RUN_INFO_KEYS}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and key not in ("data.columns",):
                walk(key + ".", v)
            else:
                try:
                    set_key(cfg, key, v)
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}" if source else str(e)) from None

    walk("", mapping)


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"'{item}' is not a key=value override (e.g. lora.r=16 beta=0.05)")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"'{item}' has no key before '='")
    return key.strip(), value


# ----------------------------------------------------------------------------------------------------------------
# Presets and files

def list_presets() -> dict[str, str]:
    """name -> first comment line of each preset file."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"'{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return data or {}


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = list(list_presets())
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"no preset '{name_or_path}'.{hint} Presets: {', '.join(names)} (or give a .yaml path)")


def build_config(preset: str | None = None, config_file: str | None = None, overrides: dict | None = None,
                 ) -> Config:
    """Defaults <- preset <- config file <- overrides (each later one wins), then cross-field checks."""
    cfg = Config()
    if preset:
        path = preset_path(preset)
        apply_mapping(cfg, read_yaml(path), source=f"preset {path.name}")
    if config_file:
        apply_mapping(cfg, read_yaml(config_file), source=str(config_file))
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve several fields."""
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length "
                          f"({cfg.max_length}) so answers keep some tokens; lower max_prompt_length or raise "
                          "max_length")
    if cfg.checkpoint_offload and cfg.gradient_checkpointing is False:
        raise ConfigError("checkpoint_offload=true offloads the inputs of checkpointed layers, but "
                          "gradient_checkpointing is false; turn checkpointing on (true or auto) or leave "
                          "checkpoint_offload at auto")
    from .tasks import task_class
    from .trackers import parse

    parse(cfg.report_to)
    task_class(cfg.task).validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    apply_mapping(cfg, data, source="config.yaml")
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
