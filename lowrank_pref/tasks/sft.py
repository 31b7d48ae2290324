"""Supervised fine-tuning: next-token negative log-likelihood on the answer tokens only (completion-only loss).

The first step of the pipeline (SFT -> preferences -> reward model -> RL). Rows, detected from the columns:

- ``messages`` (or ShareGPT ``conversations`` without chosen/rejected): a conversation; every assistant turn carries
  loss, the rest (system, user, tool turns and the template's markup) does not;
- ``prompt`` + ``completion``: strings (the completion gets the eos token) or message lists (chat template);
- ``text``: plain text, every token carries loss;
- preference data (``chosen``/``rejected`` in any format data.py reads): the prompt and the chosen answer
  (``sft.source=chosen`` insists on this).

The adapter it saves is the natural ``adapter=`` of a later DPO or KTO run, where it is also the frozen reference.
A step's loss is the mean over its answer tokens (each example weighs its answer-token count), so long and short
examples count per token, however the step is split into micro-batches; metrics: loss, token accuracy, perplexity.
"""

from __future__ import annotations

import math

from .. import data as data_mod
from ..config import ConfigError
from ..data import DataReport, RowError
from ..logps import sequence_logps
from ..model import autocast
from .base import Task


class Example:
    """One tokenized SFT example: its tokens and which of them carry the loss."""
    __slots__ = ("input_ids", "loss_mask", "row")

    def __init__(self, input_ids: list[int], loss_mask: list[int], row: int = 0):
        self.input_ids, self.loss_mask, self.row = input_ids, loss_mask, row

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def answer_tokens(self) -> int:
        """Tokens the loss is over: loss positions with a token before them to predict them from."""
        return sum(self.loss_mask[1:])


def detect_sft_format(rows: list[dict], source: str, wanted: str) -> str:
    """messages | prompt_completion | text | a preference format (data.detect_format) for the chosen answers."""
    if not rows:
        raise data_mod.DataError(f"{source}: the dataset has no rows")
    cols = set(rows[0])
    if wanted != "chosen":
        if "messages" in cols or ("conversations" in cols and not {"chosen", "rejected"} & cols):
            return "messages"
        if {"prompt", "completion"} <= cols:
            return "prompt_completion"
        if "text" in cols and "chosen" not in cols:
            return "text"
    if {"chosen"} <= cols:
        return data_mod.detect_format(rows, source)
    need = "chosen/rejected preference columns" if wanted == "chosen" else \
        "messages, prompt/completion, text, or chosen/rejected columns"
    raise data_mod.DataError(f"{source}: SFT data needs {need}; columns are {', '.join(sorted(cols))}. Map yours with "
                             "e.g. data.columns.messages=<your column> or data.columns.completion=<your column>")


def segments(row: dict, fmt: str, tokenizer) -> tuple[list[tuple[str, bool]], bool]:
    """The row as (text, carries loss) pieces in order, and whether a chat template rendered them."""
    if fmt == "text":
        return [(data_mod._text(row, "text"), True)], False
    if fmt == "messages":
        col = "messages" if "messages" in row else "conversations"
        return _conversation_segments(data_mod._messages(row.get(col), col), tokenizer, col), True
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return [(data_mod._text(row, "prompt"), False), (data_mod._text(row, "completion"), True)], False
        prompt = data_mod._messages(prompt, "prompt", default_role="user")
        completion = data_mod._messages(completion, "completion", default_role="assistant")
    else:  # preference data: its prompt and chosen answer
        pair = data_mod.normalize_row(row, fmt)
        prompt, completion = pair["prompt"], pair["chosen"]
    prompt_text, (answer,), templated = data_mod.render_answers(prompt, {"completion": completion}, tokenizer)
    return [(prompt_text, False), (answer, True)], templated


