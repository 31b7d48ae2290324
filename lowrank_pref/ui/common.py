"""What every tab shares: the app's state (runs, hardware, uploads, the model loaded to try), a run's task, the run
list, and the wrapper that turns a plain handler into a Gradio event.

Handlers in the tab modules are plain functions ``handler(app, *values) -> values``: tests call them directly, no
browser and no server. Only :func:`event` knows about Gradio's error display and requests.

Two modes. Locally (the default) the app is its user's: every run in the folder is listed and local paths are data
like any other. Public (a Space, ``--public``) it is anyone's who opens it: each visitor sees and controls only their
own runs (``AppState.session``: the owner is the signed-in user, else a random key the browser keeps in its local
storage), data comes only from uploads and hub ids, and messages name files, not server paths.
"""

from __future__ import annotations

import copy
import functools
import html
import inspect
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import yaml

from ..artifacts import RunDir
from ..config import ConfigError
from ..runs import KILL_AFTER, REQUEST, RunBusy, RunManager, owner_key, owner_of
from ..tasks import TASKS

log = logging.getLogger("lowrank_pref.ui")

DOCTOR_ROWS = 2000  # rows the data check reads: enough to judge a format and its lengths, cheap whatever the file
PUBLIC_UPLOAD_MB = 200  # the upload limit of a public app unless --max-upload-mb says otherwise
UPLOAD_MAX_AGE = 86400  # seconds an upload no run refers to is kept
EXPORT_KEEP = 60  # seconds an exported zip is kept: Gradio copies it into its own cache as the download is answered
OWNER_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # what a browser's key must look like to own runs
NO_SESSION = "this page has no session key yet: reload it (an API client passes owner=<16+ letters or digits>)"
# An absolute path in a message: "/data/runs/.uploads/0123456789ab-mine.csv" -> "mine.csv" (URLs are left alone)
SERVER_PATH = re.compile(r"(?<![\w.~/:-])/(?:[^\s'\"`<>:,;()\[\]/]+/)*([^\s'\"`<>:,;()\[\]/]+)/?")
UPLOAD_NAME = re.compile(r"^[0-9a-f]{12}-(.+)$")  # store_upload's "<content hash>-<name>"


def strip_paths(text: str) -> str:
    """``text`` with each absolute path replaced by its last part, an upload by the name it was uploaded as: a public
    app's messages must not map the server for its visitors."""
    return SERVER_PATH.sub(lambda m: UPLOAD_NAME.sub(r"\1", m.group(1)), text)


def issue_owner(token) -> str:
    """The browser's key: kept when it has one, else a new random one (the page stores it in local storage, so a
    reload or a restarted Space still finds the visitor's runs)."""
    return token if isinstance(token, str) and OWNER_TOKEN.match(token) else secrets.token_urlsafe(24)


class UserError(ValueError):
    """Something the user can fix from the page; shown as one line."""


def detect_hardware() -> dict:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                "gpus": torch.cuda.device_count()}
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"gpu": None, "memory_gb": round(ram, 1) if ram else None}


def task_of(run: RunDir) -> str | None:
    """The task a run trains (its status, else its config), or None when unknown or not in this install."""
    task = run.read_status().get("task")
    for path in (run.config, run.path / REQUEST):
        if task:
            break
        try:
            task = (yaml.safe_load(path.read_text()) or {}).get("task")
        except (OSError, yaml.YAMLError):
            continue
    return task if task in TASKS else None


