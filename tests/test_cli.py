"""End-to-end: the CLI on tiny 4-bit models, learning, adapter reload, resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, run_cli, write_pairs
from lowrank_pref.artifacts import read_metrics
from lowrank_pref.config import build_config
from lowrank_pref.data import collate, prepare
from lowrank_pref.run import main, parser, resolve


def _last_eval(metrics):
    return [m for m in metrics if any(k.startswith("eval_") for k in m)][-1]


def test_tiny_preset_learns_offline(tmp_path):
    out = tmp_path / "out"
    res = run_cli("--preset", "tiny", "--output-dir", str(out))
    assert res.returncode == 0, res.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert _last_eval(metrics)["eval_rewards/accuracies"] >= 0.9
    train = [m for m in metrics if "loss" in m]
    assert train[-1]["step"] == 60  # the last step is always logged
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second",
                "peak_memory_mb"):
        assert key in train[-1], key
    assert train[-1]["loss"] < train[0]["loss"]
    assert "reference: base" in (out / "config.yaml").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert "final eval" in res.stdout


def _heldout_pairs(tok, n=16):
    path = ROOT / "tests" / ".heldout.jsonl"
    rows = [json.loads(line) for line in write_pairs(path, n=n, seed=99).read_text().splitlines()]
    path.unlink()
    pairs, _, _ = prepare(rows, tok, source="heldout", columns={}, max_length=64, max_prompt_length=32)
    return collate(pairs, tok.pad_token_id), len(pairs)


def _logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def test_dpo_on_unseen_model_and_data_prefers_heldout_chosen(tmp_path, unseen_model_dir):
    data = write_pairs(tmp_path / "train.jsonl", n=96, seed=5)
    out = tmp_path / "out"
    res = run_cli("--model", str(unseen_model_dir), "--dataset", str(data), "--output-dir", str(out),
                  "--max-steps", "30", "learning_rate=3e-3", "batch_size=8", "max_length=64",
                  "max_prompt_length=32", "lora.r=8")
    assert res.returncode == 0, res.stderr
    # PEFT alone, on the plain base: implicit reward beta * (log pi - log pi_ref) prefers held-out chosen answers
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(unseen_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    batch, n = _heldout_pairs(tok)
    with torch.no_grad():
        policy = _logps(model, batch)
        with model.disable_adapter():
            ref = _logps(model, batch)
    reward = policy - ref
    accuracy = (reward[:n] > reward[n:]).float().mean().item()
    assert accuracy >= 0.9, accuracy


def test_reward_model_ranks_heldout_pairs(tmp_path, unseen_model_dir):
    data = write_pairs(tmp_path / "train.jsonl", n=96, seed=5)
    out = tmp_path / "rm"
    res = run_cli("--task", "reward", "--model", str(unseen_model_dir), "--dataset", str(data), "--output-dir",
                  str(out), "--max-steps", "30", "learning_rate=3e-3", "batch_size=8", "max_length=64",
                  "max_prompt_length=32")
    assert res.returncode == 0, res.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert {"loss", "accuracy", "margin"} <= set(metrics[0])
    assert "eval_accuracy" in _last_eval(metrics)
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(unseen_model_dir, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    batch, n = _heldout_pairs(tok)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert (scores[:n] > scores[n:]).float().mean().item() >= 0.9


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, pairs_file):
    common = ["--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--max-steps", "8", "--save-steps",
              "2", "batch_size=4", "gradient_accumulation_steps=2", "lora.dropout=0.1", "eval_steps=4"]
    full = tmp_path / "full"
    assert run_cli(*common, "--output-dir", str(full)).returncode == 0
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_pref.run", *common, "--output-dir", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoint-4" / "state.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-4").exists()
    assert not (killed / "adapter").exists()  # it really was killed mid-run
    res = run_cli("--output-dir", str(killed), "--resume")
    assert res.returncode == 0, res.stderr
    a = {m["step"]: m for m in read_metrics(full / "metrics.jsonl") if "loss" in m}
    b = {m["step"]: m for m in read_metrics(killed / "metrics.jsonl") if "loss" in m}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-5), step


def test_same_effective_batch_same_update_whatever_the_split(tmp_path, tiny_model_dir, pairs_file):
    from lowrank_pref.loop import train

    results = []
    for bs, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = build_config("tiny", overrides={
            "model": str(tiny_model_dir), "dataset": str(pairs_file), "max_steps": "2", "batch_size": str(bs),
            "gradient_accumulation_steps": str(accum), "max_grad_norm": "0", "lora.dropout": "0",
            "data.eval_fraction": "0", "warmup_ratio": "0", "lr_scheduler_type": "constant"})
        out = tmp_path / f"{bs}x{accum}"
        train(cfg, out)
        results.append([m for m in read_metrics(out / "metrics.jsonl") if "loss" in m])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # unclipped: the summed gradient


@pytest.mark.parametrize("args,needle", [
    (["lora.rank=8"], "unknown config key 'lora.rank'. Did you mean 'lora.r'?"),
    (["beta=-1"], "'beta' must be > 0.0"),
    (["loss_type=sigmod"], "Did you mean 'sigmoid'?"),
    (["batch_size=two"], "'batch_size' must be a whole number"),
    (["--preset", "24gig-dpo"], "no preset '24gig-dpo'"),
    (["max_prompt_length=512", "max_length=256"], "max_prompt_length (512) must be smaller than max_length"),
    (["--dataset", "missing.jsonl"], "dataset file 'missing.jsonl' does not exist"),
    (["--model", "./no-such-model"], "model folder './no-such-model' does not exist"),
    (["notakeyvalue"], "is not a key=value override"),
    (["learning_rate=nan"], "'learning_rate' must be a finite number"),  # was an internal error
    (["seed=1e30"], "'seed' must be <= 9223372036854775807"),  # was an internal error from torch.manual_seed
    # overrides before, between and after options: the bad value is named, so the words were read as overrides
    (["seed=3", "--max-steps", "2", "batch_size=two"], "'batch_size' must be a whole number"),
    (["seed=3", "--max-steps", "2", "notakeyvalue"], "'notakeyvalue' is not a key=value override"),
])
def test_bad_input_is_one_plain_message_and_exit_2(tmp_path, capsys, args, needle):
    """In this process (run.main, as ``python -m lowrank_pref.run`` calls it): a fresh interpreter for each of these
    cost the suite 35 s of imports; the tests below and test_bad_rows_... check the same path as a process."""
    import logging
    import warnings

    loggers = [logging.root, *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    levels, handlers = [x.level for x in loggers], logging.root.handlers[:]
    try:
        with warnings.catch_warnings():  # quiet_libraries' filters
            code = main([*args, "--output-dir", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    finally:  # main's logging setup (basicConfig, quiet_libraries' levels) stays with this test
        logging.root.handlers[:] = handlers
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    _assert_one_plain_error(subprocess.CompletedProcess(args, code, "", capsys.readouterr().err), needle)


def _assert_one_plain_error(res, needle):
    assert res.returncode == 2, (res.returncode, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr


@pytest.mark.parametrize("name,content,needle", [
    ("empty.jsonl", b"", "the file is empty"),  # was 'internal error: StopIteration', exit 1
    ("pairs.csv", "prompt,chosen,rejected\nQ,Caf\u00e9,Bad\n".encode("latin-1"), "line 2 is not UTF-8 text"),
], ids=["empty.jsonl", "latin1.csv"])
def test_malformed_data_file_is_one_plain_message_naming_it(tmp_path, name, content, needle):
    data = tmp_path / name
    data.write_bytes(content)
    res = run_cli("--dataset", str(data), "--output-dir", str(tmp_path / "o"))
    _assert_one_plain_error(res, f"error: {data}: {needle}")


def test_overrides_anywhere_on_the_line():
    args = parser().parse_args(["seed=3", "--output-dir", "runs/a", "lora.r=4", "--max-steps", "5", "beta=0.2",
                                "--preset", "tiny", "batch_size=2"])
    cfg = resolve(args)
    assert (cfg.seed, cfg.lora.r, cfg.beta, cfg.batch_size) == (3, 4, 0.2, 2)
    assert (cfg.output_dir, cfg.max_steps) == ("runs/a", 5)
    assert parser().parse_args(["--list-keys", "seed=3"]).list_keys
    assert parser().parse_args(["--output-dir", "o", "--resume", "seed=3"]).resume
    for argv in (["--output-dir", "o", "oops"], ["seed=3", "--resume", "=1"]):
        with pytest.raises(SystemExit) as e:
            parser().parse_args(argv)
        assert e.value.code == 2


def test_bad_rows_refused_with_row_and_column(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b c", "rejected": "d"}) + "\n"
                 + json.dumps({"prompt": "a", "chosen": "", "rejected": "d"}) + "\n")
    res = run_cli("--dataset", str(f), "data.on_bad_rows=error", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "row 2, column 'chosen': is empty" in res.stderr
    assert "Traceback" not in res.stderr


def test_nonfinite_steps_stop_the_run_plainly(tmp_path, tiny_model_dir, pairs_file):
    res = run_cli("--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir", str(tmp_path / "o"),
                  "beta=1e38", "max_nonfinite_steps=3", "--max-steps", "10")
    assert res.returncode == 1
    assert "3 steps in a row had a non-finite loss or gradient" in res.stderr
    assert "Traceback" not in res.stderr
    status = json.loads((tmp_path / "o" / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite" in status["message"]


def test_existing_run_folder_is_not_overwritten(tmp_path, tiny_model_dir, pairs_file):
    args = ["--model", str(tiny_model_dir), "--dataset", str(pairs_file), "--output-dir", str(tmp_path / "o"),
            "--max-steps", "2"]
    assert run_cli(*args).returncode == 0
    before = (tmp_path / "o" / "status.json").read_text()
    res = run_cli(*args)
    assert res.returncode == 2 and "already holds a run; use --resume" in res.stderr
    # a refused run writes nothing: the completed run stays "completed" (it was turned into "failed")
    assert (tmp_path / "o" / "status.json").read_text() == before
    assert json.loads(before)["state"] == "completed"


def test_list_presets_and_keys():
    res = run_cli("--list-presets")
    assert res.returncode == 0 and "tiny" in res.stdout
    res = run_cli("--list-keys")
    assert "lora.r" in res.stdout and "beta" in res.stdout
