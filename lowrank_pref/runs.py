"""Runs as child processes, for the app: start, stop, resume, list, and one run after another. One training run at a
time.

A run is the CLI (``python -m lowrank_pref.run``) in its own process, so an out-of-memory error or a crash never
takes the app down; the app only reads the run folder (``artifacts.RunDir``). Everything the manager knows lives in
that folder too, so a restarted app (a Space that slept, a closed terminal) finds its runs again.

A run can bring the config of the run that follows it (``start(cfg, then=...)``, e.g. SFT first, then DPO from the
SFT adapter): it waits in the first run's folder as ``then.yaml`` and is started by ``poll()`` once the first run
has completed. ``poll`` runs on every listing and on every refresh of the app, so a chain needs no thread of its own,
and a stopped or failed first run keeps its follow-up queued until it is resumed and completes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .artifacts import RunDir, pid_alive
from .config import Config, ConfigError, build_config, dump_yaml

log = logging.getLogger("lowrank_pref.runs")
REQUEST = "request.yaml"  # the config the app asked for; the run writes the resolved config.yaml itself
CONSOLE = "console.log"  # the child's stdout and stderr
THEN = "then.yaml"  # the config of the run that starts when this one completes
THEN_STARTED = "then.started.yaml"  # ... renamed once it has been started (the rename is the claim)


class RunBusy(RuntimeError):
    """A run is already training."""


def default_root() -> Path:
    """``LOWRANK_PREF_RUNS``, else a Space's persistent storage (``/data``) when it has one, else ./runs."""
    if os.environ.get("LOWRANK_PREF_RUNS"):
        return Path(os.environ["LOWRANK_PREF_RUNS"])
    if os.environ.get("SPACE_ID") and os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/runs")
    return Path("runs")


