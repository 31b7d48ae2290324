"""One 4-bit base model carrying LoRA adapters: the policy with adapters on, the reference with them off.

- ``load_tokenizer(cfg)`` / ``load_model(cfg, tokenizer)``: NF4 + double quantization (bitsandbytes), or 8-bit, or
  none; LoRA via PEFT; for the reward task a sequence-classification model with one output whose ``score`` head is
  trained and saved with the adapter.
- ``reference_mode(model)``: the frozen reference *is* the same object: adapters disabled, or, when training started
  from an existing adapter, that adapter loaded a second time under the name ``reference`` and frozen.
- ``sequence_logps(model, batch)``: per-row sums of answer-token log-probs, with the LM head applied to answer
  positions only and in chunks (no (batch, tokens, vocab) logits tensor); ``shared_sequence_logps`` the same from
  ``[prompt | chosen | rejected]`` rows, whose attention ``shared_prompt_sdpa`` computes without the dense mask.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from .config import Config, ConfigError
from .memory import MemoryPlan, default_plan, full_checkpointing
from .patches import apply_patch
from .tasks import task_class
from .tiny import resolve_model

log = logging.getLogger("lowrank_pref")
POLICY, REFERENCE = "default", "reference"


class ModelError(ValueError):
    """A user-facing problem with the model or adapter (missing folder, unsupported architecture, ...)."""


def device() -> torch.device:
    """This process's device: its own GPU (on N processes the launcher's LOCAL_RANK, set by distributed.init)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(cfg: Config) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU unless asked (bf16 works there too)."""
    if cfg.dtype != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype the forward passes autocast to: the 16-bit compute dtype on a GPU; None (no autocast) on the CPU."""
    dtype = compute_dtype(cfg)
    return dtype if device().type == "cuda" and dtype != torch.float32 else None


def autocast(cfg: Config):
    """Mixed precision for the forward passes on GPU; log-probs and losses are upcast to fp32 regardless."""
    dtype = autocast_dtype(cfg)
    return torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()


def _source(cfg: Config) -> str:
    name = resolve_model(cfg.model)
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model folder '{name}' does not exist")
    return str(path) if path.exists() else name


def _from_pretrained_errors(what: str, name: str):
    """Turn the hub/loader's exceptions into one plain ModelError."""

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, (ModelError, ConfigError)):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"could not load the {what} from '{name}': {first}") from e

    return ctx()


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    name = _source(cfg)
    with _from_pretrained_errors("tokenizer", name):
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:  # many causal LMs ship without one; padding is masked, so eos serves
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise ModelError(f"tokenizer of '{name}' has no pad, eos or unk token to pad with")
    tok.padding_side = "right"
    return tok


