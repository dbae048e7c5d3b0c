"""Gradient statistics computed once per (network weights, calibration data), then read from disk.

Every weight-level criterion is a cheap function of `GradientStats` (see `jpq_core.criteria`), so caching the
statistics makes any criterion at any sparsity a matter of milliseconds after the first pass. The key is a
hash of the network's weights and the calibration settings, so a fine-tuned or user network never reads
another's statistics. Files are safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jpq_core.checkpoints import atomic_write
from jpq_core.errors import JPQError
from jpq_core.criteria import GradientStats, gather_gradient_stats

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "runs" / "score_cache"
_FIELDS = ("mean_gw_abs", "mean_gw_sq", "mean_g_sq", "mean_g_abs")
_memory: dict[str, GradientStats] = {}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's state dict (names, shapes, values) and of its quantizers' settings, which
    change the gradients but are attributes, not state."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for name, m in model.named_modules():
        if hasattr(m, "bits"):
            h.update(f"{name}:{m.bits}:{getattr(m, 'symmetric', '')}:{getattr(m, 'per_channel', '')}:{getattr(m, 'calibrating', '')}".encode())
    return h.hexdigest()[:16]


def cached_gradient_stats(model, task, batches: int, seed: int, cache_dir: Path | None = None, progress=None) -> GradientStats:
    """`gather_gradient_stats` over `task.batches(batches, seed)`, from memory or disk when seen before."""
    key = f"{weights_fingerprint(model)}-{task.name}-{task.data_key}-b{batches}-s{seed}"
    if key in _memory:
        return _memory[key]
    path = Path(cache_dir or DEFAULT_DIR) / f"{key}.safetensors"
    stats = None
    if path.exists():
        try:
            flat = load_file(str(path))
            stats = GradientStats(*({k.split("::", 1)[1]: v for k, v in flat.items() if k.startswith(f + "::")} for f in _FIELDS),
                                  batches=int(flat["batches"].item()))
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            stats = None
    if stats is None:
        stats = gather_gradient_stats(model, task.batches(batches, seed=seed), task.loss, progress)
        flat = {f"{f}::{k}": v.contiguous() for f in _FIELDS for k, v in getattr(stats, f).items()}
        flat["batches"] = torch.tensor(stats.batches)
        try:
            atomic_write(path, lambda tmp: save_file(flat, tmp))
        except JPQError:  # a cache only saves time: a full disk or read-only folder must not stop the work
            pass
    _memory[key] = stats
    return stats
