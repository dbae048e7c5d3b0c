"""Whole-network latency of the engine against dense PyTorch and PyTorch's own sparse path.

For each (sparsity, weight bits): the shipped network pruned by magnitude (global threshold, first and
last layer kept dense, as `compress` does) and quantized (per-channel symmetric weights, 8-bit
activations calibrated on training data; no fine-tuning: speed does not depend on it), then timed as
- dense PyTorch: the plain network with the effective (masked, de-quantized) float32 weights, conv2d;
- PyTorch sparse: the same network with every conv/linear computed as a torch.sparse CSR weight times the
  unfolded input (F.unfold + torch.sparse.mm), float32: the sparse path PyTorch offers on a CPU;
- the engine (integer path where weights and activations are quantized);
- with `peers=True`, the peers of `jpq_core.engine.peers`: ONNX Runtime fp32 and int8 (static quantization)
  on the network's ONNX export, and DeepSparse through another interpreter when one is named.
Repetitions are interleaved (dense, sparse, engine, peers, dense, ...) so that load from other processes hits
all alike; figures are medians and speedups are ratios of medians from the same run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import subprocess
import sys
import time

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jpq_core.layers import prunable_layers
from jpq_core.engine.ops import cpuinfo, int8_products
from jpq_core.engine.program import compile_network, memory_report
from jpq_core.errors import JPQError

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
WBITS = (8, 4)
CALIBRATION_BATCHES = 4  # activation calibration of the benchmarked networks (and of ONNX Runtime's int8 peer)


def magnitude_compressed(model, task, sparsity: float, wbits, abits=8, calibration_batches: int = CALIBRATION_BATCHES, seed: int = 0,
                         allocation: str = "global"):
    """`model` pruned by magnitude and quantized, activations calibrated, without fine-tuning
    (the prune-then-quantize pipeline with finetune="none", minus its evaluation). `allocation="uniform"`
    prunes every layer alike: a randomly initialised network, whose layers' weight scales differ, would lose
    whole layers to one global threshold."""
    from jpq_core.compression import compress_without_training
    from jpq_core.pipeline import CompressionConfig

    config = CompressionConfig(criterion="magnitude", sparsity=sparsity, wbits=wbits, abits=abits, finetune="none",
                               calibration_batches=calibration_batches, seed=seed, allocation=allocation).check()
    return compress_without_training(model, task, config)


def plain_copy(compressed, dense: nn.Module | str):
    """A plain network (no parametrizations or hooks) computing with the effective float32 weights;
    `dense` is the uncompressed network (a copy of it is made) or a shipped network's name."""
    from jpq_core.models import build_network
    from jpq_core.compressed import effective_state_dict

    plain = (build_network(dense) if isinstance(dense, str) else copy.deepcopy(dense)).eval()
    state = {k: v for k, v in effective_state_dict(compressed).items() if "input_quantizer" not in k}
    plain.load_state_dict(state)
    return plain


def unfolded_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weight as the C_out x (C_in k k) matrix that multiplies F.unfold(input): block diagonal for a
    grouped (depthwise) convolution, whose output channels see only their group's input channels."""
    w = conv.weight.detach()
    if conv.groups == 1:
        return w.flatten(1)
    per_out, cols = w.shape[0] // conv.groups, w[0].numel()
    full = w.new_zeros(w.shape[0], cols * conv.groups)
    for g in range(conv.groups):
        full[g * per_out:(g + 1) * per_out, g * cols:(g + 1) * cols] = w[g * per_out:(g + 1) * per_out].flatten(1)
    return full


