"""The Gradio app: its pieces and handlers called directly (no browser, no server), the run manager's chains, then
the whole thing through gradio_client against a launched app."""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from conftest import free_port, wait_for_run, wait_until, write_pairs
from lowrank_pref.artifacts import RunDir, process_start
from lowrank_pref.config import ConfigError, build_config, dump_yaml
from lowrank_pref.diagnostics import LN2, diagnose
from lowrank_pref.run import parser, resolve
from lowrank_pref.tasks import TASKS, task_class
from lowrank_pref.ui import KEYS, AppState, UserError, cli_command, config_from_form, form_values, suggest_preset
from lowrank_pref.ui import data as data_tab
from lowrank_pref.ui import export as export_tab
from lowrank_pref.ui import setup as setup_tab
from lowrank_pref.ui import train as train_tab
from lowrank_pref.ui import tryit as try_tab

CPU = {"gpu": None, "memory_gb": 16.0}


# ---- pieces -------------------------------------------------------------------------------------------------------

def _dpo_metrics(n, loss=0.5, margin=0.5, chosen=lambda s: -40.0, rejected=lambda s: -50.0, **extra):
    return [{"step": s, "loss": loss, "rewards/margins": margin, "rewards/accuracies": 0.8,
             "logps/chosen": chosen(s), "logps/rejected": rejected(s), "nonfinite_steps": 0, **extra}
            for s in range(1, n + 1)]


def test_diagnostics_name_each_known_failure():
    levels = lambda ms, **kw: {lvl for lvl, _ in diagnose(ms, **{"task": "dpo", **kw})}  # noqa: E731
    text = lambda ms, **kw: " ".join(t for _, t in diagnose(ms, **{"task": "dpo", **kw}))  # noqa: E731
    assert levels(_dpo_metrics(10)) == {"ok"}
    assert "policy still equals the reference" in text(_dpo_metrics(10, loss=LN2, margin=0.0))
    falling = _dpo_metrics(12, chosen=lambda s: -40 - s, rejected=lambda s: -50 - 2 * s)
    assert "likelihood displacement" in text(falling)
    assert "bf16" in text(_dpo_metrics(4, nonfinite_steps=3))
    key = "eval_rewards/accuracies"
    stuck = _dpo_metrics(10) + [{"step": 5, key: 0.5}, {"step": 10, key: 0.52}]
    assert "stuck near 0.5" in text(stuck, total_steps=10)
    learning = _dpo_metrics(10) + [{"step": 5, key: 0.7}, {"step": 10, key: 0.9}]
    assert levels(learning, total_steps=10) == {"ok"}
    reward_flat = [{"step": s, "loss": LN2, "accuracy": 0.5} for s in range(1, 8)]
    assert "scores chosen and rejected alike" in text(reward_flat, task="reward")


def test_task_rules_come_from_the_task_and_shared_rules_from_diagnostics():
    from lowrank_pref.tasks import task_class
    from lowrank_pref.tasks.base import Task

    flat = _dpo_metrics(10, loss=LN2, margin=0.0)
    assert task_class("dpo").diagnose(flat) and Task.diagnose(flat) == []
    # no task (one this install lacks): only the shared rules, which still see a non-finite step
    assert [lvl for lvl, _ in diagnose(flat)] == ["ok"]
    assert [lvl for lvl, _ in diagnose(_dpo_metrics(4, nonfinite_steps=1))] == ["error"]
    # the eval-accuracy rule reads the task's accuracy_key: the reward task's is "accuracy"
    stuck = [{"step": s, "loss": 0.3, "accuracy": 0.9} for s in range(1, 9)] + [
        {"step": 4, "eval_accuracy": 0.5}, {"step": 8, "eval_accuracy": 0.49}]
    assert "stuck near 0.5" in " ".join(t for _, t in diagnose(stuck, "reward", total_steps=8))


def _sft_metrics(n, loss=lambda s: 3.0 - 0.1 * s, evals=()):
    """Train records of ``n`` steps, then ``evals`` as (step, eval loss)."""
    return [{"step": s, "loss": loss(s), "token_accuracy": 0.4, "nonfinite_steps": 0} for s in range(1, n + 1)] + [
        {"step": s, "eval_loss": v, "eval_token_accuracy": 0.5} for s, v in evals]


def _kto_metrics(n, loss=lambda s: 0.5 - 0.01 * s, desirable=lambda s: 0.02 * s, undesirable=lambda s: -0.02 * s,
                 chosen=lambda s: -40.0, rejected=lambda s: -50.0):
    return [{"step": s, "loss": loss(s), "rewards/chosen": desirable(s), "rewards/rejected": undesirable(s),
             "rewards/margins": desirable(s) - undesirable(s), "kl": 0.1, "logps/chosen": chosen(s),
             "logps/rejected": rejected(s), "nonfinite_steps": 0} for s in range(1, n + 1)]


def test_sft_diagnostics_read_the_loss_curves():
    text = lambda ms: " ".join(t for _, t in diagnose(ms, "sft", total_steps=20))  # noqa: E731
    assert [lvl for lvl, _ in diagnose(_sft_metrics(20, evals=[(10, 2.0), (20, 1.5)]), "sft")] == ["ok"]
    assert "loss is not falling" in text(_sft_metrics(20, loss=lambda s: 2.0 + 0.01 * (s % 2)))
    overfit = _sft_metrics(20, evals=[(5, 2.0), (10, 1.8), (15, 2.1), (20, 2.4)])
    assert "overfitting" in text(overfit) and "step 10 was the best" in text(overfit)
    # the eval loss rises, but so does the training loss: not overfitting (the other rule speaks)
    assert "overfitting" not in text(_sft_metrics(20, loss=lambda s: 2.0 + 0.05 * s,
                                                  evals=[(5, 2.0), (10, 1.8), (15, 2.1), (20, 2.4)]))
    # a token accuracy is no pairwise accuracy: an eval token accuracy of 0.5 is not "chance"
    assert task_class("sft").accuracy_key == "" and "stuck near 0.5" not in text(
        _sft_metrics(20, evals=[(10, 2.0), (20, 1.5)]))


