"""One run on several processes (issue 17): torchrun with the gloo backend on the CPU, tiny models, few steps.

A 2-process run with 2 pairs per rank must be the 1-process run with 4 pairs per step (2 x 2 micro-batches): the same
loss curve and adapter; only rank 0 writes the run folder (seen by an audit hook in every process); SIGTERM to the
launcher stops both ranks with a checkpoint and --resume gives the uninterrupted result; a killed rank ends the run
within seconds with a message naming it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_pairs
from lowrank_pref.artifacts import read_metrics

STEPS = 8
AUDIT = '''
import os, sys, json
_dir, _run = os.environ["AUDIT_DIR"], os.environ["AUDIT_RUN"]
_log = open(os.path.join(_dir, "rank-" + os.environ.get("RANK", "launcher") + ".log"), "a", buffering=1)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        paths = [args[0]] if writing else []
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for p in paths:
        p = os.fsdecode(p)
        if os.path.abspath(p).startswith(_run):
            _log.write(json.dumps([event, p]) + "\\n")
sys.addaudithook(_hook)
'''


def _args(model, data, out, **overrides):
    settings = {"model": model, "dataset": data, "max_steps": STEPS, "save_steps": 2, "eval_steps": 4,
                "batch_size": 2, "lora.dropout": 0.0, "data.eval_fraction": 0.1, "max_length": 64,
                "max_prompt_length": 24, **overrides}
    return ["--output-dir", str(out), *(f"{k.replace('__', '.')}={v}" for k, v in settings.items())]


def _env(tmp, **extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LOWRANK_PREF_PROGRESS="0",
                LOWRANK_PREF_CACHE=str(tmp / "cache"), **extra)


def _launch(nproc, args, env, **popen):
    """torchrun (one process: plain python) on a free port; stdout and stderr piped."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
           if nproc > 1 else [sys.executable])
    return subprocess.Popen([*cmd, "-m", "lowrank_pref.run", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def _finish(proc, timeout=240):
    """Wait for a launched run; on a timeout or any failure kill its whole process group (the ranks too)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _end(proc)
    return proc.returncode, out + err


def _end(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    else:  # the launcher ended; a rank it left behind must not outlive the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(nproc, args, env, timeout=240):
    code, output = _finish(_launch(nproc, args, env), timeout)
    assert code == 0, output[-3000:]
    return output


def _curve(out):
    """Train lines (loss, grad_norm by step) and the final eval line of a run's metrics."""
    metrics = read_metrics(out / "metrics.jsonl")
    train = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics if "loss" in m]
    return train, [m for m in metrics if "eval_loss" in m][-1]


def _assert_same(a: Path, b: Path, tol=1e-5):
    (ta, ea), (tb, eb) = _curve(a), _curve(b)
    assert [m[0] for m in ta] == [m[0] for m in tb] == list(range(1, STEPS + 1))
    for x, y in zip(ta, tb):
        assert abs(x[1] - y[1]) <= tol and abs(x[2] - y[2]) <= tol, (x, y)
    assert ea["step"] == eb["step"] == STEPS
    assert sorted(ea) == sorted(eb) and all(abs(ea[k] - eb[k]) <= tol for k in ea), (ea, eb)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=tol), k
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # trained, not the zero init compared