class TorchSparseConv(nn.Module):
    """conv2d as torch.sparse CSR weight (C_out x C_in*k*k, block diagonal when grouped) times F.unfold(input)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.weight = unfolded_weight(conv).to_sparse_csr()
        self.bias = conv.bias.detach() if conv.bias is not None else None

    def forward(self, x):
        c = self.conv
        n, _, h, w = x.shape
        cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # N x (C k k) x L
        out_h = (h + 2 * c.padding[0] - c.dilation[0] * (c.kernel_size[0] - 1) - 1) // c.stride[0] + 1
        out_w = (w + 2 * c.padding[1] - c.dilation[1] * (c.kernel_size[1] - 1) - 1) // c.stride[1] + 1
        y = torch.stack([torch.sparse.mm(self.weight, cols[i]) for i in range(n)])
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(n, -1, out_h, out_w)


class TorchSparseLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x):
        y = torch.sparse.mm(self.weight, x.t()).t()
        return y + self.bias if self.bias is not None else y


def torch_sparse_copy(plain):
    """`plain` with every conv/linear replaced by its torch.sparse counterpart."""
    net = copy.deepcopy(plain)
    for name, layer in prunable_layers(net).items():
        parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
        child = name.rpartition(".")[2]
        setattr(parent, child, TorchSparseConv(layer) if isinstance(layer, nn.Conv2d) else TorchSparseLinear(layer))
    return net


def bench_inputs(network: str, batch: int, height: int | None = None, width: int | None = None) -> tuple:
    """Inputs at the network's evaluation size: the Middlebury pair (741 x 500) for stereo, 32 x 32 images
    for the classifiers; random values (speed does not depend on them)."""
    from jpq_core.models import task_of

    g = torch.Generator().manual_seed(0)
    if task_of(network) == "stereo":
        h, w = height or 500, width or 741
        return tuple(torch.rand(batch, 3, h, w, generator=g) for _ in range(2))
    return (torch.rand(batch, 3, height or 32, width or 32, generator=g),)


def _time(fn, calls: int = 1) -> float:
    """Milliseconds per call of fn over `calls` back-to-back calls; a timer of another process
    (`peers.SubprocessTimer`) measures its calls itself (`ms_per_call`), without the round trip to it."""
    if hasattr(fn, "ms_per_call"):
        return fn.ms_per_call(calls)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


MIN_MEASURE_MS = 100.0  # a fast network is called repeatedly per measurement, so that one preemption by
# another process does not dominate a measurement of a millisecond


def time_interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function in `runs`, timed in turns (a, b, c, a, b, c, ...) so that
    load from other processes hits all alike; each is warmed up first (kernels compile, buffers allocate)."""
    calls = {}
    for k, fn in runs.items():
        fn()
        ms = _time(fn)
        if ms < MIN_MEASURE_MS:  # an engine program makes its plan on its second run (`Program._plan`)
            ms = min(ms, _time(fn))
        calls[k] = max(1, int(MIN_MEASURE_MS / max(ms, 1e-3)))
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_time(fn, calls[k]))
    return {k: float(np.median(v)) for k, v in times.items()}


def crossover(results: list[dict], wbits: int) -> float | None:
    """The lowest measured sparsity from which the engine is faster than dense PyTorch at every higher one."""
    rows = sorted((r for r in results if r["wbits"] == wbits), key=lambda r: r["sparsity"])
    faster = [r["speedup"] > 1 for r in rows]
    for i, r in enumerate(rows):
        if all(faster[i:]):
            return r["sparsity"]
    return None


# The engine's speed targets (issue 21), by network: (sparsity, against, at least), `against` the fastest peer
# timed in the same run or dense PyTorch. Every weight width and batch is held to them.
TARGETS = {
    "stereo": ((0.0, "peer", 1.0), (0.9, "peer", 3.0), (0.95, "peer", 3.0), (0.99, "peer", 3.0), (0.99, "dense", 30.0)),
    "resnet20": ((0.0, "peer", 0.7), (0.9, "peer", 1.0), (0.95, "peer", 1.0), (0.99, "peer", 1.0)),
}


def fastest_peer(row: dict) -> tuple[str, float] | None:
    """(peer, ms) of the fastest peer timed in a benchmark row, or None."""
    from jpq_core.engine.peers import PEERS

    timed = [(peer, row[f"{peer}_ms"]) for peer in PEERS if row.get(f"{peer}_ms") is not None]
    return min(timed, key=lambda t: t[1]) if timed else None