def test_kto_diagnostics_read_rewards_margins_and_log_probs():
    text = lambda ms: " ".join(t for _, t in diagnose(ms, "kto", total_steps=12))  # noqa: E731
    assert [lvl for lvl, _ in diagnose(_kto_metrics(12), "kto")] == ["ok"]
    stuck = _kto_metrics(12, loss=lambda s: 0.5, desirable=lambda s: 0.0, undesirable=lambda s: 0.0)
    assert "policy still equals the reference" in text(stuck)
    inverted = _kto_metrics(12, desirable=lambda s: -0.02 * s, undesirable=lambda s: 0.02 * s)
    assert "labels are not inverted" in text(inverted)
    early_only = _kto_metrics(12, desirable=lambda s: 0.05 * (s - 4), undesirable=lambda s: 0.0)
    assert "inverted" not in text(early_only)  # negative at the start, positive late: learning, not inverted
    falling = _kto_metrics(12, chosen=lambda s: -40 - s, rejected=lambda s: -50 - 2 * s)
    assert "likelihood displacement" in text(falling) and "desirable -" in text(falling)
    # the same rule, one function, for dpo: its own words and its own fix
    dpo = " ".join(t for _, t in diagnose(_dpo_metrics(12, chosen=lambda s: -40 - s, rejected=lambda s: -50 - 2 * s),
                                          "dpo"))
    assert "Both chosen and rejected log-probs are falling" in dpo and "rpo_alpha" in dpo


def test_preset_suggested_from_the_card():
    assert suggest_preset({"gpu": None}) == "tiny"
    assert suggest_preset({"gpu": "RTX 2060", "memory_gb": 5.8}) == "6gb-dpo"
    assert suggest_preset({"gpu": "RTX 4060", "memory_gb": 7.6}) == "8gb-dpo"  # an 8 GB card reports 7.6 GiB
    assert suggest_preset({"gpu": "RTX 3060", "memory_gb": 11.8}) == "12gb-dpo"
    assert suggest_preset({"gpu": "RTX 4090", "memory_gb": 23.6}, task="reward") == "24gb-reward"
    assert suggest_preset({"gpu": "A100", "memory_gb": 80}) == "24gb-dpo"


def test_memory_estimate_says_whether_it_fits():
    from lowrank_pref.ui import memory_line

    cfg = build_config("24gb-dpo")  # an 8B model: known architecture, no download
    roomy = memory_line(cfg, {"gpu": "RTX 4090", "memory_gb": 24.0})
    assert roomy.startswith("Estimated peak memory") and " fits" in roomy
    # each part with its unit, two decimals at most
    part = r"[a-z ]+ \d+\.\d{1,2} [GM]B"
    assert re.search(rf"\*\*\d+\.\d\d GB\*\* .*\. \((?:{part}, )+{part}\)$", roomy), roomy
    assert "does not fit" in memory_line(cfg, {"gpu": "GTX 1060", "memory_gb": 6.0})


def test_the_shown_command_repeats_the_form():
    values = form_values(build_config("12gb-dpo"))
    values[KEYS.index("beta")] = 0.05
    values[KEYS.index("lora.r")] = 32.0  # number boxes send floats
    values[KEYS.index("max_steps")] = 300
    cfg = config_from_form("12gb-dpo", None, values)
    command = cli_command("12gb-dpo", cfg)
    assert "beta=0.05" in command and "lora.r=32" in command and "max_steps=300" in command
    again = resolve(parser().parse_args(command.split()[3:]))
    again.output_dir = cfg.output_dir
    assert again == cfg


def test_uploads_are_kept_by_content_so_a_runs_data_never_changes(tmp_path):
    from lowrank_pref.ui import store_upload

    first = tmp_path / "in" / "pairs.jsonl"
    first.parent.mkdir()
    first.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    kept = store_upload(str(first), tmp_path / "uploads")
    assert store_upload(str(first), tmp_path / "uploads") == kept
    first.write_text('{"prompt": "x", "chosen": "y", "rejected": "z"}\n')  # the same name, other data
    other = store_upload(str(first), tmp_path / "uploads")
    assert other != kept and '"a"' in kept.read_text() and '"x"' in other.read_text()
    script = tmp_path / "in" / "run.py"
    script.write_text("print(1)\n")
    with pytest.raises(UserError, match="upload a .jsonl"):
        store_upload(str(script), tmp_path / "uploads")


# ---- handlers, called directly -------------------------------------------------------------------------------

def _form(max_steps=None, preset="tiny", **changes):
    values = form_values(build_config(preset))
    if max_steps:
        values[KEYS.index("max_steps")] = max_steps
    for key, value in changes.items():
        values[KEYS.index(key)] = value
    return values


def _fake_run(root: Path, name: str, task: str, metrics: list[dict], **status) -> RunDir:
    """A run folder as a run leaves it, without training one."""
    run = RunDir(root / name).create()
    run.config.write_text(f"reference: base\n{dump_yaml(build_config('tiny', overrides={'task': task}))}")
    run.write_status(task=task, **status)
    for m in metrics:
        run.append_metrics(m)
    return run


