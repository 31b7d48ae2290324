"""Runs as child processes, for the app: start, stop, resume, list, and one run after another. One training run at a
time.

A run is the CLI (``python -m lowrank_pref.run``) in its own process, so an out-of-memory error or a crash never
takes the app down; the app only reads the run folder (``artifacts.RunDir``). Everything the manager knows lives in
that folder too, so a restarted app (a Space that slept, a closed terminal) finds its runs again.

A run can bring the config of the run that follows it (``start(cfg, then=...)``, e.g. SFT first, then DPO from the
SFT adapter): it waits in the first run's folder as ``then.yaml`` and is started by ``poll()`` once the first run
has completed. ``poll`` runs on every listing and on every refresh of the app, so a chain needs no thread of its own,
and a stopped or failed first run keeps its follow-up queued until it is resumed and completes.

A run may have an owner (``owner``: a hash of the browser session or signed-in user that started it, never the secret
itself); a public app shows and controls a visitor's own runs only. Stop is SIGTERM, then SIGKILL after
``kill_after`` seconds: a run that ignores SIGTERM (stuck in a library call) must not keep the GPU and block every
Start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .artifacts import RunDir, atomic_write_text, process_start, run_alive
from .config import Config, ConfigError, build_config, dump_yaml

log = logging.getLogger("lowrank_pref.runs")
REQUEST = "request.yaml"  # the config the app asked for; the run writes the resolved config.yaml itself
CONSOLE = "console.log"  # the child's stdout and stderr
THEN = "then.yaml"  # the config of the run that starts when this one completes
THEN_STARTED = "then.started.yaml"  # ... renamed once it has been started (the rename is the claim)
OWNER = "owner"  # who started the run: owner_key() of their session, one line
KILL_AFTER = 60.0  # seconds from Stop's SIGTERM to SIGKILL
HUB_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a run's folder name


class RunBusy(RuntimeError):
    """A run is already training (``run``: its name)."""

    def __init__(self, message: str, run: str):
        super().__init__(message)
        self.run = run


def owner_key(identity: str) -> str:
    """What a run folder records of its owner: a hash, so the folder never holds the session's secret."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def owner_of(run: RunDir) -> str | None:
    try:
        return (run.path / OWNER).read_text().strip() or None
    except FileNotFoundError:
        return None


def default_root() -> Path:
    """``LOWRANK_PREF_RUNS``, else a Space's persistent storage (``/data``) when it has one, else ./runs."""
    if os.environ.get("LOWRANK_PREF_RUNS"):
        return Path(os.environ["LOWRANK_PREF_RUNS"])
    if os.environ.get("SPACE_ID") and os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/runs")
    return Path("runs")


def launcher(processes: int) -> list[str]:
    """What starts a run on ``processes`` GPUs: torchrun, one process each (distributed.py); none for one."""
    if processes <= 1:
        return []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


