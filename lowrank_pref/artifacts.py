"""The run folder contract. The app and the tests read only this.

    OUTPUT_DIR/
      config.yaml        the resolved config, plus ``reference: base | adapter``
      metrics.jsonl      one JSON object a line, each with its ``step``; eval lines carry ``eval_`` keys
      status.json        {state: running|completed|stopped|failed, step, total_steps, pid, message, ...}
      data_report.json   what the data path kept, dropped and truncated
      train.log          the run's log
      adapter/           the final PEFT adapter (+ tokenizer), loadable with PeftModel.from_pretrained
      checkpoint-N/      adapter/, optimizer.pt, scheduler.pt, rng.pt, state.json; written atomically
      checkpoint-N.damaged/  a checkpoint that failed to load on resume, moved aside (the one before was used)
      .lock              held (flock) by the run training in the folder, with its pid; free once it ends

Files that must survive a crash or a power cut whole (status.json, checkpoints, the adapter) are written to a
temporary name, fsynced, then renamed into place, and the folder is fsynced: the rename alone may reach the disk
before the data does, leaving a complete-looking checkpoint of zeros.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded against a second run in the folder
    fcntl = None

log = logging.getLogger("lowrank_pref")
LOCK = ".lock"


class FolderBusy(RuntimeError):
    """Another live run holds the run folder's lock."""


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable. Some filesystems can't fsync a folder (EINVAL): there is nothing more to
    do on them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (a checkpoint or an adapter, before its rename into place)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def atomic_write_text(path: Path, text: str) -> None:
    """Write whole or not at all, and durably: a temporary file, fsynced, renamed over ``path``. A failed write
    (a full disk) leaves ``path`` as it was and no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux: /proc/<pid>/stat field 22); None where that
    can't be read. A pid with another start time is another process that got the number after ours ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19])  # fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def this_process() -> dict:
    """What status.json records of the run's own process: its pid and start time (see :func:`run_alive`)."""
    return {"pid": os.getpid(), "start": process_start(os.getpid())}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete lines of a metrics.jsonl; a torn last line (a killed writer) is ignored."""
    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child (exited, not yet reaped) still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def run_alive(status: dict) -> bool:
    """Whether the process a status names is the run that wrote it and still lives. The pid alone is not enough: after
    a restart that keeps the folder the number may belong to another process, which would block Start and get the
    Stop button's SIGTERM. A status that records the process's start time (``process``, written by the run itself)
    must match it; one without (written by the app before the run starts) is judged by the pid."""
    pid = status.get("pid")
    if not pid_alive(pid):
        return False
    recorded = status.get("process")
    if isinstance(recorded, dict) and recorded.get("pid") == pid and recorded.get("start") is not None:
        now = process_start(pid)
        return now is None or now == recorded["start"]
    return True


class RunDir:
    writes = True  # False for a rank other than 0 of a run on several processes (ReaderRunDir)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.status_file = self.path / "status.json"
        self.data_report = self.path / "data_report.json"
        self.log = self.path / "train.log"
        self.adapter = self.path / "adapter"

    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def lock(self):
        """Hold the folder for this process's run: an exclusive flock on ``.lock``, kept until the returned file is
        closed or the process ends however it ends (the kernel drops it then, so a killed run leaves no stale lock).
        Raises FolderBusy, naming the holder's pid, when a live run holds it; nothing is written then."""
        f = open(self.path / LOCK, "a+")
        if fcntl is None:
            return f
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise FolderBusy(f"run folder '{self.path}' is in use by a run that is still training (pid {holder}); "
                             "wait for it to end or stop it, or choose another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def remove_partial(self) -> None:
        """Remove the temporary files and folders this process left half-written (a run stopped mid-write)."""
        for tmp in self.path.glob(f".*.tmp-{os.getpid()}"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def write_text(self, path: Path, text: str) -> None:
        """A file of the run folder (data_report.json, config.yaml), written atomically."""
        atomic_write_text(path, text)

    # status -----------------------------------------------------------------------------------------------------
    def write_status(self, **fields) -> None:
        status = self.read_status()
        status.update(fields, updated=time.time())
        atomic_write_text(self.status_file, json.dumps(status, indent=1))

    def write_final_status(self, **fields) -> bool:
        """The status a run ends with (failed, stopped), by any means left; False when even that failed. A full disk
        refuses the new file an atomic write needs, but the old status.json's own blocks can still be overwritten
        in place (compact JSON, smaller than the indented file): a run that ends on ENOSPC must not stay
        "running"."""
        try:
            self.write_status(**fields)
            return True
        except OSError as e:
            log.warning("could not write %s (%s); overwriting it in place", self.status_file, e)
        status = self.read_status()
        status.update(fields, updated=time.time())
        try:
            with open(self.status_file, "r+") as f:
                f.write(json.dumps(status, separators=(",", ":")))
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError as e:
            log.error("could not write %s either way (%s): it still says what it said before", self.status_file, e)
            return False

    def read_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def state(self) -> str:
        """The status as the app shows it: a 'running' run whose process is gone was killed ('stopped')."""
        status = self.read_status()
        state = status.get("state", "new")
        if state == "running" and not run_alive(status):
            return "stopped"
        return state

    # metrics ----------------------------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics)

    def truncate_metrics(self, last_step: int) -> None:
        """On resume: keep what was logged up to the checkpoint; later steps will be logged again."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # checkpoints ------------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.path.glob("checkpoint-*"):
            suffix = p.name.split("-", 1)[1]
            if suffix.isdigit() and (p / "state.json").is_file():
                out.append((int(suffix), p))
        return sorted(out)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def new_checkpoint_dir(self, step: int) -> Path:
        tmp = self.path / f".checkpoint-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int, keep: int) -> Path:
        """Rename a fully written checkpoint into place (atomic and, with the fsyncs, durable), then drop the oldest
        beyond ``keep``."""
        final = self.path / f"checkpoint-{step}"
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.path)
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.path.glob(".checkpoint-*.tmp-*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def move_aside(self, checkpoint: Path) -> Path:
        """Rename a checkpoint that failed to load to ``checkpoint-N.damaged`` (kept to look at, never loaded)."""
        target = checkpoint.with_name(checkpoint.name + ".damaged")
        k = 1
        while target.exists():
            k += 1
            target = checkpoint.with_name(f"{checkpoint.name}.damaged-{k}")
        os.replace(checkpoint, target)
        return target

    def install_dir(self, tmp: Path, final: Path) -> None:
        """Put a fully written folder (the adapter) in place: fsynced, then renamed; a previous one is renamed
        aside first and removed after, so ``final`` is never a half-deleted folder."""
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class ReaderRunDir(RunDir):
    """The run folder as a rank other than 0 of a run on several processes sees it: it reads the checkpoints to
    resume from and writes nothing (rank 0 writes status, metrics, checkpoints, the adapter; see distributed.py)."""
    writes = False

    class _NoLock:
        def close(self) -> None:
            pass

    def create(self) -> "RunDir":
        return self

    def lock(self):
        return self._NoLock()

    def write_text(self, path: Path, text: str) -> None:
        pass

    def write_status(self, **fields) -> None:
        pass

    def write_final_status(self, **fields) -> bool:
        return True

    def append_metrics(self, record: dict) -> None:
        pass

    def truncate_metrics(self, last_step: int) -> None:
        pass

    def remove_partial(self) -> None:
        pass

    def move_aside(self, checkpoint: Path) -> Path:
        return checkpoint  # rank 0 moves it; this rank only skips it

    def install_dir(self, tmp: Path, final: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
