"""The app's side of RL against the user's reward model, through its handlers (no browser, no training): the reward
model is chosen among this app's finished reward runs (a visitor's own in public, resolved to its folder on the
server; a typed folder only locally), a run of another model is refused naming both, an rl run without one is told
to train one first, and a finished reward run sets up RL in one click. Runs here are folders as runs leave them;
the samples table and Try it's scores on a real rl run are in test_rl.py, and the page in test_browser.py."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from lowrank_pref.artifacts import RunDir
from lowrank_pref.config import ConfigError, build_config, dump_yaml
from lowrank_pref.runs import OWNER, owner_key
from lowrank_pref.ui import KEYS, AppState, UserError, form_values
from lowrank_pref.ui import setup as setup_tab
from lowrank_pref.ui import train as train_tab

CPU = {"gpu": None, "memory_gb": 16.0}
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef0"
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"  # the 6gb-reward and 6gb-rl presets' model


def _run(app: AppState, name: str, task: str = "reward", model: str = "builtin:tiny", state: str = "completed",
         accuracy: float | None = 0.9, owner: str | None = None) -> RunDir:
    """A run folder as a run leaves it (config, status, metrics, adapter), without training one."""
    run = RunDir(app.manager.root / name).create()
    preset = {"reward": "tiny-reward", "rl": "tiny-rl"}.get(task, "tiny")
    run.config.write_text(f"reference: base\n{dump_yaml(build_config(preset, overrides={'model': model}))}")
    run.write_status(task=task, state=state, step=8, total_steps=8)
    if accuracy is not None:
        run.append_metrics({"step": 8, "eval_accuracy": accuracy})
    if owner:
        (run.path / OWNER).write_text(owner_key(f"browser:{owner}") + "\n")
    run.adapter.mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    return run


def _form(preset: str = "tiny-rl", **changes) -> list:
    values = form_values(build_config(preset))
    for key, value in changes.items():
        values[KEYS.index(key)] = value
    return values


def test_the_reward_model_is_one_of_the_finished_reward_runs(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU)
    # none yet: an rl run is told to train one first, with the reward preset of its size and the button to set it up
    dropdown, note, button = setup_tab.reward_state(app, "tiny-rl", "rl", "builtin:tiny", None)
    assert dropdown["choices"] == [] and dropdown["value"] is None
    assert note["visible"] and "No finished reward run yet" in note["value"] and "`tiny-reward`" in note["value"]
    assert button["visible"] and button["value"] == "Set up a reward model run first (tiny-reward)"
    with pytest.raises(UserError, match=r"^reward_model: No finished reward run yet.*train one first \(preset "
                                        r"`tiny-reward`"):
        train_tab.start(app, "tiny-rl", None, False, *_form(max_steps=2))
    preset, *values = setup_tab.reward_first_preset(app, "tiny-rl", "builtin:tiny")
    assert preset["value"] == "tiny-reward" and values[:len(KEYS)] == form_values(build_config("tiny-reward"))
    # on the form's own model when it is not the preset's: the reward model must be of the rl run's base
    preset, *values = setup_tab.reward_first_preset(app, "tiny-rl", "someone/model")
    assert values[:len(KEYS)] == form_values(build_config("tiny-reward", overrides={"model": "someone/model"}))
    assert setup_tab.sibling_preset(app, "12gb-rl", "reward") == "12gb-reward"
    assert setup_tab.sibling_preset(app, "tiny", "reward") == "tiny-reward"
    # a dpo run may go without one (it is only judged by one): no note
    assert not setup_tab.reward_state(app, "tiny", "dpo", "builtin:tiny", None)[1]["visible"]

    _run(app, "rm-old", accuracy=0.62)
    _run(app, "rm-qwen", model=QWEN, accuracy=None)
    _run(app, "rm-stopped", state="stopped")
    _run(app, "rm-new", accuracy=0.91)
    _run(app, "dpo-1", task="dpo")
    # only completed reward runs are listed, with their model and eval accuracy; another model's is marked
    dropdown, note, button = setup_tab.reward_state(app, "tiny-rl", "rl", "builtin:tiny", None)
    labels = dict((value, label) for label, value in dropdown["choices"])
    assert set(labels) == {"rm-old", "rm-qwen", "rm-new"}
    assert labels["rm-new"] == "rm-new · builtin:tiny · eval accuracy 0.91"
    assert labels["rm-qwen"] == f"rm-qwen · {QWEN} · no eval yet · ⚠ another model than builtin:tiny"
    assert dropdown["value"] == "rm-new" and not note["visible"] and not button["visible"]  # the newest of its model
    assert setup_tab.reward_state(app, "tiny-rl", "rl", "builtin:tiny", "rm-old")[0]["value"] == "rm-old"  # kept
    # reward runs, but none of the form's model: none is chosen, and the note names the model
    dropdown, note, button = setup_tab.reward_state(app, "tiny-rl", "rl", "someone/model", None)
    assert dropdown["value"] is None and len(dropdown["choices"]) == 3 and button["visible"]
    assert "No finished reward run of `someone/model` yet" in note["value"]
    with pytest.raises(UserError, match=r"No finished reward run of `someone/model` yet"):
        train_tab.start(app, "tiny-rl", None, False, *_form(model="someone/model", max_steps=2))
    # chosen by name, resolved to its adapter folder on the server (the run manager then keeps it from deletion)
    cfg = setup_tab.form_config(app, "tiny-rl", None, _form(reward_model="rm-old"))
    assert cfg.reward_model == str((app.manager.root / "rm-old" / "adapter").resolve())
    _run(app, "rl-x", task="rl").config.write_text(dump_yaml(cfg))
    with pytest.raises(ConfigError, match="run 'rm-old' can't be deleted: run 'rl-x' .* or its reward model"):
        app.manager.delete("rm-old")
    # another model's reward run: refused, naming both models and the fix
    with pytest.raises(UserError, match=rf"^reward_model: the reward run 'rm-qwen' was trained on the model '{QWEN}', "
                                        r"but this run's model is 'builtin:tiny'.*set Model to"):
        setup_tab.form_config(app, "tiny-rl", None, _form(reward_model="rm-qwen"))
    estimate, _, _, marker = setup_tab.settings_changed(app, "tiny-rl", None, False, *_form(reward_model="rm-qwen"))
    assert "Not a valid setting" in estimate and QWEN in estimate and "#lp-field-reward-model" in marker
    # locally a reward run's folder may be typed; a dpo run takes one as its judge; a reward run never reads it
    assert setup_tab.form_config(app, "tiny-rl", None, _form(reward_model="/some/rm")).reward_model == "/some/rm"
    assert setup_tab.form_config(app, "tiny", None, _form("tiny", task="dpo", reward_model="rm-new")).reward_model
    assert setup_tab.form_config(app, "tiny-reward", None, _form("tiny-reward", reward_model="rm-new")
                                 ).reward_model is None
    # with runs to pick from, an rl run without one is told to pick one
    with pytest.raises(UserError, match=r"^reward_model: an rl run trains against a reward model: pick one"):
        train_tab.start(app, "tiny-rl", None, False, *_form(max_steps=2))
    assert [r["name"] for r in app.manager.runs() if r["state"] == "running"] == []


def test_a_public_visitor_picks_only_their_own_reward_runs(tmp_path):
    public = AppState(tmp_path / "runs", hw=CPU, public=True)
    alice, bob, nobody = public.session(ALICE), public.session(BOB), public.session(None)
    _run(public, "rm-a", owner=ALICE)
    _run(public, "rm-b", owner=BOB)
    _run(public, "rm-cli")  # started from a terminal: nobody's in public
    assert list(setup_tab.reward_runs(alice)) == ["rm-a"] and list(setup_tab.reward_runs(bob)) == ["rm-b"]
    assert setup_tab.reward_runs(nobody) == {}
    assert [v for _, v in setup_tab.reward_state(alice, "tiny-rl", "rl", "builtin:tiny", None)[0]["choices"]] == \
        ["rm-a"]
    cfg = setup_tab.form_config(alice, "tiny-rl", None, _form(reward_model="rm-a"))
    assert cfg.reward_model == str((public.manager.root / "rm-a" / "adapter").resolve())  # on the server side
    # another visitor's run, a run nobody owns, a typed server path: refused alike, the value not echoed
    for value in ("rm-b", "rm-cli", str(public.manager.root / "rm-b"), "/etc", "../runs/rm-b/adapter"):
        with pytest.raises(UserError, match="^reward_model: this public app reads no files on its server; pick one of "
                                            "your finished reward runs") as e:
            setup_tab.form_config(alice, "tiny-rl", None, _form(reward_model=value))
        assert value not in str(e.value)
    # the command shown and the settings saved name the run, not its folder; the saved file loads back as that run
    _, command, yaml_text, _ = setup_tab.settings_changed(alice, "tiny-rl", None, False, *_form(reward_model="rm-a"))
    assert "reward_model=rm-a" in command and str(public.manager.root) not in command + yaml_text
    saved = setup_tab.save_settings(alice, "tiny-rl", None, *_form(reward_model="rm-a"))
    *values, note = setup_tab.load_settings(alice, "tiny-rl", saved)
    assert values[KEYS.index("reward_model")] == "rm-a"
    assert setup_tab.form_config(alice, "tiny-rl", None, values).reward_model == cfg.reward_model
    typed = Path(saved).with_name("typed.yaml")
    typed.write_text(f"reward_model: {public.manager.root / 'rm-b'}\n")
    with pytest.raises(UserError, match="^reward_model: this public app reads no files"):
        setup_tab.load_settings(alice, "tiny-rl", str(typed))
    # the one-click from a reward run: only from one's own
    with pytest.raises(UserError, match="not a finished reward run"):
        setup_tab.rl_from_reward(alice, "rm-b")
    # "Set up a reward model run first" on the form's model: a server folder there is refused, never read
    for folder in ("/etc", str(public.manager.root)):
        with pytest.raises(UserError, match="^model: this public app reads no files on its server") as e:
            setup_tab.reward_first_preset(alice, "tiny-rl", folder)
        assert folder not in str(e.value)
    assert setup_tab.reward_first_preset(alice, "tiny-rl", "someone/model")[0]["value"] == "tiny-reward"
    assert train_tab.run_extras(bob, "rm-a")[1]["visible"] is False


def test_rl_from_a_reward_run_in_one_click(tmp_path):
    """"Train a policy against this reward model (RL)": the rl preset of the run's size (the one on its model) in
    the form, the run as its reward model; the form as filled is a valid rl config against that run's folder."""
    app = AppState(tmp_path / "runs", hw=CPU)
    _run(app, "rm-tiny")
    _run(app, "rm-qwen", model=QWEN)
    _run(app, "rm-mine", model=str(tmp_path / "my-model"))  # a model no preset has: the machine's rl preset on it
    _run(app, "dpo-1", task="dpo")
    _run(app, "rm-failed", state="failed")
    assert train_tab.run_extras(app, "rm-tiny")[1]["visible"] is True  # the button, on a finished reward run
    for name in ("dpo-1", "rm-failed", None):
        assert train_tab.run_extras(app, name)[1]["visible"] is False
    for run, preset, model in [("rm-tiny", "tiny-rl", "builtin:tiny"), ("rm-qwen", "6gb-rl", QWEN),
                               ("rm-mine", "tiny-rl", str(tmp_path / "my-model"))]:
        out = setup_tab.rl_from_reward(app, run)
        chosen, values, (estimate, command, yaml_text), message = out[0], out[1:len(KEYS) + 1], out[-4:-1], out[-1]
        assert chosen["value"] == preset and f"**{preset}**" in message and f"**{run}**" in message
        form = dict(zip(KEYS, values))
        assert form["task"] == "rl" and form["model"] == model
        assert form["reward_model"]["value"] == run and run in [v for _, v in form["reward_model"]["choices"]]
        values[KEYS.index("reward_model")] = run
        cfg = setup_tab.form_config(app, preset, None, values)
        assert cfg.task == "rl" and cfg.reward_model == str((app.manager.root / run / "adapter").resolve())
        assert f"reward_model={cfg.reward_model}" in command and "reward_model: " in yaml_text
        assert "Estimated peak memory" in estimate or run != "rm-tiny"  # (other models: not here, no estimate)
    for name in ("dpo-1", "rm-failed"):
        with pytest.raises(UserError, match=f"run '{name}' is not a finished reward run"):
            setup_tab.rl_from_reward(app, name)
    # the Setup form's reward model: a list of runs, with a typed folder allowed only locally
    field = setup_tab._field("reward_model", "x", build_config("tiny-rl"))
    assert isinstance(field, gr.Dropdown) and field.allow_custom_value and field.visible
    assert not setup_tab._field("reward_model", "x", build_config("tiny-reward")).visible