class RunManager:
    """``kill_after``: seconds Stop waits after SIGTERM before SIGKILL. ``hub_token``: whether runs may use this
    machine's Hugging Face token (HF_TOKEN, the saved login); a public app passes False, so visitors can't load the
    owner's private models and datasets through it."""

    command = [sys.executable, "-m", "lowrank_pref.run"]  # what a run is; tests put a stand-in here

    def __init__(self, root: str | os.PathLike | None = None, *, kill_after: float = KILL_AFTER,
                 hub_token: bool = True):
        self.root = Path(root) if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.kill_after = kill_after
        self.hub_token = hub_token
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
            if path.name.startswith(".") or not path.is_dir() or not (run.status_file.exists() or run.config.exists()):
                continue
            status = run.read_status()
            out.append({"name": path.name, "owner": owner_of(run), "state": run.state(), "step": status.get("step", 0),
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
            if path.is_dir() and not path.name.startswith(".") and RunDir(path).state() == "running":
                return path.name
        return None

    # start, resume, stop ---------------------------------------------------------------------------------------
    def start(self, cfg: Config, name: str | None = None, then: Config | None = None, owner: str | None = None,
              processes: int = 1) -> str:
        """Start a new run of ``cfg``; returns its name. Refused while another run trains. ``then``: the run to start
        when this one completes, from this run's adapter (``then.adapter`` is set to it). ``owner``: an
        :func:`owner_key`, recorded in the folder (and inherited by the follow-up). ``processes`` > 1: on that many
        GPUs, through the launcher (the follow-up too)."""
        with self._lock:
            self._start_follow_ups()  # a chain that is due goes first: it was asked for earlier
            self._refuse_if_busy()
            return self._start(cfg, name, then, owner=owner, processes=processes)

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
            self._spawn(run, ["--output-dir", str(run.path), "--resume"],
                        processes=run.read_status().get("processes", 1))  # on as many GPUs as it started on
            return name

    def stop(self, name: str | None = None) -> str:
        """Ask the run to stop (SIGTERM): it ends after its micro-batch with a checkpoint of its last complete step and
        exits. One still alive ``kill_after`` seconds later is killed (SIGKILL), and its status says so. Only the
        process the status names, with its recorded start time, is signalled (``artifacts.run_alive``): a pid the
        system has given to another process since is left alone."""
        name = name or self.active()
        if not name:
            raise ConfigError("no run is training")
        run = self.run_dir(name)
        status = run.read_status()
        if status.get("state") != "running" or not run_alive(status):
            raise ConfigError(f"run '{name}' is not training")
        os.kill(status["pid"], signal.SIGTERM)
        threading.Thread(target=self._kill_if_alive, args=(name, status), daemon=True,
                         name=f"stop-{name}").start()
        return name

    def delete(self, name: str) -> str:
        """Remove a run and its files (checkpoints, adapter, merged model, logs). Refused while it trains, and while
        another run starts from its adapter (that run's reference and Resume read it): delete that one first."""
        with self._lock:
            run = self._idle(name, "delete")
            users = self._users_of(run)
            if users:
                raise ConfigError(f"run '{name}' can't be deleted: run '{users[0]}' starts from its adapter (it is "
                                  f"that run's reference, or its reward model); delete '{users[0]}' first")
            trash = self.root / f".deleting-{name}-{os.getpid()}"
            os.rename(run.path, trash)  # at once: the run is gone from the list even if removing its files is slow
            shutil.rmtree(trash, ignore_errors=True)
            self._children.pop(name, None)
            return name

    def rename(self, name: str, new: str) -> str:
        """Give a run another name (its folder's). Refused while it trains or when the name is taken. The run's own
        configs and the runs chained to it (SFT first) are rewritten to the new folder, so Resume, Try it and a
        queued follow-up still find its adapter."""
        new = (new or "").strip()
        if not RUN_NAME.match(new):
            raise ConfigError(f"'{new[:40]}' can't name a run: use letters, digits, '.', '_' and '-' (up to 100, "
                              "starting with a letter or digit)")
        with self._lock:
            run = self._idle(name, "rename")
            if new == name:
                return name
            target = self.root / new
            if target.exists():
                raise ConfigError(f"a run named '{new}' exists already; choose another name")
            os.rename(run.path, target)
            old_path, new_path = str(run.path.resolve()), str(target.resolve())
            for path in self.root.iterdir():
                if not path.is_dir() or path.name.startswith("."):
                    continue
                for file in (REQUEST, "config.yaml", THEN, THEN_STARTED):
                    f = path / file
                    if f.is_file() and old_path in (text := f.read_text()):
                        atomic_write_text(f, text.replace(old_path + "/", new_path + "/")
                                          .replace(f": {old_path}\n", f": {new_path}\n"))
                other = RunDir(path)
                status = other.read_status()
                links = {k: new for k in ("then_run", "after") if status.get(k) == name}
                if links:
                    other.write_status(**links)
            if name in self._children:
                self._children[new] = self._children.pop(name)
            return new

    def _idle(self, name: str, what: str) -> RunDir:
        run = self.run_dir(name)
        self.reap()
        status = run.read_status()
        if status.get("state") == "running" and run_alive(status):
            raise ConfigError(f"run '{name}' is training: stop it before you {what} it")
        return run

    def _users_of(self, run: RunDir) -> list[str]:
        """The runs whose config starts from this run's adapter."""
        adapter = str(run.path.resolve() / "adapter")
        users = []
        for path in self.root.iterdir():
            if path == run.path or not path.is_dir() or path.name.startswith("."):
                continue
            for file in (REQUEST, "config.yaml"):
                f = path / file
                if f.is_file() and adapter in f.read_text(errors="replace"):
                    users.append(path.name)
                    break
        return users

    def _kill_if_alive(self, name: str, status: dict) -> None:
        """Stop's second half, on its own thread: wait up to ``kill_after`` seconds for the process to end, then kill
        it and its process group, and record that it was killed and what Resume starts from."""
        end = time.monotonic() + self.kill_after
        while run_alive(status) and time.monotonic() < end:
            time.sleep(min(0.2, max(end - time.monotonic(), 0.01)))
        pid = status["pid"]
        with self._lock:
            if not run_alive(status):
                return
            try:  # a run the app started leads its own process group (start_new_session): take its helpers too
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return  # it ended just now
            child = self._children.get(name)
            if child is not None and child.pid == pid:
                child.wait(30)
            run = RunDir(self.root / name)
            latest = run.latest_checkpoint()
            resume = f"Resume starts from its last checkpoint (step {latest[0]})" if latest else \
                "it had no checkpoint yet: Resume starts from step 0"
            run.write_final_status(state="stopped", killed=True,
                                   message=f"killed: still running {self.kill_after:g} s after Stop; {resume}")
            log.warning("run %s ignored SIGTERM for %g s: killed", name, self.kill_after)

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
                          "would share the GPU)", busy)

    def _start(self, cfg: Config, name: str | None, then: Config | None = None, owner: str | None = None,
               **status) -> str:
        name = name or f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        base, k = name, 1
        while (self.root / name).exists():
            k += 1
            name = f"{base}-{k}"
        run = RunDir(self.root / name).create()
        if owner:
            (run.path / OWNER).write_text(owner + "\n")
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
            name = self._start(cfg, None, owner=owner_of(first), after=first.path.name,
                               processes=first.read_status().get("processes", 1))
            first.write_status(then_run=name)
            log.info("%s completed: started its follow-up %s", first.path.name, name)
            started.append(name)
        return started

    def child_env(self) -> dict:
        """The run's environment: this one, the package importable, and without this machine's Hugging Face token
        unless ``hub_token`` (HF_HUB_DISABLE_IMPLICIT_TOKEN also keeps a saved login from being sent)."""
        env = dict(os.environ, LOWRANK_PREF_PROGRESS="0", PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)  # the package is importable in the child as it is here
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if not self.hub_token:
            for var in HUB_TOKEN_VARS:
                env.pop(var, None)
            env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
        return env

    def _spawn(self, run: RunDir, args: list[str], processes: int = 1, **status) -> None:
        command = [*launcher(processes), *self.command[1:]] if processes > 1 else self.command
        with open(run.path / CONSOLE, "a") as console:
            child = subprocess.Popen([*command, *args], stdout=console, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.child_env(), start_new_session=True)
        self._children[run.path.name] = child
        # written before the child writes its own, so a second start is refused from this moment; with the child's
        # start time, so Stop never signals another process that gets this pid later
        run.write_status(state="running", pid=child.pid, process={"pid": child.pid, "start": process_start(child.pid)},
                         message="starting", killed=False, processes=processes, **status)

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