class AppState:
    """The one object the handlers share: the run manager, the machine, where uploads go, and at most one trained
    model in memory (loading one takes seconds to minutes, so it is kept until another run is tried).

    ``public``: a Space or ``--public`` (see the module's docstring). ``auth``: the app asks for a login, so a signed-in
    user owns their runs. ``doctor_rows``: rows the data check reads. ``kill_after``: seconds from Stop to SIGKILL.
    ``share_hub_token``: runs may use this machine's Hugging Face token even when public. Each request works on a
    :meth:`session` of this object, which knows whose request it is."""

    def __init__(self, runs_root: str | os.PathLike | None = None, hw: dict | None = None, *, public: bool = False,
                 auth: bool = False, doctor_rows: int = DOCTOR_ROWS, kill_after: float = KILL_AFTER,
                 share_hub_token: bool = False, max_upload_mb: float | None = None):
        self.public, self.auth, self.doctor_rows, self.max_upload_mb = public, auth, doctor_rows, max_upload_mb
        self.manager = RunManager(runs_root, kill_after=kill_after, hub_token=share_hub_token or not public)
        self.uploads: Path = self.manager.root / ".uploads"
        self.exports: Path = Path(tempfile.gettempdir()) / "lowrank_pref_exports"
        self.hw = detect_hardware() if hw is None else hw
        self.owner: str | None = None  # the session's owner_key; None: no session (the app itself, or anonymous)
        self.owner_box = None  # the page's gr.BrowserState with the browser's key (build_app sets it)
        self._trained: dict[str, object] = {}
        clean_uploads(self.uploads, self.manager.root)
        clean_exports(self.exports)

    # whose request ---------------------------------------------------------------------------------------------
    def session(self, token=None, request: gr.Request | None = None) -> "AppState":
        """This state as one request sees it: the same runs, uploads and loaded model, with the owner of the request
        (the signed-in user when the app asks for a login, else the browser's key; none for a request with
        neither)."""
        view = copy.copy(self)
        username = getattr(request, "username", None) if self.auth else None
        identity = f"user:{username}" if username else \
            f"browser:{token}" if isinstance(token, str) and OWNER_TOKEN.match(token) else None
        view.owner = owner_key(identity) if identity else None
        return view

    def owns(self, run: RunDir) -> bool:
        """Locally every run is the user's; in public, the runs this session started."""
        return not self.public or (self.owner is not None and owner_of(run) == self.owner)

    def run_dir(self, name: str) -> RunDir:
        """The run, if this session may see it; another visitor's run is answered as if it did not exist."""
        if self.public:
            try:
                run = self.manager.run_dir(name)
            except ConfigError:
                run = None
            if run is None or not self.owns(run):
                raise ConfigError(f"no run named '{name}'")
            return run
        return self.manager.run_dir(name)

    def runs(self) -> list[dict]:
        return [r for r in self.manager.runs() if not self.public or (self.owner and r["owner"] == self.owner)]

    def active(self) -> str | None:
        """This session's run that is training now, if any."""
        name = self.manager.active()
        return name if name and self.owns(self.manager.run_dir(name)) else None

    # acting on runs --------------------------------------------------------------------------------------------
    def start(self, cfg, then=None, name: str | None = None, processes: int = 1) -> str:
        if self.public and not self.owner:
            raise UserError(NO_SESSION)
        try:
            return self.manager.start(cfg, name=name, then=then, owner=self.owner, processes=processes)
        except RunBusy as e:
            raise self._busy(e) from None

    def resume(self, name: str) -> str:
        self.run_dir(name)
        try:
            return self.manager.resume(name)
        except RunBusy as e:
            raise self._busy(e) from None

    def stop(self, name: str | None) -> str:
        name = name or self.active()
        if not name:
            raise ConfigError("no run of yours is training" if self.public else "no run is training")
        self.run_dir(name)
        return self.manager.stop(name)

    def message(self, text: str) -> str:
        """A message as this app may show it: in public, without server paths."""
        return strip_paths(text) if self.public else text

    def _busy(self, e: RunBusy) -> RunBusy:
        """RunBusy as this session may read it: another visitor's run is not named (nor can it be stopped)."""
        if self.public and not self.owns(self.manager.run_dir(e.run)):
            return RunBusy("another visitor's run is training on this machine (one run at a time: they would share "
                           "the GPU); try again when it has ended", e.run)
        return e

    def forget(self, name: str) -> None:
        """Drop the loaded model of a run that was renamed or deleted."""
        for key in [k for k in self._trained if k.split(":")[0] == name]:
            del self._trained[key]

    def trained(self, name: str):
        from ..infer import Trained

        if self.manager.active() and self.hw.get("gpu"):
            raise UserError("a run is training on the GPU; try the model when it is done or stopped")
        run = self.run_dir(name)
        key = f"{name}:{run.adapter.exists()}:{run.latest_checkpoint()}"
        if key not in self._trained:
            self._trained.clear()  # one model in memory at a time
            self._trained[key] = Trained(run.path)
        return self._trained[key]


def run_label(r: dict) -> str:
    """One line of the run list: name, state, progress, and its place in a chain (SFT first, then DPO)."""
    label = f"{r['name']} · {r['state']} · step {r['step']}/{r['total_steps'] or '?'}"
    if r.get("then"):
        label += f" · then {r['then']}"
    elif r.get("then_run"):
        label += f" · then {r['then_run']}"
    if r.get("after"):
        label += f" · after {r['after']}"
    return label


