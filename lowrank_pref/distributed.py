"""One run on several processes: data-parallel (DDP) on every task, FSDP-QLoRA for a model no card holds alone.

    torchrun --nproc-per-node 2 -m lowrank_pref.run --preset tiny --output-dir runs/a
    accelerate launch --multi_gpu --num_processes 2 -m lowrank_pref.run --preset 24gb-dpo --output-dir runs/b
    torchrun --nproc-per-node 4 -m lowrank_pref.run --preset 24gb-dpo distributed=fsdp ...   # GPUs only

A run on N processes is the single-process run with N times the micro-batches per step: each rank (process) loads
the 4-bit base on its own device, optimizer step s is the same micro-batches of the same data order as for one
process with ``gradient_accumulation_steps x N``, rank r taking its r-th share of them; the ranks' gradients are
added (one all-reduce of the flat LoRA gradients per optimizer step, what DDP does with ``no_sync`` over the
accumulation), so every rank takes the same optimizer step and the adapters stay equal; metric sums are added over
the ranks. Only rank 0 writes the run folder, the checkpoints, the adapter and the reference cache; the others read
checkpoints from it, so the folder must be visible to every rank (one machine, or a shared filesystem).

Why not the ``DistributedDataParallel`` wrapper itself: its gradient hooks fire only for forwards through the
wrapper, and a task calls the PeftModel in several roles (the policy, the reference under ``disable_adapter``, the
score head), so every call would have to be routed through it; the LoRA gradients are a few MB, and one all-reduce
of them per optimizer step is what DDP would send, with fewer messages.

A rank that ends (crash, kill, out of memory) closes its connections, so the others' next collective fails at once;
they end with a plain message naming it, rank 0 keeping a checkpoint of the last complete step. A rank that hangs
is caught by the collectives' timeout (``LOWRANK_PREF_DIST_TIMEOUT_S``, default 600 s: it must outlast the longest
gap between collectives, loading the model). SIGTERM (the launcher forwards it to every rank, the app's Stop sends
it to rank 0) is agreed between the ranks before every micro-batch, so all stop at the same point with a checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
from dataclasses import dataclass, field

import torch

from .config import Config, ConfigError

log = logging.getLogger("lowrank_pref")
MODES = ("auto", "none", "ddp", "fsdp")
DEFAULT_TIMEOUT_S = 600
MAX_TIMEOUT_S = 86_400


class PeerLost(RuntimeError):
    """A collective failed: another rank of the run ended (crash, kill) or stopped answering (timeout)."""


def launched() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started for this run; 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _timeout_s() -> int:
    raw = os.environ.get("LOWRANK_PREF_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 1 <= value <= MAX_TIMEOUT_S):
        raise ConfigError(f"LOWRANK_PREF_DIST_TIMEOUT_S must be a number of seconds from 1 to {MAX_TIMEOUT_S}, got "
                          f"{raw!r}; unset it for the default ({DEFAULT_TIMEOUT_S})")
    return int(value)


@dataclass
class World:
    """This process's place in the run. A single process is ``World()``: rank 0 of 1, every collective a no-op."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    backend: str = ""
    ranks: list = field(default_factory=list)  # [{rank, host, pid, device}] of every rank, once the model loaded

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- collectives: each one every rank calls at the same point; a failure is PeerLost ---------------------------
    def _collective(self, fn, *args):
        import torch.distributed as dist

        try:
            return fn(*args)
        except (RuntimeError, dist.DistError) as e:  # gloo: "Connection closed by peer"; a timeout; NCCL's errors
            raise PeerLost(self._who_ended(e)) from e

    def _who_ended(self, error: Exception) -> str:
        """Which rank ended, where this host can tell (its pid is gone: the collective may fail while it is still
        exiting, so a moment is allowed), else what the collective said."""
        import time

        from .artifacts import pid_alive

        here = socket.gethostname()
        peers = [r for r in self.ranks if r["host"] == here and r["rank"] != self.rank]
        deadline = time.monotonic() + 3
        while peers:
            gone = [r["rank"] for r in peers if not pid_alive(r["pid"])]
            if gone:
                return f"rank {', '.join(map(str, gone))} of {self.size} ended (crashed or killed)"
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        said = said.split("] ", 1)[-1][:160]  # gloo's "[file.cc:line] " prefix says nothing to a user
        return f"another rank of the {self.size} ended or stopped answering ({said})"

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        self._collective(dist.all_reduce, t, dist.ReduceOp.MAX)
        return bool(t.item())

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        self._collective(dist.all_reduce, t, dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (small picklable things: facts, metric sums)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        self._collective(dist.all_gather_object, out, obj)
        return out

    def sum_dicts(self, sums: dict) -> dict:
        """Key-wise sums over the ranks, added in rank order (the same order every time: reproducible floats)."""
        if self.size == 1:
            return sums
        total: dict[str, float] = {}
        for part in self.gather(sums):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def sum_gradients(self, params: list) -> None:
        """Add the ranks' gradients in place: one all-reduce of them all, flattened (a missing gradient is zeros)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,): the LoRA gradients, a few MB
        self._collective(dist.all_reduce, flat)
        offset = 0
        for p in params:
            summed = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)

    def broadcast_parameters(self, params: list) -> None:
        """Rank 0's values on every rank (DDP does this at its start): equal seeds make equal adapters already,
        this makes sure of it."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for p in params:
            self._collective(dist.broadcast, p.data, 0)

    def agree(self, problem: str | None) -> None:
        """Raise ConfigError(problem) on every rank when any rank has one (rank 0's run-folder checks, a resume
        step that differs): a refusal on one rank must not leave the others waiting for it."""
        problems = [p for p in self.gather(problem) if p]
        if problems:
            raise ConfigError(problems[0])

    def share(self, items: list) -> list:
        """This rank's micro-batches of a step's ``items``: rank r takes the r-th contiguous share, of
        len(items) / size (the step has accumulation x size micro-batches)."""
        if self.size == 1:
            return items
        per = len(items) // self.size
        return items[self.rank * per:(self.rank + 1) * per]

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def describe(self, cfg: Config, unit: str) -> str:
        per_rank = cfg.batch_size * cfg.gradient_accumulation_steps
        devices = ", ".join(f"rank {r['rank']}: {r['device']} (pid {r['pid']})" for r in self.ranks)
        return (f"distributed: {self.mode} on {self.size} processes ({self.backend}); {cfg.batch_size} {unit} x "
                f"{cfg.gradient_accumulation_steps} micro-steps = {per_rank} {unit} per rank, "
                f"{per_rank * self.size} {unit} per optimizer step; {devices}")

    def status(self, cfg: Config) -> dict:
        """What status.json says of the processes."""
        per_rank = cfg.batch_size * cfg.gradient_accumulation_steps
        return {"world_size": self.size, "distributed": self.mode, "batch_per_rank": per_rank,
                "global_batch": per_rank * self.size, "ranks": self.ranks}


_WORLD = World()


def world() -> World:
    """This process's World (rank 0 of 1 until :func:`init` joins a launched run)."""
    return _WORLD


def init(cfg: Config) -> World:
    """Join the run's process group when a launcher started several processes, or check that none is wanted.
    Raises ConfigError, naming the fix, for a configuration that would not run as asked."""
    global _WORLD
    size = launched()
    mode = cfg.distributed
    under_launcher = "LOCAL_RANK" in os.environ  # torchrun and accelerate launch set it, on 1 process too
    if size == 1 and not (mode == "fsdp" and under_launcher):  # FSDP on one GPU still needs its process group
        if mode in ("ddp", "fsdp") and not under_launcher:
            raise ConfigError(f"distributed={mode} needs several processes, started by a launcher: torchrun "
                              "--nproc-per-node N -m lowrank_pref.run ... (or accelerate launch --multi_gpu "
                              "--num_processes N -m lowrank_pref.run ...); or leave distributed at auto for one "
                              "process")
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            log.info("%d GPUs visible, this run uses one: torchrun --nproc-per-node %d -m lowrank_pref.run ... uses "
                     "them all", torch.cuda.device_count(), torch.cuda.device_count())
        _WORLD = World()
        return _WORLD
    if mode == "none":
        raise ConfigError(f"the launcher started {size} processes but distributed=none: each would train the whole "
                          "run on its own, into the same folder; set distributed=auto (or ddp, fsdp), or run it with "
                          "python -m lowrank_pref.run")
    mode = "ddp" if mode == "auto" else mode
    if cfg.task == "rl" or getattr(cfg, "reward_model", None):
        # rollouts, the reward model's judged eval and samples.jsonl are one process's work today
        raise ConfigError(f"task={cfg.task} with a reward model runs on one process for now: start it with python -m "
                          "lowrank_pref.run (one GPU); several processes take dpo, reward, sft and kto runs")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    gpu = torch.cuda.is_available()
    if mode == "fsdp" and not gpu:
        raise ConfigError("distributed=fsdp shards the 4-bit model over GPUs and needs CUDA; on this machine use "
                          "distributed=ddp (or auto)")
    if mode == "fsdp" and cfg.reference_cache:
        # every forward through a sharded layer is a collective: a rank whose pairs are all cached would skip the
        # reference forward its peers run, and the ranks' all-gathers would no longer match
        raise ConfigError("distributed=fsdp needs reference_cache=false (a rank that finds its reference log-probs "
                          "cached would skip a forward the other ranks run)")
    if gpu and local_size > torch.cuda.device_count():
        raise ConfigError(f"{local_size} processes on this machine but {torch.cuda.device_count()} GPU(s) visible: "
                          "each process needs a GPU of its own (two on one card would share its memory and gain "
                          f"nothing); use --nproc-per-node {torch.cuda.device_count()}")
    import torch.distributed as dist

    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(local_rank)  # every rank's model on its own card: {"": local_rank}, never a map
    timeout = datetime.timedelta(seconds=_timeout_s())
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    _WORLD = World(rank=rank, size=size, local_rank=local_rank, mode=mode, backend=backend)
    if rank != 0:  # one log and one progress bar: rank 0's; the others say only what went wrong
        logging.getLogger("lowrank_pref").setLevel(logging.WARNING)
        os.environ["LOWRANK_PREF_PROGRESS"] = "0"
    return _WORLD


# ----------------------------------------------------------------------------------------------------------------
# FSDP-QLoRA (distributed=fsdp, GPUs)

FSDP_PREFIX = "_fsdp_wrapped_module."


def shard(model) -> int:
    """distributed=fsdp: shard the decoder layers' frozen 4-bit weights over the ranks; returns the layers wrapped.

    Each decoder layer becomes an FSDP unit (PyTorch FSDP, flat parameters) whose 4-bit weights, stored in the
    compute dtype (``bnb_4bit_quant_storage``, model.nf4_config) so FSDP can flatten and shard them, are gathered
    while the layer runs, in forward and again in backward, and freed after; bitsandbytes restores their quant
    state from the module (``fix_4bit_weight_quant_state_from_module``). Everything else in a layer (LoRA, norms)
    is left to the rank, whole, as are the tables and the head outside the layers: the LoRA gradients are added by
    :meth:`World.sum_gradients` as under DDP, and the optimizer, checkpoints, adapter and reference are unchanged.
    The decoder and the chunked LM head are called apart (logps.py), so the root model is not wrapped."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapped = 0
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, GradientCheckpointingLayer):
                continue
            kept = [p for p in layer.parameters() if not isinstance(p, bnb.nn.Params4bit)]
            setattr(parent, name, FSDP(layer, sharding_strategy=ShardingStrategy.FULL_SHARD, ignored_states=kept,
                                       device_id=torch.cuda.current_device(), use_orig_params=False,
                                       limit_all_gathers=True))
            wrapped += 1
    if not wrapped:
        raise ConfigError("distributed=fsdp found no decoder layers to shard in this model; use distributed=ddp")
    log.info("fsdp: %d decoder layers sharded over %d ranks", wrapped, _WORLD.size)
    return wrapped


def adapter_state(model) -> dict:
    """``save_pretrained`` keyword arguments that keep a saved adapter free of collectives: under FSDP
    ``model.state_dict()`` gathers every shard (all ranks must call it), but rank 0 saves alone, so the trainable
    tensors (whole on every rank) are handed over by name instead. ``{}`` when nothing is sharded."""
    if _WORLD.mode != "fsdp":
        return {}
    return {"state_dict": {name.replace(FSDP_PREFIX, ""): p.detach() for name, p in model.named_parameters()
                           if p.requires_grad}}


def shutdown() -> None:
    import torch.distributed as dist

    global _WORLD
    if _WORLD.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def rank_facts(device) -> dict:
    return {"rank": _WORLD.rank, "host": socket.gethostname(), "pid": os.getpid(), "device": str(device)}
