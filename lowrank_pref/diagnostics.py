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


def nonfinite_advice(dtype: str | None) -> str:
    """What to do about NaN/inf steps, for the compute dtype the run used: fp16 overflows (bf16 has fp32's range);
    in bf16 or fp32 the cause is the optimisation itself, and another dtype would not help."""
    if dtype == "fp16":
        return ("In fp16 this is overflow: set dtype to bf16 (or fp32 on cards without bf16); otherwise lower "
                "learning_rate or beta.")
    where = f"In {dtype}" if dtype else "Unless the run used fp16 (then set dtype to bf16)"
    return f"{where} this is not overflow: lower learning_rate or beta, or keep max_grad_norm at 1."


def overfitting(metrics: list[dict], accuracy: str) -> list[tuple[str, str]]:
    """Train good, eval flat or worse. Over the steps between the first and the last eval, the train loss fell
    clearly while the eval loss gained less than a quarter of that (or rose from its best); or, with any eval, the
    recent train accuracy is 0.2 or more above the eval accuracy."""
    train, evals = series(metrics, "loss"), series(metrics, "eval_loss")
    found, how = False, []
    if len(train) >= 4 and len(evals) >= 2:
        def train_at(step):  # the train loss around a step: the mean of the last three points up to it
            upto = [v for s, v in train if s <= step][-3:] or [train[0][1]]
            return mean(upto)

        (s0, first), (s1, last) = evals[0], evals[-1]
        best = min(v for _, v in evals)
        t0, t1 = train_at(s0), train_at(s1)
        train_gain = t0 - t1
        if train_gain > max(0.05, 0.15 * abs(t0)):
            flat, rose = first - last < 0.25 * train_gain, last > best + max(0.02, 0.1 * abs(best))
            if flat or rose:
                found = True
                how.append(f"from step {s0} to {s1} train loss {t0:.3f} -> {t1:.3f}, eval loss {first:.3f} -> "
                           f"{last:.3f}" + (f" (best {best:.3f})" if rose else ""))
    if accuracy:
        acc, eval_acc = series(metrics, accuracy), series(metrics, f"eval_{accuracy}")
        if len(acc) >= 4 and eval_acc:
            recent = mean([v for _, v in acc[-max(2, len(acc) // 4):]])
            if recent - eval_acc[-1][1] >= 0.2:
                found = True
                how.append(f"train accuracy {recent:.2f} against eval accuracy {eval_acc[-1][1]:.2f}")
    if not found:
        return []
    return [("warn", f"Over-fitting: the run gets better on its training items but not on held-out ones "
                     f"({'; '.join(how)}). Train fewer steps or epochs, lower the learning rate or LoRA rank, raise "
                     "LoRA dropout, or bring more data.")]


def eval_summary(metrics: list[dict]) -> str:
    """The latest eval's numbers in words ("eval at step 60: loss 0.676, accuracy 0.600"), "" before any."""
    evals = [m for m in metrics if any(k.startswith("eval_") for k in m)]
    if not evals:
        return ""
    last = evals[-1]
    parts = [f"{k.removeprefix('eval_')} {v:.4g}" for k, v in last.items()
             if k.startswith("eval_") and isinstance(v, (int, float)) and math.isfinite(v)
             and not k.endswith(("_per_second", "seconds", "_count"))]
    return f"eval at step {last['step']}: {', '.join(parts)}" if parts else ""


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


def diagnose(metrics: list[dict], task: str | None = None, total_steps: int | None = None, *,
             dtype: str | None = None, state: str | None = None, message: str = "") -> list[tuple[str, str]]:
    """(level, message) pairs, level in ``ok | warn | error``; the worst first. ``task`` adds that task's rules
    (None: the shared rules only, e.g. for a run of a task this install does not have). ``dtype``: the run's compute
    dtype (status.json), so advice fits it. ``state``/``message``: the run's, so a run that failed before its first
    metrics says why instead of "no metrics yet"."""
    from .tasks import task_class

    out: list[tuple[str, str]] = []
    train = [m for m in metrics if "loss" in m]
    if state == "failed":
        out.append(("error", f"The run failed: {message or 'see the log below'}"))
    if not train:
        return out or [("ok", "No metrics yet: the first ones appear after the first logged step.")]

    nonfinite = max((m.get("nonfinite_steps", 0) for m in train), default=0)
    if nonfinite:
        out.append(("error", f"{nonfinite} step(s) had a non-finite (NaN or inf) loss or gradient and were skipped. "
                             + nonfinite_advice(dtype)))
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
    out += overfitting(metrics, accuracy)
    if not out:
        last = train[-1]
        acc = f", train accuracy {last[accuracy]:.2f}" if accuracy and accuracy in last else ""
        out.append(("ok", f"No problems seen: loss {last['loss']:.3f}{acc} at step {last['step']}."))
    order = {"error": 0, "warn": 1, "ok": 2}
    return sorted(out, key=lambda x: order[x[0]])
