"""The offline `tiny` world: a toy Llama-architecture model and byte-level BPE tokenizer, built on first use.

``builtin:tiny`` as a model and ``builtin:tiny-prefs`` as a dataset make the default preset run with no network.
The tokenizer is trained on the bundled preference data, the model is randomly initialised from a fixed seed, and
both are saved (safetensors) in a cache folder keyed by a fingerprint of everything that shapes them, so the
second run loads instead of building.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_PREFS = ASSETS / "tiny_prefs.jsonl"

# Small enough to train in a minute on two CPU cores, big enough to learn the bundled task.
TINY_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
TINY_VOCAB = 768
SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "user": "<|user|>", "assistant": "<|assistant|>",
           "system": "<|system|>"}
# A small chat template in the style of Zephyr's: role tags, answers end with the eos token.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VERSION = 1


def cache_root() -> Path:
    base = os.environ.get("LOWRANK_PREF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowrank_pref")
    return Path(base)


def _corpus() -> list[str]:
    texts = []
    for line in TINY_PREFS.read_text().splitlines():
        row = json.loads(line)
        for key in ("prompt", "chosen", "rejected"):
            texts += [m["content"] for m in row[key]]
    return texts


def _fingerprint() -> str:
    h = hashlib.sha256()
    h.update(json.dumps([VERSION, TINY_MODEL, TINY_VOCAB, SPECIAL, TINY_CHAT_TEMPLATE], sort_keys=True).encode())
    h.update(TINY_PREFS.read_bytes())
    return h.hexdigest()[:12]


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the bundled data (deterministic for a given corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], model_max_length=TINY_MODEL["max_position_embeddings"])
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def ensure_tiny_model() -> Path:
    """Folder of the tiny model + tokenizer, built once and cached. Safe against concurrent builders."""
    target = cache_root() / f"tiny-{_fingerprint()}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; theirs is identical
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    if name == "builtin:tiny":
        return str(ensure_tiny_model())
    return name


def resolve_dataset(name: str) -> str:
    if name == "builtin:tiny-prefs":
        return str(TINY_PREFS)
    return name
