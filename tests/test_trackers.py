"""report_to: a real run writes TensorBoard event files whose scalars are metrics.jsonl's, under the same names and
steps, with the config as hyperparameters; a tracker that is not installed stops the run before anything is written,
with the install command; unknown names are refused."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import run_cli

from lowrank_pref import trackers
from lowrank_pref.artifacts import read_metrics
from lowrank_pref.config import ConfigError, build_config


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="pip install tensorboard")
def test_tensorboard_gets_the_runs_metrics(tmp_path, tiny_model_dir, pairs_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowrank_pref.loop import train

    cfg = build_config("tiny", overrides={"model": str(tiny_model_dir), "dataset": str(pairs_file), "max_steps": "4",
                                          "eval_steps": "2", "batch_size": "4", "report_to": "tensorboard"})
    train(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    expected: dict[str, dict[int, float]] = {}
    for record in metrics:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, {})[record["step"]] = value
    assert {"loss", "rewards/margins", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies"} <= set(scalars)
    assert set(scalars) == set(expected)  # the file's names, no others
    for tag, by_step in expected.items():
        assert scalars[tag] == pytest.approx(by_step, rel=1e-5, abs=1e-6), tag  # float32 in the event file
    assert sorted(scalars["eval_loss"]) == [2, 4]
    # the config as hyperparameters: the hparams plugin's session start, and the YAML as text
    assert "lora.r" in str(events.PluginTagToContent("hparams"))
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "beta: 0.1" in config_text and "report_to: tensorboard" in config_text


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="pip install tensorboard")
def test_a_failed_run_closes_its_trackers_and_the_folder_writes_alone_again(tmp_path):
    from lowrank_pref.artifacts import RunDir

    run = RunDir(tmp_path / "run").create()
    cfg = build_config("tiny", overrides={"report_to": "tensorboard"})
    with pytest.raises(RuntimeError, match="boom"):
        with trackers.report(cfg, run, start=0):
            run.append_metrics({"step": 1, "loss": 0.5})
            raise RuntimeError("boom")
    assert "append_metrics" not in vars(run)  # the class's own writer again
    run.append_metrics({"step": 2, "loss": 0.4})
    assert [m["step"] for m in read_metrics(run.metrics)] == [1, 2]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_missing_tracker_package_is_one_line_with_the_install_command(tmp_path, tiny_model_dir, pairs_file):
    missing = next((n for n, (module, _) in trackers.TRACKERS.items() if importlib.util.find_spec(module) is None),
                   None)
    if missing is None:
        pytest.skip("every tracker package is installed")
    done = run_cli("--preset", "tiny", "--output-dir", str(tmp_path / "run"), f"model={tiny_model_dir}",
                   f"dataset={pairs_file}", f"report_to=tensorboard,{missing}")
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.strip().splitlines() if x.startswith("error")]
    assert lines == [f"error: report_to={missing} needs the {trackers.TRACKERS[missing][1]} package: pip install "
                     f"{trackers.TRACKERS[missing][1]} (or pip install -r requirements-trackers.txt for all of them)"]
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()  # nothing loaded or written


def test_report_to_takes_a_comma_list_and_refuses_unknown_names():
    assert trackers.parse("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert trackers.parse("none") == [] and trackers.parse("") == []
    assert build_config("tiny", overrides={"report_to": "mlflow,trackio"}).report_to == "mlflow,trackio"
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'tensorbord'; use one or more of tensorboard"):
        build_config("tiny", overrides={"report_to": "tensorbord"})
