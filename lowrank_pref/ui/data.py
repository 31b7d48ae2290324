"""The Data tab, a preference-data doctor: what the data path keeps and drops, how long the pairs are, and the first
pairs as the model sees them (the tokens that carry the loss marked, what truncation cuts struck through).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ..config import Config
from .common import AppState, event
from .setup import DATA_EXTENSIONS, SetupTab, config_from_form


def doctor(cfg: Config) -> tuple[str, pd.DataFrame | None, str]:
    """Report (markdown), token-length histogram, and the first pairs as the model sees them (HTML)."""
    from ..data import ensure_chat_template, load_rows, prepare, tokenize_rendered, truncate
    from ..model import load_tokenizer

    tok = load_tokenizer(cfg)
    ensure_chat_template(tok, cfg.data.chat_template)
    rows = load_rows(cfg.dataset, cfg.dataset_split, cfg.trust_remote_code)
    pairs, report, examples = prepare(rows, tok, source=cfg.dataset, columns=cfg.data.columns,
                                      max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    lines = [f"**Format:** {report.format} · **rows:** {report.total_rows} · **usable pairs:** {report.usable}"]
    dropped = sum(report.dropped.values())
    if dropped:
        lines.append(f"**Skipped {dropped} row(s):**")
        for reason, n in report.dropped.most_common():
            rows_ = ", ".join(map(str, report.dropped_rows[reason]))
            lines.append(f"- {n} × {reason} (rows {rows_}{', …' if n > 5 else ''})")
    else:
        lines.append("No rows skipped: no empty, identical or malformed pairs.")
    over = sum(n > cfg.max_length for n in report.lengths)
    lines.append(f"**Lengths:** {over} of {len(report.lengths)} pairs are longer than max_length ({cfg.max_length}); "
                 f"{report.truncated_prompts} prompt(s) cut from the left to max_prompt_length "
                 f"({cfg.max_prompt_length}).")
    share = report.truncated_answers / max(report.usable, 1)
    lines.append(f"**Truncation cuts into the answers** (where chosen and rejected differ) in "
                 f"{report.truncated_answers} pair(s), {share:.0%}."
                 + (" Raise max_length, or these pairs teach from a partial difference." if share > 0.1 else ""))
    if not report.usable:
        lines.append("**No usable pairs: training would stop at once.**")
    hist = length_histogram(report.lengths, cfg.max_length)

    shown = []
    rendered = [(e["prompt"], e["chosen"], e["rejected"], e["templated"]) for e in examples]
    for e, (p, c, r) in zip(examples, tokenize_rendered(tok, rendered) if rendered else []):
        p2, c2, r2, _, _ = truncate(p, c, r, cfg.max_length, cfg.max_prompt_length)
        cut_prompt = p[:len(p) - len(p2)]

        def piece(ids, cls):
            return f'<span class="{cls}">{html.escape(tok.decode(ids))}</span>' if ids else ""

        sides = []
        for name, full, kept in (("chosen", c, c2), ("rejected", r, r2)):
            sides.append(f'<div class="lp-side"><b>{name}</b> ({len(kept)} tokens)<pre>'
                         f'{piece(cut_prompt, "lp-cut")}{piece(p2, "lp-prompt")}{piece(kept, "lp-loss")}'
                         f'{piece(full[len(kept):], "lp-cut")}</pre></div>')
        shown.append(f'<div class="lp-example"><div>row {e["row"]} · prompt {len(p2)} tokens'
                     f'{" · chat template applied" if e["templated"] else ""}</div>{"".join(sides)}</div>')
    legend = ('<div class="lp-legend"><span class="lp-prompt">prompt (no loss)</span> '
              '<span class="lp-loss">answer tokens that carry the loss</span> '
              '<span class="lp-cut">cut by truncation</span></div>')
    return "\n\n".join(lines), hist, legend + "".join(shown)


def length_histogram(lengths: list[int], max_length: int, bins: int = 16) -> pd.DataFrame | None:
    if not lengths:
        return None
    top = max(max(lengths), max_length)
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return pd.DataFrame({"tokens": [i * width for i in range(bins)], "pairs": counts,
                         "fits": ["within max_length" if (i + 1) * width <= max_length else "over max_length"
                                  for i in range(bins)]})


def check_data(app: AppState, preset: str, upload: str | None, *values) -> tuple[str, pd.DataFrame | None, str]:
    """The doctor on the data Start would train on: the uploaded file, else the form's dataset."""
    return doctor(config_from_form(preset, upload, list(values), app.uploads))


def upload_box() -> gr.File:
    """The data file box. Made before the tabs (``render=False``) because Setup's command reads it too; the Data
    tab places it."""
    return gr.File(label="Preference data", file_types=list(DATA_EXTENSIONS), type="filepath", render=False)


@dataclass
class DataTab:
    upload: gr.File


def create_data_tab(app: AppState, setup: SetupTab, upload: gr.File) -> DataTab:
    """Build the Data tab inside the current ``gr.Tab``: the upload box (from :func:`upload_box`) and the doctor."""
    gr.Markdown("Upload a `.jsonl`, `.json`, `.csv` or `.parquet` file of preference pairs, or leave it empty "
                "to use the dataset named in Setup. Formats are detected: prompt/chosen/rejected strings or "
                "messages, HH-style transcripts, UltraFeedback, ShareGPT.")
    upload.render()
    check = gr.Button("Check the data", variant="secondary")
    report = gr.Markdown()
    hist = gr.BarPlot(x="tokens", y="pairs", color="fits", title="Tokens per pair (prompt + longer answer)",
                      height=220)
    examples = gr.HTML()
    check.click(event(check_data, app), [setup.preset, upload, *setup.form], [report, hist, examples],
                api_name="doctor")
    return DataTab(upload)
