"""Run llama.cpp's own HF -> GGUF converter (``convert_hf_to_gguf.py``) from a llama.cpp folder, with two overrides.

    python -m lowrank_pref.llamacpp LLAMA_CPP_DIR MODEL_DIR --outfile model.gguf --outtype f16

:mod:`lowrank_pref.export` starts this as a child process: the converter puts its own ``gguf-py`` first on
``sys.path``, which must not leak into the exporting process (transformers reads GGUF with the installed ``gguf``).

The overrides, each a fallback where the converter would stop with an error; tested on the converter that
llama-cpp-python 0.3.36 vendors (``conversion/base.py``), and prone to change with it:

1. ``_create_vocab_sentencepiece``: the converter tries a SentencePiece vocabulary first and moves on to the
   tokenizer.json one on ``FileNotFoundError`` (no ``tokenizer.model``), but it imports ``sentencepiece`` before it
   looks, so without that package every Llama-family model fails. We look first, as it means to.
2. ``get_vocab_base_pre``: the converter names the BPE pre-tokenizer by a hash of the token ids of a test string,
   known only for published tokenizers. A tokenizer of one's own (the ``tiny`` model's) whose tokenizer.json
   pre-tokenizer is exactly GPT-2's (byte-level with the GPT-2 split regex) is named ``gpt-2``, which is what it
   is; any other unknown one still stops the conversion, with the converter's message.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("lowrank_pref")


def _gpt2_pre_tokenizer(model_dir: Path) -> bool:
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def _override(base_module) -> None:
    cls = next((c for c in vars(base_module).values()
                if isinstance(c, type) and "get_vocab_base_pre" in vars(c)), None)
    if cls is None:
        raise SystemExit("this llama.cpp converter has no get_vocab_base_pre: it is not a version lowrank-pref knows; "
                         "use llama-cpp-python 0.3.36's (python -m lowrank_pref.export get-converter)")
    owner = next(c for c in cls.__mro__ if "_create_vocab_sentencepiece" in vars(c))
    create_sp = owner._create_vocab_sentencepiece
    vocab_pre = cls.get_vocab_base_pre

    def _create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return create_sp(self)

    def get_vocab_base_pre(self, tokenizer):
        try:
            return vocab_pre(self, tokenizer)
        except NotImplementedError:
            if not _gpt2_pre_tokenizer(self.dir_model):
                raise
            log.warning("unrecognized BPE tokenizer with GPT-2's byte-level pre-tokenizer: written as 'gpt-2'")
            return "gpt-2"

    owner._create_vocab_sentencepiece = _create_vocab_sentencepiece
    cls.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    llama_dir = Path(argv[0]).resolve()
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), *argv[1:]]
    import convert_hf_to_gguf

    if (llama_dir / "conversion" / "base.py").is_file():  # the converter split into a package (2026)
        import conversion.base as base_module
    else:
        base_module = convert_hf_to_gguf
    _override(base_module)
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
