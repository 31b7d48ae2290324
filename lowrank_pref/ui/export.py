"""The Export tab: the selected run's adapter as a zip (with a model card), merged into an fp16 copy of the base
(downloadable), converted to GGUF with an Ollama Modelfile, or pushed to the Hub. The tab names the run it exports."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import gradio as gr

from .common import AppState, UserError, clean_exports, on
from .setup import HUB_ID

GGUF_CHOICES = [("q8_0: half the size of fp16, near exact", "q8_0"), ("f16: exact", "f16"),
                ("q4_k_m: a quarter, needs llama.cpp's llama-quantize", "q4_k_m")]


def _adapter(app: AppState, name: str | None) -> Path:
    from ..infer import adapter_of

    if not name:
        raise UserError("select a run in the Train tab first")
    return adapter_of(app.run_dir(name))


def _download_dir(app: AppState, prefix: str) -> Path:
    """A folder of its own under the app's exports folder. Gradio serves a copy from its cache, so the files made
    before this one (a minute or more ago) are removed now: downloads used to leave one file in the temp folder
    each."""
    app.exports.mkdir(parents=True, exist_ok=True)
    clean_exports(app.exports)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=app.exports))


def describe(app: AppState, name: str | None) -> str:
    """The line at the top of the tab: which run the buttons act on, and what it is."""
    if not name:
        return "Select a run in the Train tab: this tab exports that run."
    run = app.run_dir(name)
    import yaml

    try:
        cfg = yaml.safe_load(run.config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    status = run.read_status()
    step = f"step {status.get('step', 0)} of {status.get('total_steps', '?')}"
    return (f"Exports **{name}**: {cfg.get('task', '?')} on `{cfg.get('model', '?')}`, {run.state()}, {step}."
            + ("" if (run.adapter / "adapter_config.json").is_file() else
               " Its final adapter is not written yet: the latest checkpoint's is exported."))


def export_zip(app: AppState, name: str | None) -> str:
    """The adapter folder as a zip, with a model card (README.md) and the run's config.yaml."""
    from ..export import package_adapter

    adapter = _adapter(app, name)
    work = _download_dir(app, "zip-")
    folder = package_adapter(app.run_dir(name).path, adapter, work / "adapter")
    archive = shutil.make_archive(str(work / f"{name}-adapter"), "zip", folder)
    shutil.rmtree(folder)
    return archive


def merge(app: AppState, name: str | None) -> str:
    from ..export import merge as merge_adapter
    from ..export import model_card

    adapter = _adapter(app, name)
    out = merge_adapter(adapter, app.run_dir(name).path / "merged")
    (out / "README.md").write_text(model_card(app.run_dir(name).path, "merged"))
    where = "in the run's folder, as merged/" if app.public else f"to `{out}`"
    return f"Merged model saved {where} (fp16, safetensors); the zip is below."


def merged_zip(app: AppState, name: str | None) -> str | None:
    """The merged folder as a zip to download (stored, not compressed: safetensors hardly compress and a 7B model
    would take minutes); None before a merge."""
    if not name:
        return None
    merged = app.run_dir(name).path / "merged"
    if not (merged / "config.json").is_file():
        return None
    archive = _download_dir(app, "merged-") / f"{name}-merged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(merged.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(merged))
    return str(archive)


def to_gguf(app: AppState, name: str | None, quant: str) -> tuple[str, list[str]]:
    """GGUF + Modelfile in the run's folder (gguf/), both offered for download."""
    from ..export import gguf

    adapter = _adapter(app, name)
    done = gguf(adapter, app.run_dir(name).path / "gguf" / f"{name}-{quant}.gguf", quant=quant)
    where = "in the run's folder, under gguf/" if app.public else f"to `{done['gguf'].parent}`"
    # the downloads are served from the exports folder (a temporary folder Gradio may serve from), as links to the
    # files, not copies of a file that may be gigabytes
    offered = _download_dir(app, "gguf-")
    for f in (done["gguf"], done["modelfile"]):
        try:
            os.link(f, offered / f.name)
        except OSError:  # another filesystem
            shutil.copy(f, offered / f.name)
    return (f"GGUF ({quant}) and Modelfile saved {where}. Put both in one folder and run "
            f"`ollama create {name} -f Modelfile`, or `llama-cli -m {done['gguf'].name}`.",
            [str(offered / done["gguf"].name), str(offered / done["modelfile"].name)])


def push(app: AppState, name: str | None, repo_id: str, token: str) -> str:
    from ..export import package_adapter
    from ..export import push as push_adapter

    if not name:
        raise UserError("select a run in the Train tab first")
    if not repo_id or "/" not in repo_id or not HUB_ID.match(repo_id):
        raise UserError("give the Hub repo id as user/name")
    if not token:
        raise UserError("give a Hub token with write access")
    adapter = _adapter(app, name)
    with tempfile.TemporaryDirectory() as work:  # the pushed folder carries the model card too
        folder = package_adapter(app.run_dir(name).path, adapter, Path(work) / "adapter")
        return f"Pushed to {push_adapter(folder, repo_id, token)}"


def create_export_tab(app: AppState, run: gr.Dropdown, tab: gr.Tab | None = None) -> None:
    """Build the Export tab inside the current ``gr.Tab`` (``tab``: it, so the line naming the run is read again when
    it is opened: the run may have completed since it was selected); it acts on the run selected in the Train tab."""
    which = gr.Markdown(describe(app, None))
    zip_btn = gr.Button("Download the adapter (zip, with a model card)")
    zip_file = gr.File(label="Adapter")
    merge_btn = gr.Button("Merge into the base (fp16, on the CPU) and save")
    merged_file = gr.File(label="Merged model (zip)")
    with gr.Row():
        quant = gr.Dropdown(GGUF_CHOICES, value="q8_0", label="GGUF quantization")
        gguf_btn = gr.Button("Export to GGUF for Ollama / llama.cpp")
    gguf_files = gr.File(label="GGUF and Modelfile", file_count="multiple")
    repo = gr.Textbox(label="Hub repo id (user/name)")
    token = gr.Textbox(label="Hub token (write access)", type="password")
    push_btn = gr.Button("Push the adapter to the Hub")
    message = gr.Markdown()
    on(run.change, describe, app, run, which, api_name="export_which")
    if tab is not None:
        on(tab.select, describe, app, run, which, api_name=False)
    on(zip_btn.click, export_zip, app, run, zip_file, api_name="export_zip")
    merged = on(merge_btn.click, merge, app, run, message, api_name="merge")
    on(merged.success, merged_zip, app, run, merged_file, api_name="merged_zip")
    on(gguf_btn.click, to_gguf, app, [run, quant], [message, gguf_files], api_name="gguf")
    on(push_btn.click, push, app, [run, repo, token], message, api_name="push")
