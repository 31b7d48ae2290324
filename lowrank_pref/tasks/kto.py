"""KTO: preference-tune on unpaired thumbs-up / thumbs-down answers, the data people collect from their own apps.

Rows: ``prompt``, ``completion`` and ``label`` (true: desirable), the prompt and completion as strings or message
lists; preference data (``chosen``/``rejected``, any format data.py reads) is split into a desirable and an
undesirable row per pair. The loss is ``losses.kto_loss``: each answer's log-ratio against the reference point z0,
the KL estimate from mismatched pairs of the micro-batch (example i's prompt with example i-1's answer, as TRL's
KTOTrainer builds them). The reference is the base with adapters off, or the frozen starting adapter (e.g. an SFT
run's). ``kto.desirable_weight`` / ``kto.undesirable_weight`` balance imbalanced data; the log suggests values when
the ratio is off (KTO eq. 8: lambda_D n_D / (lambda_U n_U) in [1, 4/3]).
"""

from __future__ import annotations

import logging
from collections import namedtuple

import torch

from .. import data as data_mod
from ..config import ConfigError
from ..data import DataReport, RowError
from ..logps import sequence_logps
from ..losses import kto_loss
from ..model import autocast, reference_mode
from .base import Task, TaskData

log = logging.getLogger("lowrank_pref")

_TRUE = {"true", "1", "yes", "y", "up", "good", "positive", "thumbs_up", "desirable"}
_FALSE = {"false", "0", "no", "n", "down", "bad", "negative", "thumbs_down", "undesirable"}

# The reference cache keys a (prompt, answer, KL answer) triple as it keys a pair: [answer ref, KL ref].
_CacheKey = namedtuple("_CacheKey", "prompt_ids chosen_ids rejected_ids")


class Completion:
    """One tokenized KTO example: a prompt, an answer, and whether the answer is desirable."""
    __slots__ = ("prompt_ids", "completion_ids", "label", "row")

    def __init__(self, prompt_ids: list[int], completion_ids: list[int], label: bool, row: int = 0):
        self.prompt_ids, self.completion_ids, self.label, self.row = prompt_ids, completion_ids, label, row

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def parse_label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RowError("label", f"must be true/false (or 1/0, up/down), got {value!r}")


def unpaired_rows(rows: list[dict], source: str) -> tuple[str, list[tuple[int, object, object, bool]]]:
    """(format, [(source row, prompt, completion, desirable)]): unpaired rows as they are, pairs split in two."""
    if not rows:
        raise data_mod.DataError(f"{source}: the dataset has no rows")
    cols = set(rows[0])
    if "label" in cols:
        if not {"prompt", "completion"} <= cols:
            missing = "prompt" if "prompt" not in cols else "completion"
            raise data_mod.DataError(f"{source}: KTO rows need prompt, completion and label columns; no '{missing}' "
                                     f"(columns are {', '.join(sorted(cols))}). Map yours with "
                                     f"data.columns.{missing}=<your column>")
        return "unpaired", [(i, r.get("prompt"), r.get("completion"), r.get("label")) for i, r in enumerate(rows, 1)]
    fmt = data_mod.detect_format(rows, source)  # preference data: a desirable and an undesirable row per pair
    return f"{fmt} (pairs split)", [(i, r, fmt, side) for i, r in enumerate(rows, 1) for side in (True, False)]


