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
import resource
import sys
import types
from pathlib import Path

import torch

from .config import Config, ConfigError
from .losses import selected_token_logps
from .memory import MemoryPlan, default_plan, full_checkpointing
from .tiny import resolve_model

log = logging.getLogger("lowrank_pref")
POLICY, REFERENCE = "default", "reference"


class ModelError(ValueError):
    """A user-facing problem with the model or adapter (missing folder, unsupported architecture, ...)."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def nf4_config(dtype: torch.dtype):
    """QLoRA's quantization: NF4 with double quantization, computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def quantization_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return nf4_config(compute_dtype(cfg))
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
        if cfg.task == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if q is None:
        model.to(device())
    else:
        pin_cpu_4bit_kernel(model)
        compute_in(model, compute_dtype(cfg))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    use_shared_prompt_sdpa(model, cfg)
    if not for_training:
        return model
    if q is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if dtype := autocast_dtype(cfg):
            log.debug("16-bit embedding tables: %.2f GB saved", embeddings_in(model, dtype) / 2**30)
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


def embeddings_in(model, dtype: torch.dtype) -> int:
    """Hold the input embeddings and the LM head in ``dtype``, the 16-bit dtype they were loaded in, instead of the
    fp32 copies ``prepare_model_for_kbit_training`` makes of every non-4-bit weight; the input embeddings' output is
    upcast to fp32 as before. Returns the bytes saved.

    Use it only where the forward passes run under autocast to ``dtype``. Both tables are frozen. The fp32 rows of
    the input embeddings are exact upcasts of the loaded ones, so the upcast output is the same; the LM head's
    matmul under autocast cast its fp32 weight back to ``dtype`` anyway, on every call (autocast caches casts of
    trainable weights only), which gives back exactly the loaded values. So the outputs are bit for bit the same,
    each table takes half the memory (1 GB less each for Llama-3-8B), and each LM-head chunk no longer makes a
    transient 16-bit copy of the whole table."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    modules = [m for m in (embeddings, head) if isinstance(getattr(m, "weight", None), torch.Tensor)]
    # only plain modules, whose outputs the argument above covers: a subclass may compute in its weight's dtype
    # (Gemma 3's embeddings scale their output in it), and a head tied to such embeddings shares their weight
    plain = [m for m in modules if type(m) in (torch.nn.Embedding, torch.nn.Linear)]
    unsafe = {id(m.weight) for m in modules if m not in plain}
    saved, seen = 0, set()
    for module in plain:
        weight = module.weight
        if id(weight) in unsafe | seen or weight.requires_grad or weight.dtype != torch.float32:
            continue
        seen.add(id(weight))
        weight.data = weight.data.to(dtype)
        saved += weight.numel() * (4 - weight.element_size())
    if id(getattr(embeddings, "weight", None)) in seen:
        embeddings.register_forward_hook(_upcast_output)
    if saved and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the fp32 copies' blocks, as prepare_model_for_kbit_training does after its casts
    return saved


def _upcast_output(module, inputs, output):
    return output.float()


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


def pin_cpu_4bit_kernel(model) -> None:
    """One 4-bit kernel for the whole run on CPU.

    bitsandbytes (0.50, CPUs with AVX512-bf16) repacks a Linear4bit's weights the first time it runs in eval mode
    without grad (our reference pass) and every later forward, training ones included, then uses the packed bf16
    kernel; saving a state dict unpacks them again, and the round trip is not exact. So policy and reference would
    use different kernels, and a run that wrote checkpoints would drift from one resumed from them. Keeping the
    unpacked kernel makes reference == base and resume exact (tests/test_cli.py, tests/test_model.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora,
                      use_dora=cfg.lora.use_dora, bias="none",
                      task_type="SEQ_CLS" if cfg.task == "reward" else "CAUSAL_LM")


