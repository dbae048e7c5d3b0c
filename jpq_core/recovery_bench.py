"""How long one-shot recovery takes (`python -m jpq_core bench live --recovery M`): kept apart from
`jpq_core.recovery`, which the single compression path imports, because it builds its networks on that path."""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch

from jpq_core.engine.bench import magnitude_compressed
from jpq_core.models import load_network
from jpq_core.recovery import DEFAULT_SAMPLES, apply, calibration_inputs, check_methods
from jpq_core.tasks import make_task


def benchmark(network: str = "stereo", methods: str = "lsq+bn", threads: int = 1, repeats: int = 5,
              sparsities=(0.8, 0.9, 0.95), wbits: int = 4, samples: int | None = None, progress=None) -> dict:
    """Seconds of `apply` on the magnitude-pruned, quantized (w`wbits`/a8) network at each sparsity: the median
    of `repeats` runs on fresh copies, after one warm-up run that renders the calibration data and fills the
    dense-target cache (its time is reported apart as first_s: the app pays it once per network). Beside it,
    timed in turns with it so that load from other processes hits both alike, the baseline: one plain forward
    pass of the same compressed network over the same calibration samples (forward_s); `ratio` = seconds /
    forward_s, what recovery costs in forward passes, comparable across machines and loads. `samples`:
    calibration samples (default per task, DEFAULT_SAMPLES)."""
    torch.set_num_threads(threads)
    model, task = load_network(network).eval(), make_task(network)
    spec = check_methods(methods)
    samples = samples or DEFAULT_SAMPLES[task.name]
    inputs = calibration_inputs(task, samples)
    rows = []
    for sparsity in sparsities:
        base = magnitude_compressed(model, task, sparsity, wbits)
        first = time.perf_counter()
        apply(copy.deepcopy(base), model, task, spec, samples)
        first = time.perf_counter() - first
        seconds, forward = [], []
        for _ in range(repeats):
            seconds.append(apply(copy.deepcopy(base), model, task, spec, samples)["seconds"])
            start = time.perf_counter()
            with torch.no_grad():
                base(*inputs)
            forward.append(time.perf_counter() - start)
        median, forward_s = float(np.median(seconds)), float(np.median(forward))
        row = {"method": spec, "sparsity": sparsity, "wbits": wbits, "seconds": median, "all_s": seconds,
               "first_s": round(first, 3), "forward_s": round(forward_s, 3), "ratio": round(median / forward_s, 2)}
        rows.append(row)
        if progress:
            progress(row)
    return {"network": network, "threads": threads, "repeats": repeats, "samples": samples, "runs": rows,
            "load_average": os.getloadavg()[0], "median_s": float(np.median([r["seconds"] for r in rows])),
            "target_s": 5.0 if network == "stereo" else None}