def prepare_kto(rows: list[dict], tokenizer, *, source: str, cfg, n_examples: int = 3):
    """Validate, render and tokenize KTO rows. Returns usable examples, the report, and a few rendered examples."""
    rows = data_mod.apply_column_mapping(rows, cfg.data.columns, source)
    fmt, entries = unpaired_rows(rows, source)
    report = DataReport(source=source, format=fmt, total_rows=len(rows), max_length=cfg.max_length,
                        unit="examples", lengths_are="prompt + answer",
                        answer_cut="each is judged desirable or undesirable on part of its answer")
    rendered, kept, failed = [], [], set()
    for i, a, b, c in entries:
        try:
            if fmt == "unpaired":
                prompt, completion, label = a, b, parse_label(c)
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    prompt = data_mod._messages(prompt, "prompt", default_role="user")
                    completion = data_mod._messages(completion, "completion", default_role="assistant")
                elif not prompt.strip() or not completion.strip():
                    raise RowError("prompt" if not prompt.strip() else "completion", "is empty")
            else:
                pair = data_mod.normalize_row(a, b)
                prompt, completion, label = pair["prompt"], pair["chosen" if c else "rejected"], c
            rendered.append(data_mod.render_answers(prompt, {"completion": completion}, tokenizer))
            kept.append((i, label))
        except RowError as e:
            if cfg.data.on_bad_rows == "error":
                raise data_mod.DataError(f"{source}: row {i}, {e}. Fix the row, or set data.on_bad_rows=skip to skip "
                                         "rows like it") from None
            if i not in failed:  # a pair split in two fails once
                failed.add(i)
                report.drop(str(e), i)
    items, shown = [], []
    for (p, (a,)), (i, label), (pt, (at,), templated) in zip(
            data_mod.tokenize_answers(tokenizer, rendered) if rendered else [], kept, rendered):
        report.lengths.append(len(p) + len(a))
        if not a:
            report.drop("answer is empty after tokenization", i)
            continue
        p2, a2, _, cut_p, cut_a = data_mod.truncate(p, a, a, cfg.max_length, cfg.max_prompt_length)
        report.truncated_prompts += cut_p
        report.truncated_answers += cut_a
        items.append(Completion(p2, a2, label, row=i))
        if len(shown) < n_examples:
            side = {"name": "desirable" if label else "undesirable", "tokens": len(p2) + len(a2),
                    "loss_tokens": len(a2), "pieces": data_mod.display_pieces(tokenizer, [
                        (p[:len(p) - len(p2)], "cut"), (p2, "prompt"), (a2, "loss"), (a[len(a2):], "cut")])}
            shown.append({"row": i, "prompt": pt, "completion": at, "label": label, "prompt_tokens": len(p2),
                          "completion_tokens": len(a2), "truncated": bool(cut_p or cut_a), "templated": templated,
                          "note": f"prompt {len(p2)} tokens" + (" · chat template applied" if templated else ""),
                          "sides": [side]})
    report.usable = len(items)
    return items, report, shown


def weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                  undesirable_weight: float) -> str | None:
    """A suggestion when lambda_D n_D / (lambda_U n_U) is outside [1, 4/3] (KTO eq. 8; TRL's bounds), else None."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if n_d == n_u:
        return None
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi:
        return None
    return (f"{n_desirable} desirable and {n_undesirable} undesirable examples with kto.desirable_weight="
            f"{desirable_weight:g} and kto.undesirable_weight={undesirable_weight:g}: the weighted ratio is outside "
            f"[1, 4/3]. Set kto.desirable_weight in [{d_lo}, {d_hi}] or kto.undesirable_weight in [{u_lo}, {u_hi}] "
            "(one of them)")


class KtoTask(Task):
    name = "kto"
    unit = "examples"
    sequences_per_item = 1  # the KL rows go through without grad
    uses_reference = True
    plots = [("Loss", {"loss": "train", "eval_loss": "eval"}),
             ("Rewards", {"rewards/chosen": "desirable", "rewards/rejected": "undesirable",
                          "rewards/margins": "margin", "eval_rewards/margins": "eval margin"}),
             ("KL (reference point)", {"kl": "train", "eval_kl": "eval"}),
             ("Log-probs", {"logps/chosen": "desirable", "logps/rejected": "undesirable",
                            "eval_logps/chosen": "eval desirable", "eval_logps/rejected": "eval undesirable"})]
    fields = ("beta", "kto.desirable_weight", "kto.undesirable_weight")

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.batch_size < 2:
            raise ConfigError("kto estimates its reference point from mismatched pairs within a micro-batch, so it "
                              "needs batch_size >= 2 (with 1 the KL term equals the example's own reward); raise "
                              "batch_size")

    def prepare_rows(self, rows: list[dict], tokenizer, source: str):
        return prepare_kto(rows, tokenizer, source=source, cfg=self.cfg)

    def load_data(self, tokenizer) -> TaskData:
        """The base's data path, then the balance of desirable and undesirable examples, with advice when off."""
        cfg = self.cfg
        d = super().load_data(tokenizer)
        n_d = sum(e.label for e in d.train)
        log.info("kto: %d desirable, %d undesirable training examples", n_d, len(d.train) - n_d)
        advice = weight_advice(n_d, len(d.train) - n_d, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
        if advice:
            log.warning("kto: %s", advice)
        return d

    def micro_step_tokens(self, items: list) -> tuple[int, int]:
        return len(items) * max(e.num_tokens for e in items), sum(len(e.completion_ids) for e in items)

    def rows(self, items: list) -> tuple[list, list]:
        """(prompt + answer) rows and the KL rows: example i's prompt with example i-1's answer, cut to max_length."""
        own = [(e.prompt_ids + e.completion_ids, [0] * len(e.prompt_ids) + [1] * len(e.completion_ids))
               for e in items]
        kl = []
        for i, e in enumerate(items):
            other = items[i - 1].completion_ids[:max(1, self.cfg.max_length - len(e.prompt_ids))]
            kl.append((e.prompt_ids + other, [0] * len(e.prompt_ids) + [1] * len(other)))
        return own, kl

    def losses(self, model, items: list):
        cfg = self.cfg
        n = len(items)
        own, kl = self.rows(items)
        keys = [_CacheKey(e.prompt_ids, e.completion_ids, row[0][len(e.prompt_ids):]) for e, row in zip(items, kl)]
        batch, kl_batch = data_mod.collate_rows(own, self.pad_id), data_mod.collate_rows(kl, self.pad_id)
        with autocast(cfg):
            ref = self.ref_cache.get(keys) if self.ref_cache is not None else None
            if ref is None:
                with reference_mode(model):  # answers and KL rows in one pass, before the policy graph is built
                    ref, _ = sequence_logps(model, data_mod.collate_rows(own + kl, self.pad_id),
                                            cfg.logprob_chunk_size)
                if self.ref_cache is not None:
                    self.ref_cache.put(keys, ref)
            ref = ref.to(next(model.parameters()).device)
            with torch.no_grad():  # the reference point is detached: its policy pass needs no graph
                policy_kl, _ = sequence_logps(model, kl_batch, cfg.logprob_chunk_size)
            logps, _ = sequence_logps(model, batch, cfg.logprob_chunk_size)
        desirable = torch.tensor([e.label for e in items], dtype=torch.bool, device=logps.device)
        losses, rewards, z0 = kto_loss(logps, ref[:n], policy_kl, ref[n:], desirable, beta=cfg.beta,
                                       desirable_weight=cfg.kto.desirable_weight,
                                       undesirable_weight=cfg.kto.undesirable_weight)
        d, u = desirable.float(), (~desirable).float()
        # the window divides every sum by its examples; derived() turns these into means over each side
        sums = {"loss": losses.detach().sum(), "kl": z0 * n, "_n_d": d.sum(), "_n_u": u.sum(),
                "_rewards_d": (rewards * d).sum(), "_rewards_u": (rewards * u).sum(),
                "_logps_d": (logps.detach() * d).sum(), "_logps_u": (logps.detach() * u).sum()}
        return losses, sums, int(batch["attention_mask"].sum())

    def derived(self, record: dict, prefix: str = "") -> None:
        """Means over the desirable (chosen) and undesirable (rejected) examples, from the window's sums."""
        n_d, n_u = record.pop(f"{prefix}_n_d", 0), record.pop(f"{prefix}_n_u", 0)
        for name, side, n in (("rewards/chosen", "_rewards_d", n_d), ("rewards/rejected", "_rewards_u", n_u),
                              ("logps/chosen", "_logps_d", n_d), ("logps/rejected", "_logps_u", n_u)):
            value = record.pop(f"{prefix}{side}", None)
            if value is not None and n > 0:
                record[f"{prefix}{name}"] = value / n
        if f"{prefix}rewards/chosen" in record and f"{prefix}rewards/rejected" in record:
            record[f"{prefix}rewards/margins"] = record[f"{prefix}rewards/chosen"] - record[f"{prefix}rewards/rejected"]

    @classmethod
    def diagnose(cls, metrics: list[dict]) -> list[tuple[str, str]]:
        """A policy that never leaves the reference (the loss at its start, zero rewards), desirable answers rewarded
        below undesirable ones late in the run (inverted labels), and likelihood displacement (both log-probs
        falling). Desirable answers are logged as ``chosen``, undesirable ones as ``rejected``."""
        from ..diagnostics import likelihood_displacement, mean, series

        out = []
        loss = series(metrics, "loss")
        rewards = [abs(v) for key in ("rewards/chosen", "rewards/rejected") for _, v in series(metrics, key)[-3:]]
        if len(loss) >= 5 and all(abs(v - loss[0][1]) < 0.003 for _, v in loss[-3:]) and rewards and \
                max(rewards) < 1e-3:
            out.append(("warn", f"The loss stays at its starting value ({loss[-1][1]:.3f}) and the rewards stay at "
                                "zero: the policy still equals the reference, so the adapter is not learning. Check "
                                "that the learning rate is not tiny, that beta is not near 0, and that the LoRA "
                                "target modules exist."))
        margins = series(metrics, "rewards/margins")
        late = [v for _, v in margins[-max(2, len(margins) // 4):]]
        if len(margins) >= 8 and all(v < 0 for v in late) and mean(late) < -1e-3:
            out.append(("warn", f"Late in the run the desirable answers are rewarded below the undesirable ones "
                                f"(margin {mean(late):+.3f}): the model moves towards the thumbs-down answers. Check "
                                "that the labels are not inverted: label true must mean desirable (for pairs: "
                                "chosen must be the better answer)."))
        out += likelihood_displacement(metrics, ("desirable", "undesirable"),
                                       "Lower the learning rate, raise beta (it keeps the policy nearer its "
                                       "reference), or start from an SFT adapter (SFT first).")
        return out


TASK = KtoTask
