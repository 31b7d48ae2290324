"""The run shell: what every task shares, from the run folder to the saved adapter. ``train(cfg, output_dir)``.

``setup`` (data, memory plan, model, optimizer, resume) is apart from ``loop`` (the steps), as torchtune's recipes
do; the task (``tasks/``) supplies the data and the losses of a micro-batch, and nothing here tests its name.

One optimizer step = ``gradient_accumulation_steps`` micro-steps of ``batch_size`` items (pairs, examples).
Micro-batch g of the whole run is fixed by (seed, g) alone, so a run's data position is its step number and a
resumed run sees exactly the items an uninterrupted one would. Each micro-step's loss is ``sum(item losses) /
(weight of the step's items)`` (tasks/base.py), so the same effective batch gives the same update however it is
split into micro-steps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed, memory, trackers
from .artifacts import FolderBusy, ReaderRunDir, RunDir, this_process
from .config import Config, ConfigError, dump_yaml
from .diagnostics import nonfinite_advice
from .memory import available_memory_gb, choose_plan, current_memory_mb, peak_memory_mb, reset_peak_memory
from .model import (checkpointed_layers, compute_dtype, device, load_model, load_tokenizer, save_adapter,
                    trainable_parameters)
from .tasks import task_class

log = logging.getLogger("lowrank_pref")


class TrainingStopped(RuntimeError):
    """The run stopped itself with a plain message (e.g. repeated non-finite losses)."""


class RunStopped(KeyboardInterrupt):
    """SIGTERM (the app's Stop) ended the run; the message says where and what to resume from. A KeyboardInterrupt,
    so the libraries' own ``except Exception`` around their loading can't swallow it when it is raised from the
    signal handler, and so callers treat it as the interruption it is."""


class DamagedCheckpoint(RuntimeError):
    """A checkpoint's files could not be read back (truncated, corrupted, or not plain tensors and numbers)."""


# ----------------------------------------------------------------------------------------------------------------
# Data order

@dataclass
class Schedule:
    """Which items make micro-batch g of the run: a pure function of (seed, g), so resume is exact.

    Fixed count: ``batch_size`` items a micro-batch, the epoch's items shuffled by seed. Token budget (``sizes``
    given): each epoch's shuffled items are cut into windows, sorted by length inside a window and packed greedily so
    a micro-batch's padded size (items x its longest item) stays within ``token_budget``; the batches are then
    shuffled. Short items travel many to a batch, long ones few, and rows of a batch have similar lengths.

    ``repeat``: consecutive steps that take the same micro-batches (PPO's epochs over one rollout: steps 1..E take
    the first step's, E+1..2E the second's, ...); a full pass over the data is then ``repeat`` times the steps.
    """
    n_items: int
    batch_size: int
    accum: int
    seed: int
    sizes: list[int] | None = None
    token_budget: int | None = None
    repeat: int = 1
    _epochs: dict = field(default_factory=dict, repr=False)
    _counts: dict = field(default_factory=dict, repr=False)
    _cursor: tuple = (0, 0)  # (epoch, its first micro-batch) of the last lookup: runs walk forward from it

    # Counting a token-budget run's micro-batches packs every epoch (about 1 us an item); past this many items packed
    # (epochs x items, a second or two), the epochs beyond are counted as the mean of those packed (a few steps off,
    # logged), so a huge num_epochs can't spend minutes before the first step.
    EXACT_COUNT_ITEMS = 2_000_000

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(self.n_items))
            rng.shuffle(order)
            if not self.token_budget:
                batches = [order[k:k + self.batch_size] for k in range(0, self.n_items, self.batch_size)]
            else:
                batches = []
                window = 64 * max(1, self.token_budget // max(1, max(self.sizes)))
                for start in range(0, self.n_items, window):
                    current, longest = [], 0
                    for i in sorted(order[start:start + window], key=lambda i: self.sizes[i]):
                        longest_with = max(longest, self.sizes[i])
                        if current and longest_with * (len(current) + 1) > self.token_budget:
                            batches.append(current)
                            current, longest_with = [], self.sizes[i]
                        current.append(i)
                        longest = longest_with
                    if current:
                        batches.append(current)
                rng.shuffle(batches)
            self._epochs = {epoch: batches}  # one epoch at a time is all a run needs
        return self._epochs[epoch]

    def epoch_count(self, epoch: int) -> int:
        """Micro-batches in an epoch (remembered, so finding an epoch doesn't rebuild the ones before it)."""
        if not self.token_budget:
            return math.ceil(self.n_items / self.batch_size)
        if epoch not in self._counts:
            self._counts[epoch] = len(self.epoch_batches(epoch))
        return self._counts[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_count(0)

    def micro_batch(self, g: int) -> list[int]:
        """Pair indices of the run's g-th micro-batch (0-based), epochs one after another."""
        if not self.token_budget:
            epoch, g = divmod(g, self.epoch_count(0))
            return self.epoch_batches(epoch)[g]
        epoch, first = self._cursor if g >= self._cursor[1] else (0, 0)
        while g - first >= self.epoch_count(epoch):
            first += self.epoch_count(epoch)
            epoch += 1
        self._cursor = (epoch, first)
        return self.epoch_batches(epoch)[g - first]

    def step_batches(self, step: int) -> list[list[int]]:
        """Micro-batches of optimizer step ``step`` (1-based)."""
        step = (step - 1) // self.repeat + 1
        return [self.micro_batch(g) for g in range((step - 1) * self.accum, step * self.accum)]

    def total_steps(self, cfg: Config) -> int:
        if cfg.max_steps:
            return cfg.max_steps
        full, part = divmod(cfg.num_epochs, 1)
        full = int(full)
        if not self.token_budget:  # every epoch has the same count: arithmetic, whatever num_epochs is
            micro = full * self.epoch_count(0)
        else:
            exact = min(full, max(1, self.EXACT_COUNT_ITEMS // max(1, self.n_items)))
            micro = sum(self.epoch_count(e) for e in range(exact))
            if full > exact:
                micro += round((full - exact) * micro / exact)
                log.info("num_epochs=%s: micro-batches of epochs %d on estimated from the first %d (token_budget "
                         "packs each epoch differently)", cfg.num_epochs, exact + 1, exact)
        if part:
            micro += math.ceil(part * self.epoch_count(full))
        return max(1, math.ceil(micro / self.accum)) * self.repeat


def largest_micro_step(task, schedule: Schedule, items: list) -> tuple[int, int]:
    """(padded tokens through the model, answer tokens) of the first epoch's largest micro-batch."""
    return max(task.micro_step_tokens([items[i] for i in batch]) for batch in schedule.epoch_batches(0))


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, checkpoints

def make_optimizer(cfg: Config, params):
    choice = cfg.optimizer
    if choice == "auto":
        choice = "paged_adamw_8bit" if device().type == "cuda" else "adamw_torch"
    if choice == "adamw_torch":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if choice == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _rng_state() -> dict:
    """The RNG state a checkpoint restores. Plain tensors, ints and tuples only: checkpoints are read back with
    ``torch.load(weights_only=True)``, which runs no code from the file (a crafted rng.pt once ran a command)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: RunDir, cfg: Config, model, optimizer, scheduler, step: int, counters: dict,
                    rng: dict | None = None, task=None) -> Path:
    """Checkpoint of the run after ``step``; ``rng``: the RNG state to store when it is not the current one (a step
    cut short by a stop has moved the RNG on since ``step`` ended). Rank 0 alone writes it (a reader run folder).
    ``task``: its ``state_dict(step)`` (ppo: the value adapter, the rollout buffer) goes in too, as task.safetensors
    and task.json."""
    if not run.writes:
        return None
    tmp = run.new_checkpoint_dir(step)
    model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"], safe_serialization=True,
                          **distributed.adapter_state(model))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng or _rng_state(), tmp / "rng.pt")
    extra = task.state_dict(step) if task is not None else None
    if extra is not None:
        from safetensors.torch import save_file

        tensors, meta = extra
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "task.safetensors"))
        (tmp / "task.json").write_text(json.dumps(meta))
    # written last: a checkpoint without state.json is incomplete and never picked up
    size = distributed.world().size  # the data position is global: micro-batches of every rank
    state = {"step": step, "micro_batches_done": step * cfg.gradient_accumulation_steps * size, "world_size": size,
             **counters}
    (tmp / "state.json").write_text(json.dumps(state))
    return run.commit_checkpoint(tmp, step, cfg.save_total_limit)


def read_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint, read and checked before any of it is applied, so a damaged one (truncated by a
    full disk, or crafted) is refused whole and the model is left as it was. Raises DamagedCheckpoint."""
    from safetensors.torch import load_file

    try:
        out = {"weights": load_file(str(path / "adapter" / "adapter_model.safetensors")),
               "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
               "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
               "rng": torch.load(path / "rng.pt", weights_only=True),
               "state": json.loads((path / "state.json").read_text())}
        if (path / "task.json").exists():  # the task's own state (ppo's value adapter and rollout buffer)
            out["task"] = (load_file(str(path / "task.safetensors")), json.loads((path / "task.json").read_text()))
    except (MemoryError, torch.OutOfMemoryError, PermissionError):
        raise  # the machine's trouble, not the checkpoint's: it must not be moved aside for it
    except Exception as e:  # any reader's failure (safetensors, torch's unpickler, json) means the same: unusable
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DamagedCheckpoint(f"{type(e).__name__}: {first}") from None
    state, rng = out["state"], out["rng"]
    if not out["weights"]:
        raise DamagedCheckpoint("its adapter holds no weights")
    if not isinstance(state, dict) or state.get("step") != int(path.name.split("-", 1)[1]):
        raise DamagedCheckpoint("its state.json does not name its step")
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and isinstance(rng.get("python"),
                                                                                                  tuple)):
        raise DamagedCheckpoint("its rng.pt is not an RNG state")
    return out


def _first_reason(e: Exception) -> str:
    """The line of torch's load error that says what differs (its first "size mismatch", else its first line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)[:240]


def apply_checkpoint(checkpoint: dict, path: Path, model, optimizer, scheduler, task=None) -> dict:
    """Restore a checkpoint read by :func:`read_checkpoint` (and the task's state in it); returns its state.json."""
    from peft import set_peft_model_state_dict

    def other_weights(e: Exception) -> ConfigError:
        return ConfigError(f"{path.name} was written by a run that trained other weights than this one "
                           f"({_first_reason(e)}): resume with the run's own settings (its config.yaml), "
                           "without overrides that change what trains (rl.algorithm, lora.*)")

    try:
        result = set_peft_model_state_dict(model, checkpoint["weights"], adapter_name="default")
    except RuntimeError as e:  # torch: "Error(s) in loading state_dict ... size mismatch" (another lora.r)
        raise other_weights(e) from None
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint {path} does not match this model: {result.unexpected_keys[:3]}")
    if task is not None:
        task.load_state_dict(*checkpoint.get("task", ({}, {})))
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as e:  # torch: "... a parameter group that doesn't match the size of optimizer's group"
        raise other_weights(e) from None
    scheduler.load_state_dict(checkpoint["scheduler"])
    _set_rng_state(checkpoint["rng"])
    return checkpoint["state"]


# ----------------------------------------------------------------------------------------------------------------
# Stop, progress, metrics

class _StopFlag:
    """SIGTERM (the app's Stop button, a Space shutting down). While the run sets up (data, model, resume) it raises
    RunStopped at once: a long load would otherwise ignore it, and nothing there needs finishing (writes are atomic,
    and their temporary files are removed). Once training, it only sets the flag, read after every micro-batch: the
    run ends there with a checkpoint of its last complete step."""

    def __init__(self):
        self.set = False
        self.immediate = True

    def __call__(self, signum, frame):
        self.set = True
        if self.immediate:
            raise RunStopped("stopped before the first step (SIGTERM): nothing was trained in this run")


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("LOWRANK_PREF_PROGRESS", "1") == "0", mininterval=1.0)


class _Window:
    """Metric sums, weight, tokens and time since the last logged step."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = self.items = self.tokens = 0
        self.seconds = 0.0

    def add(self, sums: dict, weight: float, items: int, tokens: int, seconds: float) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.weight += weight
        self.items += items
        self.tokens += tokens
        self.seconds += seconds

    def record(self, unit: str) -> dict:
        out = {k: v / max(self.weight, 1) for k, v in self.sums.items()}
        out["tokens_per_second"] = self.tokens / max(self.seconds, 1e-9)
        out[f"{unit}_per_second"] = self.items / max(self.seconds, 1e-9)
        return out


def evaluate(task, model, items: list, batch_size: int, should_stop=None) -> dict | None:
    """Eval metrics over ``items``: each summed metric divided by the items' weight, as in training. None when
    ``should_stop()`` turns true between batches (a stop request: an eval of many items must not hold it up).
    On several processes rank r evaluates batches r, r + N, ... (the same batches as one process) and the sums are
    added over the ranks; every rank asks ``should_stop`` once a round, so all stop at the same batch."""
    world = distributed.world()
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    mine = batches[world.rank::world.size]
    try:
        with torch.no_grad():
            for k in range(math.ceil(len(batches) / world.size)):
                if should_stop is not None and should_stop():
                    return None
                if k >= len(mine):
                    continue
                _, sums, _ = task.losses(model, mine[k])
                for key, v in sums.items():
                    totals[key] = totals.get(key, 0.0) + float(v)
    finally:
        model.train(was_training)
    totals = world.sum_dicts(totals)
    weight = sum(task.weight(item) for item in items)
    record = {f"eval_{k}": v / weight for k, v in totals.items()}
    task.derived(record, prefix="eval_")
    return record


# ----------------------------------------------------------------------------------------------------------------
# The run

def train(cfg: Config, output_dir: str | os.PathLike, *, resume: bool = False) -> dict:
    """Run a whole training job into ``output_dir``; returns the last logged metrics (train and eval).

    Raises RunStopped when SIGTERM stopped it (status "stopped"), ConfigError without writing anything when the
    folder is not this run's to write (another live run holds it, or it holds a finished run and resume is off)."""
    trackers.check(cfg.report_to)  # a tracker package that is missing stops the run before anything is written
    world = distributed.world()
    run = RunDir(output_dir).create() if world.main else ReaderRunDir(output_dir)  # rank 0 alone writes the folder
    problem = None
    try:
        lock = run.lock()
    except FolderBusy as e:
        lock, problem = None, str(e)
    try:
        if not problem and not resume and (run.metrics.exists() or run.checkpoints()):
            problem = (f"output_dir '{run.path}' already holds a run; use --resume to continue it, or choose another "
                       "--output-dir")
        world.agree(problem if world.main else None)  # rank 0's refusal ends every rank, not rank 0 alone
        return _train_locked(cfg, run, resume)
    finally:
        if lock is not None:
            lock.close()


def _train_locked(cfg: Config, run: RunDir, resume: bool) -> dict:
    handler = logging.FileHandler(run.log) if run.writes else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    stop = _StopFlag()
    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm(loggers=[logging.root]):
            shell = Shell(cfg, run, stop)
            shell.setup(resume)
            try:
                # metrics.jsonl's lines go to report_to's trackers too (rank 0 alone: it alone writes metrics)
                with trackers.report(cfg, run, shell.start) if run.writes else contextlib.nullcontext():
                    return shell.loop()
            except distributed.PeerLost as e:  # another rank ended: keep what this one can, and say which
                raise shell.lost(e) from None
    except BaseException as e:
        stop.immediate = False  # a second SIGTERM now must not cut the status write short
        run.remove_partial()
        state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, RunStopped):
            log.info("%s", message)
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("%s", message)
        run.write_final_status(state=state, message=message)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Shell:
    """One run: ``setup`` loads everything and restores a checkpoint; ``loop`` trains to the end or a stop."""

    def __init__(self, cfg: Config, run: RunDir, stop: _StopFlag):
        self.cfg, self.run, self.stop = cfg, run, stop
        self.task = task_class(cfg.task)(cfg)
        self.world = distributed.world()
        self.started = time.time()

    def setup(self, resume: bool) -> None:
        cfg, run, task = self.cfg, self.run, self.task
        candidates = run.checkpoints() if resume else []
        if resume and not candidates and run.read_metrics():
            log.info("no checkpoint in %s yet: starting from step 0", run.path)
            run.truncate_metrics(0)  # the earlier lines will be logged again
        run.write_status(state="running", pid=os.getpid(), process=this_process(),
                         step=candidates[-1][0] if candidates else 0, message="", task=cfg.task, started=self.started)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # the data before the model: bad data fails in seconds, not after a multi-GB load
        self.tokenizer = load_tokenizer(cfg)
        self.data = data = task.load_data(self.tokenizer)
        log.info("%s", data.report.summary())
        if data.eval_report:
            log.info("eval %s", data.eval_report.summary())
        log.info("train %s: %d, eval %s: %d", task.unit, len(data.train), task.unit, len(data.eval))
        run.write_text(run.data_report, json.dumps({
            "train": data.report.as_dict(), "examples": data.examples,
            "eval": data.eval_report.as_dict() if data.eval_report else None,
            "train_pairs": len(data.train), "eval_pairs": len(data.eval), "unit": task.unit}, indent=1))

        # the memory plan from the largest micro-step this run will take
        # on N processes a step is N times the micro-batches, rank r taking the r-th share (distributed.py)
        self.schedule = Schedule(len(data.train), cfg.batch_size, cfg.gradient_accumulation_steps * self.world.size,
                                 cfg.seed, sizes=[task.size(item) for item in data.train],
                                 token_budget=cfg.token_budget, repeat=task.steps_per_batch)
        tokens, answers = largest_micro_step(task, self.schedule, data.train)
        gpu = device().type == "cuda"
        refusal = memory.beyond_machine(cfg, memory.machine_memory_gb(), gpu=gpu, tokens=tokens, answer_tokens=answers)
        if refusal:
            raise ConfigError(refusal)
        plan = choose_plan(cfg, cfg.memory_limit_gb or available_memory_gb(), gpu=gpu, tokens=tokens,
                           answer_tokens=answers)
        log.info("gradient checkpointing: %s (%s)", plan.describe(), plan.why)
        self.model, loaded = load_model(cfg, self.tokenizer, plan, keep_reference=task.uses_reference)
        if self.world.mode == "fsdp":  # the 4-bit layers sharded over the GPUs (FSDP-QLoRA)
            distributed.shard(self.model)
        run.write_status(gradient_checkpointing=plan.checkpointing, checkpointed_layers=checkpointed_layers(self.model),
                         checkpoint_offload=plan.offload, dtype=dtype_name(cfg))  # the app's advice reads dtype
        reference = task.reference(loaded)
        if reference:
            log.info("reference: %s%s", reference, {
                "base": " (the base model, adapters disabled)",
                "adapter": f" (the starting adapter {cfg.adapter}, frozen)",
                "none": f" ({cfg.loss_type} is reference-free)"}[reference])
        # a task's own trainable roles (ppo: the value adapter and head) join before the optimizer is built
        self.params = trainable_parameters(self.model)
        self.params += task.attach(self.model, self.tokenizer)
        log.info("trainable parameters: %s", f"{sum(p.numel() for p in self.params):,}")
        if self.world.size > 1:  # every rank starts from rank 0's adapter, and the log says who runs where
            self.world.ranks = self.world.gather(distributed.rank_facts(device()))
            self.world.broadcast_parameters(self.params)
            log.info("%s", self.world.describe(cfg, task.unit))
            run.write_status(**self.world.status(cfg))
        header = f"# resolved config of this run; repeat it with: python -m lowrank_pref.run --config {run.config}\n"
        run.write_text(run.config, header + (f"reference: {reference}\n" if reference else "") + dump_yaml(cfg))

        # optimizer and schedule; a checkpoint restores both with the adapter and the RNG
        from transformers import get_scheduler

        self.total = total = self.schedule.total_steps(cfg)
        self.optimizer = make_optimizer(cfg, self.params)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=round(cfg.warmup_ratio * total), num_training_steps=total)
        self.counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0}
        self.start = self.restore(candidates) if candidates else 0
        starts = self.world.gather(self.start)
        self.world.agree(None if len(set(starts)) == 1 else f"the ranks resumed from different steps {starts}: the run "
                         "folder must be the same folder for every rank (one machine, or a shared filesystem)")
        self.saved = self.completed = self.start  # the newest checkpoint on disk; the last step taken (0: none)
        run.write_status(state="running", step=self.start, total_steps=total, reference=reference)
        run.write_status(**task.setup(self.model, self.tokenizer, data))
        self.model.train()
        reset_peak_memory()  # peaks from here on are training's, not loading's
        self.loaded_mb = current_memory_mb()
        log.info("memory with the model loaded: %.0f MB", self.loaded_mb)

    def restore(self, candidates: list[tuple[int, Path]]) -> int:
        """Resume from the newest checkpoint that loads; returns its step (0: none did, the run starts over). One that
        fails to load is named in the log and moved aside, and the one before it is tried: a crash or a full disk
        while the newest was written must not end the run when an older one is intact."""
        for step, path in reversed(candidates):
            try:
                checkpoint = read_checkpoint(path)
            except DamagedCheckpoint as e:
                aside = self.run.move_aside(path)
                log.warning("checkpoint %s is damaged (%s): moved aside to %s; trying the one before it", path, e,
                            aside.name)
                continue
            per_step = checkpoint["state"].get("micro_batches_done", 0) // max(step, 1)
            if per_step and per_step != self.schedule.accum:  # the data position would not be the same
                runs = checkpoint["state"].get("world_size", 1)
                raise ConfigError(
                    f"{path.name} was written by a run of {per_step} micro-batches per step ({runs} process(es)), this "
                    f"one takes {self.schedule.accum}: resume with gradient_accumulation_steps x processes = "
                    f"{per_step}, e.g. gradient_accumulation_steps={max(1, per_step // self.world.size)} on "
                    f"{self.world.size} process(es), or --nproc-per-node {runs}")
            state = apply_checkpoint(checkpoint, path, self.model, self.optimizer, self.scheduler, self.task)
            self.counters.update({k: v for k, v in state.items() if k in self.counters})
            self.run.truncate_metrics(step)
            log.info("resumed from %s (step %d of %d)", path.name, step, self.total)
            return step
        log.warning("no usable checkpoint in %s: starting over from step 0", self.run.path)
        self.run.truncate_metrics(0)
        return 0

    def loop(self) -> dict:
        cfg, run, task, total = self.cfg, self.run, self.task, self.total
        eval_every = cfg.eval_steps or max(1, total // 4)
        save_every = cfg.save_steps or max(1, total // 4)
        window, last = _Window(), {}
        bar = _progress(total, self.start)
        self.stop.immediate = False  # from here a stop ends the run after the current micro-batch, with a checkpoint
        for step in range(self.start + 1, total + 1):
            t0 = time.perf_counter()
            rng = _rng_state()  # what a checkpoint of step - 1 holds, should a stop cut this step short
            self.current = (step, rng)  # for a checkpoint when another rank ends (lost)
            # the step's micro-batches are a pure function of (seed, step), so a resumed run sees the same data
            batches = [[self.data.train[i] for i in idx] for idx in self.schedule.step_batches(step)]
            weight = sum(task.weight(item) for batch in batches for item in batch)
            task.begin_step(step, weight)
            lr = self.scheduler.get_last_lr()[0]
            # forward and backward each micro-batch (on N processes, this rank's share of them), its loss scaled to
            # its share of the step's mean
            sums, tokens, finite = self.accumulate(self.world.share(batches), weight)
            if finite is None:  # stopped between micro-batches: this step is dropped, the one before is saved
                bar.close()
                raise self.stop_within(step, rng)
            # on N processes the ranks' gradients and sums are added: every rank takes the whole step's update
            sums, tokens, finite = self.reduce(sums, tokens, finite)
            # clip, then step; a non-finite loss or gradient skips the step (too many in a row stop the run)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
            self.update(step, finite and bool(torch.isfinite(grad_norm)), finite)
            self.scheduler.step()
            self.completed = step
            if finite:
                window.add(sums, weight, sum(map(len, batches)), tokens, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{sums['loss'] / weight:.4f}", refresh=False)
            bar.update(1)
            # log the window's means, evaluate and checkpoint on their schedules (and always at the end)
            if step % cfg.logging_steps == 0 or step == total:
                last.update(self.log_train(step, window, lr, float(grad_norm)))
                window = _Window()
            if self.data.eval and (step % eval_every == 0 or step == total):
                last.update(self.log_eval(step, final=step == total))
            run.write_status(step=step)
            stop = step < total and self.stopping()
            if step < total and (step % save_every == 0 or stop):
                save_checkpoint(run, cfg, self.model, self.optimizer, self.scheduler, step, self.counters, task=task)
                task.checkpoint()
                self.saved = step
            # SIGTERM (the app's Stop): the checkpoint above is written; end here, resumable
            if stop:
                bar.close()
                message = f"stopped at step {step} (checkpoint written); continue with --resume"
                run.write_status(state="stopped", step=step, message=message)
                raise RunStopped(message)
        bar.close()
        return self.finish(last)

    def stopping(self) -> bool:
        """Whether a stop was asked for. On N processes the ranks agree (SIGTERM may reach one, or reach them at
        different moments), so all stop at the same micro-batch; a SIGTERM during the agreement counts at the next."""
        agreed = self.world.any(self.stop.set)
        self.stop.set = self.stop.set or agreed
        return agreed

    def reduce(self, sums: dict, tokens: int, finite: bool) -> tuple[dict, int, bool]:
        """The step's gradients, metric sums and tokens added over the ranks; finite only if it is on every rank."""
        if self.world.size == 1:
            return sums, tokens, finite
        finite = self.world.all(finite)
        if finite:
            self.world.sum_gradients(self.params)
        total = self.world.sum_dicts({**sums, "_tokens": tokens})
        return total, int(total.pop("_tokens")), finite

    def lost(self, error: distributed.PeerLost) -> distributed.PeerLost:
        """Another rank ended mid-run (``error`` says which): the last complete step is checkpointed (by rank 0),
        unless it is on disk already, and the run ends failed, resumable from there."""
        self.optimizer.zero_grad(set_to_none=True)
        step, rng = getattr(self, "current", (self.start + 1, None))
        done = self.completed
        if done > self.saved:
            # cut before its update: the RNG of the step's start; after it: the RNG now (nothing since drew on it)
            save_checkpoint(self.run, self.cfg, self.model, self.optimizer, self.scheduler, done, self.counters,
                            rng=rng if done < step else None, task=self.task)
            self.saved = done if self.run.writes else self.saved
        self.run.write_status(step=done)  # the step may have ended without its status line (lost in its logging)
        where = f"; continue with --resume (from step {self.saved})" if self.saved else ""
        return distributed.PeerLost(f"{error} during step {step}: the run stopped{where}")

    def stop_within(self, step: int, rng: dict) -> RunStopped:
        """End the run in the middle of ``step`` (a stop request): its gradients are dropped, and the state after
        step - 1, which the model, the optimizer and the scheduler still hold, is checkpointed with the RNG state of
        then, unless a checkpoint of it exists already. Resuming from it repeats what an uninterrupted run does."""
        self.optimizer.zero_grad(set_to_none=True)
        done = step - 1
        if done > self.saved:
            save_checkpoint(self.run, self.cfg, self.model, self.optimizer, self.scheduler, done, self.counters,
                            rng=rng, task=self.task)
            self.task.checkpoint()
            self.saved = done
        if done:
            message = f"stopped during step {step}; continue with --resume (from step {done})"
        else:
            message = f"stopped during step {step}, before any step completed: nothing was trained in this run"
        self.run.write_status(state="stopped", step=done, message=message)
        return RunStopped(message)

    def log_train(self, step: int, window: _Window, lr: float, grad_norm: float) -> dict:
        """The window's means and the run's vitals, one line of metrics.jsonl."""
        epochs = step * self.schedule.accum / (self.schedule.batches_per_epoch * self.schedule.repeat)
        record = {"step": step, "epoch": round(epochs, 4),
                  **window.record(self.task.unit), "learning_rate": lr, "grad_norm": grad_norm,
                  "peak_memory_mb": self.world.max(peak_memory_mb()), "loaded_memory_mb": self.loaded_mb,
                  "nonfinite_steps": self.counters["nonfinite_steps"]}
        self.task.derived(record)
        self.run.append_metrics(record)
        return record

    def log_eval(self, step: int, final: bool = False) -> dict:
        """Eval metrics over the held-out items, one line of metrics.jsonl and one of the log. A stop request cuts an
        eval short (not the final one): the step is complete, and is checkpointed without its eval line."""
        size, should_stop = self.cfg.eval_batch_size or self.cfg.batch_size, None if final else self.stopping
        if hasattr(self.task, "evaluate"):  # a task with its own eval (rl: generation judged by the reward model)
            metrics = self.task.evaluate(self.model, self.data.eval, size, should_stop=should_stop, step=step,
                                         run_dir=self.run.path)
        else:
            metrics = evaluate(self.task, self.model, self.data.eval, size, should_stop=should_stop)
            if metrics is not None and getattr(self.task, "judge", None):  # reward_model given: judged generations
                judged = self.task.judge(self.model, size, should_stop=should_stop, step=step, run_dir=self.run.path)
                metrics = None if judged is None else {**metrics, **judged}
        if metrics is None:
            log.info("step %d eval: skipped (stopping)", step)
            return {}
        record = {"step": step, **metrics}
        self.run.append_metrics(record)
        log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step"))
        return record

    def accumulate(self, batches: list[list], weight: float) -> tuple[dict, int, bool | None]:
        """Backward over the step's micro-batches. Returns the metric sums, the real tokens, and False after a
        non-finite loss (whose backward and the rest of the step's are skipped), None when a stop request came before a
        micro-batch. Every micro-batch asks ``stopping`` (on N processes a collective: each rank asks as often)."""
        sums: dict[str, float] = {}
        tokens, finite = 0, True
        for items in batches:
            if self.stopping():
                return sums, tokens, None
            if not finite:
                continue
            losses, batch_sums, t = self.task.losses(self.model, items)
            loss = losses.sum() / weight
            if not torch.isfinite(loss):
                finite = False
                continue
            loss.backward()
            tokens += t
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return sums, tokens, finite

    def update(self, step: int, ok: bool, finite_loss: bool) -> None:
        """The optimizer step, or a skipped one counted in ``nonfinite_steps``."""
        c = self.counters
        if ok:
            c["nonfinite_in_a_row"] = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        c["nonfinite_steps"] += 1
        c["nonfinite_in_a_row"] += 1
        log.warning("step %d: non-finite %s, step skipped (%d so far)", step, "gradient" if finite_loss else "loss",
                    c["nonfinite_steps"])
        self.optimizer.zero_grad(set_to_none=True)
        if c["nonfinite_in_a_row"] >= self.cfg.max_nonfinite_steps:
            raise TrainingStopped(
                f"stopped at step {step}: {c['nonfinite_in_a_row']} steps in a row had a non-finite loss "
                f"or gradient. {nonfinite_advice(dtype_name(self.cfg))}")

    def finish(self, last: dict) -> dict:
        """The adapter, written whole or not at all, and the final status."""
        run = self.run
        run.write_status(**self.task.finish())
        if self.world.size > 1:  # each rank's peak, for the per-rank memory (benchmarks/distributed.py)
            run.write_status(rank_peak_memory_mb=self.world.gather(round(peak_memory_mb(), 1)))
        if run.writes:  # rank 0's
            tmp = run.path / f".adapter.tmp-{os.getpid()}"
            save_adapter(self.model, self.tokenizer, tmp)
            run.install_dir(tmp, run.adapter)
            self.task.save(self.model, self.tokenizer, run)  # a task's other trained roles (ppo: value/)
        summary = {k: v for k, v in last.items() if k.startswith("eval_")}
        run.write_status(state="completed", step=self.total, message="", seconds=round(time.time() - self.started, 1),
                         final=summary)
        log.info("done in %.0fs: adapter in %s", time.time() - self.started, run.adapter)
        return last


def dtype_name(cfg: Config) -> str:
    """The compute dtype this run uses, as the config spells dtypes (auto resolved on this machine)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute_dtype(cfg)]

