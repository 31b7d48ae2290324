"""The Gradio app: set up, check the data, train, watch, try and export, from a browser tab. ``python app.py``.

One module per tab, each with its ``create_<tab>_tab`` builder (LLaMA-Factory's ``webui`` shape, with components
passed between tabs as plain attributes instead of a string-keyed registry) and its handlers as plain functions of
``(app, *values)`` that tests call without a browser: setup.py, data.py, train.py, tryit.py, export.py; common.py
holds what they share. Training runs as the CLI in a child process (``runs.RunManager``), so an out-of-memory error
or a crash never takes the page down; the page reads the run folder. Every handler's user errors reach the page as
one plain message (``gr.Error``), never a stack trace.

Public (a Space, or ``--public``): see common.py. Each visitor sees and controls only their own runs, data comes from
uploads and hub ids only, uploads are limited in size (``--max-upload-mb``), and the machine's Hugging Face token is
kept from visitors unless ``--share-hub-token``. ``--auth user:password`` adds Gradio's login.
"""

from __future__ import annotations

import argparse
import logging
import os

import gradio as gr

from ..runs import HUB_TOKEN_VARS, KILL_AFTER
from .common import (DOCTOR_ROWS, PUBLIC_UPLOAD_MB, AppState, UserError, detect_hardware, issue_owner, on,
                     run_list)
from .data import create_data_tab, doctor, upload_box
from .export import create_export_tab
from .setup import (KEYS, cli_command, config_from_form, create_setup_tab, form_values, memory_line, reward_state,
                    store_upload, suggest_preset)
from .train import create_train_tab
from .tryit import create_try_tab