def _status(out):
    try:
        return json.loads((out / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it got there:\n"
                                 f"{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("dist_data") / "pairs.jsonl", n=60)


@pytest.fixture(scope="module")
def dpo_runs(tiny_model_dir, data, tmp_path_factory):
    """The dpo runs the tests compare: 1 process x 2 micro-batches of 2 pairs, and 2 processes x 1 of 2 (whose
    writes the audit hook records, per process)."""
    tmp = tmp_path_factory.mktemp("dist_dpo")
    one, two, audit = tmp / "one", tmp / "two", tmp / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    _run(1, _args(tiny_model_dir, data, one, gradient_accumulation_steps=2), _env(tmp / "c1"))
    env = _env(tmp / "c2", AUDIT_DIR=str(audit), AUDIT_RUN=str(two))
    env["PYTHONPATH"] = f"{audit}{os.pathsep}{ROOT}"
    output = _run(2, _args(tiny_model_dir, data, two, gradient_accumulation_steps=1), env)
    return one, two, audit, tmp / "c2" / "cache", output


def test_two_processes_give_the_one_process_run_for_dpo(dpo_runs):
    one, two, _, _, output = dpo_runs
    _assert_same(one, two)
    status = _status(two)
    assert status["state"] == "completed"
    assert (status["world_size"], status["batch_per_rank"], status["global_batch"]) == (2, 2, 4)
    assert [r["rank"] for r in status["ranks"]] == [0, 1] and {r["device"] for r in status["ranks"]} == {"cpu"}
    assert len({r["pid"] for r in status["ranks"]}) == 2 and len(status["rank_peak_memory_mb"]) == 2
    assert "distributed: ddp on 2 processes (gloo); 2 pairs x 1 micro-steps = 2 pairs per rank, 4 pairs per " \
           "optimizer step" in (two / "train.log").read_text()
    assert output.count("adapter saved to") == 1  # rank 0 reports; rank 1 is quiet
    state = json.loads((two / "checkpoint-6" / "state.json").read_text())
    assert (state["micro_batches_done"], state["world_size"]) == (12, 2)  # the data position is global


def test_only_rank_0_writes_the_run_folder_and_the_reference_cache_holds_every_ranks_pairs(dpo_runs):
    _, two, audit, cache, _ = dpo_runs
    rank0 = [json.loads(line) for line in (audit / "rank-0.log").read_text().splitlines()]
    assert (audit / "rank-1.log").read_text() == ""  # the hook ran in rank 1 (its file exists) and saw no write
    written = {Path(p).name for _, p in rank0}
    assert {"status.json", "metrics.jsonl", "train.log", "config.yaml", "data_report.json", "checkpoint-6",
            "adapter"} <= written
    assert any(event == "os.rename" and Path(p).name == "adapter" for event, p in rank0)
    # the reference cache (written by rank 0) holds the pairs of both ranks: every pair trained on and evaluated
    report = json.loads((two / "data_report.json").read_text())
    (stored,) = (cache / "ref_logps").glob("*.json")
    assert len(json.loads(stored.read_text())["values"]) == STEPS * 4 + report["eval_pairs"]


def test_two_processes_give_the_one_process_run_for_the_reward_model(tiny_model_dir, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(1, _args(tiny_model_dir, data, one, task="reward", gradient_accumulation_steps=2), _env(tmp_path))
    _run(2, _args(tiny_model_dir, data, two, task="reward", gradient_accumulation_steps=1), _env(tmp_path))
    _assert_same(one, two)
    assert _status(two)["world_size"] == 2


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint_and_resume_is_exact(dpo_runs, tiny_model_dir,
                                                                                        data, tmp_path):
    _, two, _, _, _ = dpo_runs
    out = tmp_path / "stopped"
    args = _args(tiny_model_dir, data, out, gradient_accumulation_steps=1)
    proc = _launch(2, args, _env(tmp_path))
    try:
        _wait(lambda: _status(out).get("step", 0) >= 3, proc)
        os.kill(proc.pid, signal.SIGTERM)  # the launcher, as a scheduler or Ctrl-C would
        code, output = _finish(proc, timeout=60)
    finally:
        _end(proc)
    assert code != 0
    status = _status(out)
    assert status["state"] == "stopped" and "continue with --resume" in status["message"], status
    assert 3 <= status["step"] < STEPS and (out / f"checkpoint-{status['step']}").is_dir(), output[-2000:]
    assert "Traceback" not in (out / "train.log").read_text()
    _run(2, [*args, "--resume"], _env(tmp_path))
    _assert_same(two, out)


def test_a_killed_rank_ends_the_run_within_seconds_with_a_message(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    proc = _launch(2, _args(tiny_model_dir, data, out, gradient_accumulation_steps=1, max_steps=400, save_steps=1000,
                            eval_steps=1000), _env(tmp_path))
    try:
        ranks = _wait(lambda: _status(out).get("step", 0) >= 2 and _status(out)["ranks"], proc)
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        t0 = time.time()
        code, output = _finish(proc, timeout=60)
        seconds = time.time() - t0
    finally:
        _end(proc)
    assert code != 0 and seconds < 20, (seconds, output[-2000:])
    status = _status(out)
    assert status["state"] == "failed"
    assert status["message"].startswith("rank 1 of 2 ended (crashed or killed) during step "), status["message"]
    assert "the run stopped; continue with --resume (from step" in status["message"]
    assert "[rank 0] error: rank 1 of 2 ended" in output
    assert (out / f"checkpoint-{status['step']}").is_dir(), output[-3000:]  # the last complete step, by rank 0
    assert "internal error" not in output


def test_resuming_on_another_number_of_micro_batches_per_step_is_refused(dpo_runs, tiny_model_dir, data, tmp_path):
    import shutil

    from lowrank_pref.config import ConfigError, build_config
    from lowrank_pref.loop import train

    _, two, _, _, _ = dpo_runs
    out = tmp_path / "copy"
    shutil.copytree(two, out)
    (out / ".lock").unlink()
    cfg = build_config("tiny", overrides=dict(a.split("=", 1) for a in _args(tiny_model_dir, data, out,
                                                                             gradient_accumulation_steps=1)[2:]))
    cfg.output_dir = str(out)
    with pytest.raises(ConfigError, match=r"checkpoint-6 was written by a run of 2 micro-batches per step \(2 "
                                          r"process\(es\)\), this one takes 1: .*gradient_accumulation_steps=2 on 1"):
        train(cfg, out, resume=True)


def test_launch_settings_that_would_not_run_as_asked_are_refused(monkeypatch):
    from lowrank_pref import distributed
    from lowrank_pref.config import ConfigError, build_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="distributed=ddp needs several processes, started by a launcher: torchrun"):
        distributed.init(build_config("tiny", overrides={"distributed": "ddp"}))
    assert distributed.init(build_config("tiny")).size == 1  # auto, no launcher: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launcher started 2 processes but distributed=none"):
        distributed.init(build_config("tiny", overrides={"distributed": "none"}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="distributed=fsdp .* needs CUDA"):
            distributed.init(build_config("tiny", overrides={"distributed": "fsdp"}))
    monkeypatch.setenv("LOWRANK_PREF_DIST_TIMEOUT_S", "nan")
    with pytest.raises(ConfigError, match="LOWRANK_PREF_DIST_TIMEOUT_S must be a number of seconds"):
        distributed.init(build_config("tiny"))
    assert distributed.world().size == 1


def test_memory_estimate_per_rank():
    """python -m lowrank_pref.memory --processes N: DDP keeps the whole model on every rank plus the all-reduced
    gradients; FSDP shards the layers' 4-bit weights N ways and gathers a layer (two, prefetched) at a time."""
    from lowrank_pref.config import build_config
    from lowrank_pref.memory import GB, arch_of, estimate, main, per_rank

    cfg = build_config("24gb-dpo")
    a = arch_of(cfg.model)
    one = estimate(cfg, a, gpu=True)
    ddp = per_rank(one, cfg, 4, a)
    assert ddp["weights"] == one["weights"] and ddp["activations"] == one["activations"]
    assert ddp["gradient_all_reduce"] == pytest.approx(a.lora_params(cfg.lora.r) * 8 / GB, abs=1e-4)
    cfg.distributed = "fsdp"
    fsdp = per_rank(one, cfg, 4, a)
    layer = a.linear_params / a.layers * 0.516 / GB
    assert fsdp["weights"] == pytest.approx(one["weights"] / 4 + 2 * layer, abs=1e-3)
    assert fsdp["lora_and_optimizer"] == one["lora_and_optimizer"] and fsdp["embeddings"] == one["embeddings"]
    assert fsdp["activations"] == one["activations"] and fsdp["gradient_all_reduce"] == ddp["gradient_all_reduce"]
    assert fsdp["total"] == pytest.approx(sum(v for k, v in fsdp.items() if k != "total"), abs=1e-3)
    assert fsdp["total"] < one["total"] < ddp["total"]
    assert per_rank(one, cfg, 1, a) == one
    assert main(["--preset", "24gb-dpo", "--processes", "2", "distributed=fsdp"]) == 0


def test_the_app_offers_all_gpus_and_starts_the_run_through_the_launcher(tmp_path, monkeypatch):
    """On a machine with 2 GPUs the Setup form carries "use all 2 GPUs": the command shown and the child started
    go through torchrun (a stand-in records what it was given), and Resume starts it on as many again."""
    from conftest import wait_until
    from lowrank_pref import runs
    from lowrank_pref.config import build_config
    from lowrank_pref.ui.common import AppState
    from lowrank_pref.ui.setup import form_values, settings_changed
    from lowrank_pref.ui.train import start

    recorder = tmp_path / "torchrun.py"
    recorder.write_text("import json, sys\nopen(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')\n")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setattr(runs, "launcher", lambda n: [sys.executable, str(recorder), str(calls), f"--nproc={n}"])
    app = AppState(tmp_path / "runs", hw={"gpu": "card", "memory_gb": 24.0, "gpus": 2})
    values = form_values(build_config("tiny"))
    _, command, _, _ = settings_changed(app, "tiny", None, False, *values, True)
    assert command.startswith("torchrun --nproc-per-node 2 -m lowrank_pref.run --preset tiny")
    _, plain, _, _ = settings_changed(app, "tiny", None, False, *values, False)
    assert plain.startswith("python -m lowrank_pref.run --preset tiny")
    start(app, "tiny", None, False, *values, True)
    (argv,) = [json.loads(line) for line in wait_until(lambda: calls.exists() and calls.read_text()).splitlines()]
    assert argv[:3] == ["--nproc=2", "-m", "lowrank_pref.run"] and argv[3] == "--config"
    name = app.runs()[0]["name"]
    assert app.run_dir(name).read_status()["processes"] == 2
    wait_until(lambda: app.manager.active() is None)
    app.manager.resume(name)
    wait_until(lambda: len(calls.read_text().splitlines()) == 2)
    assert json.loads(calls.read_text().splitlines()[1])[:3] == ["--nproc=2", "-m", "lowrank_pref.run"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP-QLoRA needs CUDA GPUs")
def test_fsdp_qlora_on_gpus_gives_the_one_gpu_run(small_model, tmp_path):
    """distributed=fsdp on every GPU there is (one is enough: FSDP still shards, over one rank): the 4-bit layers
    sharded, the same loss curve and adapter as the plain one-GPU run with the same global batch, and a resume."""
    model, pairs = small_model
    n = min(torch.cuda.device_count(), 4)
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    common = dict(batch_size=2, max_length=256, max_prompt_length=128, dtype="bf16", eval_steps=1000,
                  reference_cache="false")  # fsdp refuses the cache (a cached rank would skip a collective)
    _run(1, _args(model, pairs, one, gradient_accumulation_steps=n, **common), _env(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
           "lowrank_pref.run", *_args(model, pairs, fsdp, gradient_accumulation_steps=1, distributed="fsdp",
                                      **common)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    code, output = _finish(proc, timeout=600)
    assert code == 0, output[-3000:]
    assert f"fsdp: 4 decoder layers sharded over {n} ranks" in (fsdp / "train.log").read_text()
    assert _status(fsdp)["distributed"] == "fsdp" or n == 1
    _assert_same(one, fsdp, tol=2e-3)  # bf16 forwards; the gathered weights are the same bits
