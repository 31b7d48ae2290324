"""Merge an adapter into its base model, or push an adapter to the Hugging Face Hub.

    python -m lowrank_pref.export merge --adapter out/adapter --output merged/
    HF_TOKEN=hf_... python -m lowrank_pref.export push --adapter out/adapter --repo-id you/my-dpo-adapter

``push`` takes the token from ``HF_TOKEN`` or the saved login (``hf auth login``); ``--token`` works too, but a
token on the command line shows in the process list (``ps``) to every user of the machine.

``merge`` is the QLoRA merge: the base is loaded on the CPU the way it was trained (4-bit NF4 by default), its
weights are de-quantized to fp16, the adapter is folded in, and the result is saved as safetensors with the
tokenizer. (``--from-original`` merges into the original unquantized weights instead.) A reward adapter merges
into a sequence-classification model with its trained score head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


class ExportError(ValueError):
    pass


def _adapter_info(adapter: str | os.PathLike) -> dict:
    path = Path(adapter)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ExportError(f"'{adapter}' is not an adapter folder (no adapter_config.json)")
    return json.loads(cfg_file.read_text())


def merge(adapter: str | os.PathLike, output: str | os.PathLike, *, base: str | None = None,
          from_original: bool = False, trust_remote_code: bool = False) -> Path:
    """Fold the adapter into a de-quantized fp16 copy of its base on the CPU; returns the output folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .model import ModelError, nf4_config, stored_quantization

    info = _adapter_info(adapter)
    base = base or info.get("base_model_name_or_path")
    if not base:
        raise ExportError("the adapter does not name its base model; pass --base")
    reward = info.get("task_type") == "SEQ_CLS"
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    kwargs = {"num_labels": 1} if reward else {}
    try:
        stored = stored_quantization(base, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise ExportError(str(e)) from None
    if stored is not None and from_original:
        raise ExportError(f"the base '{base}' is stored in {stored}: it holds no original weights to merge into; "
                          "merge without --from-original (into its de-quantized weights), or pass --base with the "
                          "unquantized original")
    try:
        if from_original:
            model = cls.from_pretrained(base, dtype=torch.float16, trust_remote_code=trust_remote_code, **kwargs)
        else:  # a pre-quantized base brings its own quantization (passing ours too only earns a warning)
            quantize = {"quantization_config": nf4_config(torch.float16)} if stored is None else {}
            model = cls.from_pretrained(base, device_map={"": "cpu"}, dtype=torch.float16,
                                        trust_remote_code=trust_remote_code, **quantize, **kwargs)
            model = model.dequantize()  # the exact weights the adapter was trained against, in fp16
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except OSError as e:
        raise ExportError(f"could not load the base model '{base}': {str(e).splitlines()[0]}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(torch.float16)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def push(adapter: str | os.PathLike, repo_id: str, token: str | None = None, *, private: bool = True, api=None) -> str:
    """Upload the adapter folder to a (private by default) Hub model repo; returns the repo URL."""
    _adapter_info(adapter)
    if not repo_id or "/" not in repo_id:
        raise ExportError(f"repo id '{repo_id}' must look like 'user/name'")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(adapter), repo_id=repo_id, repo_type="model",
                          commit_message="Upload LoRA adapter trained with lowrank-pref")
    except Exception as e:  # no network, a bad token, no write access: one line, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"push to '{repo_id}' failed: {type(e).__name__}: {first}. Check the network, and that "
                          "the token has write access") from None
    return str(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowrank_pref.export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge an adapter into its base (fp16, CPU)")
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--base", help="base model (default: the one the adapter names)")
    m.add_argument("--from-original", action="store_true", help="merge into the unquantized weights")
    m.add_argument("--trust-remote-code", action="store_true")
    u = sub.add_parser("push", help="push an adapter to the Hub")
    u.add_argument("--adapter", required=True)
    u.add_argument("--repo-id", required=True)
    u.add_argument("--token", help="Hub token; prefer $HF_TOKEN or your saved login (the default), since a token "
                                   "given here shows in the process list")
    u.add_argument("--public", action="store_true")
    args = p.parse_args(argv)
    from .run import quiet_libraries

    quiet_libraries()
    try:
        if args.cmd == "merge":
            out = merge(args.adapter, args.output, base=args.base, from_original=args.from_original,
                        trust_remote_code=args.trust_remote_code)
            print(f"merged model saved to {out}")
        else:
            url = push(args.adapter, args.repo_id, args.token, private=not args.public)
            print(f"adapter pushed to {url}")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # network or auth trouble from the Hub client
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