def test_the_samples_table_reads_a_judged_runs_samples_newest_eval_first(tmp_path):
    """A dpo run judged by a reward model writes samples.jsonl as an rl run does: the Train tab shows it as a table,
    the latest eval first and each eval's prompts in their order; a line cut by a kill is left out."""
    import json

    app = AppState(tmp_path / "runs", hw=CPU)
    run = _run(app, "dpo-judged", task="dpo")
    assert train_tab.run_extras(app, "dpo-judged")[0]["visible"] is False  # no eval yet: no table
    lines = [{"step": step, "row": row, "prompt": f"p{row}", "completion": f"c{step}-{row}", "reward": step + row / 10,
              "reference_completion": f"r{row}", "reference_reward": -row} for step in (4, 8) for row in (3, 1)]
    (run.path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines) + '{"step": 12, "pro')
    table, button, shown = train_tab.run_extras(app, "dpo-judged")
    assert table["visible"] and not button["visible"]
    # the page's next refresh: the same file is not sent again (a reader of the table keeps their place)
    assert train_tab.run_extras(app, "dpo-judged", shown)[0] == gr.update()
    assert list(table["value"].columns) == train_tab.SAMPLE_COLUMNS
    assert table["value"].values.tolist() == [[8, "p3", "c8-3", 8.3, "r3", -3], [8, "p1", "c8-1", 8.1, "r1", -1],
                                              [4, "p3", "c4-3", 4.3, "r3", -3], [4, "p1", "c4-1", 4.1, "r1", -1]]
