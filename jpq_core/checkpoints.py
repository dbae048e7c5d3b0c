"""Saving and loading network weights safely.

A checkpoint is `NAME.safetensors` (weights only, no code can run on load) with a JSON sidecar
`NAME.json` (architecture, its settings, training data, steps, time, metrics, library versions).
User checkpoints may also be PyTorch files (zip archives, as torch.save writes since 1.6); those are read with
`torch.load(weights_only=True)`, which refuses any pickle that would construct arbitrary objects; raw pickles
are never unpickled. Sizes are checked first (file and unpacked archive), and loaded weights are checked to
fit the network and to be finite, each problem named in a `JPQError`. Every file is written to a temporary name and
renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import platform
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jpq_core.errors import JPQError
from jpq_core.untrusted import cause, decoding

MAX_CHECKPOINT_BYTES = 512 * 1024 * 1024
MAX_SIDECAR_BYTES = 10 * 1024 * 1024


def library_versions() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


def _save_failed(path: Path, exc: OSError) -> JPQError:
    """A failed save, told in words: what happened, that the old file is kept, and what to do."""
    if exc.errno == errno.ENOSPC:
        why, todo = "the disk is full", "free some space and save again"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why, todo = "the folder is read-only or not yours to write", "choose a writable folder or fix its permissions"
    else:
        why, todo = exc.strerror or str(exc), "check the folder and save again"
    return JPQError(f"{path}: could not save ({why}); the previous file, if any, is unchanged. Please {todo}.")


def _as_os_error(exc: Exception) -> OSError | None:
    """The operating-system error behind `exc`; safetensors wraps it as "I/O error: ... (os error 28)"."""
    if isinstance(exc, OSError):
        return exc
    code = re.search(r"os error (\d+)", str(exc))
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def atomic_write_all(writes: dict) -> None:
    """For {path: write}: call every write(tmp_path), then rename every temporary file into place.

    Nothing is renamed until every write has succeeded, so a full disk or a crash while writing leaves all
    previous files as they were, and no temporary file is left behind. Renames within a folder are atomic
    (POSIX rename), so a reader sees the old file or the new one, never a part.
    """
    temps: dict[Path, str] = {}
    current = None
    try:
        for path, write in writes.items():
            current = path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write(temps[path])
            os.chmod(temps[path], 0o644)  # mkstemp makes the file private; saved results are for everyone who runs the app
        for path, tmp in temps.items():
            current = path
            os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        cause = _as_os_error(exc)
        if cause is None:
            raise
        raise _save_failed(current, cause) from exc
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)  # only those not renamed still exist


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path`; on any error the old file stays (see atomic_write_all)."""
    atomic_write_all({path: write})


