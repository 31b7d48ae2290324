"""The Data tab, a data doctor for every task: what the task's data path keeps and drops, how long its items are,
and the first items as the model sees them (the tokens that carry the loss marked, what truncation cuts struck
through). It reads the data with the task's own ``prepare_rows``, as a run does, and renders the task's examples in
their one display shape, so nothing here knows a task by name.

It reads the first rows only (``AppState.doctor_rows``, 2,000 by default) and says so: the whole of a large upload,
tokenized in the app's process, took gigabytes that were never given back. The run itself reads every row.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ..config import Config
from ..tasks import task_class
from .common import DOCTOR_ROWS, AppState, on
from .setup import DATA_EXTENSIONS, SetupTab, form_config

PIECE_CLASS = {"prompt": "lp-prompt", "loss": "lp-loss", "cut": "lp-cut"}


def read_first_rows(cfg: Config, limit: int):
    """The first ``limit`` rows read as the task reads them: (report, examples, rows read, the row count or None).
    The data check and Start both read data through this, so Start refuses what the check refuses."""
    from ..data import ensure_chat_template, sample_rows
    from ..model import load_tokenizer

    tok = load_tokenizer(cfg)
    ensure_chat_template(tok, cfg.data.chat_template)
    rows, total = sample_rows(cfg.dataset, limit, cfg.dataset_split, cfg.trust_remote_code)
    _, report, examples = task_class(cfg.task)(cfg).prepare_rows(rows, tok, source=cfg.dataset)
    return report, examples, rows, total


def no_usable(report) -> str:
    """The check's verdict on data with no usable item, "" when there are some."""
    if report.usable:
        return ""
    reasons = "; ".join(f"{n} × {reason}" for reason, n in report.dropped.most_common(3))
    return f"No usable {report.unit}: training would stop at once" + (f" ({reasons})" if reasons else "") + "."


def data_refusal(cfg: Config, limit: int) -> str:
    """Why Start must not start on this data, in the data check's words ("" when it may): an unreadable file or
    wrong columns raise the check's own error; no usable item in the first ``limit`` rows is said here."""
    report, *_ = read_first_rows(cfg, limit)
    verdict = no_usable(report)
    return f"not started: {verdict} Check the data (Data tab) shows every skipped row." if verdict else ""


def doctor(cfg: Config, limit: int = DOCTOR_ROWS) -> tuple[str, dict, str]:
    """Report (markdown), the token-length histogram (an update: its frame, and a title in the task's words), and
    the first items as the model sees them (HTML), for the first ``limit`` rows. The report's text is HTML-escaped:
    it quotes the data (column names, reasons)."""
    report, examples, rows, total = read_first_rows(cfg, limit)
    unit = report.unit
    lines = [f"**Format:** {report.format} · **rows:** {report.total_rows} · **usable {unit}:** {report.usable}"]
    if total is None or total > len(rows):
        of = f"{total:,}" if total else "more"
        lines.append(f"**Checked the first {len(rows):,} of {of} rows**: the data check reads at most {limit:,}; a run "
                     "reads them all, and its log says what it kept and skipped.")
    dropped = sum(report.dropped.values())
    if dropped:
        lines.append(f"**Skipped {dropped} row(s):**")
        for reason, n in report.dropped.most_common():
            rows_ = ", ".join(map(str, report.dropped_rows[reason]))
            lines.append(f"- {n} × {reason} (rows {rows_}{', …' if n > 5 else ''})")
    else:
        lines.append("No rows skipped: every row could be read and used.")
    over = sum(n > cfg.max_length for n in report.lengths)
    lines.append(f"**Lengths** ({report.lengths_are}): {over} of {len(report.lengths)} {unit} are longer than "
                 f"max_length ({cfg.max_length}); {report.truncated_prompts} prompt(s) cut from the left to "
                 f"max_prompt_length ({cfg.max_prompt_length}).")
    share = report.truncated_answers / max(report.usable, 1)
    lines.append(f"**Answers cut by max_length** in {report.truncated_answers} {unit.rstrip('s')}(s), {share:.0%}"
                 + (f": {report.answer_cut}. Raise max_length if you can." if report.truncated_answers else "."))
    if not report.usable:
        lines.append(f"**{no_usable(report)}**")
    legend = ('<div class="lp-legend"><span class="lp-prompt">no loss (prompt, markup)</span> '
              '<span class="lp-loss">tokens that carry the loss</span> '
              '<span class="lp-cut">cut by truncation</span></div>')
    frame = length_histogram(report.lengths, cfg.max_length)
    hist = gr.update(value=frame, y_title=unit, x_title=f"tokens (max_length {cfg.max_length})",
                     sort=list(dict.fromkeys(frame["tokens"])) if frame is not None else None,
                     title=f"Tokens per {unit.rstrip('s')} ({report.lengths_are}), max_length {cfg.max_length}")
    return html.escape("\n\n".join(lines), quote=False), hist, legend + "".join(example_html(e) for e in examples)