__all__ = ["AppState", "CSS", "KEYS", "UserError", "build_app", "cli_command", "config_from_form", "detect_hardware",
           "doctor", "form_values", "main", "memory_line", "server_name", "store_upload", "suggest_preset",
           "withhold_hub_token"]

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
.lp-bad input, .lp-bad textarea {border: 2px solid #dc2626 !important}
.lp-group {padding: 4px 8px 0}
"""


def mode_line(app: AppState) -> str:
    """What this page is, in one paragraph: whose runs it shows and what data it reads."""
    if not app.public:
        who = "Everyone who signs in sees every run." if app.auth else "Every run in the runs folder is listed."
        return (f"**Local mode.** {who} Local files and folders are data like any other. For a page others can "
                "reach, use `--public` (a Space is public by itself).")
    owner = "the runs started under your user name" if app.auth else \
        "the runs started from this browser (it keeps a private key in its local storage; another browser, or " \
        "cleared site data, starts with none)"
    limit = f" up to {app.max_upload_mb:g} MB" if app.max_upload_mb else ""
    return (f"**Public mode.** You see and control only {owner}. Data comes from uploads{limit} and hub ids: "
            "paths on this server are refused. One run trains at a time, whoever started it.")


def build_app(runs_root: str | os.PathLike | None = None, hw: dict | None = None, *, public: bool | None = None,
              auth: list[tuple[str, str]] | None = None, max_upload_mb: float | None = None,
              doctor_rows: int = DOCTOR_ROWS, kill_after: float = KILL_AFTER, share_hub_token: bool = False
              ) -> gr.Blocks:
    """The page, tab by tab. ``hw``: the machine as :func:`detect_hardware` describes it (tests pass their own).
    ``public``: None means a Space (SPACE_ID set) is public and anything else local. ``max_upload_mb``: None means
    PUBLIC_UPLOAD_MB in public and no limit locally. ``demo.launch_kwargs`` holds what launch() needs for these
    (the upload limit, the login, the CSS)."""
    public = bool(os.environ.get("SPACE_ID")) if public is None else public
    if max_upload_mb is None and public:
        max_upload_mb = PUBLIC_UPLOAD_MB
    app = AppState(runs_root, hw, public=public, auth=bool(auth), doctor_rows=doctor_rows, kill_after=kill_after,
                   share_hub_token=share_hub_token, max_upload_mb=max_upload_mb)
    preset = suggest_preset(app.hw)
    # Gradio's copies of uploads and downloads go after a day (checked hourly), and all of them at a restart
    with gr.Blocks(title="lowrank-pref", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# lowrank-pref\nFine-tune an open model on one GPU with QLoRA: supervised fine-tuning (SFT) "
                    "on demonstrations, preference tuning (DPO on chosen/rejected pairs, KTO on thumbs-up/down "
                    "answers), a reward model, and RL against that reward model. Pick a preset, check your data, "
                    "train, watch, try it, take the adapter home.")
        where = f"GPU: {app.hw['gpu']} ({app.hw['memory_gb']} GB)" if app.hw.get("gpu") else \
            "No GPU found: the `tiny` preset trains a toy model on the CPU in about a minute."
        gr.Markdown(f"**Hardware.** {where} Suggested preset: `{preset}`.")
        gr.Markdown(mode_line(app), elem_classes="lp-mode")
        # the browser's key (common.issue_owner): the storage key is fixed and the secret too, so a restarted app
        # still reads it; the value is a capability the browser holds, not something the secret protects
        app.owner_box = gr.BrowserState(None, storage_key="lowrank_pref_owner", secret="lowrank-pref")
        upload = upload_box()  # shown in the Data tab; Setup's command and Train's Start read it too
        with gr.Tabs() as tabs:
            with gr.Tab("1 · Setup", id="setup") as setup_tab:
                setup = create_setup_tab(app, preset, upload, setup_tab.select)
            with gr.Tab("2 · Data", id="data"):
                create_data_tab(app, setup, upload)
            with gr.Tab("3 · Train", id="train"):
                train = create_train_tab(app, setup, upload, tabs)
            with gr.Tab("4 · Try it", id="try") as try_it:
                create_try_tab(app, train.run, try_it)
            with gr.Tab("5 · Export", id="export") as export_tab:
                create_export_tab(app, train.run, export_tab)
        loaded = demo.load(issue_owner, app.owner_box, app.owner_box, api_name=False)
        on(loaded.then, run_list, app, None, train.run, api_name=False)
        on(loaded.then, reward_state, app, *setup.reward, api_name=False)  # the session's own reward runs
    demo.manager = app.manager  # for scripts and tests
    demo.app_state = app
    max_file_size = int(max_upload_mb * 2**20) if max_upload_mb else None
    demo.launch_kwargs = {"css": CSS, "max_file_size": max_file_size, "auth": auth or None}
    return demo


def withhold_hub_token() -> None:
    """A public app's own hub reads (the data check, the memory estimate) must not use the machine's Hugging Face
    token either: visitors would read the owner's private models and datasets. The token leaves this process's
    environment, and huggingface_hub stops sending a saved login (its flag is read at import, so it is set too)."""
    import huggingface_hub.constants

    for var in HUB_TOKEN_VARS:
        os.environ.pop(var, None)
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True


def server_name() -> str:
    """127.0.0.1 unless asked; a Hugging Face Space (SPACE_ID set) must listen on all interfaces."""
    if os.environ.get("SPACE_ID"):
        return "0.0.0.0"
    return os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")


def _login(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("give --auth as user:password")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The app's options; each has an environment variable too, since a Space runs `python app.py` without any."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python app.py", description="The lowrank-pref app.")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; 0.0.0.0 in a Space)")
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--runs", default=None, help="runs folder (default: $LOWRANK_PREF_RUNS or ./runs)")
    p.add_argument("--public", action="store_true", default=bool(env("LOWRANK_PREF_PUBLIC")),
                   help="public mode, as in a Space: each visitor sees only their own runs, data only from uploads "
                        "and hub ids ($LOWRANK_PREF_PUBLIC=1)")
    p.add_argument("--auth", type=_login, action="append", default=None, metavar="USER:PASSWORD",
                   help="require Gradio's login (repeat for more users; $LOWRANK_PREF_AUTH, comma-separated)")
    p.add_argument("--max-upload-mb", type=float, default=float(env("LOWRANK_PREF_MAX_UPLOAD_MB", 0)) or None,
                   help=f"largest upload (default {PUBLIC_UPLOAD_MB} in public mode, none locally)")
    p.add_argument("--share-hub-token", action="store_true", default=bool(env("LOWRANK_PREF_SHARE_HUB_TOKEN")),
                   help="let visitors' runs and data checks use this machine's HF_TOKEN in public mode (off: they "
                        "can only read public repos)")
    p.add_argument("--doctor-rows", type=int, default=int(env("LOWRANK_PREF_DOCTOR_ROWS", DOCTOR_ROWS)),
                   help=f"rows the data check reads (default {DOCTOR_ROWS})")
    p.add_argument("--kill-after", type=float, default=float(env("LOWRANK_PREF_KILL_AFTER", KILL_AFTER)),
                   help=f"seconds from Stop to killing a run that has not ended (default {KILL_AFTER:g})")
    args = p.parse_args(argv)
    if args.auth is None and env("LOWRANK_PREF_AUTH"):
        args.auth = [_login(pair.strip()) for pair in env("LOWRANK_PREF_AUTH").split(",") if pair.strip()]
    args.public = args.public or bool(env("SPACE_ID"))
    return args


def main(argv: list[str] | None = None) -> None:
    from ..run import quiet_libraries

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    if args.public and not args.share_hub_token:
        withhold_hub_token()
    host = args.host or server_name()
    if not args.public and not args.auth and host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("listening on %s in local mode: anyone who reaches it can read this machine's files through "
                        "the app; --public or --auth is the mode for that", host)
    demo = build_app(args.runs, public=args.public, auth=args.auth, max_upload_mb=args.max_upload_mb,
                     doctor_rows=args.doctor_rows, kill_after=args.kill_after, share_hub_token=args.share_hub_token)
    demo.queue(default_concurrency_limit=4).launch(server_name=host, server_port=args.port, show_error=True,
                                                   **demo.launch_kwargs)
