"""The training loop, top to bottom: data, model, optimizer, steps, eval, logs, checkpoints, resume.

One optimizer step = ``gradient_accumulation_steps`` micro-steps of ``batch_size`` pairs. Micro-batch g of the
whole run is fixed by (seed, g) alone, so a run's data position is its step number and a resumed run sees exactly
the pairs an uninterrupted one would. Each micro-step's loss is ``sum(per-pair losses) / pairs in the step``, so the
same effective batch gives the same update however it is split into micro-steps.
"""

from __future__ import annotations

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

from . import data as data_mod
from .artifacts import RunDir
from .config import Config, ConfigError, dump_yaml
from .losses import REFERENCE_FREE, preference_loss, reward_loss
from .memory import choose_plan, shared_layout_possible
from .logps import reward_scores, sequence_logps, shared_reward_scores, shared_sequence_logps
from .memory import available_memory_gb, current_memory_mb, peak_memory_mb, reset_peak_memory
from .model import autocast, checkpointed_layers, compute_dtype, device, load_model, load_tokenizer, reference_mode, save_adapter, trainable_parameters
from .refcache import RefCache

log = logging.getLogger("lowrank_pref")


class TrainingStopped(RuntimeError):
    """The run stopped itself with a plain message (e.g. repeated non-finite losses)."""


# ----------------------------------------------------------------------------------------------------------------
# Data order

