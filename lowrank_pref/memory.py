"""Peak-memory estimate of a run from the model's architecture and the settings, before anything loads.

    python -m lowrank_pref.memory --preset 12gb-dpo

The arithmetic (see shared PERFORMANCE-NOTES): 0.516 B per NF4 weight with double quantization (1.0 B at 8-bit,
2 B unquantized bf16); embeddings and LM head stay unquantized and ``prepare_model_for_kbit_training`` upcasts
them to fp32 (4 B); each LoRA parameter costs its fp32 weight + gradient + optimizer state (16 B with AdamW, 10 B
with 8-bit Adam); activations: with checkpointing one fp32 hidden state per layer and token plus one layer's
recompute, without it every layer's saved tensors; the LM head works on one chunk of answer tokens at a time.
An estimate, not a measurement: presets/README.md says which figures were measured.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from .losses import auto_chunk_size

GB = 1024 ** 3

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

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def linear_params(self) -> int:
        d, f, kv = self.hidden, self.ffn, self.kv_dim
        return self.layers * (2 * d * d + 2 * d * kv + 3 * d * f)

    def lora_params(self, r: int) -> int:
        d, f, kv = self.hidden, self.ffn, self.kv_dim
        per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
        return self.layers * per_layer


def arch_of(model: str) -> Arch:
    if model in KNOWN:
        return Arch(*KNOWN[model])
    from transformers import AutoConfig

    from .tiny import resolve_model

    c = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    heads = c.num_attention_heads
    return Arch(c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size, heads,
                getattr(c, "num_key_value_heads", None) or heads, bool(getattr(c, "tie_word_embeddings", False)))


def shared_layout_possible(cfg) -> bool:
    """Whether a run may use the shared-prompt rows: not when turned off, nor with flash_attention_2 (no custom
    masks). train.shared_prompt_works still checks the model itself on the first pairs."""
    return cfg.shared_prompt != "off" and cfg.attn_implementation != "flash_attention_2"


def micro_step_tokens(cfg, prompt: int | None = None, answer: int | None = None) -> tuple[int, int]:
    """(tokens through the model, answer tokens through the LM head) of one micro-step of pairs with these lengths.
    Without lengths, the worst case: answers of ``max_length`` each (a near-empty prompt), in either layout."""
    if prompt is None or answer is None:
        return 2 * cfg.batch_size * cfg.max_length, 2 * cfg.batch_size * cfg.max_length
    if shared_layout_possible(cfg):  # [prompt | chosen | rejected]: the prompt once
        return cfg.batch_size * (prompt + 2 * answer), cfg.batch_size * 2 * answer
    return 2 * cfg.batch_size * (prompt + answer), cfg.batch_size * 2 * answer


def estimate(cfg, arch: Arch | None = None, *, gpu: bool = True, tokens: int | None = None,
             answer_tokens: int | None = None, checkpointing: bool | None = None) -> dict:
    """Estimated peak memory in GB, by part, for a Config (``tokens``/``answer_tokens`` of the largest micro-step
    when known, see :func:`micro_step_tokens`; ``checkpointing`` overrides the config's choice).

    Activations per token and layer: (12 d + 4 f + 7 r) values saved for backward (LoRA on every linear layer: the
    normed inputs, q/k/v and their rotated copies, the attention output, the MLP's gate, up and product, the seven
    LoRA A outputs), plus the attention weights with eager attention (SDPA's kernels, flash on CPU too, keep none);
    with checkpointing, one fp32 d-vector per layer plus one layer recomputed in full and the hidden-state
    gradients.
    Checked against measured CPU peaks in tests/test_memory.py."""
    a = arch or arch_of(cfg.model)
    per_weight = {"4bit": 0.516, "8bit": 1.03, "none": 2.0}[cfg.quantization]
    embed_bytes = 4 if cfg.quantization != "none" else 2  # prepare_model_for_kbit_training upcasts to fp32
    n_embed = a.vocab * a.hidden * (1 if a.tied else 2)
    if cfg.task == "reward":
        n_embed = a.vocab * a.hidden + a.hidden  # input embeddings + the score head
    eight_bit_adam = gpu and cfg.optimizer in ("auto", "paged_adamw_8bit", "adamw_8bit")
    lora = a.lora_params(cfg.lora.r) * (10 if eight_bit_adam else 16)
    default_tokens, default_answers = micro_step_tokens(cfg)
    tokens = tokens or default_tokens
    answer_tokens = answer_tokens or default_answers
    act_bytes = 2 if gpu else 4
    layer = tokens * (12 * a.hidden + 4 * a.ffn + 7 * cfg.lora.r) * act_bytes
    shared = shared_layout_possible(cfg)
    rows = cfg.batch_size * (1 if shared else 2)
    row = tokens / rows
    mask = rows * row * row if shared else 0  # the (T, T) bool mask of shared rows
    if cfg.attn_implementation == "eager":  # eager attention keeps its (heads, T, T) weights; SDPA kernels don't
        layer += rows * a.heads * row * row * act_bytes
    if checkpointing if checkpointing is not None else cfg.gradient_checkpointing is not False:
        activations = tokens * (a.layers * a.hidden * 4 + 2 * a.hidden * 4) + layer + mask
    else:
        activations = a.layers * layer + mask
    if cfg.task == "dpo":
        chunk = min(cfg.logprob_chunk_size or auto_chunk_size(a.vocab), answer_tokens)
        head = chunk * a.vocab * 4 * 3  # fp32 logits, log-softmax, their gradient
    else:
        head = 0
    parts = {"weights": a.linear_params * per_weight / GB, "embeddings": n_embed * embed_bytes / GB,
             "lora_and_optimizer": lora / GB, "activations": activations / GB, "lm_head_chunk": head / GB,
             "runtime": 0.6 if gpu else 0.3}
    parts["total"] = sum(parts.values())
    return {k: round(v, 4) for k, v in parts.items()}


def training_gb(parts: dict) -> float:
    """What training adds to the loaded model: activations, the LM-head chunk, adapter gradients and optimizer."""
    return parts["activations"] + parts["lm_head_chunk"] + parts["lora_and_optimizer"]


def choose_checkpointing(cfg, available_gb: float, *, gpu: bool, tokens: int | None = None,
                         answer_tokens: int | None = None) -> tuple[bool, str]:
    """gradient_checkpointing=auto: off when the run fits without it (with 10% to spare), else on."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing, "as configured"
    try:
        without = estimate(cfg, gpu=gpu, tokens=tokens, answer_tokens=answer_tokens, checkpointing=False)
    except Exception as e:  # an architecture we can't read: the safe choice
        return True, f"on (no memory estimate: {type(e).__name__})"
    need = without["total"]
    if need <= 0.9 * available_gb:
        return False, f"off (the run needs about {need:.1f} GB without it; {available_gb:.1f} GB available)"
    return True, f"on (about {need:.1f} GB without it would not fit in {available_gb:.1f} GB)"


def main(argv=None) -> int:
    from .config import build_config, parse_override

    p = argparse.ArgumentParser(prog="python -m lowrank_pref.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = build_config(args.preset, overrides=dict(parse_override(o) for o in args.overrides))
    print(json.dumps(estimate(cfg), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
