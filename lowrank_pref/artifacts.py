"""The run folder contract. The app and the tests read only this.

    OUTPUT_DIR/
      config.yaml        the resolved config, plus ``reference: base | adapter``
      metrics.jsonl      one JSON object a line, each with its ``step``; eval lines carry ``eval_`` keys
      status.json        {state: running|completed|stopped|failed, step, total_steps, pid, message, ...}
      data_report.json   what the data path kept, dropped and truncated
      train.log          the run's log
      adapter/           the final PEFT adapter (+ tokenizer), loadable with PeftModel.from_pretrained
      checkpoint-N/      adapter/, optimizer.pt, scheduler.pt, rng.pt, state.json; written atomically
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class RunDir:
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

    # status -----------------------------------------------------------------------------------------------------
    def write_status(self, **fields) -> None:
        status = self.read_status()
        status.update(fields, updated=time.time())
        atomic_write_text(self.status_file, json.dumps(status, indent=1))

    def read_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def state(self) -> str:
        """The status as the app shows it: a 'running' run whose process is gone was killed ('stopped')."""
        status = self.read_status()
        state = status.get("state", "new")
        if state == "running" and not pid_alive(status.get("pid")):
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
        """Rename a fully written checkpoint into place (atomic), then drop the oldest beyond ``keep``."""
        final = self.path / f"checkpoint-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.path.glob(".checkpoint-*.tmp-*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        return final