def save_checkpoint(model: torch.nn.Module, path: Path, sidecar: dict) -> None:
    """Write the weights as safetensors and `sidecar` (plus library versions) as JSON beside them."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = dict(sidecar, versions=library_versions())
    atomic_write_all({path: lambda tmp: save_file(state, tmp),  # both or neither: weights never meet a stale sidecar
                      path.with_suffix(".json"): lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")})


def read_sidecar(path: Path) -> dict:
    """The JSON sidecar of a checkpoint, or {} when there is none: a JSON object with a `config` object
    ({} when the file has none), whose `architecture`, where present, is an object too."""
    side = Path(path).with_suffix(".json")
    if not side.exists():
        return {}
    if side.stat().st_size > MAX_SIDECAR_BYTES:
        raise JPQError(f"{side}: {side.stat().st_size / 2**20:.0f} MiB is too big for a checkpoint's sidecar; delete or fix it.")
    with decoding(side, "the checkpoint's sidecar is not valid JSON", "delete or fix it."):
        meta = json.loads(side.read_text())
    config = meta.get("config", {}) if isinstance(meta, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("architecture", {}), dict):
        raise JPQError(f"{side}: the checkpoint's sidecar should be a JSON object with a 'config' object "
                       "(as save_checkpoint writes); delete or fix it.")
    return {**meta, "config": config}  # readers index meta["config"]: a sidecar without one reads as {}


def _torch_error_line(exc: BaseException) -> str:
    """The line of a weights-only load error that names the problem (torch's message is a page long)."""
    lines = [l.strip() for l in str(exc).splitlines() if "WeightsUnpickler error" in l] or [cause(exc, 200)]
    return lines[0].split(" Please ")[0][:200]  # drop torch's advice to allowlist the global: we never do


def _decoding_checkpoint(path: Path, describe=_torch_error_line):
    return decoding(path, "not a readable checkpoint", "give a .safetensors file or a PyTorch state dict saved with "
                    "torch.save(model.state_dict(), ...).", describe)


def _read_torch_zip(path: Path) -> object:
    """torch.load(weights_only=True) after checking the archive cannot unpack to more than the size limit."""
    with _decoding_checkpoint(path, lambda exc: f"broken archive: {cause(exc)}"):  # zipfile raises BadZipFile, NotImplementedError, EOFError, ...
        with zipfile.ZipFile(path) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    if unpacked > MAX_CHECKPOINT_BYTES:
        raise JPQError(f"{path}: unpacks to {unpacked / 2**20:.0f} MiB, over the {MAX_CHECKPOINT_BYTES // 2**20} MiB limit for checkpoints.")
    with _decoding_checkpoint(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" in str(exc):  # the pickle asks for a function or class: code, not weights
                raise JPQError(f"{path}: refused to load: the file holds more than plain weights ({_torch_error_line(exc)}). "
                               "Only weights are loaded (weights_only=True); re-save it with torch.save(model.state_dict(), ...).") from None
            raise


def _is_plain_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_quantized and not v.dtype.is_complex


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether the first 9 bytes are a safetensors header: its length (8 bytes, little-endian), then '{'.
    A header of 128 + 256k bytes starts with 0x80 like a pickle, so the first byte alone cannot tell."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights from a .safetensors file or a PyTorch (zip) state dict, never executing code from it.

    The format is told by content: safetensors (8-byte header length, then a JSON header) or a zip archive
    (torch.save since PyTorch 1.6), read with weights_only=True. Raw pickles (legacy .pt files) are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise JPQError(f"{path}: no such checkpoint file; check the path.")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise JPQError(f"{path}: {size / 2**20:.0f} MiB is over the {MAX_CHECKPOINT_BYTES // 2**20} MiB limit for checkpoints.")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # a zip archive (zipfile.is_zipfile raises on some damaged ones)
        state = _read_torch_zip(path)
    elif head[:1] == b"\x80" and not _looks_like_safetensors(head, size):
        raise JPQError(f"{path}: refused to load: a raw pickle (or a PyTorch file older than 1.6) can run code and is never unpickled. "
                       "Re-save it with a current torch.save(model.state_dict(), ...) or as .safetensors.")
    else:
        with _decoding_checkpoint(path):
            state = load_file(str(path))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and _is_plain_tensor(v) for k, v in state.items()):
        raise JPQError(f"{path}: holds no state dict of plain tensors; save it with torch.save(model.state_dict(), ...).")
    return state


def _named(label: str, names: list[str]) -> str:
    return f"{label}: " + ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], label) -> dict[str, torch.Tensor]:
    """`state` converted to `model`'s dtypes, after checking it fits: every missing, unexpected or mis-shaped
    tensor is named, and so is every tensor holding NaN or inf (a diverged run would only show NaN metrics)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [_named(l, n) for l, n in (("missing", missing), ("unexpected", unexpected),
                                           ("wrong shape (file vs network)", wrong_shape)) if n]
        raise JPQError(f"{label}: does not fit the {type(model).__name__} network; " + "; ".join(parts) + ".")
    fitted = {k: v.to(own[k].dtype) for k, v in state.items()}
    broken = [k for k, v in fitted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise JPQError(f"{label}: {_named('NaN or infinite values in', broken)}. The weights are broken (a diverged "
                       "training run?); use an earlier checkpoint.")
    return fitted


def load_weights(model: torch.nn.Module, path: Path, ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """Load `path` into `model`, naming every missing, unexpected, mis-shaped or non-finite tensor; tensors of
    the file whose names start with one of `ignore` are left out (heads the network is built without)."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(tuple(ignore))}
    model.load_state_dict(fit_state_dict(model, state, path))
    return model
