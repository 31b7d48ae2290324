"""The Gradio app: set up, check the data, train, watch, try and export, from a browser tab. ``python app.py``.

One module per tab, each with its ``create_<tab>_tab`` builder (LLaMA-Factory's ``webui`` shape, with components
passed between tabs as plain attributes instead of a string-keyed registry) and its handlers as plain functions of
``(app, *values)`` that tests call without a browser: setup.py, data.py, train.py, tryit.py, export.py; common.py
holds what they share. Training runs as the CLI in a child process (``runs.RunManager``), so an out-of-memory error
or a crash never takes the page down; the page reads the run folder. Every handler's user errors reach the page as
one plain message (``gr.Error``), never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os

import gradio as gr

from .common import AppState, UserError, detect_hardware, run_list
from .data import create_data_tab, doctor, upload_box
from .export import create_export_tab
from .setup import (KEYS, cli_command, config_from_form, create_setup_tab, form_values, memory_line, store_upload,
                    suggest_preset)
from .train import create_train_tab
from .tryit import create_try_tab

__all__ = ["AppState", "CSS", "KEYS", "UserError", "build_app", "cli_command", "config_from_form", "detect_hardware",
           "doctor", "form_values", "main", "memory_line", "server_name", "store_upload",
           "suggest_preset"]

CSS = """
.lp-progress {height: 12px; background: #e5e7eb; border-radius: 6px; overflow: hidden}
.lp-bar {height: 100%; background: #f97316; transition: width .5s}
.lp-status {margin-top: 4px}
.lp-eval {margin-top: 2px; color: #374151}
.lp-example {border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px; margin: 6px 0}
.lp-side pre {white-space: pre-wrap; margin: 2px 0}
.lp-loss {background: #bbf7d0}
.lp-prompt {color: #6b7280}
.lp-cut {text-decoration: line-through; color: #dc2626}
"""


def build_app(runs_root: str | os.PathLike | None = None, hw: dict | None = None) -> gr.Blocks:
    """The page, tab by tab. ``hw``: the machine as :func:`detect_hardware` describes it (tests pass their own)."""
    app = AppState(runs_root, hw)
    preset = suggest_preset(app.hw)
    with gr.Blocks(title="lowrank-pref") as demo:
        gr.Markdown("# lowrank-pref\nFine-tune an open model on one GPU with QLoRA: supervised fine-tuning (SFT) "
                    "on demonstrations, preference tuning (DPO on chosen/rejected pairs, KTO on thumbs-up/down "
                    "answers) or a reward model. Pick a preset, check your data, train, watch, try it, take the "
                    "adapter home.")
        where = f"GPU: {app.hw['gpu']} ({app.hw['memory_gb']} GB)" if app.hw.get("gpu") else \
            "No GPU found: the `tiny` preset trains a toy model on the CPU in about a minute."
        gr.Markdown(f"**Hardware.** {where} Suggested preset: `{preset}`.")
        upload = upload_box()  # shown in the Data tab; Setup's command and Train's Start read it too
        with gr.Tab("1 · Setup"):
            setup = create_setup_tab(app, preset, upload)
        with gr.Tab("2 · Data"):
            create_data_tab(app, setup, upload)
        with gr.Tab("3 · Train"):
            train = create_train_tab(app, setup, upload)
        with gr.Tab("4 · Try it"):
            create_try_tab(app, train.run)
        with gr.Tab("5 · Export"):
            create_export_tab(app, train.run)
        demo.load(lambda: run_list(app), None, train.run, api_name=False)
    demo.manager = app.manager  # for scripts and tests
    demo.app_state = app
    return demo


def server_name() -> str:
    """127.0.0.1 unless asked; a Hugging Face Space (SPACE_ID set) must listen on all interfaces."""
    if os.environ.get("SPACE_ID"):
        return "0.0.0.0"
    return os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")


def main(argv: list[str] | None = None) -> None:
    from ..run import quiet_libraries

    p = argparse.ArgumentParser(prog="python app.py", description="The lowrank-pref app.")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; 0.0.0.0 in a Space)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--runs", default=None, help="runs folder (default: $LOWRANK_PREF_RUNS or ./runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    demo = build_app(args.runs)
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host or server_name(), server_port=args.port,
                                                   css=CSS, show_error=True)
