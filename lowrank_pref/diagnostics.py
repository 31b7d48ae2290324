"""What the curves say, in plain words: the known ways a run goes wrong, read from metrics.jsonl.

The rules every task shares live here (non-finite steps, eval accuracy at chance); the ones that only make sense for
one task's metrics are its ``Task.diagnose`` (tasks/), so a new task brings its own without a branch here. A rule
that several tasks read from the same metrics (both log-probs falling) is one function here, called by each.
"""

from __future__ import annotations

import math

LN2 = math.log(2)


def series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record with a finite number under ``key``."""
    return [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def quarters(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Means of the first and the last quarter (at least two points each) of a series: its start and end, less
    noisy than single steps."""
    q = max(2, len(points) // 4)
    return mean([v for _, v in points[:q]]), mean([v for _, v in points[-q:]])


def likelihood_displacement(metrics: list[dict], sides: tuple[str, str], fix: str) -> list[tuple[str, str]]:
    """Both answers' log-probs (``logps/chosen`` and ``logps/rejected``) falling by more than a nat over the run:
    the preference objective is met by pushing the worse answer down faster than the better one, and the better
    one goes down too (likelihood displacement; Razin et al. 2024). ``sides``: what the two are called in this
    task; ``fix``: what to do about it in this task's keys."""
    chosen, rejected = series(metrics, "logps/chosen"), series(metrics, "logps/rejected")
    if len(chosen) < 8 or len(rejected) < 8:
        return []
    d_chosen, d_rejected = (end - start for start, end in (quarters(chosen), quarters(rejected)))
    if d_chosen < -1.0 and d_rejected < -1.0:
        return [("warn", f"Both {sides[0]} and {sides[1]} log-probs are falling ({sides[0]} {d_chosen:+.1f}, "
                         f"{sides[1]} {d_rejected:+.1f} nats): likelihood displacement, the model unlearns the good "
                         f"answers too. {fix}")]
    return []


def diagnose(metrics: list[dict], task: str | None = None, total_steps: int | None = None) -> list[tuple[str, str]]:
    """(level, message) pairs, level in ``ok | warn | error``; the worst first. ``task`` adds that task's rules
    (None: the shared rules only, e.g. for a run of a task this install does not have)."""
    from .tasks import task_class

    out: list[tuple[str, str]] = []
    train = [m for m in metrics if "loss" in m]
    if not train:
        return [("ok", "No metrics yet: the first ones appear after the first logged step.")]

    nonfinite = max((m.get("nonfinite_steps", 0) for m in train), default=0)
    if nonfinite:
        out.append(("error", f"{nonfinite} step(s) had a non-finite (NaN or inf) loss or gradient and were skipped. "
                             "With fp16 this is overflow: set dtype to bf16 (or fp32 on old cards); otherwise lower "
                             "the learning rate or beta."))
    cls = task_class(task) if task else None
    if cls is not None:
        out += cls.diagnose(metrics)

    accuracy = cls.accuracy_key if cls is not None else ""
    evals = series(metrics, f"eval_{accuracy}") if accuracy else []
    late = total_steps is None or (evals and evals[-1][0] >= total_steps / 2)
    if len(evals) >= 2 and late and all(abs(v - 0.5) <= 0.05 for _, v in evals[-2:]):
        out.append(("warn", f"Eval accuracy is stuck near 0.5 ({evals[-1][1]:.2f}): on held-out pairs the model "
                            "prefers chosen answers no more often than chance. Train longer or with a higher "
                            "learning rate, check that chosen and rejected are not swapped, or that the pairs differ "
                            "in something the model can learn."))
    if not out:
        last = train[-1]
        acc = f", train accuracy {last[accuracy]:.2f}" if accuracy and accuracy in last else ""
        out.append(("ok", f"No problems seen: loss {last['loss']:.3f}{acc} at step {last['step']}."))
    order = {"error": 0, "warn": 1, "ok": 2}
    return sorted(out, key=lambda x: order[x[0]])
