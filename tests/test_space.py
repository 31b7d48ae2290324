"""The app in public (a Space, --public): a visitor reads no server files, sees and controls only their own runs,
can't exhaust the app with one upload, and Stop ends a run that ignores SIGTERM. Handlers are called with two fake
owners; one launched app in public mode checks the same through its API, anonymous calls included. Runs here are a
stand-in process (RunManager.command), not training: what is tested is who may act on them and how they end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import free_port, wait_until, write_pairs
from lowrank_pref.artifacts import RunDir, process_start
from lowrank_pref.config import ConfigError, build_config, dump_yaml
from lowrank_pref.runs import OWNER, RunBusy, RunManager, owner_key
from lowrank_pref.ui import KEYS, AppState, UserError, config_from_form, form_values
from lowrank_pref.ui import common
from lowrank_pref.ui import data as data_tab
from lowrank_pref.ui import export as export_tab
from lowrank_pref.ui import setup as setup_tab
from lowrank_pref.ui import train as train_tab
from lowrank_pref.ui import tryit as try_tab

CPU = {"gpu": None, "memory_gb": 16.0}
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef0"

# A stand-in for `python -m lowrank_pref.run`: it says it is running (as a run does) and waits. On SIGTERM it ends
# "stopped", as a run does; with "ignore" among its arguments it ignores SIGTERM, as a run stuck in a library call.
STUB = r"""
import os, signal, sys, time
from lowrank_pref.artifacts import RunDir, this_process
run = RunDir(sys.argv[sys.argv.index("--output-dir") + 1])
def stop(signum, frame):
    run.write_status(state="stopped", message="stopped (SIGTERM)")
    sys.exit(130)
signal.signal(signal.SIGTERM, signal.SIG_IGN if "ignore" in sys.argv else stop)
run.write_status(state="running", pid=os.getpid(), process=this_process(), step=3, total_steps=100, task="dpo",
                 message="")
while True:
    time.sleep(0.05)