def target_report(result: dict) -> list[dict]:
    """The network's TARGETS against the rows of one benchmark run: per target and weight width, the ratio
    (fastest peer's or dense PyTorch's time over the engine's, same run) and whether it is met. A peer target
    without peers timed is left out; so is a sparsity the run did not measure."""
    report = []
    for sparsity, against, least in TARGETS.get(result["network"], ()):
        for row in result["results"]:
            if abs(row["sparsity"] - sparsity) > 1e-9:
                continue
            peer = fastest_peer(row) if against == "peer" else ("dense PyTorch", row["dense_ms"])
            if peer is None:
                continue
            ratio = peer[1] / row["engine_ms"]
            report.append({"sparsity": sparsity, "wbits": row["wbits"], "against": peer[0], "ratio": ratio,
                           "target": least, "met": ratio >= least})
    return report


def benchmark(network: str = "stereo", sparsities=SPARSITIES, wbits=WBITS, batch: int = 1, threads: int = 1,
              repeats: int = 5, torch_sparse: bool = True, height: int | None = None, width: int | None = None,
              checkpoint=None, first_call: bool = True, progress=None, peers: bool = False,
              deepsparse_python: str | None = None, allocation: str = "global") -> dict:
    """Latency table of dense PyTorch, PyTorch sparse, the engine and, with `peers`, ONNX Runtime (and
    DeepSparse run by the interpreter `deepsparse_python`); see the module docstring. Peers that cannot run
    are left out of the rows (None) and the result's "peer_notes" says why. `allocation`: as in
    `magnitude_compressed` ("uniform" for a randomly initialised network)."""
    from jpq_core.engine.peers import PEERS, peer_runs, versions
    from jpq_core.models import load_network
    from jpq_core.tasks import make_task

    if threads < 1 or batch < 1 or repeats < 1:
        raise JPQError("threads, batch and repeats must be 1 or more.")
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    task = make_task(network)
    model = load_network(network, checkpoint, getattr(task, "num_classes", None))
    inputs = bench_inputs(network, batch, height, width)
    results, peer_notes = [], {}
    for bits in wbits:
        for sparsity in sparsities:
            net = magnitude_compressed(model, task, sparsity, bits, calibration_batches=CALIBRATION_BATCHES,
                                       allocation=allocation)
            plain = plain_copy(net, model)
            program = compile_network(net, tuple(x[:1] for x in inputs))
            sparse = torch_sparse_copy(plain) if torch_sparse else None
            with contextlib.ExitStack() as stack:
                runs = {"dense": lambda: plain(*inputs), "engine": lambda: program.run(*inputs)}
                if sparse is not None:
                    runs["torch_sparse"] = lambda: sparse(*inputs)
                if peers:
                    runs.update(stack.enter_context(peer_runs(net, inputs, task, threads, CALIBRATION_BATCHES, 0,
                                                              deepsparse_python, peer_notes)))
                with torch.inference_mode():
                    med = time_interleaved(runs, repeats)
            kept = sum(int((l.weight != 0).sum()) for l in prunable_layers(net).values())
            total = sum(l.weight.numel() for l in prunable_layers(net).values())
            row = {"sparsity": sparsity, "measured_sparsity": 1 - kept / total, "wbits": bits,
                   "dense_ms": med["dense"], "torch_sparse_ms": med.get("torch_sparse"), "engine_ms": med["engine"],
                   "speedup": med["dense"] / med["engine"],
                   "torch_sparse_speedup": med["dense"] / med["torch_sparse"] if "torch_sparse" in med else None,
                   "program_bytes": program.nbytes, "cost_model_bytes": memory_report(program)["cost_model_bytes"],
                   "layers_ms": program.profile(*inputs, repeats=3)}
            if peers:
                row.update({f"{peer}_ms": med.get(peer) for peer in PEERS if peer != "deepsparse" or deepsparse_python})
                fastest = fastest_peer(row)
                row["vs_fastest_peer"] = fastest[1] / row["engine_ms"] if fastest else None
            results.append(row)
            if progress:
                progress(row)
    result = {"network": network, "threads": threads, "batch": batch, "input": [list(x.shape) for x in inputs],
              "allocation": allocation, "machine": machine(),
              "repeats": repeats, "results": results, "crossover": {str(b): crossover(results, b) for b in wbits},
              **({"peer_notes": peer_notes, "peer_versions": versions(deepsparse_python)} if peers else {}),
              # a user factory is loaded in this process only: a new one cannot build it
              "first_call_s": first_call_seconds(network, threads) if first_call and is_shipped_or_zoo(network) else None}
    result["targets"] = target_report(result)
    return result


