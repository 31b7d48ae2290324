"""What every tab shares: the app's state (runs, hardware, uploads, the model loaded to try), the tasks this
install has, a run's task, the run list, and the wrapper that turns a plain handler into a Gradio event.

Handlers in the tab modules are plain functions ``handler(app, *values) -> values``: tests call them directly, no
browser and no server. Only :func:`event` knows about Gradio's error display.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path

import gradio as gr
import yaml

from ..artifacts import RunDir
from ..config import ConfigError
from ..runs import REQUEST, RunBusy, RunManager
from ..tasks import TASKS

log = logging.getLogger("lowrank_pref.ui")


class UserError(ValueError):
    """Something the user can fix from the page; shown as one line."""


def detect_hardware() -> dict:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "memory_gb": round(props.total_memory / 2**30, 1)}
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
    model in memory (loading one takes seconds to minutes, so it is kept until another run is tried)."""

    def __init__(self, runs_root: str | os.PathLike | None = None, hw: dict | None = None):
        self.manager = RunManager(runs_root)
        self.uploads: Path = self.manager.root / ".uploads"
        self.hw = detect_hardware() if hw is None else hw
        self._trained: dict[str, object] = {}

    def trained(self, name: str):
        from ..infer import Trained

        if self.manager.active() and self.hw.get("gpu"):
            raise UserError("a run is training on the GPU; try the model when it is done or stopped")
        run = self.manager.run_dir(name)
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
    """The Run dropdown, refreshed: every run, newest first, with ``select`` (else the training one) chosen."""
    runs = app.manager.runs()
    names = [r["name"] for r in runs]
    value = select if select in names else (app.manager.active() or (names[0] if names else None))
    return gr.update(choices=[(run_label(r), r["name"]) for r in runs], value=value)


def event(fn, app: AppState):
    """``fn(app, *values)`` as a Gradio event handler: the app bound, and errors shown as one line in the page
    (``gr.Error``): the message itself for anything the user can fix, a short line (and the traceback in the log)
    for the rest. The signature Gradio sees is ``fn``'s without ``app``."""
    from ..data import DataError
    from ..export import ExportError
    from ..model import ModelError

    def handler(*args):
        try:
            return fn(app, *args)
        except gr.Error:
            raise
        except (ConfigError, DataError, ModelError, ExportError, RunBusy, UserError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # an internal error: logged with its traceback, shown as one line
            log.exception("internal error in %s", fn.__name__)
            first = str(e).splitlines()[0] if str(e) else ""
            raise gr.Error(f"internal error: {type(e).__name__}: {first}", print_exception=False) from None

    sig = inspect.signature(fn)
    handler.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    functools.update_wrapper(handler, fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    return handler