def nf4_config(dtype: torch.dtype, storage: torch.dtype = torch.uint8):
    """QLoRA's quantization: NF4 with double quantization, computing in ``dtype``; the packed weights stored as
    ``storage`` (the compute dtype under FSDP, which shards them as flat tensors of one dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)


def quantization_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return nf4_config(compute_dtype(cfg), compute_dtype(cfg) if cfg.distributed == "fsdp" else torch.uint8)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def stored_quantization(name: str, revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """How the checkpoint of model ``name`` (hub id or folder) is quantized: "4bit" or "8bit" (bitsandbytes),
    another library's method name, or None for ordinary weights.

    Pre-quantized uploads (unsloth's "...-bnb-4bit" repos and the like) hold the NF4 weights themselves, about a
    third of the 16-bit download. transformers loads them with the quantization they were saved with, whatever
    ``quantization_config`` asks, so a run must not ask for another one (see :func:`load_base`)."""
    from transformers import AutoConfig

    with _from_pretrained_errors("model config", name):
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("quant_method") == "bitsandbytes":
        return "4bit" if q.get("load_in_4bit") else "8bit" if q.get("load_in_8bit") else "bitsandbytes"
    return str(q.get("quant_method", "an unknown method"))


def _check_stored_quantization(cfg: Config, stored: str, name: str) -> None:
    if stored not in ("4bit", "8bit"):
        raise ConfigError(f"model '{name}' is stored quantized with {stored}, which lowrank-pref does not train; "
                          "use the model's unquantized original (it is quantized with bitsandbytes as it loads)")
    if stored != cfg.quantization:
        raise ConfigError(f"model '{name}' is stored in {stored} (bitsandbytes), so quantization={cfg.quantization} "
                          f"can't apply to it; set quantization={stored} to train it as it is, or use the model's "
                          "unquantized original")


def load_base(cfg: Config, tokenizer, *, for_training: bool = True, plan: MemoryPlan | None = None):
    """The (quantized) transformers model, prepared for k-bit training, without adapters, with the activation
    checkpointing of ``plan`` (default: what the config asks for, see memory.default_plan)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = _source(cfg)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=compute_dtype(cfg),
                  attn_implementation=cfg.attn_implementation)
    stored = stored_quantization(name, cfg.revision, cfg.trust_remote_code)
    if stored is not None:
        _check_stored_quantization(cfg, stored, name)
        log.info("model stored in %s (pre-quantized): its weights load as they are", stored)
    q = quantization_config(cfg)
    if q is not None:
        kwargs["device_map"] = {"": device().index or 0} if device().type == "cuda" else {"": "cpu"}
        if stored is None:  # a pre-quantized model brings its own (passing ours too only earns a warning)
            kwargs["quantization_config"] = q
    with _from_pretrained_errors("model", name):
        if task_class(cfg.task).head == "score":
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if q is None:
        model.to(device())
    else:
        apply_patch("pin_cpu_4bit_kernel", cfg, model)
        compute_in(model, compute_dtype(cfg))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    apply_patch("shared_prompt_sdpa", cfg, model, cfg)
    if not for_training:
        return model
    if q is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if dtype := autocast_dtype(cfg):
            log.debug("16-bit embedding tables: %.2f GB saved", (apply_patch("embeddings_in", cfg, model, dtype) or 0)
                      / 2**30)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    plan = plan or default_plan(cfg, gpu=device().type == "cuda")  # auto is resolved by train(); else the safe choice
    if plan.checkpointing:
        # non-reentrant checkpointing needs no input-grad hack and works under no_grad for the reference pass;
        # transformers' offload pins host memory, which a machine without an accelerator doesn't have
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              offload=plan.offload and device().type != "cpu")
        checkpoint_first_layers(model, plan.checkpointed)
    return model


def checkpoint_first_layers(model, count: int | None) -> None:
    """Checkpoint only the first ``count`` decoder layers (None: as many as ``gradient_checkpointing=true``, see
    memory.full_checkpointing).

    Backward reaches the first layers last, after the later layers' saved activations are freed, so their
    recompute adds nothing to the peak. The last layer is never worth checkpointing: backward starts with it, so
    its recompute would bring the same activations back at once (the same peak, 1/L more work)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if count is None:
        count = full_checkpointing(len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count


def checkpointed_layers(model) -> int:
    """How many decoder layers recompute their activations in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) and bool(m.gradient_checkpointing) for m in model.modules())


