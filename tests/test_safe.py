"""Safe to leave running: what a damaged, crafted or busy run folder, a stop at any moment, a full disk or an absurd
setting does to a run (issue 13, the engine's side). Every test here failed before its fix."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, write_pairs
from lowrank_pref.artifacts import RunDir, read_metrics
from lowrank_pref.config import ConfigError, build_config


def _cfg(model_dir, data, **overrides):
    return build_config("tiny", overrides={"model": str(model_dir), "dataset": str(data), "reference_cache": "false",
                                           "lora.dropout": "0.1", **{k.replace("__", "."): str(v)
                                                                     for k, v in overrides.items()}})


def _train(cfg, out, resume=False):
    from lowrank_pref.loop import train

    return train(cfg, out, resume=resume)


def _losses(out):
    return {m["step"]: m for m in read_metrics(Path(out) / "metrics.jsonl") if "loss" in m}


def _assert_same_run(a, b):
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-5), step


def _status(out):
    return json.loads((Path(out) / "status.json").read_text())


def _wait_for(predicate, proc, timeout=240):
    """Wait on a run's progress (its files), not a fixed sleep; fails early if the process ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it got there")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _start_cli(*args, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "lowrank_pref.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _end(proc):
    """Stop a test's process whatever happened, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


# ---- 3. resume runs no code; 8. a damaged checkpoint falls back to the one before -----------------------------------

@pytest.fixture()
def finished_run(tmp_path, tiny_model_dir, pairs_file):
    """A completed 8-step run with checkpoints 4 and 6 (save_steps=2, two kept), and its metrics."""
    cfg = _cfg(tiny_model_dir, pairs_file, max_steps=8, save_steps=2, batch_size=4, gradient_accumulation_steps=2,
               eval_steps=4)
    out = tmp_path / "run"
    _train(cfg, out)
    assert [s for s, _ in RunDir(out).checkpoints()] == [4, 6]
    return cfg, out, _losses(out)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this calls open(marker, "w"): code from the file runs
        return (open, (self.marker, "w"))


def test_a_crafted_rng_pt_runs_nothing_and_the_checkpoint_before_is_used(finished_run, tmp_path, caplog):
    import torch

    cfg, out, full = finished_run
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), out / "checkpoint-6" / "rng.pt")
    with caplog.at_level(logging.INFO, logger="lowrank_pref"):
        _train(cfg, out, resume=True)
    assert not marker.exists()  # loaded with weights_only=True: the unpickler refused open()
    assert f"checkpoint {out / 'checkpoint-6'} is damaged" in caplog.text
    assert "resumed from checkpoint-4" in caplog.text
    _assert_same_run(full, _losses(out))


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(finished_run, caplog):
    cfg, out, full = finished_run
    weights = out / "checkpoint-6" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    with caplog.at_level(logging.INFO, logger="lowrank_pref"):
        _train(cfg, out, resume=True)
    log = (out / "train.log").read_text()
    assert f"checkpoint {out / 'checkpoint-6'} is damaged" in log and "moved aside to checkpoint-6.damaged" in log
    assert "resumed from checkpoint-4 (step 4 of 8)" in log
    caplog.clear()
    assert (out / "checkpoint-6.damaged").is_dir() and _status(out)["state"] == "completed"
    _assert_same_run(full, _losses(out))  # the final metrics are the uninterrupted run's

    # no checkpoint loads at all: the run starts over, says so, and still ends where the uninterrupted one did
    for step, path in RunDir(out).checkpoints():
        (path / "state.json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="lowrank_pref"):
        _train(cfg, out, resume=True)
    assert "no usable checkpoint" in caplog.text and "starting over from step 0" in caplog.text
    _assert_same_run(full, _losses(out))


def test_writes_that_must_survive_a_crash_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    from lowrank_pref import artifacts

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(artifacts.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)),
                                                              real_replace(a, b))[1])
    run = RunDir(tmp_path).create()
    run.write_status(state="running")
    assert events[0] == "fsync" and events[1] == ("replace", "status.json") and events[2] == "fsync"  # file, folder
    events.clear()
    tmp = run.new_checkpoint_dir(3)
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "w.safetensors").write_bytes(b"x")
    (tmp / "state.json").write_text("{}")
    run.commit_checkpoint(tmp, 3, keep=2)
    rename = events.index(("replace", "checkpoint-3"))
    assert events[:rename].count("fsync") >= 4 and events[rename + 1:] == ["fsync"]  # 2 files, 2 folders; parent


# ---- 5. a stop at any moment; absurd sizes -------------------------------------------------------------------------

def test_a_stop_within_a_step_checkpoints_the_last_complete_step_and_resume_is_exact(tmp_path, tiny_model_dir,
                                                                                      pairs_file, monkeypatch):
    from lowrank_pref.loop import RunStopped
    from lowrank_pref.tasks import task_class

    cfg = _cfg(tiny_model_dir, pairs_file, max_steps=5, save_steps=100, batch_size=2, gradient_accumulation_steps=4,
               eval_steps=2)
    _train(cfg, tmp_path / "full")
    full = _losses(tmp_path / "full")

    task = task_class("dpo")
    real = task.losses
    calls = []

    def losses(self, model, items):  # SIGTERM in the middle of step 4's second micro-batch (training calls only)
        if model.training:
            calls.append(1)
            if len(calls) == 3 * 4 + 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, items)

    monkeypatch.setattr(task, "losses", losses)
    out = tmp_path / "stopped"
    with pytest.raises(RunStopped, match="stopped during step 4; continue with --resume"):
        _train(cfg, out)
    assert len(calls) == 3 * 4 + 2  # it ended after that micro-batch, not after the step
    status = _status(out)
    assert (status["state"], status["step"]) == ("stopped", 3)
    assert [s for s, _ in RunDir(out).checkpoints()] == [3]  # the last complete step, not the cut one
    monkeypatch.setattr(task, "losses", real)
    _train(cfg, out, resume=True)
    _assert_same_run(full, _losses(out))


def test_sigterm_during_data_loading_ends_the_run_within_seconds(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "big.jsonl", n=150_000)  # loading and tokenizing it takes far longer than the test
    out = tmp_path / "out"
    proc = _start_cli("--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out),
                      env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    try:
        _wait_for(lambda: _status_of(out).get("state") == "running", proc)  # written just before the data loads
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.time()
        _, stderr = proc.communicate(timeout=30)
        assert time.time() - t0 < 10, "the stop waited for the data to load"
    finally:
        _end(proc)
    assert proc.returncode == 130, stderr
    assert "stopped: stopped before the first step" in stderr and "Traceback" not in stderr
    status = _status(out)
    assert status["state"] == "stopped" and "before the first step" in status["message"]
    assert not (out / "data_report.json").exists()  # it was stopped in the data, not after it
    assert not list(out.glob(".*.tmp-*"))  # nothing half-written


def _status_of(out):
    try:
        return _status(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_step_count_is_arithmetic_and_bounded():
    import random

    from lowrank_pref.loop import Schedule

    cfg = build_config("tiny", overrides={"num_epochs": "10000", "max_steps": "null"})
    t0 = time.perf_counter()
    assert Schedule(1001, 4, 3, seed=1).total_steps(cfg) == math.ceil(10000 * 251 / 3)
    rng = random.Random(0)
    sizes = [rng.randint(20, 300) for _ in range(20_000)]
    budget = Schedule(len(sizes), 4, 2, seed=1, sizes=sizes, token_budget=1200)
    steps = budget.total_steps(cfg)  # 200 million items to pack: counted from the first epochs
    assert time.perf_counter() - t0 < 30
    per_epoch = budget.epoch_count(0)
    assert abs(steps - 10000 * per_epoch / 2) < 0.01 * steps


def test_a_run_far_beyond_the_machines_memory_is_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                                 pairs_file, monkeypatch):
    from lowrank_pref import memory

    monkeypatch.setattr(memory, "machine_memory_gb", lambda: 0.001)
    with pytest.raises(ConfigError, match="far more than the 0 GB this machine has; lower lora.r"):
        _train(_cfg(tiny_model_dir, pairs_file, max_steps=2), tmp_path / "o")
    assert not (tmp_path / "o" / "config.yaml").exists()  # written after the model loads


# ---- 9. one run a folder; 7. a pid that is someone else's -----------------------------------------------------------

def test_a_second_run_on_a_live_folder_is_refused_and_touches_nothing(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "o"
    args = ["--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir", str(out)]
    first = _start_cli(*args, "--max-steps", "5000", "eval_steps=5000", "save_steps=5000")
    try:
        _wait_for(lambda: len(read_metrics(out / "metrics.jsonl")) >= 2, first)
        before = read_metrics(out / "metrics.jsonl")
        for extra in ([], ["--resume"]):
            res = run_cli(*args, *extra)
            assert res.returncode == 2, res.stderr
            assert f"error: run folder '{out}' is in use by a run that is still training (pid {first.pid})" \
                in res.stderr
            status = _status(out)
            assert (status["state"], status["pid"], status["message"]) == ("running", first.pid, "")
            assert read_metrics(out / "metrics.jsonl")[:len(before)] == before  # not truncated or rewritten
        # the app's Stop mid-run: ends after a micro-batch with a checkpoint of the last complete step
        os.kill(first.pid, signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
    finally:
        _end(first)
    assert first.returncode == 130 and "continue with --resume" in stderr, stderr
    status = _status(out)
    assert status["state"] == "stopped" and (out / f"checkpoint-{status['step']}").is_dir()


def test_a_status_whose_pid_now_belongs_to_another_process_is_not_running(tmp_path):
    from lowrank_pref.artifacts import process_start, run_alive, this_process

    run = RunDir(tmp_path).create()
    me = this_process()
    assert me["pid"] == os.getpid() and isinstance(me["start"], int)
    run.write_status(state="running", pid=os.getpid(), process=me)
    assert run.state() == "running"
    # our pid, but recorded with another start time: the run that wrote it is gone and the number was reused
    run.write_status(process={"pid": os.getpid(), "start": me["start"] - 1})
    assert run.state() == "stopped" and not run_alive(run.read_status())
    # written by the app before the run started (no start time, or one recorded for another pid): the pid decides
    run.write_status(process={"pid": os.getpid() + 1, "start": 5})
    assert run.state() == "running"
    assert process_start(os.getpid()) == me["start"]


# ---- 10. the reference cache is not trusted --------------------------------------------------------------------------

def _cache(tmp_path, meta=None):
    from lowrank_pref.refcache import RefCache

    return RefCache(tmp_path / "ref_logps" / "abc.json", meta or {"model": "m"})


def test_an_unreadable_reference_cache_is_named_moved_aside_and_rebuilt(tmp_path, caplog):
    import torch

    path = tmp_path / "ref_logps" / "abc.json"
    path.parent.mkdir()
    for damage in (b"\xff\xfe not utf-8", b'{"fingerprint": {"model": "m"}, "val', b"[1, 2]"):
        path.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="lowrank_pref"):
            cache = _cache(tmp_path)
        assert len(cache) == 0 and f"reference cache {path} is damaged" in caplog.text
        assert path.with_name("abc.json.damaged").read_bytes() == damage and not path.exists()
        caplog.clear()

    class P:
        prompt_ids, chosen_ids, rejected_ids = [1], [2], [3]

    cache.put([P()], torch.tensor([-1.5, -2.5]))
    cache.save()
    assert _cache(tmp_path).get([P()]).tolist() == [-1.5, -2.5]  # rebuilt


def test_reference_cache_entries_that_are_not_two_finite_logprobs_are_dropped(tmp_path, caplog):
    path = tmp_path / "ref_logps" / "abc.json"
    path.parent.mkdir()
    values = {"good": [-1.0, -2.0], "int": [-3, 0], "nan": [float("nan"), -1.0], "inf": [-1.0, float("-inf")],
              "positive": [5.0, -1.0], "three": [-1.0, -1.0, -1.0], "text": ["-1", -1.0], "bool": [False, -1.0],
              "scalar": -1.0}
    path.write_text(json.dumps({"fingerprint": {"model": "m"}, "values": values}))  # json writes NaN, Infinity
    with caplog.at_level(logging.WARNING, logger="lowrank_pref"):
        cache = _cache(tmp_path)
    assert cache.values == {"good": [-1.0, -2.0], "int": [-3, 0]}
    assert "7 entries were not two finite log-probs" in caplog.text and str(path) in caplog.text


def test_reference_cache_fingerprint_follows_a_hub_models_cached_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lowrank_pref.refcache import fingerprint

    hub = tmp_path / "hub"
    repo = hub / "models--someone--model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    cfg = build_config("tiny", overrides={"model": "someone/model"})
    (repo / "refs" / "main").write_text("a" * 40)
    first = fingerprint(cfg)
    (repo / "refs" / "main").write_text("b" * 40)  # the repo changed and the new snapshot was downloaded
    second = fingerprint(cfg)
    assert (first["model_commit"], second["model_commit"]) == ("a" * 40, "b" * 40)
    pinned = fingerprint(build_config("tiny", overrides={"model": "someone/model", "revision": "a" * 40}))
    assert pinned["model_commit"] == "a" * 40
    assert "model_commit" not in fingerprint(build_config("tiny", overrides={"model": "nobody/uncached"}))


# ---- 11. a dataset folder that is a filesystem; a full disk; the push token ----------------------------------------

def test_a_dataset_folder_is_searched_within_bounds(tmp_path, monkeypatch):
    from lowrank_pref import data
    from lowrank_pref.data import DataError, load_rows

    t0 = time.perf_counter()
    with pytest.raises(DataError, match="^/: this folder holds .*point dataset at the folder of the data files"):
        load_rows("/")  # walked the whole filesystem
    assert time.perf_counter() - t0 < 30
    monkeypatch.setattr(data, "MAX_FOLDER_ENTRIES", 20)
    monkeypatch.setattr(data, "MAX_FOLDER_DEPTH", 3)
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(25):
        write_pairs(wide / f"part-{i}.jsonl", n=2)
    with pytest.raises(DataError, match=f"^{wide}: this folder holds more than 20 entries"):
        load_rows(str(wide))
    deep = tmp_path / "deep"
    (deep / "a" / "b" / "c" / "d").mkdir(parents=True)
    with pytest.raises(DataError, match=f"^{deep}: this folder holds folders more than 3 levels deep"):
        load_rows(str(deep))
    (deep / "a" / "b" / "c" / "d").rmdir()
    write_pairs(deep / "a" / "b" / "c" / "pairs.jsonl", n=3)
    assert len(load_rows(str(deep))) == 3  # within the bounds, found as before


def test_a_full_disk_ends_the_run_failed_not_running(tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys):
    from lowrank_pref import artifacts
    from lowrank_pref.run import main

    real = artifacts.atomic_write_text
    full = []

    def atomic_write_text(path, text):
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    def append_metrics(self, record):
        full.append(1)  # the disk fills up at the first metrics line
        raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics))

    monkeypatch.setattr(artifacts, "atomic_write_text", atomic_write_text)
    monkeypatch.setattr(RunDir, "append_metrics", append_metrics)
    out = tmp_path / "o"
    code = main(["--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir", str(out),
                 "--max-steps", "3", "reference_cache=false"])
    assert code == 1
    assert f"error: the disk is full ({out / 'metrics.jsonl'}): free some space" in capsys.readouterr().err
    status = _status(out)
    assert status["state"] == "failed" and "No space left on device" in status["message"]
    assert not list(out.glob(".*.tmp-*"))


def test_push_takes_the_token_from_the_environment_and_says_to_prefer_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from lowrank_pref import export

    with pytest.raises(SystemExit):
        export.main(["push", "--help"])
    assert "prefer $HF_TOKEN" in " ".join(capsys.readouterr().out.split())
    seen = {}

    class Api:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, **kw):
            return "https://hub/me/x"

        def upload_folder(self, **kw):
            seen["uploaded"] = kw["folder_path"]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert export.main(["push", "--adapter", str(adapter), "--repo-id", "me/x"]) == 0
    assert seen == {"token": "hf_from_env", "uploaded": str(adapter)}
