"""Reference log-probs kept on disk, so the frozen reference runs once per pair, not once per pair per epoch per run.

The reference (base with adapters off, or the frozen starting adapter) never changes during a run, nor between runs
that share the model, the starting adapter and the numerics. So its log-probs are stored under a fingerprint of
those, each keyed by the pair's token ids (which carry the data, the chat template and the truncation lengths).
Later epochs, every evaluation after the first, resumed runs, and sweeps that change only beta, the loss type or the
learning rate skip the reference forward for pairs already seen (TRL recomputes it in every run; LLaMA-Factory
declined to cache it, its issue #4810). The cache fills as training goes, so it costs no extra pass.

    $LOWRANK_PREF_CACHE/ref_logps/<fingerprint>.json   {"fingerprint": {...}, "values": {pair key: [chosen, rejected]}}

The file is not trusted: one that can't be read is named in the log, moved aside (``<fingerprint>.json.damaged``)
and rebuilt, and entries that are not two finite log-probs (<= 0) are dropped and computed again, so a damaged or
tampered cache never stops a run nor trains it on NaN or made-up references.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from .artifacts import atomic_write_text

log = logging.getLogger("lowrank_pref")
# A sequence log-prob is a sum of log-softmax values, <= 0; a little slack for the arithmetic.
LOGP_MAX = 1e-3


def _files_signature(path: Path) -> list:
    """Names, sizes and modification times of a local model's or adapter's weight files (cheap, no hashing)."""
    return sorted([f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in path.glob("*.safetensors"))


def hub_commit(repo_id: str, revision: str | None, filename: str) -> str | None:
    """The commit a hub id (at ``revision``, default main) resolves to in the local hub cache, read offline from the
    cached snapshot's folder name; None when it is not cached (or not a hub id). With it in the fingerprint, a repo
    that changes gets a new cache instead of its old reference log-probs."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except (ImportError, ValueError):  # ValueError: not a valid repo id (huggingface_hub's HFValidationError)
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def fingerprint(cfg) -> dict:
    """What the reference log-probs depend on besides the pair: the model, the starting adapter, the numerics."""
    from .model import compute_dtype
    from .tiny import resolve_model

    model = resolve_model(cfg.model)
    parts = {"model": cfg.model, "revision": cfg.revision, "quantization": cfg.quantization,
             "dtype": str(compute_dtype(cfg)), "attn": cfg.attn_implementation}
    if Path(model).is_dir():
        parts["model_files"] = _files_signature(Path(model))
    elif commit := hub_commit(cfg.model, cfg.revision, "config.json"):
        parts["model_commit"] = commit
    if cfg.adapter:
        adapter = Path(cfg.adapter).expanduser()
        parts["adapter"] = str(adapter.resolve()) if adapter.exists() else cfg.adapter
        if adapter.is_dir():
            parts["adapter_files"] = _files_signature(adapter)
        elif commit := hub_commit(cfg.adapter, None, "adapter_config.json"):
            parts["adapter_commit"] = commit
    return parts


def _valid(value) -> bool:
    """Two finite log-probs, as ``get`` turns them into a tensor."""
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= LOGP_MAX
                    for v in value))


def pair_key(pair) -> str:
    return hashlib.sha1(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode()).hexdigest()[:24]


class RefCache:
    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.hits = self.misses = 0
        self._dirty = False
        self._new: dict[str, list[float]] = {}  # computed since the last save (rank 0 stores every rank's)
        self.values: dict[str, list[float]] = self._read()

    def _read(self) -> dict[str, list[float]]:
        try:
            stored = json.loads(self.path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._damaged(f"not JSON text: {str(e).splitlines()[0][:120]}")
        if not isinstance(stored, dict) or not isinstance(stored.get("values"), dict):
            return self._damaged("not a reference cache (no 'values' mapping)")
        if stored.get("fingerprint") != self.meta:
            return {}  # another model's under the same digest: replaced by ours at the next save
        values = {k: v for k, v in stored["values"].items() if _valid(v)}
        if len(values) < len(stored["values"]):
            log.warning("reference cache %s: %d entries were not two finite log-probs (<= 0); they are dropped and "
                        "computed again", self.path, len(stored["values"]) - len(values))
        return values

    def _damaged(self, why: str) -> dict:
        """Move an unreadable cache file aside (kept to look at) so the run rebuilds it; returns no values."""
        aside = self.path.with_name(self.path.name + ".damaged")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:  # another run moved it aside first
            return {}
        log.warning("reference cache %s is damaged (%s): moved aside to %s; it is rebuilt as the run goes",
                    self.path, why, aside.name)
        return {}

    @classmethod
    def for_config(cls, cfg) -> "RefCache":
        from .tiny import cache_root

        meta = fingerprint(cfg)
        digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        return cls(cache_root() / "ref_logps" / f"{digest}.json", meta)

    def get(self, pairs: list) -> torch.Tensor | None:
        """(2B,) reference log-probs, chosen then rejected, when every pair is known; else None."""
        found = [self.values.get(pair_key(p)) for p in pairs]
        if any(v is None for v in found):
            self.misses += len(pairs)
            return None
        self.hits += len(pairs)
        return torch.tensor([v[0] for v in found] + [v[1] for v in found], dtype=torch.float32)

    def put(self, pairs: list, ref: torch.Tensor) -> None:
        n = len(pairs)
        values = ref.detach().float().cpu().tolist()
        for i, p in enumerate(pairs):
            if _valid(pair := [values[i], values[n + i]]):  # a NaN reference is not kept for the next run
                self.values[pair_key(p)] = self._new[pair_key(p)] = pair
        self._dirty = True

    def save(self) -> None:
        """Store the cache (rank 0 of a run on several processes, with what every rank computed: each rank calls
        this at the same points, a checkpoint and the end)."""
        from .distributed import world

        if world().size > 1:
            for part in world().gather(self._new):
                self.values.update(part)
                self._dirty = self._dirty or bool(part)
            self._new = {}
            if not world().main:
                self._dirty = False
                return
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = RefCache(self.path, self.meta).values  # keep what another run stored meanwhile
        merged.update(self.values)
        self.values = merged
        atomic_write_text(self.path, json.dumps({"fingerprint": self.meta, "values": self.values}))
        self._dirty = False
        self._new = {}

    def __len__(self) -> int:
        return len(self.values)
