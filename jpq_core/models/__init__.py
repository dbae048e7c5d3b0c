"""The networks the dashboard compresses, by name, and their shipped checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from jpq_core.checkpoints import MAX_CHECKPOINT_BYTES, load_weights, read_sidecar
from jpq_core.errors import JPQError
from jpq_core.models.resnet import ResNet20, resnet18_cifar
from jpq_core.models.stereo import StereoNet

CACHED_RUNS = Path(__file__).resolve().parents[2] / "cached_runs"

# name -> (constructor, task)
NETWORKS = {
    "stereo": (StereoNet, "stereo"),
    "resnet20": (ResNet20, "classification"),
    "resnet18": (resnet18_cifar, "classification"),
}
# name -> what the app calls it (the data it is shown on)
NETWORK_LABELS = {"stereo": "Stereo network (Middlebury pair)", "resnet20": "ResNet-20 (digits)",
                  "resnet18": "ResNet-18 (CIFAR-10)"}


def network_label(name: str) -> str:
    """The network's name as the app shows it."""
    return NETWORK_LABELS.get(_check_name(name), name)


def task_of(name: str) -> str:
    return NETWORKS[_check_name(name)][1]


def _check_name(name: str) -> str:
    if name not in NETWORKS:
        raise JPQError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)}.")
    return name


def build_network(name: str, **config) -> nn.Module:
    """A freshly initialised network."""
    return NETWORKS[_check_name(name)][0](**config)


def shipped_checkpoint(name: str) -> Path:
    """Where the trained checkpoint of `name` is kept in `cached_runs/`."""
    return CACHED_RUNS / "checkpoints" / f"{_check_name(name)}.safetensors"


def load_network(name: str, checkpoint: Path | None = None) -> nn.Module:
    """`name` with trained weights (the shipped checkpoint unless `checkpoint` is given), in eval mode."""
    path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint(name)
    if checkpoint is None and not path.exists():
        raise JPQError(f"no shipped checkpoint for {name!r} at {path}; train one with `python -m jpq_core train {name}`.")
    config = read_sidecar(path).get("config", {}) if path.exists() else {}
    if config.get("network", name) != name:
        raise JPQError(f"{path}: is a {config['network']!r} checkpoint, not {name!r}.")
    arch = config.get("architecture", {})
    try:  # on the meta device first: a sidecar asking for a giant network must not take the memory
        with torch.device("meta"):
            params = sum(p.numel() for p in build_network(name, **arch).parameters())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise JPQError(f"{path}: its sidecar's architecture settings {arch} do not build a {name!r} network ({exc}); "
                       "fix or delete the .json beside it.") from None
    if params * 4 > MAX_CHECKPOINT_BYTES:
        raise JPQError(f"{path}: its sidecar asks for a {name!r} network of {params:,} parameters, over the checkpoint size limit.")
    return load_weights(build_network(name, **arch), path).eval()