"""


def _form(preset="tiny", **changes):
    values = form_values(build_config(preset))
    for key, value in changes.items():
        values[KEYS.index(key)] = value
    return values


def _wait(predicate, timeout=60.0, every=0.1):
    return wait_until(predicate, timeout, every)


def _running(manager: RunManager, name: str) -> bool:
    """The stand-in has written its own status (its pid and start time)."""
    return manager.run_dir(name).read_status().get("message") == "" and manager.run_dir(name).state() == "running"


def _end_all(manager: RunManager) -> None:
    """Kill what a test started, whatever happened in it."""
    for child in list(manager._children.values()):
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(30)
    manager.reap()


def _fake_run(app: AppState, name: str, owner: str | None, **status) -> RunDir:
    """A run folder as a run leaves it, owned by ``owner`` (a browser key), with an adapter to export."""
    run = RunDir(app.manager.root / name).create()
    run.config.write_text(f"reference: base\n{dump_yaml(build_config('tiny'))}")
    run.write_status(task="dpo", **{"state": "completed", **status})
    if owner:
        (run.path / OWNER).write_text(owner_key(f"browser:{owner}") + "\n")
    (run.adapter).mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    return run


# ---- item 1: no server files in public ---------------------------------------------------------------------------

def test_public_refuses_server_paths_in_every_source(tmp_path):
    """dataset=/etc/passwd, model=/some/dir, an adapter or eval set on the server, a preset path: one plain line,
    which does not echo the path. Hub ids and builtin: names pass; locally, paths are data as before."""
    app = AppState(tmp_path / "runs", hw=CPU, public=True).session(ALICE)
    for key, value in [("dataset", "/etc/passwd"), ("model", "/some/dir"), ("dataset", "../runs/x.jsonl"),
                       ("dataset", "~/.ssh/id_rsa"), ("model", "runs/sft-1/adapter"),
                       ("dataset", "file:///etc/passwd")]:
        with pytest.raises(UserError, match=f"^{key}: this public app reads no files on its server") as e:
            config_from_form("tiny", None, _form(**{key: value}), public=True)
        assert value not in str(e.value)
    base = build_config("tiny")
    for key in ("adapter", "eval_dataset"):
        with pytest.raises(UserError, match=f"^{key}: this public app reads no files"):
            setup_tab.refuse_server_paths({key: "/data/runs/dpo-1/adapter"}, base)
    existing = tmp_path / "here.jsonl"
    existing.write_text("{}\n")
    os.chdir(tmp_path)  # a relative name of a file where the app runs is a path, not a hub id
    try:
        assert not setup_tab.is_remote("here.jsonl") and setup_tab.is_remote("someone/prefs")
    finally:
        os.chdir(Path(__file__).parent.parent)
    with pytest.raises(UserError, match="^preset: choose one of"):
        config_from_form("/etc/passwd", None, _form(), public=True)
    cfg = config_from_form("tiny", None, _form(model="Qwen/Qwen2.5-0.5B-Instruct", dataset="someone/prefs"),
                           public=True)
    assert (cfg.model, cfg.dataset) == ("Qwen/Qwen2.5-0.5B-Instruct", "someone/prefs")
    # the handlers that read the form: the doctor, Start and the command shown
    with pytest.raises(UserError, match="^dataset: "):
        data_tab.check_data(app, "tiny", None, *_form(dataset="/etc/passwd"))
    with pytest.raises(UserError, match="^model: "):
        train_tab.start(app, "tiny", None, False, *_form(model="/some/dir"))
    estimate, _, _, marker = setup_tab.settings_changed(app, "tiny", None, False, *_form(model="/some/dir"))
    assert "model: this public app reads no files on its server" in estimate and "/some/dir" not in estimate
    assert "#lp-field-model input" in marker  # the field is marked
    assert app.manager.runs() == []
    local = write_pairs(tmp_path / "local.jsonl", n=4)
    assert config_from_form("tiny", None, _form(dataset=str(local))).dataset == str(local)  # locally: as before


def test_public_messages_name_files_not_server_paths_and_escape_html():
    strip = common.strip_paths
    assert strip("/data/runs/.uploads/0123456789ab-mine.csv: line 3 is bad") == "mine.csv: line 3 is bad"
    assert strip("dataset file '/etc/passwd' does not exist") == "dataset file 'passwd' does not exist"
    untouched = "push to 'me/tiny-dpo' failed: see https://huggingface.co/me/tiny-dpo, 1/2 done"
    assert strip(untouched) == untouched


# ---- items 1 and 6: each session its own runs --------------------------------------------------------------------

def test_another_session_cannot_see_stop_zip_try_resume_or_merge_a_run(tmp_path):
    public = AppState(tmp_path / "runs", hw=CPU, public=True)
    public.exports = tmp_path / "exports"
    alice, bob, nobody = public.session(ALICE), public.session(BOB), public.session(None)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _fake_run(public, "dpo-a", ALICE, state="running", pid=sleeper.pid,
                  process={"pid": sleeper.pid, "start": process_start(sleeper.pid)})
        _fake_run(public, "dpo-b", BOB)
        _fake_run(public, "dpo-cli", None)  # started from a terminal: nobody's in public
        listed = lambda app: [v for _, v in common.run_list(app)["choices"]]  # noqa: E731
        assert listed(alice) == ["dpo-a"] and listed(bob) == ["dpo-b"] and listed(nobody) == []
        assert alice.active() == "dpo-a" and bob.active() is None
        for act in (lambda a: train_tab.stop(a, "dpo-a"), lambda a: train_tab.resume(a, "dpo-a"),
                    lambda a: export_tab.export_zip(a, "dpo-a"), lambda a: export_tab.merge(a, "dpo-a"),
                    lambda a: export_tab.push(a, "dpo-a", "me/x", "hf_x"),
                    lambda a: try_tab.generate(a, "dpo-a", "hi", False),
                    lambda a: train_tab.delete_confirm(a, "dpo-a"), lambda a: train_tab.delete_ask(a, "dpo-a"),
                    lambda a: train_tab.rename_run(a, "dpo-a", "mine")):
            for other in (bob, nobody):
                with pytest.raises(ConfigError, match="^no run named 'dpo-a'$"):
                    act(other)
        assert "no run named 'dpo-a'" in train_tab.refresh(bob, "dpo-a")[-2]
        with pytest.raises(ConfigError, match="no run of yours is training"):
            train_tab.stop(bob, None)  # Stop with nothing selected stops the session's own run, not Alice's
        assert sleeper.poll() is None  # nothing was signalled
        with pytest.raises(UserError, match="no session key"):
            train_tab.start(nobody, "tiny", None, False, *_form())
        # Bob may not start while Alice's run trains, and is not told whose run it is
        with pytest.raises(RunBusy, match="another visitor's run is training") as e:
            bob.start(build_config("tiny"))
        assert "dpo-a" not in str(e.value)
        assert export_tab.export_zip(bob, "dpo-b").endswith("dpo-b-adapter.zip")
        message, _ = train_tab.stop(alice, "dpo-a")
        assert "Stopping **dpo-a**" in message
        assert sleeper.wait(30) == -signal.SIGTERM
        # a signed-in user owns their runs from any browser
        login = AppState(tmp_path / "runs", hw=CPU, public=True, auth=True)
        ann = [login.session(key, SimpleNamespace(username="ann")).owner for key in (ALICE, BOB)]
        assert ann[0] == ann[1] == owner_key("user:ann")
        # locally every run is the user's, whoever started it
        local = AppState(tmp_path / "runs", hw=CPU).session(BOB)
        assert set(listed(local)) == {"dpo-a", "dpo-b", "dpo-cli"}
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(30)


# ---- items 7 and 5: Stop signals only the run, and kills one that ignores SIGTERM --------------------------------

def test_stop_leaves_a_process_that_only_shares_the_runs_pid(tmp_path, monkeypatch):
    """A status with a live process's pid but another start time (the pid was given to another process since) is
    not signalled; with the right start time it is."""
    manager = RunManager(tmp_path / "runs", kill_after=30)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    signals, kill = [], os.kill
    try:
        run = RunDir(manager.root / "dpo-old").create()
        run.write_status(state="running", task="dpo", pid=other.pid,
                         process={"pid": other.pid, "start": process_start(other.pid) - 1})
        with monkeypatch.context() as m:  # every signal sent, but the liveness probes (signal 0)
            m.setattr(os, "kill", lambda pid, sig: kill(pid, sig) if sig == 0 else signals.append((pid, sig)))
            with pytest.raises(ConfigError, match="is not training"):
                manager.stop("dpo-old")
        assert signals == [] and other.poll() is None and run.state() == "stopped"
        run.write_status(process={"pid": other.pid, "start": process_start(other.pid)})
        assert manager.stop("dpo-old") == "dpo-old" and other.wait(30) == -signal.SIGTERM
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(30)


def test_stop_kills_a_run_that_ignores_sigterm_and_start_works_again(tmp_path):
    app = AppState(tmp_path / "runs", hw=CPU, kill_after=1.0).session(ALICE)
    app.manager.command = [sys.executable, "-c", STUB, "ignore"]
    try:
        _, update = train_tab.start(app, "tiny", None, False, *_form())
        name = update["value"]
        _wait(lambda: _running(app.manager, name))
        status = app.manager.run_dir(name).read_status()
        assert status["process"] == {"pid": status["pid"], "start": process_start(status["pid"])}  # _spawn's, kept
        with pytest.raises(RunBusy):
            train_tab.start(app, "tiny", None, False, *_form())
        message, _ = train_tab.stop(app, name)
        assert "If it is still running in 1 s it is killed; Resume then starts from its last checkpoint" in message
        run = app.manager.run_dir(name)
        _wait(lambda: run.read_status().get("killed"), timeout=30)
        status = run.read_status()
        assert status["state"] == "stopped" and run.state() == "stopped"
        assert status["message"].startswith("killed: still running 1 s after Stop; it had no checkpoint yet")
        assert "killed: still running" in train_tab.refresh(app, name)[0]
        app.manager.command = [sys.executable, "-c", STUB]
        _, update = train_tab.start(app, "tiny", None, False, *_form())  # not "is training": the GPU is free again
        second = update["value"]
        _wait(lambda: _running(app.manager, second))
        train_tab.stop(app, second)  # this one honours SIGTERM: stopped by it, not killed
        assert app.manager.wait(second, timeout=30) == "stopped"
        assert not app.manager.run_dir(second).read_status().get("killed")
    finally:
        _end_all(app.manager)


def test_a_follow_up_belongs_to_the_first_runs_owner(tmp_path):
    """SFT first, then DPO: the DPO run the poll starts is the visitor's too, or they could not watch or stop it."""
    from lowrank_pref.runs import THEN

    app = AppState(tmp_path / "runs", hw=CPU, public=True).session(ALICE)
    app.manager.command = [sys.executable, "-c", STUB]
    first = _fake_run(app, "sft-1", ALICE)
    (first.path / THEN).write_text(dump_yaml(build_config("tiny")))
    try:
        second, = app.manager.poll()
        assert {v for _, v in common.run_list(app)["choices"]} == {second, "sft-1"}
        assert app.active() == second and app.session(BOB).active() is None
    finally:
        _end_all(app.manager)


