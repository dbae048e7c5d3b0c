"""The engine's numba cache as one unit: a change to any of its kernel sources drops every cached kernel.

numba keys a cached function on the contents of its own file only (a hash of the source file), but the engine's
kernels inline intrinsics and helpers from other modules (`quads`, `chunks`, `shift_blocks` into `kernels`'s
and `direct`'s functions): after a change to one of those, the cache would hand back machine code compiled from
the old source. So the sources below are hashed together, the hash kept beside the cache, and where it differs
the engine's cache entries are deleted before anything loads them (numba then compiles again and saves afresh).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SOURCES = ("kernels", "quads", "chunks", "shift_blocks", "direct")  # modules whose code the cached kernels contain
STAMP = "jpq-engine-sources.sha256"


def sources_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((folder / f"{name}.py").read_bytes())
    return digest.hexdigest()


def drop_stale(dispatcher) -> None:
    """Delete the engine's cached kernels if its sources changed since they were saved. `dispatcher`: any cached
    kernel of `kernels` (its cache directory is the one all the engine's modules use)."""
    cache_dir = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    if not cache_dir or not os.path.isdir(cache_dir):
        return  # nothing cached yet, or a numba that keeps its cache elsewhere: it compiles afresh anyway
    cache_dir = Path(cache_dir)
    current = sources_hash(Path(__file__).parent)
    stamp = cache_dir / STAMP
    try:
        if stamp.read_text() == current:
            return
    except OSError:
        pass  # no stamp: entries from before it, or none
    prefixes = tuple(f"{name}." for name in SOURCES)
    for entry in cache_dir.iterdir():
        if entry.name.startswith(prefixes) and entry.suffix in (".nbi", ".nbc"):
            try:
                entry.unlink()
            except OSError:
                pass  # another process dropped it first
    try:  # written whole or not at all: a process reading it never sees half a hash
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=STAMP)
        with os.fdopen(fd, "w") as f:
            f.write(current)
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only cache directory: numba will not save there either
