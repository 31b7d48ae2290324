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


# ---- 7. a pid that is someone else's -----------------------------------------------------------

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


# ---- 11. a dataset folder that is a filesystem; the push token --------------------------------------------------

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