# ---- item 2: bounded work ----------------------------------------------------------------------------------------

def test_the_doctor_reads_a_sample_of_a_large_upload_quickly(tmp_path):
    big = write_pairs(tmp_path / "big.jsonl", n=150_000)
    app = AppState(tmp_path / "runs", hw=CPU)
    started = time.time()
    report, hist, _ = data_tab.check_data(app, "tiny", str(big), *_form())
    took = time.time() - started
    assert "**Checked the first 2,000 of 150,000 rows**" in report and "usable pairs:** 2000" in report
    assert int(hist["value"]["count"].sum()) == 2000
    assert took < 30, f"the doctor took {took:.1f} s on 150,000 rows"
    app.doctor_rows = 50
    assert "Checked the first 50 of 150,000 rows" in data_tab.check_data(app, "tiny", str(big), *_form())[0]


def test_uploads_are_hashed_in_chunks_and_cleaned_when_no_run_uses_them(tmp_path):
    uploads, root = tmp_path / "runs" / ".uploads", tmp_path / "runs"
    data = tmp_path / "two-mb.jsonl"
    data.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 45_000)  # > 2 chunks of 1 MB
    kept = setup_tab.store_upload(str(data), uploads)
    assert kept.read_bytes() == data.read_bytes()
    other = setup_tab.store_upload(str(write_pairs(tmp_path / "small.jsonl", n=3)), uploads)
    run = RunDir(root / "dpo-1").create()
    (run.path / "request.yaml").write_text(f"dataset: {kept}\n")
    day_ago = time.time() - 2 * 86400
    for path in (kept, other):
        os.utime(path, (day_ago, day_ago))
    common.clean_uploads(uploads, root)
    assert kept.exists() and not other.exists()  # a run's data stays; an upload nothing uses goes after a day