def compute_in(model, dtype: torch.dtype) -> None:
    """Make every 4-bit layer compute in ``dtype``, the run's compute dtype. A pre-quantized checkpoint carries the
    compute dtype it was saved with (often bf16 or fp16); on the CPU, or on a GPU without bf16, it would not be
    ours."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype, module.compute_type_is_set = dtype, True


def lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora,
                      use_dora=cfg.lora.use_dora, bias="none",
                      task_type="SEQ_CLS" if task_class(cfg.task).head == "score" else "CAUSAL_LM")


def _starting_adapter(cfg: Config) -> str:
    """Where ``cfg.adapter`` is (a local folder, else a hub id), checked: a local one must be a PEFT adapter folder
    made for this task's kind of head (a reward model's SEQ_CLS adapter, with its score head, under a causal-LM task
    would be attached by PEFT anyway, and train nonsense)."""
    import json

    path = Path(cfg.adapter).expanduser()
    config = path / "adapter_config.json"
    if cfg.adapter.startswith((".", "/", "~")) and not config.is_file():
        raise ModelError(f"adapter '{cfg.adapter}' has no adapter_config.json (a PEFT adapter folder is needed)")
    if not config.is_file():
        return cfg.adapter  # a hub id: PEFT reads it, and says what is wrong with it
    kind = json.loads(config.read_text()).get("task_type")
    want = "SEQ_CLS" if task_class(cfg.task).head == "score" else "CAUSAL_LM"
    if kind and kind != want:
        made = "a reward model's (a score head)" if kind == "SEQ_CLS" else f"a {kind} adapter"
        raise ModelError(f"adapter '{cfg.adapter}' is {made}, but task={cfg.task} starts from a {want} adapter "
                         "(e.g. an sft run's adapter/); leave adapter unset to start from the base")
    return str(path)


def load_model(cfg: Config, tokenizer, plan: MemoryPlan | None = None, *, keep_reference: bool = True):
    """The PeftModel to train (checkpointing as ``plan`` says, see load_base). Returns (model, reference_kind) with
    reference_kind 'base' or 'adapter'. ``keep_reference``: a starting adapter is loaded a second time, frozen, as
    the reference (tasks that read no reference skip that copy)."""
    from peft import PeftModel, get_peft_model

    src = _starting_adapter(cfg) if cfg.adapter else None  # before the base loads (minutes for a large model)
    base = load_base(cfg, tokenizer, plan=plan)
    if src:
        with _from_pretrained_errors("adapter", src):
            model = PeftModel.from_pretrained(base, src, adapter_name=POLICY, is_trainable=True)
            if keep_reference:  # the reference is the starting adapter, frozen: never silently the bare base
                model.load_adapter(src, adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter(POLICY)
        reference = "adapter"
    else:
        try:
            model = get_peft_model(base, lora_config(cfg))
        except ValueError as e:  # e.g. target modules not found in this architecture
            raise ConfigError(f"lora: {str(e).splitlines()[0]}") from None
        reference = "base"
    log.debug("LoRA layers with the fused add: %s", apply_patch("fuse_lora_adds", cfg, model))
    log.debug("input-grad hooks removed: %s", apply_patch("no_input_grads", cfg, model))
    return model, reference


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def reference_mode(model):
    """The frozen reference: adapters off (or the frozen starting adapter), eval mode (no LoRA dropout), no grad."""
    if REFERENCE in model.peft_config:
        with adapter_role(model, REFERENCE):
            yield model
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Saving

def save_adapter(model, tokenizer, path: str | os.PathLike) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors) + tokenizer; only the policy adapter."""
    from .distributed import adapter_state

    model.save_pretrained(str(path), selected_adapters=[POLICY], safe_serialization=True, **adapter_state(model))
    tokenizer.save_pretrained(str(path))


# ----------------------------------------------------------------------------------------------------------------
# More roles on the same base (the RL loop): a frozen reward adapter with its score head

REWARD = "reward"


