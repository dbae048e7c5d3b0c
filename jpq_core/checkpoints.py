"""Saving and loading network weights safely.

A checkpoint is `NAME.safetensors` (weights only, no code can run on load) with a JSON sidecar
`NAME.json` (architecture, its settings, training data, steps, time, metrics, library versions).
User checkpoints may also be PyTorch files; those are read with `torch.load(weights_only=True)`, which
refuses any pickle that would construct arbitrary objects. Every file is written to a temporary name and
renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jpq_core.errors import JPQError

MAX_CHECKPOINT_BYTES = 512 * 1024 * 1024


def library_versions() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path`; on any error the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; saved results are for everyone who runs the app
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: torch.nn.Module, path: Path, sidecar: dict) -> None:
    """Write the weights as safetensors and `sidecar` (plus library versions) as JSON beside them."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    meta = dict(sidecar, versions=library_versions())
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def read_sidecar(path: Path) -> dict:
    """The JSON sidecar of a checkpoint, or {} when there is none."""
    side = Path(path).with_suffix(".json")
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JPQError(f"{side}: the checkpoint's sidecar is not valid JSON ({exc}); delete or fix it.") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights from a .safetensors file or a PyTorch file, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise JPQError(f"{path}: no such checkpoint file; check the path.")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise JPQError(f"{path}: {size / 2**20:.0f} MiB is over the {MAX_CHECKPOINT_BYTES // 2**20} MiB limit for checkpoints.")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if path.suffix == ".safetensors" or (len(head) == 8 and head[:2] != b"PK" and head[0:1] != b"\x80"):
            return load_file(str(path))
        with warnings.catch_warnings():  # torch warns about pickle protocols; our own error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise JPQError(
            f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200]}). "
            "Give a .safetensors file or a PyTorch state dict saved with torch.save(model.state_dict(), ...)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError for code-running pickles
        raise JPQError(
            f"{path}: refused to load: the file holds more than plain weights ({type(exc).__name__}). "
            "Only weights are loaded (weights_only=True); re-save it with torch.save(model.state_dict(), ...)."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise JPQError(f"{path}: holds no state dict of tensors; save it with torch.save(model.state_dict(), ...).")
    return state


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load `path` into `model`, naming every missing, unexpected or mis-shaped tensor on mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs network)", wrong_shape)):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise JPQError(f"{path}: does not fit the {type(model).__name__} network; " + "; ".join(parts) + ".")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model
