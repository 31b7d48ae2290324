"""What the curves say, in plain words: the known ways a preference run goes wrong, read from metrics.jsonl."""

from __future__ import annotations

import math

LN2 = math.log(2)


def _series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def diagnose(metrics: list[dict], task: str = "dpo", total_steps: int | None = None) -> list[tuple[str, str]]:
    """(level, message) pairs, level in ``ok | warn | error``; the worst first."""
    out: list[tuple[str, str]] = []
    train = [m for m in metrics if "loss" in m]
    if not train:
        return [("ok", "No metrics yet: the first ones appear after the first logged step.")]

    nonfinite = max((m.get("nonfinite_steps", 0) for m in train), default=0)
    if nonfinite:
        out.append(("error", f"{nonfinite} step(s) had a non-finite (NaN or inf) loss or gradient and were skipped. "
                             "With fp16 this is overflow: set dtype to bf16 (or fp32 on old cards); otherwise lower "
                             "the learning rate or beta."))

    loss = _series(train, "loss")
    recent = [v for _, v in loss[-3:]]
    if task == "dpo":
        margins = [abs(v) for _, v in _series(train, "rewards/margins")[-3:]]
        if len(loss) >= 5 and all(abs(v - LN2) < 0.003 for v in recent) and margins and max(margins) < 1e-3:
            out.append(("warn", "The loss sits at 0.693 (= log 2) and the rewards stay at zero: the policy still "
                                "equals the reference, so the adapter is not learning. Check that the learning rate "
                                "is not tiny, that beta is not near 0, and that the LoRA target modules exist."))
        chosen, rejected = _series(train, "logps/chosen"), _series(train, "logps/rejected")
        if len(chosen) >= 8 and len(rejected) >= 8:
            q = max(2, len(chosen) // 4)
            d_chosen = _mean([v for _, v in chosen[-q:]]) - _mean([v for _, v in chosen[:q]])
            d_rejected = _mean([v for _, v in rejected[-q:]]) - _mean([v for _, v in rejected[:q]])
            if d_chosen < -1.0 and d_rejected < -1.0:
                out.append(("warn", f"Both chosen and rejected log-probs are falling (chosen {d_chosen:+.1f}, "
                                    f"rejected {d_rejected:+.1f} nats): likelihood displacement, the model unlearns "
                                    "the good answers too. Lower the learning rate, or add an SFT term "
                                    "(rpo_alpha=0.2)."))
        acc_key = "eval_rewards/accuracies"
    else:
        accs = [v for _, v in _series(train, "accuracy")[-3:]]
        if len(loss) >= 5 and all(abs(v - LN2) < 0.003 for v in recent) and accs and all(
                abs(a - 0.5) < 0.1 for a in accs):
            out.append(("warn", "The loss sits at 0.693 (= log 2): the reward model scores chosen and rejected "
                                "alike. Raise the learning rate or check the data."))
        acc_key = "eval_accuracy"

    evals = _series(metrics, acc_key)
    late = total_steps is None or (evals and evals[-1][0] >= total_steps / 2)
    if len(evals) >= 2 and late and all(abs(v - 0.5) <= 0.05 for _, v in evals[-2:]):
        out.append(("warn", f"Eval accuracy is stuck near 0.5 ({evals[-1][1]:.2f}): on held-out pairs the model "
                            "prefers chosen answers no more often than chance. Train longer or with a higher "
                            "learning rate, check that chosen and rejected are not swapped, or that the pairs differ "
                            "in something the model can learn."))
    if not out:
        last = train[-1]
        key = "rewards/accuracies" if task == "dpo" else "accuracy"
        acc = f", train accuracy {last[key]:.2f}" if key in last else ""
        out.append(("ok", f"No problems seen: loss {last['loss']:.3f}{acc} at step {last['step']}."))
    order = {"error": 0, "warn": 1, "ok": 2}
    return sorted(out, key=lambda x: order[x[0]])