def load_model(cfg: Config, tokenizer, plan: MemoryPlan | None = None):
    """The PeftModel to train (checkpointing as ``plan`` says, see load_base). Returns (model, reference_kind) with
    reference_kind 'base' or 'adapter'."""
    from peft import PeftModel, get_peft_model

    base = load_base(cfg, tokenizer, plan=plan)
    if cfg.adapter:
        path = Path(cfg.adapter).expanduser()
        if cfg.adapter.startswith((".", "/", "~")) and not (path / "adapter_config.json").is_file():
            raise ModelError(f"adapter '{cfg.adapter}' has no adapter_config.json (a PEFT adapter folder is needed)")
        src = str(path) if path.exists() else cfg.adapter
        with _from_pretrained_errors("adapter", src):
            model = PeftModel.from_pretrained(base, src, adapter_name=POLICY, is_trainable=True)
            # the reference is the starting adapter, frozen: never silently the bare base
            model.load_adapter(src, adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter(POLICY)
        reference = "adapter"
    else:
        try:
            model = get_peft_model(base, lora_config(cfg))
        except ValueError as e:  # e.g. target modules not found in this architecture
            raise ConfigError(f"lora: {str(e).splitlines()[0]}") from None
        reference = "base"
    fused = fuse_lora_adds(model)
    log.debug("LoRA layers with the fused add: %d", fused)
    log.debug("input-grad hooks removed: %d", no_input_grads(model))
    return model, reference


def no_input_grads(model) -> int:
    """Remove the hooks that make the input embeddings' output require grad. Returns how many were removed.

    transformers adds one when it turns checkpointing on (and PEFT another for an unquantized model). Reentrant
    checkpointing needs them; ours is non-reentrant, and the LoRA weights need no gradient from below the first
    layer. With the hook, backward also computes the gradient of the first layer's input, which nothing reads: its
    q/k/v projections pass over their 4-bit weights once more per step (3 of 7L), and its input norm is
    differentiated too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = base.get_input_embeddings()
    hooks = getattr(embeddings, "_forward_hooks", {})
    drop = [k for k, fn in hooks.items() if getattr(fn, "__name__", "") in ("make_inputs_require_grads",
                                                                             "make_inputs_require_grad")]
    for k in drop:
        del hooks[k]
    return len(drop)


def fuse_lora_adds(model) -> int:
    """Compute each LoRA linear as ``base(x).add_(B(A(x)), alpha=scaling)``, the LoRA branch first.

    PEFT's forward (0.21) clones the 4-bit layer's output, then writes ``B(A(x))``, its product with the scaling
    and the sum as three more tensors of the output's size, and walks them again in backward. Adding the branch into
    the base output in place, with the scaling as ``alpha``, gives the same sum with one pass and no copy.

    The order matters under activation checkpointing: the recompute in backward stops after the last op that saves
    a tensor for backward (torch's early stop), and the base 4-bit matmul saves none (bitsandbytes keeps only its
    weight). With the branch computed first, the base matmul of a block's last linear (a decoder layer's down
    projection, whose output only the residual add reads) is not recomputed at all: a quarter of a Llama layer's
    linear work, for every checkpointed layer. Layers fall back to PEFT's own forward whenever the fused one would
    not be the same computation: adapters disabled or merged, several adapters active, DoRA or other variants, a
    LoRA bias, mixed adapter batches, or dtypes PEFT would convert. Returns the number of layers that got the fused
    forward."""
    from peft.tuners.lora import Linear as LoraLinear

    kinds = [LoraLinear]
    with contextlib.suppress(ImportError, AttributeError):
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        kinds.append(LoraLinear4bit)
    count = 0
    for module in model.modules():
        if type(module) in kinds and "forward" not in vars(module) and all(hasattr(module, a) for a in (
                "base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant", "active_adapters",
                "disable_adapters", "merged")):
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def _fused_lora_forward(self, x, *args, **kwargs):
    """Bound to each fused layer as its ``forward`` (a bound method, so a deep copy rebinds it to the copy)."""
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return peft_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in self.lora_variant:
        return peft_forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_b.bias is not None or not (torch.is_autocast_enabled(x.device.type)
                                       or x.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return peft_forward(self, x, *args, **kwargs)
    delta = lora_b(lora_a(self.lora_dropout[name](x)))  # saves what backward needs: the last saves of the layer
    result = self.base_layer(x)  # saves nothing for backward, so a checkpoint's recompute can stop before it
    if torch.promote_types(result.dtype, delta.dtype) != result.dtype:  # a narrower base output: PEFT's sum
        return result + delta * self.scaling[name]
    # in place: the base output is a fresh tensor that no backward reads (a linear saves its input, not its output).
    # Under a GPU's autocast the 4-bit layer returns fp32 (its input's dtype) and the branch bf16: the sum is fp32
    # either way, and the scaling is applied in fp32 where PEFT rounds the scaled branch to bf16 first.
    return result.add_(delta, alpha=self.scaling[name])


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def reference_mode(model):
    """The frozen reference: adapters off (or the frozen starting adapter), eval mode (no LoRA dropout), no grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if REFERENCE in model.peft_config:
                model.set_adapter(REFERENCE, inference_mode=True)
                try:
                    yield model
                finally:
                    model.set_adapter(POLICY)
            else:
                with model.disable_adapter():
                    yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities

def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    head = base.get_output_embeddings()
    if decoder is None or head is None or not hasattr(head, "weight"):
        raise ModelError(f"{type(base).__name__} has no separate decoder and LM head; it is not a causal LM we "
                         "can score")
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return decoder, head, softcap


def sequence_logps(model, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log pi(y_t | x, y_<t) over the answer tokens of each row, and the answer lengths.

    ``batch``: ``input_ids``, ``attention_mask``, ``completion_mask`` (N, T), as ``data.collate`` makes them.
    Returns (logps (N,) fp32, lengths (N,) float). Position t's hidden state predicts token t + 1, so the hidden
    states at positions where ``completion_mask[:, 1:]`` is set are the only ones sent through the LM head.
    """
    decoder, head, softcap = _decoder_and_head(model)
    dev = head.weight.device
    input_ids = batch["input_ids"].to(dev)
    hidden = decoder(input_ids=input_ids, attention_mask=batch["attention_mask"].to(dev),
                     use_cache=False).last_hidden_state
    mask = batch["completion_mask"][:, 1:].to(dev).bool()
    return _row_logps(head, softcap, hidden[:, :-1][mask], input_ids[:, 1:][mask], mask.nonzero()[:, 0],
                      mask.shape[0], chunk_size)


def _row_logps(head, softcap, selected, targets, rows, n_rows: int, chunk_size):
    """Sum of log p(target | hidden) per row over the selected positions, and each row's count of them."""
    if head.bias is not None:  # rare (e.g. some GPT-2 variants): fold the bias into an extra input column
        selected = torch.cat([selected, selected.new_ones(selected.shape[0], 1)], dim=1)
        weight = torch.cat([head.weight, head.bias[:, None]], dim=1)
    else:
        weight = head.weight
    token_logps = selected_token_logps(selected, weight, targets, chunk_size=chunk_size, softcap=softcap)
    logps = torch.zeros(n_rows, dtype=torch.float32, device=selected.device).index_add(0, rows, token_logps)
    return logps, torch.bincount(rows, minlength=n_rows).float()


def shared_sequence_logps(model, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`sequence_logps`, (2B,) chosen rows then rejected rows, from one ``[prompt | chosen |
    rejected]`` row per pair (``data.collate_shared``): the prompt's tokens go through the model once."""
    decoder, head, softcap = _decoder_and_head(model)
    dev = head.weight.device
    flat = _shared_hidden(decoder, batch, dev)
    index = torch.cat([batch["chosen_index"], batch["rejected_index"]]).to(dev)
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]]).to(dev)
    n = batch["input_ids"].shape[0]
    rows = torch.cat([batch["chosen_rows"], batch["rejected_rows"] + n]).to(dev)
    return _row_logps(head, softcap, flat[index], targets, rows, 2 * n, chunk_size)


def _shared_hidden(decoder, batch: dict, dev) -> torch.Tensor:
    """Last hidden states (B * T, d) of ``data.collate_shared`` rows, through the decoder with their 4D mask.

    With :func:`shared_prompt_sdpa` in place the rows' ``layout`` goes along, and attention uses it instead of the
    mask; other implementations apply the mask."""
    allowed = batch["allowed"].to(dev)[:, None]  # (B, 1, T, T)
    if "sdpa" not in getattr(decoder.config, "_attn_implementation", "sdpa"):  # eager adds the mask to the scores
        allowed = torch.zeros(allowed.shape, dtype=torch.float32, device=dev).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min)
    split = {"shared_layout": batch["layout"]} if decoder.config._attn_implementation == SHARED_SDPA else {}
    hidden = decoder(input_ids=batch["input_ids"].to(dev), attention_mask=allowed,
                     position_ids=batch["position_ids"].to(dev), use_cache=False, **split).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


SHARED_SDPA = "lowrank_pref_sdpa"
CPU_SPLIT_MIN_WIDTH = 512  # the CPU flash kernel's key block (torch 2.13): narrower rows gain little from the split


def _split_pays(query, layout) -> bool:
    """Whether the split beats one masked call: always off the CPU (flash kernels, causal tiles of 64-128); on the CPU
    for rows of at least one key block, or when a fifth of the batch is padding. Below that, on this project's CPU,
    the split's extra calls cost as much as the scores it skips (whole DPO step, same process, 192/48/48 rows: 4%
    slower; 768/256/256: 17% faster; benchmarks/attention.py has the attention alone)."""
    if query.device.type != "cpu":
        return True
    width = query.shape[2]
    return width >= CPU_SPLIT_MIN_WIDTH or sum(map(sum, layout)) < 0.8 * width * len(layout)