def machine() -> dict:
    """What a run's times depend on beyond the code: the CPU's model and cores, the vector instructions the
    kernels use (AVX2, AVX-512, VNNI dot products), whether numba compiles them for 512-bit vectors
    (`kernels.wide_vector_features`) and whether the dense path has exact int8 products. The same code ran
    1.5-2.5x apart on this project's machines, and its ratios to the peers moved too."""
    text = cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(text.split())
    return {"cpu": model, "cores": os.cpu_count(),
            "vector": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags],
            "wide_vectors": bool(numba.config.CPU_FEATURES) and numba.config.CPU_FEATURES.endswith("-prefer-256-bit"),
            "int8_products": int8_products()}


def describe_machine(machine: dict) -> str:
    """`machine()` in words, e.g. "Intel(R) Xeon(R) Processor @ 2.60GHz, 2 cores; AVX-512 VNNI, 512-bit vectors,
    int8 products"."""
    vector = set(machine["vector"])
    isa = ("AVX-512" if "avx512f" in vector else "AVX2" if "avx2" in vector else "no AVX2") + (
        " VNNI" if {"avx512_vnni", "avx_vnni"} & vector else "")
    extras = [isa] + ["512-bit vectors"] * machine["wide_vectors"] + ["int8 products"] * machine["int8_products"]
    return f"{machine['cpu']}, {machine['cores']} cores; {', '.join(extras)}"


def is_shipped_or_zoo(network: str) -> bool:
    from jpq_core.models import USER

    return not network.startswith(USER)


_FIRST_CALL = """
import sys, time
start = time.perf_counter()
import numba, torch
from jpq_core.engine.bench import bench_inputs, magnitude_compressed
from jpq_core.engine.program import compile_network, memory_report
from jpq_core.models import load_network
from jpq_core.tasks import make_task
net = sys.argv[1]
numba.set_num_threads(int(sys.argv[2])); torch.set_num_threads(int(sys.argv[2]))
task = make_task(net)
program = compile_network(magnitude_compressed(load_network(net, None, getattr(task, 'num_classes', None)), task, 0.9, 8, calibration_batches=1))
inputs = bench_inputs(net, 1)
ready = time.perf_counter()
program.run(*inputs)
print(time.perf_counter() - ready)
"""


def first_call_seconds(network: str, threads: int) -> float:
    """Seconds of the first `Program.run` in a new process (kernels from numba's on-disk cache, which
    this process has filled), not counting imports and compression."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL, network, str(threads)], capture_output=True, text=True,
                         cwd=root, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def markdown_table(result: dict) -> str:
    """The benchmark's rows as a Markdown table (for docs/engine.md); peer columns where the rows have them."""
    rows = result["results"]
    peers = [(key, label) for key, label in PEER_COLUMNS if any(r.get(key) is not None for r in rows)]

    def ms(value):
        return "-" if value is None else f"{value:.3g}" if value < 10 else f"{value:.1f}"

    head = ["sparsity", "w bits", "dense PyTorch ms", "PyTorch sparse ms", "engine ms", *[label for _, label in peers],
            "speedup vs dense", *(["vs fastest peer"] if peers else []), "packed KiB", "cost model KiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        model = f"{r['cost_model_bytes'] / 1024:.1f}" if r.get("cost_model_bytes") is not None else "-"
        cells = [f"{r['measured_sparsity'] * 100:.1f}%", str(r["wbits"]), ms(r["dense_ms"]), ms(r.get("torch_sparse_ms")),
                 ms(r["engine_ms"]), *[ms(r.get(key)) for key, _ in peers], f"{r['speedup']:.2f}x",
                 *([f"{r['vs_fastest_peer']:.2f}x" if r.get("vs_fastest_peer") else "-"] if peers else []),
                 f"{r['program_bytes'] / 1024:.1f}", model]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PEER_COLUMNS = (("onnxruntime_ms", "ONNX Runtime fp32 ms"), ("onnxruntime_int8_ms", "ONNX Runtime int8 ms"),
                ("deepsparse_ms", "DeepSparse ms"))
