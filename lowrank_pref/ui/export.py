"""The Export tab: the selected run's adapter as a zip, merged into an fp16 copy of the base, or pushed to the Hub."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import gradio as gr

from .common import AppState, UserError, clean_exports, on
from .setup import HUB_ID


def _adapter(app: AppState, name: str | None) -> Path:
    from ..infer import adapter_of

    if not name:
        raise UserError("select a run in the Train tab first")
    return adapter_of(app.run_dir(name))


def export_zip(app: AppState, name: str | None) -> str:
    """The adapter folder as a zip, in a folder of its own under the app's exports folder. Gradio serves a copy
    from its cache, so the zips made before this one (a minute or more ago) are removed now: downloads used to
    leave one zip in the temp folder each."""
    adapter = _adapter(app, name)
    app.exports.mkdir(parents=True, exist_ok=True)
    clean_exports(app.exports)
    out = Path(tempfile.mkdtemp(prefix="zip-", dir=app.exports)) / f"{name}-adapter"
    return shutil.make_archive(str(out), "zip", adapter)


def merge(app: AppState, name: str | None) -> str:
    from ..export import merge as merge_adapter

    adapter = _adapter(app, name)
    out = merge_adapter(adapter, app.run_dir(name).path / "merged")
    where = "in the run's folder, as merged/" if app.public else f"to `{out}`"
    return f"Merged model saved {where} (fp16, safetensors)."


def push(app: AppState, name: str | None, repo_id: str, token: str) -> str:
    from ..export import push as push_adapter

    if not name:
        raise UserError("select a run in the Train tab first")
    if not repo_id or "/" not in repo_id or not HUB_ID.match(repo_id):
        raise UserError("give the Hub repo id as user/name")
    if not token:
        raise UserError("give a Hub token with write access")
    adapter = _adapter(app, name)
    return f"Pushed to {push_adapter(adapter, repo_id, token)}"


def create_export_tab(app: AppState, run: gr.Dropdown) -> None:
    """Build the Export tab inside the current ``gr.Tab``; it acts on the run selected in the Train tab."""
    zip_btn = gr.Button("Download the adapter (zip)")
    zip_file = gr.File(label="Adapter")
    merge_btn = gr.Button("Merge into the base (fp16, on the CPU) and save")
    repo = gr.Textbox(label="Hub repo id (user/name)")
    token = gr.Textbox(label="Hub token (write access)", type="password")
    push_btn = gr.Button("Push the adapter to the Hub")
    message = gr.Markdown()
    on(zip_btn.click, export_zip, app, run, zip_file, api_name="export_zip")
    on(merge_btn.click, merge, app, run, message, api_name="merge")
    on(push_btn.click, push, app, [run, repo, token], message, api_name="push")