class RunManager:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # what there is ---------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> RunDir:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"no run named '{name}'")
        run = RunDir(self.root / name)
        if not run.path.is_dir():
            raise ConfigError(f"no run named '{name}' in {self.root}")
        return run

    def runs(self) -> list[dict]:
        """Every run folder, newest first: name, state, step, total_steps, task, and its place in a chain: ``then``
        (the task of a follow-up still queued), ``then_run`` (the follow-up started), ``after`` (the run it
        followed)."""
        self.poll()
        out = []
        for path in self.root.iterdir():
            run = RunDir(path)
            if not path.is_dir() or not (run.status_file.exists() or run.config.exists()):
                continue
            status = run.read_status()
            out.append({"name": path.name, "state": run.state(), "step": status.get("step", 0),
                        "total_steps": status.get("total_steps"), "task": status.get("task"),
                        "message": status.get("message", ""), "updated": status.get("updated", 0.0),
                        "resumable": bool(run.checkpoints()) and run.state() in ("stopped", "failed"),
                        "then": status.get("then_task") if (path / THEN).exists() else None,
                        "then_run": status.get("then_run"), "after": status.get("after"),
                        "then_error": status.get("then_error")})
        return sorted(out, key=lambda r: r["updated"], reverse=True)

    def active(self) -> str | None:
        """The run that is training now, if any (its process is alive)."""
        self.reap()
        for path in self.root.iterdir():
            if path.is_dir() and RunDir(path).state() == "running":
                return path.name
        return None

    # start, resume, stop ---------------------------------------------------------------------------------------
    def start(self, cfg: Config, name: str | None = None, then: Config | None = None) -> str:
        """Start a new run of ``cfg``; returns its name. Refused while another run trains. ``then``: the run to start
        when this one completes, from this run's adapter (``then.adapter`` is set to it)."""
        with self._lock:
            self._start_follow_ups()  # a chain that is due goes first: it was asked for earlier
            self._refuse_if_busy()
            return self._start(cfg, name, then)

    def follow_up(self, name: str) -> str | None:
        """The run started after ``name`` completed, once there is one."""
        return self.run_dir(name).read_status().get("then_run")

    def poll(self) -> list[str]:
        """Collect ended runs and start the follow-ups that are due; returns the names started. Cheap enough to call
        on every refresh of the page."""
        with self._lock:
            return self._start_follow_ups()

    def resume(self, name: str) -> str:
        with self._lock:
            self._refuse_if_busy()
            run = self.run_dir(name)
            if run.state() == "completed":
                raise ConfigError(f"run '{name}' is complete; there is nothing to resume")
            self._spawn(run, ["--output-dir", str(run.path), "--resume"])
            return name

    def stop(self, name: str | None = None) -> str:
        """Ask the run to stop: it finishes its step, writes a checkpoint and exits (SIGTERM)."""
        name = name or self.active()
        if not name:
            raise ConfigError("no run is training")
        run = self.run_dir(name)
        pid = run.read_status().get("pid")
        if run.state() != "running" or not pid_alive(pid):
            raise ConfigError(f"run '{name}' is not training")
        os.kill(pid, signal.SIGTERM)
        return name

    def wait(self, name: str, timeout: float = 60.0) -> str:
        """Block until the run's process ends (tests, scripts); returns its state."""
        child = self._children.get(name)
        if child is not None:
            child.wait(timeout)
        self.reap()
        return self.run_dir(name).state()

    # internals -------------------------------------------------------------------------------------------------
    def _refuse_if_busy(self) -> None:
        busy = self.active()
        if busy:
            raise RunBusy(f"run '{busy}' is training; stop it before starting another (one run at a time: they "
                          "would share the GPU)")

    def _start(self, cfg: Config, name: str | None, then: Config | None = None, **status) -> str:
        name = name or f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        base, k = name, 1
        while (self.root / name).exists():
            k += 1
            name = f"{base}-{k}"
        run = RunDir(self.root / name).create()
        cfg.output_dir = str(run.path)
        (run.path / REQUEST).write_text(dump_yaml(cfg))
        if then is not None:
            then.adapter, then.output_dir = str(run.path / "adapter"), None  # the adapter this run will write
            (run.path / THEN).write_text(dump_yaml(then))
            status["then_task"] = then.task
        self._spawn(run, ["--config", str(run.path / REQUEST), "--output-dir", str(run.path)], task=cfg.task,
                    **status)
        return name

    def _start_follow_ups(self) -> list[str]:
        """Under the lock: start the queued follow-up of each completed run, one at a time (the rest wait for a later
        call, as a run the user starts would)."""
        self.reap()
        started = []
        for queued in sorted(self.root.glob(f"*/{THEN}")):
            first = RunDir(queued.parent)
            if first.state() != "completed" or self.active():
                continue
            claimed = queued.with_name(THEN_STARTED)
            try:
                os.rename(queued, claimed)  # atomic: another app on this folder cannot start it a second time
            except FileNotFoundError:
                continue
            try:
                cfg = build_config(config_file=str(claimed))
            except ConfigError as e:  # written by an older version whose keys this one refuses: say so, keep it
                first.write_status(then_error=f"the follow-up could not start: {e}")
                log.warning("follow-up of %s not started: %s", first.path.name, e)
                continue
            name = self._start(cfg, None, after=first.path.name)
            first.write_status(then_run=name)
            log.info("%s completed: started its follow-up %s", first.path.name, name)
            started.append(name)
        return started

    def _spawn(self, run: RunDir, args: list[str], **status) -> None:
        env = dict(os.environ, LOWRANK_PREF_PROGRESS="0", PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)  # the package is importable in the child as it is here
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(run.path / CONSOLE, "a") as console:
            child = subprocess.Popen([sys.executable, "-m", "lowrank_pref.run", *args], stdout=console,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        self._children[run.path.name] = child
        # written before the child writes its own, so a second start is refused from this moment
        run.write_status(state="running", pid=child.pid, message="starting", **status)

    def reap(self) -> None:
        """Collect finished children; a child that died before it could say why gets its last console line."""
        for name, child in list(self._children.items()):
            code = child.poll()
            if code is None:
                continue
            del self._children[name]
            run = RunDir(self.root / name)
            status = run.read_status()
            if status.get("state") == "running" and status.get("pid") == child.pid:
                state = "stopped" if code in (130, -signal.SIGTERM, -signal.SIGKILL) else "failed"
                run.write_status(state=state, message=last_error(run) or f"the run exited with status {code}")


def last_error(run: RunDir) -> str:
    """The CLI's one-line error, from the run's console output."""
    try:
        lines = (run.path / CONSOLE).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    for line in reversed(lines):
        if line.startswith(("error:", "internal error:")):
            return line
    return ""


def tail(path: Path, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""
