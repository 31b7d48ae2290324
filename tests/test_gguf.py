"""GGUF export: the file llama.cpp's converter writes reads back (transformers' ``gguf_file=``) with the merged
model's next-token log-probs; the Modelfile carries the chat template; what can't be exported is refused plainly.

The conversion tests need llama.cpp's converter: ``$LLAMA_CPP_DIR``, ``~/.cache/lowrank_pref/llama.cpp`` (made by
``python -m lowrank_pref.export get-converter``), else the ``llama_converter`` fixture fetches it from the package
index as a user would; only where the index can't be reached are they skipped, saying so. The SmolLM2 one is slow
(LOWRANK_PREF_SLOW=1) and needs ``../shared/tools/smollm2.py``'s folder."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowrank_pref import export
from lowrank_pref.config import build_config
from lowrank_pref.model import load_model, load_tokenizer, save_adapter

USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowrank_pref"
SMOLLM2 = Path(os.environ.get("SMOLLM2_DIR") or USER_CACHE / "smollm2-135m-instruct")
PROMPTS = ["Tell me about the river and the garden.", "Thank you for asking. The candle is near the bridge.",
           "What is the capital of France?"]


def _adapter(model_dir: Path, out: Path, **overrides) -> Path:
    """Our 4-bit PeftModel with non-zero LoRA weights (so the merge changes the model), saved as a run saves it."""
    cfg = build_config("tiny", overrides={"model": str(model_dir), "lora.dropout": "0.0", **overrides})
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, tok, out)
    return out


def _next_token_logps(model, ids: list[int]) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) at every position, in fp32: (T-1,)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _compare(gguf_path: Path, merged_dir: Path, tolerance: float) -> float:
    """Largest per-token log-prob difference between the GGUF (as transformers reads it) and the merged model; the
    GGUF's own tokenizer must also give the same ids."""
    ours = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    worst = 0.0
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True) + prompt
        ids = tok(text, add_special_tokens=False).input_ids
        assert gguf_tok(text, add_special_tokens=False).input_ids == ids
        diff = (_next_token_logps(ours, ids) - _next_token_logps(theirs, ids)).abs().max().item()
        worst = max(worst, diff)
    assert worst < tolerance, worst
    return worst


def test_tiny_adapter_exports_to_gguf_that_matches_the_merged_model(tiny_model_dir, tmp_path, llama_converter):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter")
    merged = export.merge(adapter, tmp_path / "merged")
    f16 = export.gguf(adapter, tmp_path / "f16" / "model.gguf", quant="f16", llama_cpp=llama_converter)
    # the merged model is stored in fp16 and f16 keeps it bit for bit: only the arithmetic order differs
    assert _compare(f16["gguf"], merged, 1e-2) < 1e-5  # measured: 0.0
    q8 = export.gguf(adapter, tmp_path / "q8" / "model.gguf", quant="q8_0", llama_cpp=llama_converter)
    _compare(q8["gguf"], merged, 0.05)  # 8-bit blocks: close, not exact (measured: 0.0076)
    assert q8["gguf"].stat().st_size < 0.7 * f16["gguf"].stat().st_size
    assert not list((tmp_path / "q8").glob(".gguf-*"))  # the temporary merge is gone
    text = f16["modelfile"].read_text()
    assert "FROM ./model.gguf" in text
    assert 'PARAMETER stop "<|eos|>"' in text and 'PARAMETER stop "<|user|>"' in text
    assert '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}\n' in text  # the run's template, not a guessed one


def test_modelfile_template_is_the_chat_template_in_go_form(tokenizer):
    """The pieces put back together give the Jinja rendering; the Go template is those pieces around .Messages."""
    from lowrank_pref.data import ensure_chat_template

    ensure_chat_template(tokenizer)
    parts = export.chat_parts(tokenizer)
    assert parts == {"head": "<|bos|>", "system": "", "sys_pre": "<|system|>\n", "sys_suf": "\n",
                     "user_pre": "<|user|>\n", "user_suf": "\n", "asst_pre": "<|assistant|>\n",
                     "asst_suf": "<|eos|>\n", "gen": "<|assistant|>\n"}
    assert export.go_template(parts) == (
        '<|bos|>{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
        '{{ if eq .Role "system" }}<|system|>\n{{ .Content }}\n'
        '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}\n'
        '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}{{ if not $last }}<|eos|>\n{{ end }}{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|assistant|>\n{{ end }}{{ end }}')


def test_a_default_system_prompt_becomes_system(tokenizer):
    """SmolLM2's ChatML template adds a system message when none is given: Ollama gets it as SYSTEM."""
    tok = tokenizer
    chatml = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    old = tok.chat_template
    tok.chat_template = chatml
    try:
        parts = export.chat_parts(tok)
        text = export.modelfile(tok, Path("out/m.gguf"), add_bos=False)
    finally:
        tok.chat_template = old
    assert parts["system"] == "Be kind." and parts["head"] == "" and parts["sys_pre"] == "<|im_start|>system\n"
    assert parts["user_pre"] == "<|im_start|>user\n" and parts["asst_suf"] == "<|im_end|>\n"
    assert 'SYSTEM """Be kind."""' in text


def test_gguf_refusals_are_one_plain_line(tmp_path, monkeypatch, capsys):
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": "x"}))
    with pytest.raises(export.ExportError, match="reward model"):
        export.gguf(reward, tmp_path / "r.gguf")
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "base_model_name_or_path": "x"}))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("LOWRANK_PREF_CACHE", str(tmp_path / "cache"))  # an empty cache: no converter anywhere
    assert export.main(["gguf", "--adapter", str(policy), "--output", str(tmp_path / "p.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "get-converter" in err and "Traceback" not in err
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize anywhere
    with pytest.raises(export.ExportError, match="llama-quantize.*--quant q8_0"):
        export.gguf(policy, tmp_path / "p.gguf", quant="q4_k_m", llama_cpp=fake)
    with pytest.raises(export.ExportError, match="holds no convert_hf_to_gguf.py"):
        export.gguf(policy, tmp_path / "p.gguf", llama_cpp=tmp_path / "nowhere")
    assert not list(tmp_path.glob("*.gguf"))


def test_get_converter_unpacks_only_the_converter_from_a_source_distribution(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_PREF_CACHE", str(tmp_path / "cache"))  # not over the session's real converter
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in [("convert_hf_to_gguf.py", b"# converter"), ("conversion/base.py", b"# base"),
                           ("gguf-py/gguf/__init__.py", b""), ("LICENSE", b"MIT"), ("ggml/src/big.c", b"int x;")]:
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = export.get_converter(sdist)
    assert folder == export.converter_cache() and export.find_converter() == folder
    assert (folder / "convert_hf_to_gguf.py").read_text() == "# converter" and (folder / "conversion/base.py").is_file()
    assert not (folder / "ggml").exists()
    with pytest.raises(export.ExportError, match="source distribution"):
        export.get_converter(tmp_path / "missing.tar.gz")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LOWRANK_PREF_SLOW"), reason="slow: set LOWRANK_PREF_SLOW=1")
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="needs python ../shared/tools/smollm2.py")
def test_smollm2_adapter_exports_to_gguf_that_matches_the_merged_model(tmp_path, llama_converter):
    adapter = _adapter(SMOLLM2, tmp_path / "adapter", max_length="128", max_prompt_length="64")
    merged = export.merge(adapter, tmp_path / "merged")
    done = export.gguf(adapter, tmp_path / "gguf" / "smollm2.gguf", quant="f16", llama_cpp=llama_converter)
    _compare(done["gguf"], merged, 1e-2)
    text = done["modelfile"].read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