def test_an_export_removes_the_zips_made_before_it(tmp_path, monkeypatch):
    app = AppState(tmp_path / "runs", hw=CPU)
    app.exports = tmp_path / "exports"
    _fake_run(app, "dpo-1", None)
    first = export_tab.export_zip(app, "dpo-1")
    monkeypatch.setattr(export_tab, "clean_exports", lambda folder: common.clean_exports(folder, keep=0.0))
    second = export_tab.export_zip(app, "dpo-1")
    assert not Path(first).exists() and Path(second).exists()
    assert [p.name for p in app.exports.iterdir()] == [Path(second).parent.name]


# ---- the hub token -----------------------------------------------------------------------------------------------

def test_a_public_apps_runs_and_data_checks_get_no_hub_token(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from lowrank_pref.ui import withhold_hub_token

    monkeypatch.setenv("HF_TOKEN", "hf_owner_secret")
    env = RunManager(tmp_path / "a", hub_token=False).child_env()
    assert "HF_TOKEN" not in env and env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert RunManager(tmp_path / "b").child_env()["HF_TOKEN"] == "hf_owner_secret"  # locally: the user's own
    assert AppState(tmp_path / "c", hw=CPU, public=True).manager.hub_token is False
    assert AppState(tmp_path / "d", hw=CPU, public=True, share_hub_token=True).manager.hub_token is True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "")
    withhold_hub_token()
    assert "HF_TOKEN" not in os.environ and huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN is True


