"""Peak-memory estimate of a run from the model's architecture and the settings, before anything loads.

    python -m lowrank_pref.memory --preset 12gb-dpo

The arithmetic (see shared PERFORMANCE-NOTES): 0.516 B per NF4 weight with double quantization (1.0 B at 8-bit,
2 B unquantized bf16); embeddings and LM head stay unquantized, in 16 bits under a GPU's autocast (2 B) and in
fp32 on the CPU (4 B); each LoRA parameter costs its fp32 weight + gradient + optimizer state (16 B with AdamW, 10 B
with 8-bit Adam); activations: with checkpointing one fp32 hidden state per layer and token plus one layer's
recompute, without it every layer's saved tensors; the LM head works on one chunk of answer tokens at a time.
An estimate, not a measurement: presets/README.md says which figures were measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
from dataclasses import dataclass

import torch

from .logps import auto_chunk_size

GB = 1024 ** 3
log = logging.getLogger("lowrank_pref")

# Architectures of the models the presets name, so estimates work offline (hidden, layers, ffn, vocab, heads,
# kv heads, tied embeddings).
KNOWN = {
    "Qwen/Qwen2.5-0.5B-Instruct": (896, 24, 4864, 151936, 14, 2, True),
    "Qwen/Qwen2.5-1.5B-Instruct": (1536, 28, 8960, 151936, 12, 2, True),
    "Qwen/Qwen2.5-3B-Instruct": (2048, 36, 11008, 151936, 16, 2, True),
    "Qwen/Qwen2.5-7B-Instruct": (3584, 28, 18944, 152064, 28, 4, False),
    "meta-llama/Llama-3.1-8B-Instruct": (4096, 32, 14336, 128256, 32, 8, False),
    "mistralai/Mistral-7B-Instruct-v0.3": (4096, 32, 14336, 32768, 32, 8, False),
}


@dataclass
class Arch:
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    softcap: bool = False  # final-logit softcapping (Gemma 2): one more chunk of logits in the LM head
    head_dim: int | None = None  # None: hidden // heads (Gemma's are wider: 256 on a 1152 or 2304 width)
    qk_norm: bool = False  # RMS norms on queries and keys (Gemma 3, Qwen 3): their inputs are saved too
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and the MLP as well as before (4 a layer)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def linear_params(self) -> int:
        d, f, q, kv = self.hidden, self.ffn, self.q_dim, self.kv_dim
        return self.layers * (2 * d * q + 2 * d * kv + 3 * d * f)

    def lora_params(self, r: int) -> int:
        d, f, q, kv = self.hidden, self.ffn, self.q_dim, self.kv_dim
        per_layer = r * ((d + q) * 2 + (d + kv) * 2 + (d + f) * 3)
        return self.layers * per_layer

    def saved_per_token(self, r: int) -> int:
        """Values one decoder layer saves for backward per token (LoRA on every linear layer), as counted with
        torch.autograd.graph.saved_tensors_hooks on SmolLM2 (11,580 against 11,440 here) and Gemma 3 (about 39,000
        against 39,024): the inputs of the norms and the normed inputs of the linear layers (4 d; 6 d with Gemma's
        norms after attention and the MLP as well), the queries, the rotated queries, the attention output and the
        o_proj input (4 q), the keys, rotated keys and values at their own width (3 kv: grouped-query heads are not
        expanded in what is saved; with q/k norms, Gemma 3, one kv), the MLP's gate, up, activation and product
        (4 f), and the seven LoRA A outputs (7 r)."""
        d, q, kv = self.hidden, self.q_dim, self.kv_dim
        return (6 if self.sandwich_norms else 4) * d + 4 * q + (1 if self.qk_norm else 3) * kv + 4 * self.ffn + 7 * r


def arch_of(model: str) -> Arch:
    if model in KNOWN:
        return Arch(*KNOWN[model])
    from transformers import AutoConfig

    from .tiny import resolve_model

    c = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    heads = c.num_attention_heads
    kind = c.model_type
    return Arch(c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size, heads,
                getattr(c, "num_key_value_heads", None) or heads, bool(getattr(c, "tie_word_embeddings", False)),
                bool(getattr(c, "final_logit_softcapping", None)), getattr(c, "head_dim", None),
                qk_norm=kind.startswith(("gemma3", "qwen3", "olmo2")), sandwich_norms=kind.startswith(("gemma2", "gemma3")))


def _task(cfg):
    from .tasks import task_class

    return task_class(cfg.task)


def shared_layout_possible(cfg) -> bool:
    """Whether a run may use the shared-prompt rows: only for pair tasks, not when turned off, nor with
    flash_attention_2 (no custom masks). tasks/pairs.py still checks the model itself on the first pairs."""
    return (_task(cfg).shared_prompt and cfg.shared_prompt != "off"
            and cfg.attn_implementation != "flash_attention_2")


def micro_step_tokens(cfg, prompt: int | None = None, answer: int | None = None) -> tuple[int, int]:
    """(tokens through the model, answer tokens through the LM head) of one micro-step of items (pairs, examples)
    with these lengths. Without lengths, the worst case: answers of ``max_length`` each (a near-empty prompt), in
    either layout."""
    seqs = _task(cfg).sequences_per_item
    if prompt is None or answer is None:
        return seqs * cfg.batch_size * cfg.max_length, seqs * cfg.batch_size * cfg.max_length
    if seqs == 1:
        return cfg.batch_size * (prompt + answer), cfg.batch_size * answer
    if shared_layout_possible(cfg):  # [prompt | chosen | rejected]: the prompt once
        return cfg.batch_size * (prompt + 2 * answer), cfg.batch_size * 2 * answer
    return 2 * cfg.batch_size * (prompt + answer), cfg.batch_size * 2 * answer


def full_checkpointing(layers: int) -> int:
    """How many decoder layers ``gradient_checkpointing=true`` recomputes: all but the last, or the only one (see
    model.checkpoint_first_layers)."""
    return layers - 1 if layers > 1 else layers


def estimate(cfg, arch: Arch | None = None, *, gpu: bool = True, tokens: int | None = None,
             answer_tokens: int | None = None, checkpointed_layers: int | None = None, offload: bool = False) -> dict:
    """Estimated peak memory in GB, by part, for a Config (``tokens``/``answer_tokens`` of the largest micro-step
    when known, see :func:`micro_step_tokens`).

    Checkpointing: ``checkpointed_layers`` (k of the L decoder layers, the first ones, recomputed in backward), else
    the config's choice (on, or auto: all but the last). ``offload``: the
    checkpointed layers' inputs wait in host RAM (``host_offload``, not part of the total) instead of on the device.

    Activations per token and layer: :meth:`Arch.saved_per_token` values saved for backward (grouped-query keys and
    values at their own width, Gemma's wide heads and extra norms), plus the attention weights with eager attention
    (SDPA's kernels, flash on CPU too, keep none; the shared-prompt split keeps only its outputs and log-sum-exps).
    A checkpointed layer keeps only its input, one fp32 d-vector per token, and is recomputed in full in backward,
    after the layers above it (which keep everything) have been freed: the peak is max(L - k, 1) layers' activations
    plus k inputs plus the hidden-state gradients. The LM head's chunk of fp32 logits (tied or not: the frozen head
    is never copied) comes on top: it runs after the last layer, while everything saved is still held.
    Checked against measured CPU peaks in tests/test_memory.py (a 4-layer Llama; SmolLM2, Qwen2.5 and Gemma 3 shapes
    cut to 2 layers) and benchmarks/memory_check.py (SmolLM2 on real pairs, Llama 3.2 1B, Qwen2.5 0.5B, Gemma 3 1B,
    Mistral 7B shapes)."""
    a = arch or arch_of(cfg.model)
    per_weight = {"4bit": 0.516, "8bit": 1.03, "none": 2.0}[cfg.quantization]
    act_bytes = 2 if gpu and cfg.dtype != "fp32" else 4  # autocast to bf16/fp16 on a GPU; fp32 on the CPU
    embed_bytes = act_bytes  # the tables stay in 16 bits under autocast (model.embeddings_in), else fp32
    n_embed = a.vocab * a.hidden * (1 if a.tied else 2)
    task = _task(cfg)
    if task.head == "score":
        n_embed = a.vocab * a.hidden + a.hidden  # input embeddings + the score head
    eight_bit_adam = gpu and cfg.optimizer in ("auto", "paged_adamw_8bit", "adamw_8bit")
    lora = a.lora_params(cfg.lora.r) * (10 if eight_bit_adam else 16)
    default_tokens, default_answers = micro_step_tokens(cfg)
    tokens = tokens or default_tokens
    answer_tokens = answer_tokens or default_answers
    layer = tokens * a.saved_per_token(cfg.lora.r) * act_bytes
    shared = shared_layout_possible(cfg)
    rows = cfg.batch_size * (1 if shared else task.sequences_per_item)
    row = tokens / rows
    mask = rows * row * row if shared else 0  # the (T, T) bool mask of shared rows
    if cfg.attn_implementation == "eager":  # eager attention keeps its (heads, T, T) weights; SDPA kernels don't
        layer += rows * a.heads * row * row * act_bytes
    if checkpointed_layers is None:
        checkpointed_layers = full_checkpointing(a.layers) if cfg.gradient_checkpointing is not False else 0
    k = min(checkpointed_layers, a.layers)
    checkpoint = tokens * a.hidden * 4  # one layer's input, fp32
    host = k * checkpoint if offload else 0
    # backward's temporaries inside one layer: the gradients of two of the MLP's f-wide intermediates and of one
    # d-wide tensor live at once (measured: 1,609 values per token on the 4-layer 256/704 model with checkpointing,
    # whose peak falls in a layer's backward; 2 f + d = 1,664)
    workspace = tokens * (2 * a.ffn + a.hidden) * act_bytes
    if k:
        on_device = 1 if offload else k  # offloaded: each comes back to the device for its layer's recompute
        activations = (max(a.layers - k, 1) * layer + on_device * checkpoint + tokens * 2 * a.hidden * 4 + mask
                       + workspace)
    else:
        activations = a.layers * layer + mask + workspace
    if task.head == "lm":
        chunk = min(cfg.logprob_chunk_size or auto_chunk_size(a.vocab), answer_tokens)
        # fp32 logits and their log-softmax, the gradient written over the latter (losses._FrozenHeadLogps); with
        # softcapping, the capped logits too
        head = chunk * a.vocab * 4 * (3 if a.softcap else 2)
    else:
        head = 0
    parts = {"weights": a.linear_params * per_weight / GB, "embeddings": n_embed * embed_bytes / GB,
             "lora_and_optimizer": lora / GB, "activations": activations / GB, "lm_head_chunk": head / GB,
             "runtime": 0.6 if gpu else 0.3}
    if hasattr(task, "memory_terms"):  # a task's own terms (rl: generation's KV cache, the reward adapter)
        parts.update(task.memory_terms(cfg, a, act_bytes, parts))
    parts["total"] = sum(parts.values())
    if host:
        parts["host_offload"] = host / GB
    return {name: round(v, 4) for name, v in parts.items()}


def per_rank(parts: dict, cfg, processes: int, arch: Arch | None = None) -> dict:
    """:func:`estimate`'s parts for each of ``processes`` ranks (``batch_size`` and accumulation are per rank).

    DDP (``distributed`` auto or ddp): every rank holds the whole model and its own micro-batch's activations, plus
    the flat LoRA gradients it all-reduces (and their concatenated copy). FSDP (distributed.shard): the decoder
    layers' 4-bit weights are sharded N ways, each layer gathered whole while it runs (two layers' worth allowed for
    the one running and the one being gathered); the tables, norms and LoRA state stay whole on every rank, as with
    DDP."""
    if processes <= 1:
        return parts
    a = arch or arch_of(cfg.model)
    out = dict(parts)
    if cfg.distributed == "fsdp":
        per_weight = {"4bit": 0.516, "8bit": 1.03, "none": 2.0}[cfg.quantization]
        gathered = 2 * a.linear_params / a.layers * per_weight / GB
        out["weights"] = parts["weights"] / processes + gathered
    out["gradient_all_reduce"] = a.lora_params(cfg.lora.r) * 4 * 2 / GB
    out.pop("total", None)
    out.pop("host_offload", None)
    out["total"] = sum(out.values())
    if "host_offload" in parts:
        out["host_offload"] = parts["host_offload"]
    return {name: round(v, 4) for name, v in out.items()}


def training_gb(parts: dict) -> float:
    """What training adds to the loaded model: activations, the LM-head chunk, adapter gradients and optimizer."""
    return parts["activations"] + parts["lm_head_chunk"] + parts["lora_and_optimizer"]


@dataclass(frozen=True)
class MemoryPlan:
    """How a run saves activation memory: ``checkpointed`` decoder layers of ``layers`` (the first ones; 0:
    checkpointing off; None: all but the last, counted on the model) are recomputed in backward, and with
    ``offload`` their inputs wait in pinned host RAM (GPU only)."""
    checkpointed: int | None
    layers: int
    offload: bool = False
    why: str = ""

    @property
    def checkpointing(self) -> bool:
        return self.checkpointed != 0

    def describe(self) -> str:
        if not self.checkpointing:
            return "off"
        full = self.checkpointed is None or self.checkpointed >= full_checkpointing(self.layers)
        what = "on" if full else f"{self.checkpointed} of {self.layers} layers"
        return what + (", inputs offloaded to host RAM" if self.offload else "")


def default_plan(cfg, *, gpu: bool, why: str = "as configured") -> MemoryPlan:
    """The plan a config asks for without the memory model: checkpointing off, or on (all layers but the last;
    auto counts as on), offloaded when ``checkpoint_offload`` is true and a GPU runs it."""
    if cfg.gradient_checkpointing is False:
        return MemoryPlan(0, 0, why=why)
    return MemoryPlan(None, 0, offload=bool(cfg.checkpoint_offload) and gpu, why=why)


# Where both layouts fit, the faster one, by kind of device, as benchmarks/memory_check.py --layouts measured it (one
# process, steps of the two layouts interleaved, median of each round's ratio). "off": no checkpointing (fewest
# layers checkpointed that fit); "on": every layer but the last. See FASTER_WHY for the measurement.
FASTER_LAYOUT = {"cpu": "on", "cuda": "off"}
FASTER_WHY = {
    # SmolLM2-135M, 4 real pairs of up to 512 tokens a step, 2026-11-29: on/off 0.90, 1.64, 0.69 by round (median
    # 0.90) on a shared 2-core machine, results-cpu-2026-11-29-layouts-smollm2.json; issue 18's whole runs agree (120 s
    # on, 153 s off). Writing and reading back GBs of saved activations costs a CPU more than the recompute.
    "cpu": "measured 0.90x the step time of off on this CPU, benchmarks/memory_check.py --layouts",
    "cuda": "no recompute: a GPU step is compute-bound, so the recompute is pure cost (not yet measured here)"}
# "on" is preferred only for runs whose activations without checkpointing reach this (the measurement had 3.4 GB);
# smaller ones were not measured, and with little memory traffic the recompute is the larger cost
FASTER_ON_FROM_GB = 1.0


def faster_layout(kind: str) -> str:
    """FASTER_LAYOUT's entry for ``kind``, or LOWRANK_PREF_FASTER_LAYOUT (on or off) where set: a machine that
    measures otherwise (benchmarks/memory_check.py --layouts), and the tests of the other choice."""
    value = os.environ.get("LOWRANK_PREF_FASTER_LAYOUT")
    if value is None:
        return FASTER_LAYOUT[kind]
    if value not in ("on", "off"):
        from .config import ConfigError

        raise ConfigError(f"LOWRANK_PREF_FASTER_LAYOUT={value!r}: set it to on or off, or unset it")
    return value


def choose_plan(cfg, available_gb: float, *, gpu: bool, tokens: int | None = None,
                answer_tokens: int | None = None) -> MemoryPlan:
    """The memory plan of a run, from the memory model with 10% of ``available_gb`` to spare.

    ``gradient_checkpointing`` auto: where the device kind's faster layout (FASTER_LAYOUT) is "on", checkpointing on;
    else off when the run fits without it; else the fewest layers checkpointed that make it fit (each layer left out
    saves 1/L of the recompute); else all of them. ``checkpoint_offload`` auto (GPU
    only): on when checkpointing is on and the run would not fit with the checkpoints on the card. Set values win;
    an architecture the estimate can't read gets the config's plan (auto: checkpointing on)."""
    try:
        a = arch_of(cfg.model)
    except Exception as e:  # an architecture we can't read: the safe choice
        return default_plan(cfg, gpu=gpu, why=f"no memory estimate ({type(e).__name__})")
    budget = 0.9 * available_gb

    def need(k: int, offload: bool = False) -> float:
        return estimate(cfg, a, gpu=gpu, tokens=tokens, answer_tokens=answer_tokens, checkpointed_layers=k,
                        offload=offload)["total"]

    def plan(k: int, offload: bool, why: str) -> MemoryPlan:
        return MemoryPlan(k, a.layers, offload, why + f"; {available_gb:.1f} GB available")

    full = full_checkpointing(a.layers)
    if cfg.gradient_checkpointing is False:
        return plan(0, False, f"as configured; the run needs about {need(0):.1f} GB")
    if cfg.checkpoint_offload and not gpu:
        log.info("checkpoint_offload: nothing to do on the CPU (activations are in host RAM already)")
    offload_asked = bool(cfg.checkpoint_offload) and gpu
    kind = "cuda" if gpu else "cpu"
    if (cfg.gradient_checkpointing is None and not offload_asked and faster_layout(kind) == "on"
            and estimate(cfg, a, gpu=gpu, tokens=tokens, answer_tokens=answer_tokens,
                         checkpointed_layers=0)["activations"] >= FASTER_ON_FROM_GB):
        on = need(full)
        more = "" if on <= budget else ", more than fits: lower batch_size or max_length"
        return plan(full, False, f"faster than off on this kind of device ({FASTER_WHY[kind]}); about {on:.1f} GB "
                                 f"with it, {need(0):.1f} GB without{more}")
    if cfg.gradient_checkpointing is None and not offload_asked:
        none = need(0)
        if none <= budget:
            return plan(0, False, f"the run needs about {none:.1f} GB without checkpointing, which fits, and off is "
                                  f"the faster layout on this kind of device ({FASTER_WHY[kind]})")
        for k in range(1, full + 1):
            if (needed := need(k)) <= budget:
                return plan(k, False, f"about {needed:.1f} GB with {k} of {a.layers} layers checkpointed, "
                                      f"{none:.1f} GB with none")
    source = "checkpointing as configured; " if cfg.gradient_checkpointing else ""
    on, offloaded = need(full), need(full, True)
    if offload_asked:
        return plan(full, True, f"{source}about {offloaded:.1f} GB ({on:.1f} GB without offloading)")
    if on > budget and cfg.checkpoint_offload is None and gpu:
        more = "" if offloaded <= budget else ", still more than fits: lower batch_size or max_length"
        return plan(full, True, f"{source}about {on:.1f} GB with the checkpoints on the card, {offloaded:.1f} GB "
                                f"with them in host RAM{more}")
    more = "" if on <= budget else ", more than fits: lower batch_size or max_length"
    return plan(full, False, f"{source}about {on:.1f} GB with checkpointing{more}")


# A run whose most frugal plan needs this many times the machine's whole memory can't be the estimate's error (it
# is within a few tens of percent): it is a setting far out of range, refused before the model loads.
FAR_BEYOND = 8


def beyond_machine(cfg, machine_gb: float | None, *, gpu: bool, tokens: int | None = None,
                   answer_tokens: int | None = None) -> str | None:
    """A plain refusal when even the most frugal plan (every layer but the last checkpointed, the checkpoints in host
    RAM on a GPU) needs more than FAR_BEYOND times ``machine_gb``, the memory the machine has in all; else None.
    memory_limit_gb plays no part: it is what the run may plan for, not what the machine could ever give."""
    if not machine_gb:
        return None
    try:
        a = arch_of(cfg.model)
    except Exception:  # an architecture we can't read: no estimate, as in choose_plan
        return None
    need = estimate(cfg, a, gpu=gpu, tokens=tokens, answer_tokens=answer_tokens,
                    checkpointed_layers=full_checkpointing(a.layers), offload=gpu)["total"]
    if need <= FAR_BEYOND * machine_gb:
        return None
    where = "the GPU" if gpu else "this machine"
    return (f"the run needs about {need:,.0f} GB even with gradient checkpointing, far more than the "
            f"{machine_gb:,.0f} GB {where} has; lower lora.r, batch_size (or token_budget) or max_length")


def plan_estimate(cfg, plan: MemoryPlan | None, *, gpu: bool) -> dict:
    """:func:`estimate` with the checkpointing of ``plan`` (None, or a plan that could not count the layers: the
    config's own)."""
    if plan is None or plan.checkpointed is None:
        return estimate(cfg, gpu=gpu)
    return estimate(cfg, gpu=gpu, checkpointed_layers=plan.checkpointed, offload=plan.offload)


def main(argv=None) -> int:
    import sys

    from .config import ConfigError, build_config, parse_override

    p = argparse.ArgumentParser(prog="python -m lowrank_pref.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--gpu-gb", type=float, help="a GPU with this much memory: also say which checkpointing a run "
                                                  "there would choose, and estimate with it (memory_limit_gb wins)")
    p.add_argument("--processes", type=int, default=1, help="a run on this many GPUs (torchrun --nproc-per-node N): "
                                                              "the estimate per rank (distributed=fsdp shards)")
    p.add_argument("overrides", nargs="*", help="key=value settings, as for python -m lowrank_pref.run")
    args = p.parse_args(argv)
    try:
        cfg = build_config(args.preset, overrides=dict(parse_override(o) for o in args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        budget = cfg.memory_limit_gb or args.gpu_gb
        plan = choose_plan(cfg, budget, gpu=True) if budget else None
        parts = per_rank(plan_estimate(cfg, plan, gpu=True), cfg, max(1, args.processes))
    except Exception as e:  # an architecture that can't be read (unknown offline, a typo in the model id)
        print(f"error: no estimate for model '{cfg.model}': {type(e).__name__}: {str(e).splitlines()[0][:200]}",
              file=sys.stderr)
        return 2
    if plan:
        print(f"gradient checkpointing: {plan.describe()} ({plan.why})")
    if args.processes > 1:
        print(f"per rank of {args.processes} ({'fsdp' if cfg.distributed == 'fsdp' else 'ddp'}): "
              f"{cfg.batch_size * cfg.gradient_accumulation_steps * args.processes} items per optimizer step")
    print(json.dumps(parts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------------------------------------------
# Measuring: what the machine has, what the process holds

def available_memory_gb() -> float:
    """What a run can use: the GPU's total memory (nothing of ours is loaded yet), or the RAM available now."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def machine_memory_gb() -> float | None:
    """All the memory a run could ever have here: the GPU's total, or the physical RAM (not what is free now)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


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
