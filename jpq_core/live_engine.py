"""Which path computes a live configuration: the sparse integer engine or PyTorch, and running it.

The engine computes a configuration when
1. the configuration is integer (quantized weights of 1-8 bits and activations of 4-8 bits: the engine's
   integer path; float configurations run in PyTorch anyway),
2. its sparsity is at or above the engine's own crossover, the lowest measured sparsity from which the
   engine beat dense PyTorch on this network at every higher one (`python -m jpq_core bench engine`, stored
   in cached_runs/results/engine_bench_<network>_b1_t<threads>.json; a bit width the benchmark did not
   measure takes the highest crossover it did measure), and
3. numba has its kernels for the program ready in this process. Compiling them takes seconds to minutes
   once (then numba's on-disk cache makes it fast in later processes), too slow for a slider move: a
   program whose kernels are not ready is answered by PyTorch now while a background thread runs the
   program once, and the next configuration of that kind goes to the engine.

The stereo network only: the classifier's whole test split runs in PyTorch in a fraction of a second.
"""

from __future__ import annotations

import json
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from jpq_core.data.stereo_types import StereoSample

BENCH_RESULTS = Path(__file__).resolve().parents[1] / "cached_runs" / "results"
ENGINE_NETWORKS = ("stereo",)


@lru_cache(maxsize=16)
def measured_crossovers(network: str, threads: int) -> dict:
    """{weight bits: crossover sparsity or None} from the engine benchmark nearest to `threads` threads,
    and the file it came from; {} when no benchmark of the network is stored."""
    files = sorted(BENCH_RESULTS.glob(f"engine_bench_{network}_b1_t*.json"),
                   key=lambda p: abs(int(p.stem.rsplit("_t", 1)[1]) - threads))
    if not files:
        return {}
    data = json.loads(files[0].read_text())
    return {"by_bits": {int(k): v for k, v in data["crossover"].items()}, "file": files[0].name,
            "threads": data["threads"]}


def crossover(network: str, wbits: int, threads: int) -> float | None:
    """The engine's crossover sparsity for this network and weight width (None: never faster, or unmeasured)."""
    measured = measured_crossovers(network, threads)
    if not measured:
        return None
    by_bits = measured["by_bits"]
    if wbits in by_bits:
        return by_bits[wbits]
    known = [v for v in by_bits.values() if v is not None]
    return max(known) if known else None


def is_integer(wbits, abits) -> bool:
    from jpq_core.engine.ops import INTEGER_ACTIVATION_BITS, INTEGER_WEIGHT_BITS

    return wbits in INTEGER_WEIGHT_BITS and abits in INTEGER_ACTIVATION_BITS


def kernel_signature(program) -> frozenset:
    """What decides which numba kernels a program calls, and with which argument types: op kinds, and per
    layer the integer or float path, the dtypes its kernel computes in (float32, int8 or int16 weights) and
    what is fused into it. The storage encoding is not part of it: weights are decoded before the kernels run."""
    signature = set()
    for op in program.ops:
        if hasattr(op, "_kernel_weights"):
            _, val, corr, mul = op._kernel_weights()  # decoded once per op; run() reuses it
            signature.add((type(op).__name__, op.integer, str(val.dtype), str(corr.dtype), op.quad_weights,
                           op.residual is not None, op.fused is not None, op.slope != 1.0,
                           tuple(c.integer for c in op.consumers)))
        else:
            signature.add((type(op).__name__, getattr(op, "op", None), op.targets is not None))
    return frozenset(signature)


def _pair_tensors(sample: StereoSample) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
                 for img in (sample.left, sample.right))


class EnginePath:
    """Decides per configuration whether the engine computes it, and keeps track of ready kernels.

    One per live network, shared by browser sessions; thread-safe."""

    def __init__(self, network: str):
        self.network = network
        self._ready: set = set()  # kernel signatures this process has run
        self._warming: set = set()
        self._lock = threading.Lock()

    def why_not(self, wbits, abits, sparsity: float) -> str | None:
        """None when the engine should compute this configuration, else the reason it does not."""
        if self.network not in ENGINE_NETWORKS:
            return "the engine serves the stereo network on this page"
        if not is_integer(wbits, abits):
            return "not an integer configuration (the engine's integer path needs 1-8 weight bits and 4-8 activation bits)"
        threads = torch.get_num_threads()
        limit = crossover(self.network, wbits, threads)
        if limit is None:
            return f"no measured crossover for {wbits}-bit weights on {self.network} (run `bench engine`)"
        if sparsity < limit - 1e-9:
            return f"below the engine's crossover ({limit:.0%} at {wbits}-bit weights): dense PyTorch is faster there"
        return None

    def ready(self, program) -> bool:
        with self._lock:
            return kernel_signature(program) <= self._ready

    def compiling(self) -> bool:
        """Whether a background thread is compiling kernels now."""
        with self._lock:
            return bool(self._warming)

    def warm_up(self, program, sample: StereoSample) -> None:
        """Run `program` once on `sample` in a background thread, so numba compiles (or loads from its disk
        cache) the kernels it calls. The real pair, not a small one: whether a layer's kernel runs in parallel
        or serially depends on its output size, so a small pair could compile the other variant."""
        signature = kernel_signature(program)
        with self._lock:
            if signature <= self._ready or signature in self._warming:
                return
            self._warming.add(signature)

        def run():
            try:
                self.disparity(program, sample)
                with self._lock:
                    self._ready |= signature
            finally:
                with self._lock:
                    self._warming.discard(signature)

        threading.Thread(target=run, name="engine-warm-up", daemon=True).start()

    def wait_until_ready(self, program, sample: StereoSample, timeout: float) -> bool:
        """Block until `program`'s kernels are ready (True) or `timeout` passes."""
        self.warm_up(program, sample)
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.ready(program):
                return True
            time.sleep(0.05)
        return False

    @staticmethod
    def disparity(program, sample: StereoSample) -> np.ndarray:
        """Full-resolution left-view disparity (H x W float32) of the compiled network on one pair."""
        return program.run(*_pair_tensors(sample))[0]