def _conversation_segments(messages: list[dict], tokenizer, col: str) -> list[tuple[str, bool]]:
    """Each assistant turn is what the template adds between the conversation before it (with the generation
    prompt) and the conversation through it; everything else carries no loss."""
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(col, "has no assistant turn to learn from")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= done):
            raise RowError(col, f"the chat template does not render turn {i} as an extension of the turns before "
                                "it; set data.chat_template to a template that appends turns")
        pieces += [(full[done:len(before)], False), (through[len(before):], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, loss) for text, loss in pieces if text]


def prepare_sft(rows: list[dict], tokenizer, *, source: str, cfg, n_examples: int = 3):
    """Validate, render and tokenize SFT rows. Returns usable examples, the report, and a few rendered examples."""
    rows = data_mod.apply_column_mapping(rows, cfg.data.columns, source)
    fmt = detect_sft_format(rows, source, cfg.sft.source)
    label = fmt if fmt in ("messages", "prompt_completion", "text") else f"{fmt} (chosen answers)"
    report = DataReport(source=source, format=label, total_rows=len(rows), max_length=cfg.max_length,
                        unit="examples", lengths_are="prompt and answers",
                        answer_cut="the model never sees how those answers end, nor learns to stop there")
    examples, shown = [], []
    for i, row in enumerate(rows, 1):
        try:
            pieces, templated = segments(row, fmt, tokenizer)
            ids, mask, head, tail = _tokenize(pieces, templated, tokenizer, cfg)
            if not any(mask[1:]):
                raise RowError("completion", f"no answer tokens within max_length ({cfg.max_length})")
        except RowError as e:
            if cfg.data.on_bad_rows == "error":
                raise data_mod.DataError(f"{source}: row {i}, {e}. Fix the row, or set data.on_bad_rows=skip to skip "
                                         "rows like it") from None
            report.drop(str(e), i)
            continue
        report.lengths.append(len(ids) + len(head) + len(tail))
        report.truncated_prompts += bool(head)
        report.truncated_answers += bool(tail)
        if not cfg.sft.completion_only:
            mask = [1] * len(ids)
        examples.append(Example(ids, mask, row=i))
        if len(shown) < n_examples:
            side = {"name": "example", "tokens": len(ids), "loss_tokens": sum(mask[1:]),
                    "pieces": data_mod.display_pieces(tokenizer, [(head, "cut"), *_runs(ids, mask), (tail, "cut")])}
            note = ", ".join(n for n in ("chat template applied" if templated else "",
                                         "" if cfg.sft.completion_only else "loss on every token") if n)
            shown.append({"row": i, "segments": [[text, loss] for text, loss in pieces], "tokens": len(ids),
                          "answer_tokens": sum(mask[1:]), "truncated": bool(head or tail),
                          "templated": templated, "note": note, "sides": [side]})
    report.usable = len(examples)
    return examples, report, shown


def _runs(ids: list[int], mask: list[int]) -> list[tuple[list[int], str]]:
    """The kept tokens as alternating runs of no-loss ("prompt") and loss ("loss") tokens. The first token shows as
    no-loss whatever its mask: nothing before it predicts it."""
    shown = [0] + mask[1:]
    runs, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or shown[k] != shown[start]:
            runs.append((ids[start:k], "loss" if shown[start] else "prompt"))
            start = k
    return runs


def _tokenize(pieces: list[tuple[str, bool]], templated: bool, tokenizer, cfg) -> tuple[list, list, list, list]:
    """Token ids and loss mask of a row's pieces, truncated: a leading prompt from the left to max_prompt_length,
    then the whole from the right to max_length. Returns (ids, mask, the prompt tokens cut from the left, the tokens
    cut at the end): the data doctor shows what was cut."""
    ids, mask = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not templated else []
    head = []
    for k, (text, loss) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=k == 0 and not templated)["input_ids"]
        if loss:
            piece = piece + eos  # plain answers end with eos, so the model learns to stop
        if k == 0 and not loss and len(pieces) == 2 and len(piece) > cfg.max_prompt_length:
            head = piece[:len(piece) - cfg.max_prompt_length]
            piece = piece[-cfg.max_prompt_length:]
        ids += piece
        mask += [int(loss)] * len(piece)
    return ids[:cfg.max_length], mask[:cfg.max_length], head, ids[cfg.max_length:]