@dataclass
class Schedule:
    """Which pairs make micro-batch g of the run: a pure function of (seed, g), so resume is exact.

    Fixed count: ``batch_size`` pairs a micro-batch, the epoch's pairs shuffled by seed. Token budget (``sizes`` given):
    each epoch's shuffled pairs are cut into windows, sorted by length inside a window and packed greedily so a
    micro-batch's padded size (pairs x its longest pair) stays within ``token_budget``; the batches are then shuffled.
    Short pairs travel many to a batch, long ones few, and rows of a batch have similar lengths (little padding).
    """
    n_pairs: int
    batch_size: int
    accum: int
    seed: int
    sizes: list[int] | None = None
    token_budget: int | None = None
    _epochs: dict = field(default_factory=dict, repr=False)
    _counts: dict = field(default_factory=dict, repr=False)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(self.n_pairs))
            rng.shuffle(order)
            if not self.token_budget:
                batches = [order[k:k + self.batch_size] for k in range(0, self.n_pairs, self.batch_size)]
            else:
                batches = []
                window = 64 * max(1, self.token_budget // max(1, max(self.sizes)))
                for start in range(0, self.n_pairs, window):
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
            return math.ceil(self.n_pairs / self.batch_size)
        if epoch not in self._counts:
            self._counts[epoch] = len(self.epoch_batches(epoch))
        return self._counts[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_count(0)

    def micro_batch(self, g: int) -> list[int]:
        """Pair indices of the run's g-th micro-batch (0-based), epochs one after another."""
        epoch = 0
        while g >= self.epoch_count(epoch):
            g -= self.epoch_count(epoch)
            epoch += 1
        return self.epoch_batches(epoch)[g]

    def step_batches(self, step: int) -> list[list[int]]:
        """Micro-batches of optimizer step ``step`` (1-based)."""
        return [self.micro_batch(g) for g in range((step - 1) * self.accum, step * self.accum)]

    def total_steps(self, cfg: Config) -> int:
        if cfg.max_steps:
            return cfg.max_steps
        full, part = divmod(cfg.num_epochs, 1)
        micro = sum(self.epoch_count(e) for e in range(int(full)))
        micro += math.ceil(part * self.epoch_count(int(full))) if part else 0
        return max(1, math.ceil(micro / self.accum))


def largest_micro_step(cfg: Config, schedule: Schedule, pairs: list) -> tuple[int, int]:
    """(padded tokens through the model, answer tokens) of the first epoch's largest micro-batch."""
    shared = shared_layout_possible(cfg)
    worst = (0, 0)
    for batch in schedule.epoch_batches(0):
        chosen = [pairs[i] for i in batch]
        rows = data_mod.row_lengths(chosen, shared)
        worst = max(worst, (len(rows) * max(rows), sum(len(p.chosen_ids) + len(p.rejected_ids) for p in chosen)))
    return worst


# ----------------------------------------------------------------------------------------------------------------
# One micro-batch: forward, loss, metrics (used by train and eval alike)

def pair_losses(model, cfg: Config, pairs: list, pad_id: int, shared: bool = False,
                ref_cache: RefCache | None = None) -> tuple[torch.Tensor, dict, int]:
    """Per-pair losses (B,) with grad, the metric sums for these pairs, and the real tokens processed.

    ``shared``: one ``[prompt | chosen | rejected]`` row per pair, so the prompt goes through the model once.
    ``ref_cache``: reference log-probs already known are read from it, new ones stored in it."""
    if shared:
        batch = data_mod.collate_shared(pairs, pad_id)
        tokens = sum(p.num_tokens for p in pairs)
        logps_of, scores_of = shared_sequence_logps, shared_reward_scores
    else:
        batch = data_mod.collate(pairs, pad_id)
        tokens = int(batch["attention_mask"].sum())
        logps_of, scores_of = sequence_logps, reward_scores
    n = len(pairs)
    with autocast(cfg):
        if cfg.task == "reward":
            scores = scores_of(model, batch)
            chosen, rejected = scores[:n], scores[n:]
            losses = reward_loss(chosen, rejected, margin=batch["margin"].to(scores.device),
                                 center_rewards_coefficient=cfg.center_rewards_coefficient)
            d = (chosen - rejected).detach()
            sums = {"loss": losses.detach().sum(), "accuracy": (d > 0).float().sum(), "margin": d.sum()}
            return losses, sums, tokens
        ref_c = ref_r = None
        if cfg.loss_type not in REFERENCE_FREE:
            ref = ref_cache.get(pairs) if ref_cache is not None else None
            if ref is None:
                with reference_mode(model):  # first, so its activations are gone before the policy graph is built
                    ref, _ = logps_of(model, batch, cfg.logprob_chunk_size)
                if ref_cache is not None:
                    ref_cache.put(pairs, ref)
            ref = ref.to(next(model.parameters()).device)
            ref_c, ref_r = ref[:n], ref[n:]
        logps, lengths = logps_of(model, batch, cfg.logprob_chunk_size)
    pc, pr, lc, lr = logps[:n], logps[n:], lengths[:n], lengths[n:]
    losses, cr, rr = preference_loss(cfg.loss_type, pc, pr, ref_c, ref_r, chosen_lengths=lc, rejected_lengths=lr,
                                     beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)
    if cfg.rpo_alpha:  # RPO: an SFT term on the chosen answer, per token
        losses = losses + cfg.rpo_alpha * (-pc / lc.clamp(min=1))
    sums = {"loss": losses.detach().sum(), "rewards/chosen": cr.sum(), "rewards/rejected": rr.sum(),
            "rewards/accuracies": (cr > rr).float().sum(), "rewards/margins": (cr - rr).sum(),
            "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
    return losses, sums, tokens


def shared_prompt_works(model, cfg: Config, pairs: list, pad_id: int) -> tuple[bool, str]:
    """Decide the shared-prompt forward for this model: on when it gives the two-sequence log-probs on a few pairs.

    A model whose attention ignores or rewrites a custom 4D mask (flash-attention, sliding windows shorter than the
    rows, architectures with their own mask logic) gives different numbers and falls back, with the reason logged."""
    if not shared_layout_possible(cfg):
        return False, "off" if cfg.shared_prompt == "off" else "off (flash_attention_2 takes no custom mask)"
    if cfg.shared_prompt == "on":
        return True, "on"
    sample = pairs[:2]
    try:
        with reference_mode(model), autocast(cfg):
            if cfg.task == "reward":
                two = reward_scores(model, data_mod.collate(sample, pad_id))
                one = shared_reward_scores(model, data_mod.collate_shared(sample, pad_id))
            else:
                two, _ = sequence_logps(model, data_mod.collate(sample, pad_id))
                one, _ = shared_sequence_logps(model, data_mod.collate_shared(sample, pad_id))
    except Exception as e:  # a model that refuses the mask or the position ids
        return False, f"off ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    tol = 1e-3 if compute_dtype(cfg) == torch.float32 else 2e-2
    diff = float((one - two).abs().max())
    if diff > tol * max(1.0, float(two.abs().max())):
        return False, f"off (this model's outputs differ by {diff:.2g} with the shared layout)"
    return True, "on (checked equal to two sequences per pair)"


def evaluate(model, cfg: Config, pairs: list, pad_id: int, shared: bool = False,
             ref_cache: RefCache | None = None) -> dict:
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    bs = cfg.eval_batch_size or cfg.batch_size
    with torch.no_grad():
        for i in range(0, len(pairs), bs):
            _, sums, _ = pair_losses(model, cfg, pairs[i:i + bs], pad_id, shared, ref_cache)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    model.train(was_training)
    return {f"eval_{k}": v / len(pairs) for k, v in totals.items()}


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
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: RunDir, cfg: Config, model, optimizer, scheduler, step: int, counters: dict) -> Path:
    tmp = run.new_checkpoint_dir(step)
    model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"], safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    # written last: a checkpoint without state.json is incomplete and never picked up
    state = {"step": step, "micro_batches_done": step * cfg.gradient_accumulation_steps, **counters}
    (tmp / "state.json").write_text(json.dumps(state))
    return run.commit_checkpoint(tmp, step, cfg.save_total_limit)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint {path} does not match this model: {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))  # python's RNG state is a plain tuple
    return json.loads((path / "state.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# The loop

class _StopFlag:
    """SIGTERM (the app's Stop button) ends the run after the current step, with a checkpoint."""

    def __init__(self):
        self.set = False

    def __call__(self, signum, frame):
        self.set = True


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("LOWRANK_PREF_PROGRESS", "1") == "0", mininterval=1.0)


def train(cfg: Config, output_dir: str | os.PathLike, *, resume: bool = False) -> dict:
    """Run a whole training job into ``output_dir``; returns the last logged metrics (train and eval)."""
    run = RunDir(output_dir).create()
    handler = logging.FileHandler(run.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    stop = _StopFlag()
    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm(loggers=[logging.root]):
            return _train(cfg, run, resume, stop)
    except BaseException as e:
        state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        run.write_status(state=state, message=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _train(cfg: Config, run: RunDir, resume: bool, stop: _StopFlag) -> dict:
    started = time.time()
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None and run.read_metrics():
        log.info("no checkpoint in %s yet: starting from step 0", run.path)
        run.truncate_metrics(0)  # the earlier lines will be logged again
    if not resume and (run.metrics.exists() or run.checkpoints()):
        raise ConfigError(f"output_dir '{run.path}' already holds a run; use --resume to continue it, or choose "
                          "another --output-dir")
    run.write_status(state="running", pid=os.getpid(), step=checkpoint[0] if checkpoint else 0, message="",
                     task=cfg.task, started=started)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg)
    data = data_mod.load_preference_data(cfg, tokenizer)  # before the model: bad data fails in seconds
    log.info("%s", data.report.summary())
    if data.eval_report:
        log.info("eval %s", data.eval_report.summary())
    log.info("train pairs: %d, eval pairs: %d", len(data.train), len(data.eval))
    run.data_report.write_text(json.dumps({"train": data.report.as_dict(), "examples": data.examples,
                                           "eval": data.eval_report.as_dict() if data.eval_report else None,
                                           "train_pairs": len(data.train), "eval_pairs": len(data.eval)}, indent=1))

    schedule = Schedule(len(data.train), cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed,
                        sizes=[p.num_tokens for p in data.train], token_budget=cfg.token_budget)
    tokens, answers = largest_micro_step(cfg, schedule, data.train)
    plan = choose_plan(cfg, cfg.memory_limit_gb or available_memory_gb(), gpu=device().type == "cuda",
                       tokens=tokens, answer_tokens=answers)
    log.info("gradient checkpointing: %s (%s)", plan.describe(), plan.why)
    model, reference = load_model(cfg, tokenizer, plan)
    run.write_status(gradient_checkpointing=plan.checkpointing, checkpointed_layers=checkpointed_layers(model),
                     checkpoint_offload=plan.offload)
    if cfg.task == "dpo":
        reference = "none" if cfg.loss_type in REFERENCE_FREE else reference
        log.info("reference: %s%s", reference, {"base": " (the base model, adapters disabled)",
                                                "adapter": f" (the starting adapter {cfg.adapter}, frozen)",
                                                "none": f" ({cfg.loss_type} is reference-free)"}[reference])
    params = trainable_parameters(model)
    n_trainable = sum(p.numel() for p in params)
    log.info("trainable parameters: %s", f"{n_trainable:,}")
    header = f"# resolved config of this run; repeat it with: python -m lowrank_pref.run --config {run.config}\n"
    info = f"reference: {reference}\n" if cfg.task == "dpo" else ""
    run.config.write_text(header + info + dump_yaml(cfg))

    from transformers import get_scheduler

    total = schedule.total_steps(cfg)
    optimizer = make_optimizer(cfg, params)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total),
                              num_training_steps=total)
    eval_every = cfg.eval_steps or max(1, total // 4)
    save_every = cfg.save_steps or max(1, total // 4)
    counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0}
    start = 0
    if checkpoint:
        start, path = checkpoint
        counters.update({k: v for k, v in load_checkpoint(path, model, optimizer, scheduler).items() if k in counters})
        run.truncate_metrics(start)
        log.info("resumed from %s (step %d of %d)", path.name, start, total)
    run.write_status(state="running", step=start, total_steps=total, reference=reference)

    pad_id = tokenizer.pad_token_id
    shared, why = shared_prompt_works(model, cfg, data.train, pad_id)
    log.info("shared-prompt forward: %s", why)
    run.write_status(shared_prompt=shared)
    ref_cache = None
    if cfg.task == "dpo" and cfg.loss_type not in REFERENCE_FREE and cfg.reference_cache:
        ref_cache = RefCache.for_config(cfg)
        log.info("reference log-probs cache: %s (%d pairs known)", ref_cache.path, len(ref_cache))
    model.train()
    reset_peak_memory()  # peaks from here on are training's, not loading's
    loaded_mb = current_memory_mb()
    log.info("memory with the model loaded: %.0f MB", loaded_mb)
    window: dict[str, float] = {}
    window_pairs = window_tokens = 0
    window_time = 0.0
    last: dict = {}
    bar = _progress(total, start)
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        batches = [[data.train[i] for i in idx] for idx in schedule.step_batches(step)]
        n_pairs = sum(map(len, batches))
        lr = scheduler.get_last_lr()[0]
        nonfinite = False
        step_sums: dict[str, float] = {}
        tokens = 0
        for pairs in batches:
            losses, sums, t = pair_losses(model, cfg, pairs, pad_id, shared, ref_cache)
            loss = losses.sum() / n_pairs
            if not torch.isfinite(loss):
                nonfinite = True
                break
            loss.backward()
            tokens += t
            for k, v in sums.items():
                step_sums[k] = step_sums.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        if nonfinite or not torch.isfinite(grad_norm):
            counters["nonfinite_steps"] += 1
            counters["nonfinite_in_a_row"] += 1
            log.warning("step %d: non-finite %s, step skipped (%d so far)", step,
                        "loss" if nonfinite else "gradient", counters["nonfinite_steps"])
            optimizer.zero_grad(set_to_none=True)
            if counters["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                raise TrainingStopped(
                    f"stopped at step {step}: {counters['nonfinite_in_a_row']} steps in a row had a non-finite loss "
                    "or gradient. With fp16 this is overflow: use dtype=bf16 (or fp32); otherwise lower "
                    "learning_rate or beta")
        else:
            counters["nonfinite_in_a_row"] = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        elapsed = time.perf_counter() - t0

        for k, v in step_sums.items():
            window[k] = window.get(k, 0.0) + v
        window_pairs += 0 if nonfinite else n_pairs
        window_tokens += tokens
        window_time += elapsed
        bar.update(1)
        if step_sums:
            bar.set_postfix(loss=f"{step_sums['loss'] / n_pairs:.4f}", refresh=False)

        if step % cfg.logging_steps == 0 or step == total:
            record = {"step": step, "epoch": round(step * cfg.gradient_accumulation_steps
                                                   / schedule.batches_per_epoch, 4)}
            record.update({k: v / max(window_pairs, 1) for k, v in window.items()})
            record.update({"learning_rate": lr, "grad_norm": float(grad_norm),
                           "tokens_per_second": window_tokens / max(window_time, 1e-9),
                           "pairs_per_second": window_pairs / max(window_time, 1e-9),
                           "peak_memory_mb": peak_memory_mb(), "loaded_memory_mb": loaded_mb,
                           "nonfinite_steps": counters["nonfinite_steps"]})
            run.append_metrics(record)
            last.update(record)
            window, window_pairs, window_tokens, window_time = {}, 0, 0, 0.0
        if data.eval and (step % eval_every == 0 or step == total):
            record = {"step": step, **evaluate(model, cfg, data.eval, pad_id, shared, ref_cache)}
            run.append_metrics(record)
            last.update(record)
            log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step"))
        run.write_status(step=step)
        if step % save_every == 0 and step < total or stop.set:
            save_checkpoint(run, cfg, model, optimizer, scheduler, step, counters)
            if ref_cache is not None:
                ref_cache.save()
        if stop.set and step < total:
            bar.close()
            run.write_status(state="stopped", step=step, message=f"stopped at step {step}; resume with --resume")
            log.info("stopped at step %d (checkpoint written); resume with --resume", step)
            return last
    bar.close()
    if ref_cache is not None:
        ref_cache.save()
        log.info("reference log-probs: %d pairs read from the cache, %d computed", ref_cache.hits, ref_cache.misses)
        run.write_status(reference_cache={"read": ref_cache.hits, "computed": ref_cache.misses})

    tmp = run.path / f".adapter.tmp-{os.getpid()}"
    save_adapter(model, tokenizer, tmp)
    if run.adapter.exists():
        import shutil
        shutil.rmtree(run.adapter)
    os.replace(tmp, run.adapter)
    summary = {k: v for k, v in last.items() if k.startswith("eval_")}
    run.write_status(state="completed", step=total, message="", seconds=round(time.time() - started, 1),
                     final=summary)
    log.info("done in %.0fs: adapter in %s", time.time() - started, run.adapter)
    return last