def reward_adapter_dir(spec: str) -> Path:
    """The adapter folder of ``reward_model=``: a reward run folder (its ``adapter/``) or an adapter folder itself.
    Raises ModelError naming what is missing."""
    path = Path(spec).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"reward_model '{spec}' is neither a reward run folder (with adapter/) nor an adapter folder "
                         "(with adapter_config.json); train one with --task reward and give its run folder")
    return path


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_reward_model(cfg: Config) -> Path:
    """The reward adapter folder of ``cfg.reward_model``, checked without loading any weights: it must be a reward
    model (a SEQ_CLS adapter with a saved score head) trained on this run's base model. Raises ModelError."""
    import json

    path = reward_adapter_dir(cfg.reward_model)
    meta = json.loads((path / "adapter_config.json").read_text())
    if meta.get("task_type") != "SEQ_CLS":
        raise ModelError(f"reward_model '{cfg.reward_model}' is a {meta.get('task_type') or 'plain'} adapter, not a "
                         "reward model (a score head); give the folder of a --task reward run")
    if meta.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"reward_model '{cfg.reward_model}' is a {meta.get('peft_type')} adapter; only LoRA ones load")
    trained_on, ours = str(meta.get("base_model_name_or_path") or ""), _source(cfg)
    if not _same_base(trained_on, ours):
        raise ModelError(f"reward_model '{cfg.reward_model}' was trained on the base model '{trained_on}', but this "
                         f"run's model is '{cfg.model}' ({ours}): its adapter and score head only mean something on "
                         "the base they were trained on. Train a reward model on this base (--task reward "
                         f"--model {cfg.model}), or set model to the reward model's base")
    return path


def attach_reward(model, cfg: Config) -> torch.nn.Linear:
    """Load the reward model's LoRA weights as a second, frozen adapter ``reward`` on the policy's base (one copy of
    the base weights) and return its score head (hidden -> 1, frozen). The policy stays the active adapter.

    The new LoRA's and the head's initial weights (overwritten at once) are drawn from a fork of the global RNG: a
    resumed run attaches the reward model after restoring the RNG from its checkpoint, and its rollouts must be the
    uninterrupted run's."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        return _attach_reward(model, cfg)


def _attach_reward(model, cfg: Config) -> torch.nn.Linear:
    import json

    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = check_reward_model(cfg)
    meta = json.loads((path / "adapter_config.json").read_text())
    weights = load_file(str(path / "adapter_model.safetensors"))
    score = {k: v for k, v in weights.items() if k.split(".")[-2] == "score" or ".score." in k}
    lora = {k: v for k, v in weights.items() if k not in score}
    if len(score) != 1:
        raise ModelError(f"reward_model '{cfg.reward_model}' holds no single score head weight ({sorted(score)[:3]})")
    config = LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], lora_dropout=0.0,
                        target_modules=meta["target_modules"], use_rslora=meta.get("use_rslora", False),
                        use_dora=meta.get("use_dora", False), bias="none", task_type="CAUSAL_LM",
                        inference_mode=True)
    with _from_pretrained_errors("reward adapter", str(path)):
        model.add_adapter(REWARD, config)
        result = set_peft_model_state_dict(model, lora, adapter_name=REWARD)
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"reward_model '{cfg.reward_model}' does not fit this model: {result.unexpected_keys[:3]}")
    missing = [k for k in getattr(result, "missing_keys", []) if f".{REWARD}." in k]
    if missing:
        raise ModelError(f"reward_model '{cfg.reward_model}' lacks weights for {missing[:3]}")
    model.set_adapter(POLICY)  # PEFT made the new adapter trainable; only the policy is
    for name, p in model.named_parameters():
        if f".{REWARD}." in name:
            p.requires_grad_(False)
    (weight,) = score.values()
    hidden = model.get_base_model().config.get_text_config().hidden_size
    if weight.shape != (1, hidden):
        raise ModelError(f"reward_model '{cfg.reward_model}' has a score head of shape {tuple(weight.shape)}; this "
                         f"model needs (1, {hidden})")
    head = torch.nn.Linear(hidden, 1, bias=False).to(device=next(model.parameters()).device)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
    head.requires_grad_(False)
    return head


@contextlib.contextmanager
def adapter_role(model, name: str):
    """Another frozen role of the same base (e.g. ``reward``): that adapter active, eval mode, no grad; the policy
    active again afterwards. Nothing is loaded or copied."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.set_adapter(name, inference_mode=True)
            try:
                yield model
            finally:
                model.set_adapter(POLICY)
    finally:
        model.train(was_training)