def run_list(app: AppState, select: str | None = None) -> dict:
    """The Run dropdown, refreshed: every run this session may see, newest first, with ``select`` (else its training
    one) chosen."""
    runs = app.runs()
    names = [r["name"] for r in runs]
    value = select if select in names else (app.active() or (names[0] if names else None))
    return gr.update(choices=[(run_label(r), r["name"]) for r in runs], value=value)


def clean_uploads(uploads: Path, runs_root: Path, max_age: float = UPLOAD_MAX_AGE) -> None:
    """Remove uploads older than ``max_age`` seconds that no run refers to (a run's upload is its data: kept while
    the run folder is). Called at start and on every upload kept."""
    if not uploads.is_dir():
        return
    used = set()
    for config in [*runs_root.glob(f"*/{REQUEST}"), *runs_root.glob("*/then*.yaml")]:
        try:
            used.update(re.findall(r"\.uploads/([^\s'\"]+)", config.read_text(errors="replace")))
        except OSError:
            continue
    cutoff = time.time() - max_age
    for path in uploads.iterdir():
        try:
            if path.name not in used and path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            continue


def clean_exports(exports: Path, keep: float = EXPORT_KEEP) -> None:
    """Remove the zips made more than ``keep`` seconds ago (each in a folder of its own): by then Gradio has its
    copy for the download."""
    if not exports.is_dir():
        return
    cutoff = time.time() - keep
    for folder in exports.iterdir():
        try:
            if folder.stat().st_mtime >= cutoff:
                continue
            if folder.is_dir():
                shutil.rmtree(folder)
            else:
                folder.unlink()
        except FileNotFoundError:
            continue


def event(fn, app: AppState, owned: int | None = None):
    """``fn(app, *values)`` as a Gradio event handler: the app bound, and errors shown as one line in the page
    (``gr.Error``): the message itself for anything the user can fix, a short line (and the traceback in the log)
    for the rest. Messages are HTML-escaped (the page renders a toast's HTML, and data brings its own: a CSV header
    of ``<img onerror=...>``) and, in a public app, cleared of server paths.

    ``owned``: the number of the event's inputs, the last of them the browser's key (:func:`on` wires it): ``fn``
    then gets ``app.session(key, request)``, so it sees and acts on that session's runs only. The signature Gradio
    sees is ``fn``'s without ``app`` (for ``owned``, with ``*values`` spelled out and ``owner=None``, which API clients
    may leave out locally, and the request, which Gradio fills in)."""
    from ..data import DataError
    from ..export import ExportError
    from ..model import ModelError

    def call(state: AppState, values):
        try:
            return fn(state, *values)
        except gr.Error:
            raise
        except (ConfigError, DataError, ModelError, ExportError, RunBusy, UserError) as e:
            from .setup import name_fields  # setup imports this module

            text = name_fields(str(e))  # the form's label beside each key the message names
        except Exception as e:  # an internal error: logged with its traceback, shown as one line
            log.exception("internal error in %s", fn.__name__)
            first = str(e).splitlines()[0] if str(e) else ""
            text = f"internal error: {type(e).__name__}: {first}"
        raise gr.Error(html.escape(state.message(text), quote=False), print_exception=False) from None

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1:]
    if owned is None:
        def handler(*args):
            return call(app, args)

        handler.__signature__ = sig.replace(parameters=params)
    else:
        def handler(*args):
            *values, token, request = args
            return call(app.session(token, request), values)

        P = inspect.Parameter
        # exactly one parameter per input: Gradio fills a parameter without an input with its default, which would
        # push the key out of the last place (run_list's select, on page load)
        fixed = [p.replace(annotation=P.empty) for p in params if p.kind == P.POSITIONAL_OR_KEYWORD][:owned - 1]
        spread = [P(f"param_{i}", P.POSITIONAL_OR_KEYWORD) for i in range(len(fixed), owned - 1)]
        extra = [P("owner", P.POSITIONAL_OR_KEYWORD, default=None), P("request", P.POSITIONAL_OR_KEYWORD, default=None)]
        handler.__signature__ = sig.replace(parameters=[*fixed, *spread, *extra])
        handler.__annotations__ = {"request": gr.Request}  # how Gradio knows to pass the request
    functools.update_wrapper(handler, fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    return handler


def on(trigger, fn, app: AppState, inputs, outputs, **kwargs):
    """``trigger`` (a listener such as ``button.click`` or ``dep.then``) wired to ``fn`` for the session that fires
    it: the browser's key goes with the inputs (see :func:`event`)."""
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [] if inputs is None else [inputs]
    inputs.append(app.owner_box)
    return trigger(event(fn, app, owned=len(inputs)), inputs, outputs, **kwargs)