def test_setup_handlers_fill_the_form_and_show_the_command(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    *values, estimate, command, yaml_text = setup_tab.preset_changed(app, "tiny")
    assert values == form_values(build_config("tiny")) and len(values) == len(KEYS)
    assert estimate.startswith("Estimated peak memory") and command == "python -m lowrank_pref.run --preset tiny"
    estimate, command, yaml_text, marker = setup_tab.settings_changed(app, "tiny", "/somewhere/mine.jsonl", False,
                                                                      *_form(beta=0.2))
    assert "beta=0.2" in command and "'dataset=<uploaded: mine.jsonl>'" in command and "mine.jsonl" in yaml_text
    # under the dataset box: the upload replaces it; and no field is marked
    assert "uploaded file <b>mine.jsonl</b>" in marker and "<style>" not in marker
    # the form is three named rows and the folded Advanced rows, and the task radio offers this install's tasks
    rows = (setup_tab.WHAT_ROW, setup_tab.OBJECTIVE_ROW, setup_tab.SIZE_ROW, setup_tab.ADVANCED_ROW)
    assert KEYS == [k for row in rows for k, _ in row]
    assert set(TASKS) == {"sft", "dpo", "kto", "reward", "rl"}


def test_the_advanced_settings_reach_the_config_and_a_bad_one_is_named_and_marked(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    cfg = config_from_form("tiny", None, _form(**{
        "lora.dropout": 0.1, "lora.target_modules": "q_proj, v_proj", "gradient_checkpointing": "on", "dtype": "bf16",
        "eval_steps": 5, "save_steps": 10, "data.columns": "prompt=question, chosen=good", "eval_dataset": "x.jsonl",
        "run_name": "mine"}))
    assert (cfg.lora.dropout, cfg.lora.target_modules, cfg.gradient_checkpointing, cfg.dtype) == (
        0.1, ["q_proj", "v_proj"], True, "bf16")
    assert (cfg.eval_steps, cfg.save_steps, cfg.data.columns, cfg.eval_dataset) == (
        5, 10, {"prompt": "question", "chosen": "good"}, "x.jsonl")
    assert form_values(cfg)[KEYS.index("data.columns")] == "prompt=question, chosen=good"
    assert config_from_form("tiny", None, _form(eval_steps=0, gradient_checkpointing="auto")).eval_steps is None
    # a refused value: the estimate line says why with the field's label, and that field alone is marked
    estimate, command, _, marker = setup_tab.settings_changed(app, "tiny", None, False, *_form(**{"lora.r": 0}))
    assert "LoRA rank ('lora.r') must be &gt;= 1" in estimate and command == gr.update()
    assert "#lp-field-lora-r input" in marker and marker.count("#lp-field-") == 3  # this field only
    estimate = setup_tab.settings_changed(app, "tiny", None, False, *_form(**{"data.columns": "nope"}))[0]
    assert "role=column" in estimate
    with pytest.raises(UserError, match=r"Run name .*letters, digits"):
        train_tab.start(app, "tiny", None, False, *_form(run_name="../up"))
    # a CLI message that names a column key points at the field that takes it
    assert setup_tab.name_fields("map yours with e.g. data.columns.chosen=<your column>") == \
        "map yours with e.g. chosen=<your column> in Column mapping (Setup, Advanced)"
    # presets by card size as numbers, each named once
    names = [value for _, value in setup_tab.preset_choices()]
    assert names.index("6gb-dpo") < names.index("12gb-dpo") and names[0] == "tiny"
    assert all(label.count(value) == 1 for label, value in setup_tab.preset_choices())


def test_settings_are_saved_and_loaded_as_yaml(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    saved = setup_tab.save_settings(app, "tiny", None, *_form(beta=0.25, **{"lora.dropout": 0.2}))
    assert Path(saved).name == setup_tab.SETTINGS_FILE
    assert build_config(config_file=saved).beta == 0.25  # the CLI reads it as it is
    *values, note = setup_tab.load_settings(app, "tiny", saved)
    assert values == _form(beta=0.25, **{"lora.dropout": 0.2}) and "Loaded" in note and "Not used" not in note
    extra = tmp_path / "more.yaml"
    extra.write_text("beta: 0.3\nwarmup_ratio: 0.2\n")
    *values, note = setup_tab.load_settings(app, "tiny", str(extra))
    assert values[KEYS.index("beta")] == 0.3 and "`warmup_ratio=0.2`" in note
    extra.write_text("lora:\n  r: 0\n")
    with pytest.raises(ConfigError, match=r"more.yaml.*'lora.r' must be >= 1"):
        setup_tab.load_settings(app, "tiny", str(extra))


def test_the_form_shows_and_reads_only_the_tasks_own_fields(tmp_path):
    """Every task's objective keys are made once; the selected task's are shown, and only those override the
    preset, so what was typed for one task never reaches another's run."""
    app = AppState(tmp_path / "runs", hw=CPU)
    keys = setup_tab.task_field_keys()
    assert set(keys) == {k for t in TASKS for k in task_class(t).fields} <= set(KEYS)
    assert len(set(keys)) == len(keys)
    shown = lambda task: [k for k, u in zip(keys, setup_tab.task_changed(app, task)) if u["visible"]]  # noqa: E731
    # the reward model too, for every task that generates (rl trains against it, the others are judged by it)
    assert shown("dpo") == ["loss_type", "beta", "rpo_alpha", "reward_model"]
    assert shown("kto") == ["beta", "kto.desirable_weight", "kto.undesirable_weight", "reward_model"]
    assert shown("sft") == ["sft.completion_only", "reward_model"] and shown("reward") == ["center_rewards_coefficient"]

    # dpo values left in the hidden boxes: not read for kto (rpo_alpha and loss_type would refuse the run)
    cfg = config_from_form("tiny", None, _form(task="kto", rpo_alpha=0.2, loss_type="ipo", beta=0.3,
                                               **{"kto.desirable_weight": 1.5}))
    assert (cfg.task, cfg.rpo_alpha, cfg.loss_type, cfg.beta, cfg.kto.desirable_weight) == ("kto", None, "sigmoid",
                                                                                           0.3, 1.5)
    cfg = config_from_form("tiny-sft", None, _form(preset="tiny-sft", beta=0.9, **{"sft.completion_only": False}))
    assert cfg.sft.completion_only is False and cfg.beta == build_config("tiny-sft").beta
    assert config_from_form("tiny", None, _form(rpo_alpha=0.2)).rpo_alpha == 0.2  # dpo's own: read
    cfg = config_from_form("tiny-reward", None, _form(preset="tiny-reward", center_rewards_coefficient=0.01))
    assert cfg.center_rewards_coefficient == 0.01
    # the inputs: a checkbox for a switch, and hidden unless the preset's task has the key
    sft_cfg = build_config("tiny-sft")
    box = setup_tab._field("sft.completion_only", "x", sft_cfg)
    assert box.__class__.__name__ == "Checkbox" and box.visible and not setup_tab._field("beta", "x", sft_cfg).visible


def test_sft_first_is_refused_plainly_where_it_cannot_apply(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    # a reward model starts from the base (and, before the sft task lands, there is no SFT task at all)
    with pytest.raises(UserError, match="SFT first"):
        train_tab.start(app, "tiny", None, True, *_form(task="reward"))
    assert app.manager.runs() == []


def test_doctor_handler_reads_an_upload(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    data = write_pairs(tmp_path / "mine.jsonl", n=20)
    report, hist, examples = data_tab.check_data(app, "tiny", str(data), *_form())
    assert "usable pairs:** 20" in report and 'class="lp-loss"' in examples
    assert int(hist["value"]["count"].sum()) == 20
    assert not app.uploads.exists()  # a check keeps nothing on the server: the upload is read where it is


def test_doctor_reads_the_data_as_each_task_does(tmp_path):
    """The same 240 pairs through each task's own data path: sft trains on one example per pair (the chosen
    answer), kto on two (a thumbs-up and a thumbs-down); each is counted, titled and shown in its own words."""
    app = AppState(tmp_path / "runs", hw=CPU)
    report, hist, examples = data_tab.check_data(app, "tiny-sft", None, *_form(preset="tiny-sft"))
    assert "**rows:** 240 · **usable examples:** 240" in report and "pairs" not in report
    assert hist["title"] == "Tokens per example (prompt and answers), max_length 96"
    assert int(hist["value"]["count"].sum()) == 240
    assert examples.count("<b>example</b>") == 3 and examples.count('class="lp-cut"') == 1  # the legend's
    # answers cut by max_length: said in sft's words, and struck through in the examples
    report, _, examples = data_tab.check_data(app, "tiny-sft", None, *_form(preset="tiny-sft", max_length=40,
                                                                           max_prompt_length=20))
    assert "the model never sees how those answers end" in report and examples.count('class="lp-cut"') > 1

    report, hist, examples = data_tab.check_data(app, "tiny-kto", None, *_form(preset="tiny-kto"))
    assert "**usable examples:** 480" in report and int(hist["value"]["count"].sum()) == 480
    assert "<b>desirable</b>" in examples and "<b>undesirable</b>" in examples
    report, _, _ = data_tab.check_data(app, "tiny-kto", None, *_form(preset="tiny-kto", max_length=40,
                                                                      max_prompt_length=20))
    assert "judged desirable or undesirable on part of its answer" in report


def test_train_tab_plots_come_from_the_runs_task(tmp_path, monkeypatch):
    app = AppState(tmp_path / "runs", hw=CPU)
    dpo, reward = task_class("dpo"), task_class("reward")
    slots = train_tab.plot_slots()
    assert slots == max(len(task_class(name).plots) for name in TASKS) >= max(len(dpo.plots), len(reward.plots))
    _fake_run(app.manager.root, "r1", "reward", [{"step": 1, "loss": 0.6, "accuracy": 0.7, "margin": 0.2}],
              state="completed", step=1, total_steps=1)
    *layout, message = train_tab.plot_layout(app, "r1", "Resuming **dpo-1** from its last checkpoint.")
    shown = [u for u in layout if u.get("visible")]
    assert [u.get("title") for u in shown] == [title for title, _ in reward.plots]
    assert all(u.get("visible") is False for u in layout[len(shown):])  # the slots another task uses: hidden
    assert message == ""  # a message about another run goes when this one is selected
    assert train_tab.plot_layout(app, "r1", "Renamed **r0** to **r1**.")[-1] == gr.update()
    # progress, diagnostics and log: emptied until this run's refresh (they showed the run selected before)
    assert train_tab.run_selected(app, "r1")[-3:] == ["", "", ""]
    progress, *frames, diagnostics, log = train_tab.refresh(app, "r1")
    assert len(frames) == slots and set(frames[1]["series"]) == {"train", "eval"}  # the reward task's accuracy plot
    # every series of the plot is in the frame from the first draw (the page fixes its series then): eval, without
    # points yet, as one empty row
    eval_rows = frames[1][frames[1]["series"] == "eval"]
    assert len(eval_rows) == 1 and eval_rows["value"].isna().all()
    assert "completed" in progress and "train accuracy 0.70" in diagnostics

    # a task with fewer plots than there are slots: the rest are hidden; one with more: more slots
    monkeypatch.setattr(reward, "plots", reward.plots[:3])
    assert [u["visible"] for u in train_tab.plot_layout(app, "r1")[:-1]] == [True, True, True] + [False] * (slots - 3)
    monkeypatch.setattr(dpo, "plots", dpo.plots + [("Grad norm", {"grad_norm": "norm"})] * (slots + 1 - len(dpo.plots)))
    assert train_tab.plot_slots() == len(dpo.plots) and len(train_tab.refresh(app, "r1")) == len(dpo.plots) + 3
    # nothing selected, or a folder removed under the page: every slot hidden, a plain line
    assert not any(u["visible"] for u in train_tab.plot_layout(app, None)[:-1])
    assert train_tab.refresh(app, "gone")[-2] == "no run named 'gone' in " + str(app.manager.root)


def test_the_last_eval_in_words_and_a_run_list_that_follows_the_state(tmp_path):
    """A run that evaluates once (at its end) has one eval point per series, which a line plot cannot draw: the
    progress area gives the numbers in the task's words. The run list is relisted when the selected run's state
    changes, so it does not say "running" beside a completed run."""
    app = AppState(tmp_path / "runs", hw=CPU)
    metrics = [{"step": 12, "loss": 0.43, "rewards/margins": 0.6},
               {"step": 12, "eval_loss": 0.4163, "eval_kl": 3.1021, "eval_rewards/margins": 0.6793,
                "eval_logps/chosen": -256.9, "eval_logps/rejected": -58.7}]
    run = _fake_run(app.manager.root, "k1", "kto", metrics, state="running", pid=os.getpid(), step=12,
                    total_steps=12)
    assert ("Eval at step 12: Loss <b>0.4163</b> · Rewards: margin <b>0.6793</b> · KL (reference point) <b>3.102</b>"
            " · Log-probs: desirable <b>-256.9</b>, undesirable <b>-58.7</b>") in train_tab.refresh(app, "k1")[0]
    assert train_tab.last_eval(metrics[:1], "kto") == ""  # no eval yet: nothing said

    # the one-point eval series are drawn: as a short dash ending at their step (a line needs two points)
    frames = train_tab.plot_frames(metrics, "kto")
    eval_loss = frames[0][frames[0]["series"] == "eval"]
    assert list(eval_loss["value"]) == [0.4163, 0.4163] and eval_loss["step"].max() == 12
    assert "📊 Eval at step 12: loss 0.4163, kl 3.102" in train_tab.refresh(app, "k1")[-2]  # eval numbers as text

    update, shown, message = train_tab.relist(app, "k1", None)
    assert shown == "k1:running" and "running" in update["choices"][0][0] and message == gr.update()
    assert train_tab.relist(app, "k1", shown) == ({"__type__": "update"}, shown, {"__type__": "update"})
    run.write_status(state="completed")
    update, shown, message = train_tab.relist(app, "k1", shown)
    assert shown == "k1:completed" and "completed" in update["choices"][0][0] and update["value"] == "k1"
    assert message == ""  # "Resuming ..." or "Started ..." is over once the run has ended


def test_runs_are_renamed_and_deleted_with_their_files(tmp_path):
    """Rename keeps a chain's links and adapter paths; Delete asks first, removes the folder, and refuses a run that
    trains or whose adapter another run starts from."""
    app = AppState(tmp_path / "runs", hw=CPU)
    root = app.manager.root
    first = _fake_run(root, "sft-1", "sft", [{"step": 1, "loss": 2.0}], state="completed", then_run="dpo-1")
    then = _fake_run(root, "dpo-1", "dpo", [], state="completed", after="sft-1")
    adapter = f"{first.path.resolve()}/adapter"
    (then.path / "request.yaml").write_text(f"adapter: {adapter}\n")
    message, update = train_tab.rename_run(app, "sft-1", "my-sft")
    assert "Renamed **sft-1** to **my-sft**" in message and update["value"] == "my-sft"
    assert not first.path.exists() and (root / "my-sft" / "metrics.jsonl").is_file()
    assert (then.path / "request.yaml").read_text() == f"adapter: {(root / 'my-sft').resolve()}/adapter\n"
    assert then.read_status()["after"] == "my-sft"
    for bad in ("../x", "", "a b"):
        with pytest.raises(ConfigError, match="can't name a run"):
            train_tab.rename_run(app, "my-sft", bad)
    with pytest.raises(ConfigError, match="exists already"):
        train_tab.rename_run(app, "my-sft", "dpo-1")

    with pytest.raises(ConfigError, match="run 'dpo-1' starts from its adapter"):
        train_tab.delete_confirm(app, "my-sft")
    message, confirm = train_tab.delete_ask(app, "dpo-1")
    assert "Delete **dpo-1** and all its files" in message and confirm["visible"] and then.path.exists()
    message, confirm, update = train_tab.delete_confirm(app, "dpo-1")
    assert not then.path.exists() and not confirm["visible"] and [v for _, v in update["choices"]] == ["my-sft"]
    _fake_run(root, "busy", "dpo", [], state="running", pid=os.getpid(), process={"pid": os.getpid(),
              "start": process_start(os.getpid())})
    for act in (lambda: train_tab.delete_confirm(app, "busy"), lambda: train_tab.rename_run(app, "busy", "b2")):
        with pytest.raises(ConfigError, match="is training: stop it before"):
            act()
    assert (root / "busy").is_dir()


def test_diagnostics_see_over_fitting_and_fit_their_advice_to_the_run(tmp_path):
    """Train good and eval flat is over-fitting (the issue's run: loss 0.486, train accuracy 1.00, eval loss 0.676
    and accuracy 0.60 throughout); NaN steps in fp32 are not fp16 overflow; a run that failed says why."""
    train = [{"step": s, "loss": 0.69 - 0.0102 * s, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s)}
             for s in range(1, 21)]
    evals = [{"step": s, "eval_loss": 0.676, "eval_rewards/accuracies": 0.60} for s in (5, 10, 15, 20)]
    found = diagnose(train + evals, "dpo", 20)
    level, text = found[0]
    assert level == "warn" and text.startswith("Over-fitting") and "eval loss 0.676 -> 0.676" in text
    healthy = [{"step": e["step"], "eval_loss": 0.69 - 0.0102 * e["step"], "eval_rewards/accuracies": 0.95}
               for e in evals]
    assert diagnose(train + healthy, "dpo", 20)[0][1].startswith("No problems seen")
    text = train_tab.diagnostics_md(train + evals, "dpo", {"state": "completed", "total_steps": 20})
    assert "📊 Eval at step 20: loss 0.676, rewards/accuracies 0.6" in text

    nan = [{"step": 1, "loss": 0.7, "nonfinite_steps": 2}]
    fp32 = diagnose(nan, "dpo", dtype="fp32")[0][1]
    assert "bf16" not in fp32 and "In fp32 this is not overflow" in fp32
    assert "set dtype to bf16" in diagnose(nan, "dpo", dtype="fp16")[0][1]
    failed = train_tab.diagnostics_md([], "dpo", {"state": "failed", "message": "error: out of memory"})
    assert failed.startswith("⛔ The run failed: error: out of memory") and "No metrics yet" not in failed
    # the CLI's wording is the app's buttons here
    assert train_tab.app_words("stopped at step 3 (checkpoint written); continue with --resume") == \
        "stopped at step 3 (checkpoint written); press Resume to continue"


def test_eta_reads_the_speed_of_the_runs_unit(tmp_path, monkeypatch):
    app = AppState(tmp_path / "runs", hw=CPU)
    metrics = [{"step": 10, "loss": 0.5, "pairs_per_second": 16.0, "examples_per_second": 8.0}]
    run = _fake_run(app.manager.root, "d1", "dpo", metrics, state="running", pid=os.getpid(), step=10,
                    total_steps=60)
    # tiny: 8 pairs a step at 16 pairs/s = 0.5 s/step, 50 steps to go
    assert "0.5 s/step · ETA 0m 25s" in train_tab.progress_html(run, metrics, "running", "dpo")
    monkeypatch.setattr(task_class("dpo"), "unit", "examples")  # a task counted in examples: 8 / 8 per second
    assert "1 s/step · ETA 0m 50s" in train_tab.progress_html(run, metrics, "running", "dpo")
    # one slow step (an eval, a checkpoint) does not make the ETA jump: the median of the last steps' speed
    steady = [{"step": s, "loss": 0.5, "examples_per_second": 8.0} for s in range(1, 10)]
    assert "ETA 0m 50s" in train_tab.progress_html(run, [*steady, {**steady[-1], "examples_per_second": 1.0}],
                                                   "running", "dpo")


def test_try_it_offers_what_the_runs_head_does(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    _fake_run(app.manager.root, "d1", "dpo", [], state="completed")
    _fake_run(app.manager.root, "r1", "reward", [], state="completed")
    shown = lambda name: [u["visible"] for u in try_tab.try_layout(app, name)[:2]]  # noqa: E731
    assert shown("d1") == [True, False] and shown("r1") == [False, True] and shown(None) == [True, True]
    # which run and adapter it uses, and the toy model's gibberish said before anyone wonders
    note = try_tab.try_layout(app, "d1")[2]
    assert "d1" in note and "has no adapter yet" in note
    (app.manager.root / "d1" / "adapter").mkdir()
    (app.manager.root / "d1" / "adapter" / "adapter_config.json").write_text("{}")
    note = try_tab.run_note(app, "d1")
    assert "Using run **d1** (dpo), its final adapter" in note and "toy model" in note and "gibberish" in note
    assert try_tab.try_layout(app, "d1")[3:] == ([], [])  # the conversations start afresh for another run
    with pytest.raises(UserError, match="dpo run that generates answers: use 'Send to both'"):
        try_tab.score(app, "d1", "q", "a", "b")
    for bad, field in [((0, False, 0.7, 0.9), "Max new tokens"), ((64, True, float("nan"), 0.9), "Temperature"),
                       ((64, True, 0.7, 1.5), "Top-p")]:
        with pytest.raises(UserError, match=field):
            try_tab.chat(app, "d1", "q", False, *bad, [], [])
    with pytest.raises(UserError, match="reward run that scores answers: use 'Score A and B'"):
        try_tab.generate(app, "r1", "q", False)
    with pytest.raises(UserError, match="select a run"):
        try_tab.generate(app, None, "q", False)


def test_export_handlers_refuse_plainly(tmp_path):
    from lowrank_pref.config import ConfigError

    app = AppState(tmp_path / "runs", hw=CPU)
    _fake_run(app.manager.root, "d1", "dpo", [], state="running", pid=os.getpid())
    with pytest.raises(UserError, match="user/name"):
        export_tab.push(app, "d1", "no-slash", "hf_x")
    with pytest.raises(ConfigError, match="no adapter yet"):
        export_tab.export_zip(app, "d1")


def test_the_run_list_follows_a_chain_once(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    _fake_run(app.manager.root, "sft-1", "dpo", [], state="completed", then_run="dpo-2")
    _fake_run(app.manager.root, "dpo-2", "dpo", [], state="stopped", after="sft-1")
    update, followed = train_tab.follow(app, "sft-1", [])
    assert update["value"] == "dpo-2" and followed == ["dpo-2"]
    labels = dict((v, label) for label, v in update["choices"])
    assert "then dpo-2" in labels["sft-1"] and "after sft-1" in labels["dpo-2"]
    update, followed = train_tab.follow(app, "sft-1", followed)  # the user went back to the SFT run: stay there
    assert "value" not in update and followed == ["dpo-2"]


# ---- runs one after another ---------------------------------------------------------------------------------------

def test_a_follow_up_waits_for_the_first_run_to_complete(tmp_path):
    from lowrank_pref.runs import THEN, RunManager

    manager = RunManager(tmp_path / "runs")
    for state in ("failed", "stopped"):
        run = RunDir(manager.root / f"first-{state}").create()
        run.write_status(state=state, task="dpo", then_task="dpo")
        (run.path / THEN).write_text(dump_yaml(build_config("tiny")))
    assert manager.poll() == []
    assert {r["name"]: r["then"] for r in manager.runs()} == {"first-failed": "dpo", "first-stopped": "dpo"}


def test_a_follow_up_starts_from_the_first_runs_adapter(tmp_path):
    """A real tiny dpo run, then a dpo run queued behind it: started by a poll once the first completes, by any
    manager on the folder (an app restarted meanwhile), once; its reference is the first run's adapter."""
    from lowrank_pref.runs import THEN, RunManager

    manager = RunManager(tmp_path / "runs")
    first = manager.start(build_config("tiny", overrides={"max_steps": 3}),
                          then=build_config("tiny", overrides={"max_steps": 2}))
    assert (manager.root / first / THEN).is_file() and manager.poll() == []  # queued while the first trains
    assert {r["name"]: r["then"] for r in manager.runs()} == {first: "dpo"}
    assert wait_for_run(manager, first) == "completed"

    restarted = RunManager(manager.root)
    second, = restarted.poll()
    assert restarted.poll() == [] and manager.poll() == []  # started once, whoever polls
    listed = {r["name"]: r for r in restarted.runs()}
    assert listed[first]["then_run"] == second and listed[second]["after"] == first and not listed[first]["then"]
    assert wait_for_run(restarted, second) == "completed"
    log = (manager.root / second / "train.log").read_text()
    assert f"reference: adapter (the starting adapter {manager.root / first / 'adapter'}, frozen)" in log


def test_sft_first_then_dpo_from_the_sft_adapter(tmp_path):
    """The whole chain through the app's handlers: Start with SFT first runs SFT on the chosen answers, the page's
    refresh starts the DPO run from its adapter, and the run list shows both."""
    app = AppState(tmp_path / "runs", hw=CPU)
    message, update = train_tab.start(app, "tiny", None, True, *_form(max_steps=4))
    sft = update["value"]
    assert sft.startswith("sft-") and "SFT on the chosen answers" in message
    assert "source: chosen" in (app.manager.root / sft / "request.yaml").read_text()
    assert wait_for_run(app.manager, sft) == "completed"
    train_tab.refresh(app, sft)  # the page's refresh starts what is due
    dpo = app.manager.follow_up(sft)
    assert dpo and dpo.startswith("dpo-")
    update, _ = train_tab.follow(app, sft, [])
    assert update["value"] == dpo and {sft, dpo} <= {v for _, v in update["choices"]}
    assert wait_for_run(app.manager, dpo) == "completed"
    log = (app.manager.root / dpo / "train.log").read_text()
    assert f"reference: adapter (the starting adapter {app.manager.root / sft / 'adapter'}, frozen)" in log


def _finish(app: AppState, run: str, timeout: float = 600) -> str:
    """Wait for a run the test started to end, by its status (a busy machine only makes this slower); a run still
    training at the timeout is stopped, and the test fails."""
    end = time.time() + timeout
    while time.time() < end:
        app.manager.reap()
        state = app.manager.run_dir(run).state()
        if state != "running":
            return state
        time.sleep(1)
    app.manager.stop(run)
    app.manager.wait(run, timeout=120)
    raise AssertionError(f"run {run} still training after {timeout:.0f} s; stopped")


@pytest.mark.parametrize("preset, series", [
    ("tiny-sft", {"Loss": {"train", "eval"}, "Token accuracy": {"train", "eval"}, "Perplexity": {"train", "eval"}}),
    ("tiny-kto", {"Rewards": {"desirable", "undesirable", "margin", "eval margin"},
                  "KL (reference point)": {"train", "eval"}, "Log-probs": {"desirable", "eval undesirable"}}),
])
def test_sft_and_kto_runs_through_the_handlers(tmp_path, preset, series):
    """The user's path for a task other than dpo: Start from its preset, wait, refresh; the curves are titled and
    named as the task's, the diagnostics read them, and Try it generates from the trained adapter."""
    app = AppState(tmp_path / "runs", hw=CPU)
    task = build_config(preset).task
    _, update = train_tab.start(app, preset, None, False, *_form(max_steps=12, preset=preset))
    run = update["value"]
    try:
        assert run.startswith(f"{task}-") and _finish(app, run) == "completed"
    finally:
        if app.manager.active():
            app.manager.stop()
            app.manager.wait(run, timeout=120)
    *layout, _ = train_tab.plot_layout(app, run)
    titles = [u["title"] for u in layout if u["visible"]]
    assert titles == [title for title, _ in task_class(task).plots]
    progress, *frames, diagnostics, log = train_tab.refresh(app, run)
    assert "completed" in progress and "12 / 12" in progress and "Eval at step 12: Loss <b>" in progress
    for title, names in series.items():
        assert names <= set(frames[titles.index(title)]["series"]), title
    assert diagnostics.startswith(("✅", "⚠️")) and "at step 12" in diagnostics  # rendered, and read to the end
    assert "pairs" not in diagnostics
    policy, reference = try_tab.generate(app, run, "Can you tell me how to save money?", False)
    assert policy and reference


# ---- the launched app ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gradio_client import Client

    from lowrank_pref.ui import build_app

    runs = tmp_path_factory.mktemp("runs")
    demo = build_app(runs)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **demo.launch_kwargs)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client
    manager = demo.manager
    if manager.active():
        manager.stop()
        manager.wait(manager.active() or "", timeout=60)
    demo.close()


def _wait(predicate, timeout=120, every=0.3):
    return wait_until(predicate, timeout, every)


def test_doctor_reports_an_uploaded_file(app, tmp_path):
    from gradio_client import handle_file

    _, client = app
    data = write_pairs(tmp_path / "mine.jsonl", n=30)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}) + "\n")
        f.write(json.dumps({"prompt": "hi", "chosen": "", "rejected": "no"}) + "\n")
    report, hist, examples = client.predict("tiny", handle_file(str(data)), *_form(), api_name="/doctor")
    assert "usable pairs:** 30" in report and "rows:** 32" in report
    assert "Skipped 2 row(s)" in report and "rows 31" in report and "rows 32" in report
    assert "Thank you for asking" in examples and 'class="lp-loss"' in examples
    assert hist["title"] == "Tokens per pair (prompt + longer answer), max_length 96"  # in the task's words
    assert sum(row[1] for row in hist["value"]["data"]) == 30  # the histogram counts every usable pair


def test_doctor_and_start_refuse_bad_data_plainly(app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = app
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(AppError, match=r"broken.jsonl.*line 2"):
        client.predict("tiny", handle_file(str(broken)), *_form(), api_name="/doctor")
    with pytest.raises(AppError, match=r"broken.jsonl.*line 2"):
        client.predict("tiny", handle_file(str(broken)), False, *_form(), api_name="/start")
    code = tmp_path / "evil.py"
    code.write_text("import os\n")
    with pytest.raises(AppError, match="Invalid file type.*jsonl"):  # refused by the upload box itself
        client.predict("tiny", handle_file(str(code)), *_form(), api_name="/doctor")
    with pytest.raises(AppError, match="learning_rate"):
        client.predict("tiny", None, False, *_form(learning_rate=-1.0), api_name="/start")
    # Start refuses what Check the data refuses, in the same words: wrong columns, no usable rows
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("question,good,bad\nq,a,b\n")
    with pytest.raises(AppError) as checked:
        client.predict("tiny", handle_file(str(wrong)), *_form(), api_name="/doctor")
    with pytest.raises(AppError) as started:
        client.predict("tiny", handle_file(str(wrong)), False, *_form(), api_name="/start")
    assert "no 'chosen' column" in str(started.value) and str(started.value) == str(checked.value)
    assert "chosen=&lt;your column&gt; in Column mapping (Setup, Advanced)" in str(started.value)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(AppError, match=r"not started: No usable pairs: training would stop at once \(1 × "):
        client.predict("tiny", handle_file(str(same)), False, *_form(), api_name="/start")
    # and what the memory estimate says does not fit, in Setup's words
    with pytest.raises(AppError, match=r"not started: Estimated peak memory .* does not fit: lower Batch size"):
        client.predict("tiny", None, False, *_form(batch_size=60000, max_length=4096, max_prompt_length=64),
                       api_name="/start")
    assert app[0].manager.active() is None and app[0].manager.runs() == []


def test_train_watch_stop_resume_try_and_export(app):
    from gradio_client.exceptions import AppError

    demo, client = app
    message, update = client.predict("tiny", None, False, *_form(max_steps=150), api_name="/start")
    run = update["value"]  # the run list, updated and set to the new run
    assert f"Started **{run}**" in message and run in [value for _, value in update["choices"]]

    # a second start, from this or any other tab, is refused while the first trains
    with pytest.raises(AppError, match="is training"):
        client.predict("tiny", None, False, *_form(), api_name="/start")

    def metrics_arrived():
        progress, loss, *_, diagnostics, log = client.predict(run, api_name="/refresh")
        return (progress, loss, diagnostics) if loss else None

    progress, loss, diagnostics = _wait(metrics_arrived)
    assert "running" in progress and "step" in progress
    assert {row[2] for row in loss["data"]} >= {"train"}
    client.predict(run, api_name="/stop")
    assert demo.manager.wait(run) == "stopped"
    status = json.loads((demo.manager.root / run / "status.json").read_text())
    assert 0 < status["step"] < 150
    assert (demo.manager.root / run / f"checkpoint-{status['step']}").is_dir()

    # the app restarts (a Space that slept): a new manager on the same folder finds the run and resumes it
    from lowrank_pref.runs import RunManager

    restarted = RunManager(demo.manager.root)
    listed = {r["name"]: r for r in restarted.runs()}
    assert listed[run]["state"] == "stopped" and listed[run]["resumable"]
    restarted.resume(run)
    with pytest.raises(AppError, match="is training"):  # the first app sees the resumed run too
        client.predict("tiny", None, False, *_form(), api_name="/start")
    assert wait_for_run(restarted, run) == "completed"
    progress, *plots, diagnostics, log = client.predict(run, api_name="/refresh")
    assert "completed" in progress and "150 / 150" in progress
    accuracy = [row for row in plots[2]["data"] if row[2] == "eval"]
    assert accuracy and accuracy[-1][1] >= 0.9  # the tiny task is learned, also across the stop and resume
    assert "No problems seen" in diagnostics

    policy, reference, box = client.predict(run, "Can you tell me how to save money?", False, 24, False, 0.7, 0.9,
                                            [], [], api_name="/chat")
    assert box == "" and [m["role"] for m in policy] == ["user", "assistant"] == [m["role"] for m in reference]
    assert policy[1]["content"] != reference[1]["content"]  # the adapter changed what the model says
    policy, _, _ = client.predict(run, "And then?", False, 8, True, 1.2, 0.8, policy, reference, api_name="/chat")
    assert [m["role"] for m in policy] == ["user", "assistant", "user", "assistant"]  # a conversation, sampled

    archive = client.predict(run, api_name="/export_zip")
    names = zipfile.ZipFile(archive).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names

    merged = client.predict(run, api_name="/merge")
    assert "Merged model saved" in merged
    assert (demo.manager.root / run / "merged" / "model.safetensors").is_file()

    with pytest.raises(AppError, match="push to 'me/tiny-dpo' failed"):  # offline: the real call fails plainly
        client.predict(run, "me/tiny-dpo", "hf_fake", api_name="/push")
    with pytest.raises(AppError, match="dpo run that generates answers"):
        client.predict(run, "q", "a", "b", api_name="/score")


def test_reward_run_scores_answers(app):
    demo, client = app
    _, update = client.predict("tiny", None, False, *_form(task="reward", max_steps=40), api_name="/start")
    run = update["value"]
    assert wait_for_run(demo.manager, run) == "completed"
    text = client.predict(run, "What is the best way to sleep better?",
                          "Happy to help! Go to bed at the same time every day. Good luck, you can do it.",
                          "That is a silly question.", api_name="/score")
    assert "prefers **A**" in text


def test_app_binds_localhost_unless_in_a_space(monkeypatch):
    from lowrank_pref.ui import server_name

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert server_name() == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "someone/lowrank-pref")
    assert server_name() == "0.0.0.0"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    front = readme.split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front


def test_app_py_starts_and_serves_the_page(tmp_path):
    """`python app.py` as a newcomer (or a Space) runs it: the page is served on 127.0.0.1."""
    import subprocess
    import sys
    import urllib.request

    from conftest import ROOT

    port = free_port()
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT), LOWRANK_PREF_RUNS=str(tmp_path / "runs"))
    env.pop("SPACE_ID", None)
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def page():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                return None
        assert "lowrank-pref" in _wait(page, timeout=90, every=0.5)
        assert (tmp_path / "runs").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