def example_html(example: dict) -> str:
    """One example in the tasks' shared display shape (``Task.prepare_rows``): a header line, then each side's
    token runs, marked by kind."""
    sides = []
    for side in example["sides"]:
        pieces = "".join(f'<span class="{PIECE_CLASS[kind]}">{html.escape(text)}</span>'
                         for text, kind in side["pieces"])
        sides.append(f'<div class="lp-side"><b>{html.escape(side["name"])}</b> ({side["tokens"]} tokens, '
                     f'{side["loss_tokens"]} with loss)<pre>{pieces}</pre></div>')
    note = f' · {html.escape(example["note"])}' if example.get("note") else ""
    return f'<div class="lp-example"><div>row {example["row"]}{note}</div>{"".join(sides)}</div>'


WITHIN, OVER = "within max_length", "over max_length"
HIST_COLORS = {WITHIN: "#16a34a", OVER: "#dc2626"}


def length_histogram(lengths: list[int], max_length: int, bins_within: int = 8, most: int = 24
                     ) -> pd.DataFrame | None:
    """Counts of items by token length, in bins labelled "0-11", "12-23", ... from 0 (the axis started at -1,000
    tokens when the bins were numbers), with max_length on a bin edge: ``bins_within`` bins up to it, then as many
    over it as the data needs, the last one open ("≥ 960") when that would be more than ``most`` bins. Both
    colours are in every frame (a zero-count row if need be): the plot keeps the colours it was first drawn with,
    so a second check whose items were all over max_length drew nothing under the first one's legend."""
    if not lengths:
        return None
    width = max(1, -(-max_length // bins_within))
    count = min(max(bins_within, -(-(max(lengths) + 1) // width)), most)
    counts = [0] * count
    for n in lengths:
        counts[min(n // width, count - 1)] += 1
    last_open = max(lengths) >= count * width
    labels = [f"{i * width:,}-{(i + 1) * width - 1:,}" for i in range(count)]
    if last_open:
        labels[-1] = f"≥ {(count - 1) * width:,}"
    rows = [{"tokens": label, "count": n, "fits": WITHIN if (i + 1) * width <= max_length else OVER}
            for i, (label, n) in enumerate(zip(labels, counts))]
    for colour in (WITHIN, OVER):
        if not any(r["fits"] == colour for r in rows):
            rows.append({"tokens": labels[0 if colour == WITHIN else -1], "count": 0, "fits": colour})
    return pd.DataFrame(rows)


def check_data(app: AppState, preset: str, upload: str | None, *values) -> tuple[str, dict, str]:
    """The doctor on the data Start would train on: the uploaded file (read where Gradio put it: a check keeps
    nothing on the server), else the form's dataset."""
    report, hist, examples = doctor(form_config(app, preset, upload, list(values)), app.doctor_rows)
    hist["visible"] = True
    return app.message(report), hist, examples


def clear_check() -> tuple[str, dict, str]:
    return "", gr.update(value=None, visible=False), ""


def upload_box() -> gr.File:
    """The data file box. Made before the tabs (``render=False``) because Setup's command reads it too; the Data
    tab places it."""
    return gr.File(label="Training data (.jsonl, .json, .csv, .parquet)", file_types=list(DATA_EXTENSIONS),
                   type="filepath", render=False)


@dataclass
class DataTab:
    upload: gr.File


def create_data_tab(app: AppState, setup: SetupTab, upload: gr.File) -> DataTab:
    """Build the Data tab inside the current ``gr.Tab``: the upload box (from :func:`upload_box`) and the doctor."""
    gr.Markdown("Upload a `.jsonl`, `.json`, `.csv` or `.parquet` file, or leave it empty to use the dataset named "
                "in Setup. The check reads it as the task chosen in Setup would; formats are detected from the "
                "columns. Preference pairs (dpo, reward; kto splits each pair into a thumbs-up and a thumbs-down "
                "row): prompt/chosen/rejected strings or messages, HH-style transcripts, UltraFeedback, ShareGPT. "
                "Unpaired feedback (kto): prompt/completion/label. Demonstrations (sft): conversations "
                "(`messages`), prompt/completion or `text` rows, or the chosen answers of preference pairs.")
    upload.render()
    check = gr.Button("Check the data", variant="secondary")
    report = gr.Markdown(elem_classes="lp-report")
    hist = gr.BarPlot(x="tokens", y="count", color="fits", title="Tokens per item", height=240, color_map=HIST_COLORS,
                      x_label_angle=-45, visible=False, elem_classes="lp-hist")
    examples = gr.HTML()
    # the last check's results go as soon as the file changes or a check starts: a failed check left the previous
    # file's report under its error
    outputs = [report, hist, examples]
    upload.change(clear_check, None, outputs, api_name=False, show_progress="hidden")
    cleared = check.click(clear_check, None, outputs, api_name=False, show_progress="hidden")
    # with the session (common.on): the form's reward model is one of this visitor's runs
    on(cleared.then, check_data, app, [setup.preset, upload, *setup.form], outputs, api_name="doctor")
    return DataTab(upload)
