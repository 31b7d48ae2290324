"""The CLI: parse -> config -> train. Nothing else.

    python -m lowrank_pref.run --preset tiny --output-dir out
    python -m lowrank_pref.run --preset 24gb-dpo --dataset my_pairs.jsonl lora.r=32 beta=0.05
    python -m lowrank_pref.run seed=3 --output-dir runs/a batch_size=4   # key=value anywhere on the line
    python -m lowrank_pref.run --output-dir out --resume          # continue a stopped or killed run
    python -m lowrank_pref.run --list-presets | --list-keys
    torchrun --nproc-per-node 2 -m lowrank_pref.run --preset tiny   # on 2 processes (GPUs), see distributed.py

Exit status: 0 success, 2 a user error (bad config, data, model path, a run folder in use), 1 an internal error
(see train.log) or a full disk, 130 stopped (SIGTERM, Ctrl-C; continue with --resume).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from pathlib import Path

from .config import Config, ConfigError, all_keys, build_config, field_help, list_presets, parse_override
from .tasks import TASKS

USER_ERROR, INTERNAL_ERROR = 2, 1


class _Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        """Overrides go anywhere on the line, as people type them (``seed=3 --output-dir a batch_size=4``): plain
        parse_args gives a ``nargs="*"`` positional only one run of words and calls the rest unrecognized. A word
        that is neither an option nor key=value is refused here, before anything is loaded."""
        ns = self.parse_intermixed_args(args, namespace)
        for item in ns.overrides:
            try:
                parse_override(item)
            except ConfigError as e:
                self.error(str(e))
        return ns

    def error(self, message):  # argparse's own exit code is 2 already; keep its message one line
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(USER_ERROR)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lowrank_pref.run",
                description="QLoRA SFT, DPO, KTO and reward modelling on one GPU (or CPU).",
                epilog="Any config key can be given as key=value, e.g. lora.r=16 beta=0.05 learning_rate=5e-6")
    p.add_argument("--preset", help="preset name (see --list-presets) or a .yaml path; default: tiny")
    p.add_argument("--config", help="a YAML config file (applied after the preset)")
    p.add_argument("--model", help="hub id or local folder of the base model")
    p.add_argument("--dataset", help="local file/folder or hub dataset id")
    p.add_argument("--task", choices=tuple(TASKS), help="; ".join(f"{k}: {v}" for k, (_, v) in TASKS.items()))
    p.add_argument("--output-dir", help="run folder (default: runs/<task>-<time>)")
    p.add_argument("--max-steps", help="stop after N optimizer steps")
    p.add_argument("--save-steps", help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--list-keys", action="store_true", help="list every config key with its help and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def resolve(args) -> Config:
    overrides = {}
    for flag, key in (("model", "model"), ("dataset", "dataset"), ("task", "task"), ("output_dir", "output_dir"),
                      ("max_steps", "max_steps"), ("save_steps", "save_steps")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    for item in args.overrides:
        key, value = parse_override(item)
        overrides[key] = value
    preset, config_file = args.preset, args.config
    if args.resume and not preset and not config_file:
        if not args.output_dir:
            raise ConfigError("--resume needs --output-dir (the run folder to continue)")
        saved = Path(args.output_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"nothing to resume in '{args.output_dir}': no config.yaml there")
        config_file = str(saved)
    elif not preset and not config_file:
        preset = "tiny"
    cfg = build_config(preset, config_file, overrides)
    if not cfg.output_dir:
        cfg.output_dir = os.path.join("runs", f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list_presets or args.list_keys:
        lines = ([f"{name:14s} {line}" for name, line in list_presets().items()] if args.list_presets else
                 [f"{key:32s} {field_help(key)}" for key in all_keys()])
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:  # `| head` closed the pipe: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet_libraries()

    from . import distributed

    try:
        cfg = resolve(args)
        world = distributed.init(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    try:
        return _train_and_report(cfg, args, world)
    finally:
        distributed.shutdown()


def _train_and_report(cfg: Config, args, world) -> int:
    from .data import DataError
    from .distributed import PeerLost
    from .model import ModelError
    from .loop import TrainingStopped

    # on N processes the ranks meet the same user errors and stops: rank 0 says them; what only one rank meets
    # (another rank lost, an internal error) each says, naming itself
    say = print if world.main else (lambda *a, **k: None)
    rank = f"[rank {world.rank}] " if world.size > 1 else ""
    try:
        from .loop import train

        result = train(cfg, cfg.output_dir, resume=args.resume)
    except (ConfigError, DataError, ModelError) as e:
        say(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    except PeerLost as e:
        print(f"{rank}error: {e}", file=sys.stderr)
        return INTERNAL_ERROR
    except TrainingStopped as e:
        say(f"error: {e}", file=sys.stderr)
        return INTERNAL_ERROR
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (loop.RunStopped, which says where it stopped)
        say(f"stopped: {e}" if str(e) else "interrupted; continue with --resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(e, cfg)
        print(f"error: the disk is full ({e.filename or cfg.output_dir}): free some space, then continue with "
              f"--resume", file=sys.stderr)
        return INTERNAL_ERROR
    except Exception as e:
        return _internal_error(e, cfg, rank)
    if not world.main:
        return 0
    shown = {k: v for k, v in result.items() if k.startswith("eval_")}
    if shown:
        print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    print(f"adapter saved to {os.path.join(cfg.output_dir, 'adapter')}")
    return 0


def _internal_error(e: Exception, cfg: Config, rank: str = "") -> int:
    """An internal error: say it plainly, keep the traceback in the run's log (called inside the except block)."""
    logging.getLogger("lowrank_pref").debug("internal error", exc_info=True)
    _log_traceback(cfg.output_dir)
    oom = "out of memory" in str(e).lower()
    hint = (" Lower batch_size or max_length, set gradient_checkpointing=true (on a GPU also checkpoint_offload="
            "true), or memory_limit_gb below what the card has if other programs use it." if oom else
            f" The traceback is in {os.path.join(cfg.output_dir, 'train.log')}.")
    print(f"{rank}internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}.{hint}",
          file=sys.stderr)
    return INTERNAL_ERROR


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: the libraries' load bars and known-harmless warnings go."""
    import warnings

    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "bitsandbytes",
                  "transformers.integrations.hub_kernels", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # datasets logs a reader's failure ("Failed to read file ...") before raising; data.load_rows turns the raise
    # into the one plain message the user gets, so the log line would only say it twice
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    # bitsandbytes' CPU 4-bit kernel has no registered autograd kernel, but its backward is right (tested in
    # tests/test_model.py against a dense twin) as long as patches.pin_cpu_4bit_kernel keeps the packed kernel off;
    # transformers/peft deprecation notices are not for our users
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _log_traceback(output_dir: str) -> None:
    import traceback

    try:
        with open(os.path.join(output_dir, "train.log"), "a") as f:
            traceback.print_exc(file=f)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