def test_options_and_environment_of_a_public_app(monkeypatch):
    from lowrank_pref.ui import parse_args

    for var in ("SPACE_ID", "LOWRANK_PREF_AUTH", "LOWRANK_PREF_PUBLIC", "LOWRANK_PREF_MAX_UPLOAD_MB"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args([])
    assert not args.public and args.auth is None and args.max_upload_mb is None and args.doctor_rows == 2000
    monkeypatch.setenv("SPACE_ID", "me/lowrank-pref")
    monkeypatch.setenv("LOWRANK_PREF_AUTH", "ann:pw1, bo:pw:2")
    args = parse_args(["--max-upload-mb", "50", "--kill-after", "5"])
    assert args.public and args.auth == [("ann", "pw1"), ("bo", "pw:2")] and args.max_upload_mb == 50
    assert args.kill_after == 5.0


def test_the_page_says_which_mode_applies(tmp_path):
    from lowrank_pref.ui import build_app
    from lowrank_pref.ui.__init__ import mode_line

    demo = build_app(tmp_path / "runs", hw=CPU, public=True, auth=[("ann", "pw")])
    assert demo.launch_kwargs["auth"] == [("ann", "pw")] and demo.launch_kwargs["max_file_size"] == 200 * 2**20
    assert "the runs started under your user name" in mode_line(demo.app_state)
    assert "started from this browser" in mode_line(AppState(tmp_path / "runs", hw=CPU, public=True))
    local = build_app(tmp_path / "runs", hw=CPU, public=False)
    assert local.launch_kwargs["max_file_size"] is None and "Local mode" in mode_line(local.app_state)


# ---- the launched app, public --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """One public app with a 1 MB upload limit; its runs are the stand-in process."""
    from gradio_client import Client

    from lowrank_pref.ui import build_app

    demo = build_app(tmp_path_factory.mktemp("runs"), hw=CPU, public=True, max_upload_mb=1)
    demo.manager.command = [sys.executable, "-c", STUB]
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **demo.launch_kwargs)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield demo, url, Client(url, verbose=False), Client(url, verbose=False)
    finally:
        _end_all(demo.manager)
        demo.close()


def _raw_call(url: str, api: str, data: list) -> str:
    """An anonymous API call as curl would make it: POST, then read the event stream."""
    import httpx

    event = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api}/{event}", timeout=60).text


