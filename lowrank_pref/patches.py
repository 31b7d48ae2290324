"""Overrides of third-party internals (PEFT, bitsandbytes, transformers) that make training faster or leaner.

Each one is a named contract with the library versions it was written and tested against (:data:`PATCHES`). Outside
those versions it is skipped with one log line and the library's own path runs; ``patches=false`` turns them all off
but the fixes (``Patch.fix``: where the library's own path gives wrong results), and tests/test_patches.py shows the
same numbers either way. Like PEFT's ``LoraVariant``, the internals these touch are private and prone to change, so
the version ranges are the honest stability note.
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

log = logging.getLogger("lowrank_pref")


@dataclass(frozen=True)
class Patch:
    """One override: what it changes, in which library, and the versions it was tested on (``low <= v < high``).
    ``fix``: the library's own path gives wrong results where this one applies, so ``patches=false`` keeps it."""
    fn: Callable
    library: str
    low: str
    high: str
    what: str
    fix: bool = False

    def skip_reason(self) -> str | None:
        """Why this override must not run with the installed library (None: it may)."""
        from packaging.version import Version

        try:
            found = metadata.version(self.library)
        except metadata.PackageNotFoundError:
            return f"{self.library} is not installed"
        if not Version(self.low) <= Version(found) < Version(self.high):
            return f"written for {self.library} >={self.low},<{self.high}, found {found}"
        return None


_skipped_said: set[str] = set()


def apply_patch(name: str, cfg, *args):
    """Run override ``name`` on ``args`` when ``cfg.patches`` is on (or it is a fix) and the library is a tested
    version; else do nothing (the library's own path runs) and return None. A version skip is logged once per
    process."""
    patch = PATCHES[name]
    if not (getattr(cfg, "patches", True) or patch.fix):
        return None
    reason = patch.skip_reason()
    if reason:
        if name not in _skipped_said:
            _skipped_said.add(name)
            log.info("override %s skipped (%s): %s; the library's own path runs", name, patch.what, reason)
        return None
    return patch.fn(*args)


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


def pin_cpu_4bit_kernel(model) -> None:
    """One 4-bit kernel for the whole run on CPU.

    bitsandbytes (0.50, CPUs with AVX512-bf16) repacks a Linear4bit's weights the first time it runs in eval mode
    without grad (our reference pass) and every later forward, training ones included, then uses the packed bf16
    kernel; saving a state dict unpacks them again, and the round trip is not exact. So policy and reference would
    use different kernels, and a run that wrote checkpoints would drift from one resumed from them. Worse, the
    packed kernel has no autograd: after the first reference pass the 4-bit layers pass no gradient to their input,
    and every LoRA weight below the last layer gets a wrong one (20-70% off on the tiny model). So this is a fix,
    kept with ``patches=false``. Keeping the unpacked kernel makes reference == base, resume exact and the gradients
    right (tests/test_cli.py, tests/test_model.py, tests/test_patches.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
    if result._is_view():  # bitsandbytes' output with a bias (Qwen2's q/k/v) is a view autograd won't let us write
        return result.add(delta, alpha=self.scaling[name])
    # in place: the base output is a fresh tensor that no backward reads (a linear saves its input, not its output).
    # Under a GPU's autocast the 4-bit layer returns fp32 (its input's dtype) and the branch bf16: the sum is fp32
    # either way, and the scaling is applied in fp32 where PEFT rounds the scaled branch to bf16 first.
    return result.add_(delta, alpha=self.scaling[name])


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


def use_shared_prompt_sdpa(model, cfg) -> bool:
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


# The versions each override was written and tested against. The upper bounds are the next release line that has
# not been tried: internals these touch move between minor releases of PEFT and bitsandbytes.
PATCHES: dict[str, Patch] = {
    "fuse_lora_adds": Patch(fuse_lora_adds, "peft", "0.21", "0.22",
                            "LoRA branch first, added into the 4-bit output in place"),
    "no_input_grads": Patch(no_input_grads, "transformers", "5.0", "6.0",
                            "no input-embedding grad hooks under non-reentrant checkpointing"),
    "pin_cpu_4bit_kernel": Patch(pin_cpu_4bit_kernel, "bitsandbytes", "0.50", "0.51",
                                 "one CPU 4-bit kernel for policy, reference and resume", fix=True),
    "embeddings_in": Patch(embeddings_in, "peft", "0.21", "0.22",
                           "16-bit embedding tables under autocast instead of prepare_model_for_kbit_training's fp32"),
    "shared_prompt_sdpa": Patch(use_shared_prompt_sdpa, "transformers", "5.0", "6.0",
                                "split attention for [prompt | chosen | rejected] rows"),
}