def use_shared_prompt_sdpa(model, cfg: Config) -> bool:
    """With ``attn_implementation=sdpa``, switch a model that takes transformers' attention functions to
    ``"lowrank_pref_sdpa"``: :func:`shared_prompt_sdpa` for attention and SDPA's own mask builder, so everything but
    shared-prompt rows runs exactly as with "sdpa". Models with their own attention code keep SDPA and the mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    can = getattr(model, "_can_set_attn_implementation", None)
    if cfg.attn_implementation != "sdpa" or model.config._attn_implementation != "sdpa" or not (can and can()):
        return False
    AttentionInterface.register(SHARED_SDPA, shared_prompt_sdpa)
    AttentionMaskInterface.register(SHARED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(SHARED_SDPA)
    return model.config._attn_implementation == SHARED_SDPA


def shared_prompt_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except on ``[prompt | chosen | rejected]`` rows (``shared_layout`` given).

    There the dense mask (the rejected answer must not see the chosen one) would make SDPA compute every (query,
    key) score, T^2 a row, and keep GPUs off their flash kernels. Per row, the same attention is two causal calls:
    prompt and chosen answer over themselves (``is_causal``), and the rejected answer over the prompt and itself
    (causal aligned to the bottom right), (P + C)^2 / 2 + R (P + R) scores, without a mask. Padding positions get
    zeros (nothing reads them). Sliding windows, dropout, unexpected shapes and batches where the split does not pay
    (:func:`_split_pays`) take the masked path."""
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    layout = kwargs.pop("shared_layout", None)
    if (layout is None or dropout or kwargs.get("sliding_window") or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or query.shape[2] != key.shape[2]
            or len(layout) != query.shape[0] or not _split_pays(query, layout)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    width, rows, start = query.shape[2], [], 0
    while start < len(layout):  # runs of rows with the same lengths go through together
        stop = start + 1
        while stop < len(layout) and layout[stop] == layout[start]:
            stop += 1
        p, c, r = layout[start]
        q, k, v = query[start:stop], key[start:stop], value[start:stop]
        parts = []
        if p + c:
            parts.append(sdpa(q[:, :, :p + c], k[:, :, :p + c], v[:, :, :p + c], is_causal=True, scale=scaling))
        if r:
            end = p + c + r
            k_r = torch.cat([k[:, :, :p], k[:, :, p + c:end]], dim=2)
            v_r = torch.cat([v[:, :, :p], v[:, :, p + c:end]], dim=2)
            parts.append(sdpa(q[:, :, p + c:end], k_r, v_r, attn_mask=causal_lower_right(r, p + r), scale=scaling))
        if width > p + c + r:
            parts.append(query.new_zeros(stop - start, query.shape[1], width - p - c - r, value.shape[-1]))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        start = stop
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def shared_reward_scores(model, batch: dict) -> torch.Tensor:
    """:func:`reward_scores` (2B,) from ``data.collate_shared`` rows: the score head on the hidden state of each
    answer's last token, the prompt computed once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(base, base.base_model_prefix, None), getattr(base, "score", None)
    if decoder is None or head is None:
        raise ModelError(f"{type(base).__name__} has no decoder + score head to score shared rows with")
    dev = next(model.parameters()).device
    flat = _shared_hidden(decoder, batch, dev)
    index = torch.cat([batch["chosen_last"], batch["rejected_last"]]).to(dev)
    return head(flat[index]).squeeze(-1).float()


def reward_scores(model, batch: dict) -> torch.Tensor:
    """Scalar score of each row from the classification head, at the last real token (transformers' pooling,
    the same one users get from ``model(**inputs).logits`` at inference). fp32 (N,)."""
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                use_cache=False)
    return out.logits.squeeze(-1).float()


# ----------------------------------------------------------------------------------------------------------------
# Saving and measuring

def save_adapter(model, tokenizer, path: str | os.PathLike) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors) + tokenizer; only the policy adapter."""
    model.save_pretrained(str(path), selected_adapters=[POLICY], safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def available_memory_gb() -> float:
    """What a run can use: the GPU's total memory (nothing of ours is loaded yet), or the RAM available now."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_memory_mb() -> float:
    """GPU memory allocated now, or the process's resident set size now, in MB."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else peak_memory_mb()


def reset_peak_memory() -> None:
    """Start the peak over from now, so training's peak is not the loading's (on Linux, /proc's high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU, in MB, since the last reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