def test_public_app_sessions_and_anonymous_calls(space):
    from gradio_client.exceptions import AppError

    demo, url, client_a, client_b = space
    assert any("**Public mode.**" in str(c.get("props", {}).get("value")) for c in demo.config["components"])
    message, update = client_a.predict("tiny", None, False, *_form(), owner=ALICE, api_name="/start")
    run = update["value"]
    assert f"Started **{run}**" in message
    _wait(lambda: _running(demo.manager, run))
    listed_b = client_b.predict(None, owner=BOB, api_name="/runs")
    assert run not in [v for _, v in listed_b["choices"]]
    assert run in [v for _, v in client_a.predict(None, owner=ALICE, api_name="/runs")["choices"]]
    # another session's run: Gradio refuses a name its run list never offered; past that, the app says no such run
    refused = rf"no run named '{run}'|Value: {run} is not in the list of choices"
    for api, args in [("/stop", (run,)), ("/export_zip", (run,)), ("/resume", (run,)),
                      ("/chat", (run, "hi", False, 8, False, 0.7, 0.9, [], []))]:
        with pytest.raises(AppError, match=refused):
            client_b.predict(*args, owner=BOB, api_name=api)
    with pytest.raises(AppError, match="no run of yours is training"):
        client_b.predict(None, owner=BOB, api_name="/stop")
    with pytest.raises(AppError, match=f"no run named '{run}'"):  # Alice's own session, without her key: refused
        client_a.predict(run, api_name="/stop")
    assert "event: error" in _raw_call(url, "stop", [None])  # the review's attack: POST /call/stop {"data":[null]}
    assert "no run of yours is training" in _raw_call(url, "stop", [None, None])
    assert "event: error" in _raw_call(url, "stop", [run, "not-alices-key-at-all"])
    assert demo.manager.run_dir(run).state() == "running"  # nobody but Alice stopped it
    client_a.predict(run, owner=ALICE, api_name="/stop")
    assert demo.manager.wait(run, timeout=30) == "stopped"


def test_public_app_refuses_paths_large_uploads_and_renders_no_html_from_data(space, tmp_path):
    import httpx
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    demo, url, client, _ = space
    with pytest.raises(AppError, match="dataset: this public app reads no files on its server") as e:
        client.predict("tiny", None, *_form(dataset="/etc/passwd"), api_name="/doctor")
    assert "passwd" not in str(e.value)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (2 << 20))
    with open(big, "rb") as f:  # past the client: the server refuses it too
        refused = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.jsonl", f)}, timeout=60)
    assert refused.status_code == 413
    evil = tmp_path / "evil.csv"
    evil.write_text('"<img src=x onerror=alert(1)>",other\n1,2\n')
    with pytest.raises(AppError) as e:
        client.predict("tiny", handle_file(str(evil)), *_form(), api_name="/doctor")
    text = str(e.value)
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "<img" not in text
    assert "/tmp" not in text and str(tmp_path) not in text  # the upload is named, its server path is not
    report, _, _ = client.predict("tiny", handle_file(str(write_pairs(tmp_path / "ok.jsonl", n=10))), *_form(),
                                  api_name="/doctor")
    assert "usable pairs:** 10" in report and not list(demo.manager.root.glob(".uploads/*"))


def test_public_app_reward_model_is_the_visitors_own_run_through_the_api(space):
    """Issue 14 in public, through the launched app's API: the data check, the saved settings and RL-from-a-reward-
    run read the form's reward model as a run of the calling session (their own), never another visitor's."""
    from gradio_client.exceptions import AppError

    demo, _, client, _ = space
    for name, owner in (("rm-alice", ALICE), ("rm-bob", BOB)):
        _fake_run(demo.app_state, name, owner).write_status(task="reward")
    form = _form("tiny-rl", reward_model="rm-alice")
    report, _, _ = client.predict("tiny-rl", None, *form, owner=ALICE, api_name="/doctor")
    assert "usable prompts:** 240" in report  # her own reward run: the check reads the rl task's prompts
    assert "reward_model: " in open(client.predict("tiny-rl", None, *form, owner=ALICE, api_name="/save_settings")
                                    ).read()
    for owner in (BOB, None):  # another visitor, or no session: refused as a path would be
        with pytest.raises(AppError, match="reward_model: this public app reads no files on its server; pick one"):
            client.predict("tiny-rl", None, *form, owner=owner, api_name="/doctor")
    client.predict(None, owner=ALICE, api_name="/runs")  # her run list, as her page shows it
    out = client.predict("rm-alice", owner=ALICE, api_name="/rl_from_reward")
    assert out[0]["value"] == "tiny-rl" and "against the reward model **rm-alice**" in out[-1]
    with pytest.raises(AppError, match="not a finished reward run"):
        client.predict("rm-alice", owner=BOB, api_name="/rl_from_reward")
