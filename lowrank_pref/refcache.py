"""Reference log-probs kept on disk, so the frozen reference runs once per pair, not once per pair per epoch per run.

The reference (base with adapters off, or the frozen starting adapter) never changes during a run, nor between runs
that share the model, the starting adapter and the numerics. So its log-probs are stored under a fingerprint of
those, each keyed by the pair's token ids (which carry the data, the chat template and the truncation lengths).
Later epochs, every evaluation after the first, resumed runs, and sweeps that change only beta, the loss type or the
learning rate skip the reference forward for pairs already seen (TRL recomputes it in every run; LLaMA-Factory
declined to cache it, its issue #4810). The cache fills as training goes, so it costs no extra pass.

    $LOWRANK_PREF_CACHE/ref_logps/<fingerprint>.json   {"fingerprint": {...}, "values": {pair key: [chosen, rejected]}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .artifacts import atomic_write_text


def _files_signature(path: Path) -> list:
    """Names, sizes and modification times of a local model's or adapter's weight files (cheap, no hashing)."""
    return sorted([f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in path.glob("*.safetensors"))


def fingerprint(cfg) -> dict:
    """What the reference log-probs depend on besides the pair: the model, the starting adapter, the numerics."""
    from .model import compute_dtype
    from .tiny import resolve_model

    model = resolve_model(cfg.model)
    parts = {"model": cfg.model, "revision": cfg.revision, "quantization": cfg.quantization,
             "dtype": str(compute_dtype(cfg)), "attn": cfg.attn_implementation}
    if Path(model).is_dir():
        parts["model_files"] = _files_signature(Path(model))
    if cfg.adapter:
        adapter = Path(cfg.adapter).expanduser()
        parts["adapter"] = str(adapter.resolve()) if adapter.exists() else cfg.adapter
        if adapter.is_dir():
            parts["adapter_files"] = _files_signature(adapter)
    return parts


def pair_key(pair) -> str:
    return hashlib.sha1(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode()).hexdigest()[:24]


class RefCache:
    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.values: dict[str, list[float]] = {}
        self.hits = self.misses = 0
        self._dirty = False
        try:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == meta:
                self.values = stored.get("values", {})
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            pass

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
            self.values[pair_key(p)] = [values[i], values[n + i]]
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = RefCache(self.path, self.meta).values  # keep what another run stored meanwhile
        merged.update(self.values)
        self.values = merged
        atomic_write_text(self.path, json.dumps({"fingerprint": self.meta, "values": self.values}))
        self._dirty = False

    def __len__(self) -> int:
        return len(self.values)