class SftTask(Task):
    name = "sft"
    unit = "examples"
    sequences_per_item = 1
    plots = [("Loss", {"loss": "train", "eval_loss": "eval"}),
             ("Token accuracy", {"token_accuracy": "train", "eval_token_accuracy": "eval"}),
             ("Perplexity", {"perplexity": "train", "eval_perplexity": "eval"}),
             ("Learning rate", {"learning_rate": "lr"})]
    fields = ("sft.completion_only",)

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.sft.source == "chosen" and any(r in cfg.data.columns for r in ("messages", "completion", "text")):
            raise ConfigError("sft.source=chosen reads the chosen answers of preference data; drop the "
                              "data.columns mapping of messages/completion/text, or set sft.source=auto")

    def prepare_rows(self, rows: list[dict], tokenizer, source: str):
        return prepare_sft(rows, tokenizer, source=source, cfg=self.cfg)

    def weight(self, item: Example) -> float:
        return float(item.answer_tokens)

    def micro_step_tokens(self, items: list) -> tuple[int, int]:
        return len(items) * max(e.num_tokens for e in items), sum(e.answer_tokens for e in items)

    def losses(self, model, items: list):
        batch = data_mod.collate_rows([(e.input_ids, e.loss_mask) for e in items], self.pad_id)
        with autocast(self.cfg):
            logps, lengths, hits = sequence_logps(model, batch, self.cfg.logprob_chunk_size, with_hits=True)
        nll = -logps  # (B,) summed over each example's answer tokens; the shell divides by the step's token count
        sums = {"loss": nll.detach().sum(), "token_accuracy": hits.sum()}
        return nll, sums, int(batch["attention_mask"].sum())

    def derived(self, record: dict, prefix: str = "") -> None:
        if f"{prefix}loss" in record:  # perplexity of the answer tokens: exp of the mean per-token NLL
            record[f"{prefix}perplexity"] = math.exp(min(record[f"{prefix}loss"], 50.0))

    @classmethod
    def diagnose(cls, metrics: list[dict]) -> list[tuple[str, str]]:
        """A loss that does not fall (nothing learned), and an eval loss that rises while the training loss still
        falls (overfitting)."""
        from ..diagnostics import mean, quarters, series

        out = []
        loss = series(metrics, "loss")
        if len(loss) >= 8:
            start, end = quarters(loss)
            if end > start - max(0.01, 0.02 * abs(start)):
                out.append(("warn", f"The training loss is not falling (first steps {start:.3f}, last steps "
                                    f"{end:.3f}): the adapter is not learning the answers. The learning rate may be "
                                    "too low (raise it), or the data gives little to learn: check in the Data tab "
                                    "that the answers carry the loss and are not cut away."))
        evals = series(metrics, "eval_loss")
        if len(evals) >= 3 and loss:
            best_step, best = min(evals, key=lambda p: p[1])
            last_step, last = evals[-1]
            then = [v for s, v in loss if s <= best_step][-3:]
            now = [v for _, v in loss[-3:]]
            if (best_step < last_step and last > best + max(0.01, 0.02 * abs(best)) and then
                    and mean(now) < mean(then)):
                out.append(("warn", f"The eval loss is rising (lowest {best:.3f} at step {best_step}, now {last:.3f} "
                                    f"at step {last_step}) while the training loss still falls: the adapter "
                                    "memorises its training examples (overfitting). Train fewer epochs or steps "
                                    f"(step {best_step} was the best so far), or lower the learning rate."))
        return out


TASK = SftTask
