"""The Export tab's handlers, called without a browser on a run folder with a real adapter: the tab names the run,
the zip carries a model card that names the base model id, the data, the settings and the final eval, the merged
model downloads, and GGUF export gives a GGUF and a Modelfile."""

from __future__ import annotations

import json
import zipfile

import yaml
from test_gguf import _adapter

from lowrank_pref.artifacts import RunDir
from lowrank_pref.config import build_config, dump_yaml

from lowrank_pref.ui import export as export_tab
from lowrank_pref.ui.common import AppState

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CPU = {"gpu": None, "memory_gb": 16.0}


def _run(app: AppState, model_dir, name: str = "dpo-1", model: str = SMOL) -> RunDir:
    """A finished run's folder as a run leaves it (config, data report, metrics with an eval, status, adapter),
    its config naming the Hub model the user asked for while the adapter names the local folder it loaded."""
    run = RunDir(app.manager.root / name).create()
    cfg = build_config("tiny", overrides={"model": model, "dataset": "my_prefs.jsonl", "beta": "0.2"})
    run.config.write_text("reference: base\n" + dump_yaml(cfg))
    run.data_report.write_text(json.dumps({"train_pairs": 120, "eval_pairs": 8, "unit": "pairs"}))
    run.append_metrics({"step": 10, "loss": 0.5})
    run.append_metrics({"step": 10, "eval_loss": 0.4321, "eval_rewards/accuracies": 0.875})
    run.write_status(task="dpo", state="completed", step=10, total_steps=10)
    _adapter(model_dir, run.adapter)
    return run


def test_zip_carries_a_model_card_and_the_hub_base(tiny_model_dir, tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    _run(app, tiny_model_dir)
    assert export_tab.describe(app, "dpo-1") == f"Exports **dpo-1**: dpo on `{SMOL}`, completed, step 10 of 10."
    assert "Select a run" in export_tab.describe(app, None)
    with zipfile.ZipFile(export_tab.export_zip(app, "dpo-1")) as z:
        card = z.read("README.md").decode()
        adapter_config = json.loads(z.read("adapter_config.json"))
        config = yaml.safe_load(z.read("config.yaml"))
        assert "adapter_model.safetensors" in z.namelist()
    assert adapter_config["base_model_name_or_path"] == SMOL and config["beta"] == 0.2
    assert f"base_model: {SMOL}" in card and "More Information Needed" not in card and str(tmp_path) not in card
    assert "`my_prefs.jsonl`" in card and "120 training pairs, 8 held out" in card
    assert "| beta | 0.2 |" in card and "| rewards/accuracies | 0.875 |" in card and "| loss | 0.4321 |" in card


def test_a_local_base_is_named_as_the_run_named_it(tiny_model_dir, tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    _run(app, tiny_model_dir, model=str(tiny_model_dir))
    with zipfile.ZipFile(export_tab.export_zip(app, "dpo-1")) as z:
        card = z.read("README.md").decode()
        adapter_config = json.loads(z.read("adapter_config.json"))
    assert "base_model:" not in card and "a local folder" in card
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)  # still loadable here


def test_merged_model_downloads_with_its_card(tiny_model_dir, tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    _run(app, tiny_model_dir, model=str(tiny_model_dir))
    assert export_tab.merged_zip(app, "dpo-1") is None  # nothing merged yet
    assert "Merged model saved" in export_tab.merge(app, "dpo-1")
    with zipfile.ZipFile(export_tab.merged_zip(app, "dpo-1")) as z:
        names = set(z.namelist())
        assert "fp16 model" in z.read("README.md").decode()
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names


def test_gguf_button_gives_the_gguf_and_a_modelfile(tiny_model_dir, tmp_path, monkeypatch, llama_converter):
    monkeypatch.setenv("LLAMA_CPP_DIR", llama_converter)
    app = AppState(tmp_path / "runs", hw=CPU)
    _run(app, tiny_model_dir, model=str(tiny_model_dir))
    message, files = export_tab.to_gguf(app, "dpo-1", "q8_0")
    assert "ollama create dpo-1 -f Modelfile" in message
    assert [f.rsplit("/", 1)[1] for f in files] == ["dpo-1-q8_0.gguf", "Modelfile"]
    assert open(files[0], "rb").read(4) == b"GGUF"
    assert "FROM ./dpo-1-q8_0.gguf" in open(files[1]).read()
