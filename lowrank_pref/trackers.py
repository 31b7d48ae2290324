"""Experiment trackers: every line of metrics.jsonl also goes to the trackers named in ``report_to``.

    python -m lowrank_pref.run --preset tiny report_to=tensorboard          # then: tensorboard --logdir runs/
    python -m lowrank_pref.run --preset tiny report_to=wandb,mlflow

The metric names are metrics.jsonl's (``loss``, ``rewards/margins``, ``eval_loss``, ...), at the run's optimizer
step; the resolved config is logged as the run's hyperparameters. None of the packages is needed unless named
(``requirements-trackers.txt`` lists them); a named one that is missing stops the run before anything loads, with
the install command. Where each writes, and what it reads from the environment:

- tensorboard: event files in RUN/tensorboard (scalars, the config as text and as hparams). A resumed run drops the
  events after its checkpoint's step (``purge_step``), as metrics.jsonl drops its lines.
- wandb: project ``$WANDB_PROJECT`` (default ``lowrank-pref``), the run folder's name; log in with ``wandb login`` or
  ``WANDB_API_KEY``, or ``WANDB_MODE=offline``.
- mlflow: experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``lowrank-pref``) at ``$MLFLOW_TRACKING_URI`` (default:
  ./mlruns).
- trackio: project ``$TRACKIO_PROJECT`` (default ``lowrank-pref``), local, or a Space with ``$TRACKIO_SPACE_ID``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

log = logging.getLogger("lowrank_pref")

# name -> (module to import, pip package)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
PROJECT = "lowrank-pref"


from .config import ConfigError


class TrackerError(ConfigError):
    """A ``report_to`` that names an unknown tracker or one whose package is not installed."""


def parse(report_to: str | None) -> list[str]:
    """``tensorboard,wandb`` -> ["tensorboard", "wandb"]; ``none`` or empty -> []. Unknown names are refused."""
    names = [n.strip().lower() for n in (report_to or "").split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(f"report_to: unknown tracker '{unknown[0]}'; use one or more of "
                           f"{', '.join(TRACKERS)} (comma-separated), or none")
    return list(dict.fromkeys(names))


def check(report_to: str | None) -> list[str]:
    """The trackers to use, each importable; the first one that is not gives one line with its install command."""
    names = parse(report_to)
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"report_to={name} needs the {package} package: pip install {package} "
                               "(or pip install -r requirements-trackers.txt for all of them)")
    return names


def _flat(mapping: dict, prefix: str = "") -> dict:
    """{"lora": {"r": 16}} -> {"lora.r": 16}: the config as trackers take hyperparameters (scalars and strings)."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


class _TensorBoard:
    def __init__(self, run, config: dict, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run rewrites the steps after its checkpoint; TensorBoard drops the old ones
        self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"), purge_step=start + 1 if start else None)
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        hparams = {k: ("none" if v is None else v) for k, v in _flat(config).items()}
        self.writer.add_hparams(hparams, {}, run_name=".")

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # the app and `tensorboard` read the files while the run trains

    def close(self, failed: bool) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run, config: dict, start: int):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run.path.name, config=config,
                              dir=str(run.path))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _Mlflow:
    def __init__(self, run, config: dict, start: int):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        mlflow.start_run(run_name=run.path.name)
        mlflow.log_params({k: str(v) for k, v in _flat(config).items()})

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class _Trackio:
    def __init__(self, run, config: dict, start: int):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run.path.name, config=config,
                     resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self.trackio.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.trackio.finish()


OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow, "trackio": _Trackio}


@contextlib.contextmanager
def report(cfg, run, start: int = 0):
    """While the block runs, each record ``run.append_metrics`` writes goes to the trackers too: the run folder's
    one funnel for metrics, so the names and steps are the file's. The trackers are closed however the block ends
    (a failed or stopped run is marked failed where a tracker has the notion)."""
    from .config import to_dict

    names = check(cfg.report_to)
    if not names:
        yield
        return
    config = to_dict(cfg)
    opened = [OPENERS[name](run, config, start) for name in names]
    write = run.append_metrics

    def append_metrics(record: dict) -> None:
        write(record)
        step = record.get("step", 0)
        numbers = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in opened:
            tracker.log(step, numbers)

    run.append_metrics = append_metrics
    failed = True
    try:
        yield
        failed = False
    finally:
        del run.append_metrics  # the class's own again
        for tracker in opened:
            try:
                tracker.close(failed)
            except Exception as e:  # a tracker's server gone at the end must not hide how the run ended
                log.warning("closing %s failed: %s", type(tracker).__name__.strip("_").lower(), e)
