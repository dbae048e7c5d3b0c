"""A compiled engine program: the ops of one network with packed weights; run, profile, save, load.

    program = compile_network(model)            # model: compressed (jpq_core.pipeline) or plain, eval mode
    disparity = program.run(left, right)        # numpy float32 (torch tensors or numpy arrays in)
    program.save("net.jpqe"); load_program("net.jpqe").run(...)
    program.profile(left, right)                # {layer: ms}
    program.layer_bytes()                       # {layer: packed weight bytes}

The file is safetensors (arrays only, nothing executable) with the op list as JSON in its metadata.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numba
import numpy as np
import torch

from jpq_core.checkpoints import atomic_write
from jpq_core.engine.lowering import link, lower
from jpq_core.engine import kernels
from jpq_core.engine.ops import FRESH, THREADS, Conv, entry_point, op_from
from jpq_core.errors import JPQError
from jpq_core.untrusted import decoding


def _start_numba_threads() -> None:
    """Start numba's thread pool now, keeping PyTorch's thread count. Started lazily by the first parallel
    kernel instead, numba's OpenMP layer resets the OpenMP thread count it shares with PyTorch: a process
    that had set torch.set_num_threads(1) ran PyTorch on two threads after its first engine run, and on the
    loaded 2-core test machine compressing RegNet-X-400MF went from 0.8 s to 45 s (two threads meeting at
    barriers on a busy core). Started here, the count stays what the process set, before or after. The cost:
    the pool exists from import on, so a process forked after importing the engine must not run its parallel
    kernels (GNU OpenMP is not fork-safe); the project's process pools spawn (`sweeps`), subprocesses exec."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool
    torch.set_num_threads(threads)


_start_numba_threads()

FORMAT = "jpq-engine/3"  # 3: stride, padding, dilation per direction; the general glue ops
READABLE = ("jpq-engine/2", FORMAT)  # 2: producers write several consumers' inputs (targets, keep)
# Batches of small images run in parts (`Program.micro_batch`): ResNet-20 at batch 64, one thread, in parts of
# 8 samples (512 KiB of its first layer's output) took 0.92 / 0.82 / 0.80 / 0.73 of the whole batch's time at
# 0 / 90 / 95 / 99% (interleaved in one process); torchvision's ResNet-18 (1.9 MB of weights at 90%) ran 2-5%
# slower in parts, hence the weight cap; under it, MobileNet-V2 (90%, 99%) and ResNet-18 (99%) at batch 64 still
# took 1.02x their whole batch's time on one thread (two threads run parts at once, see `_run_parts`).
MICRO_BATCH_BYTES = 1 << 19
MICRO_BATCH_MAX_WEIGHTS = 1 << 20
SHAPES = "shapes"  # key of a buffers dict: the input shapes its arrays were made for
PLAN = "plan"  # key of a buffers dict: how later runs with it make the ops' calls (`Program._run_plan`)


@functools.lru_cache(maxsize=1)
def _worker_pool() -> ThreadPoolExecutor:
    """Threads that run a batch's parts at once (`Program._run_parts`): as many as numba may use."""
    return ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, thread_name_prefix="jpq-engine-part")


os.register_at_fork(after_in_child=_worker_pool.cache_clear)  # a forked child has none of the pool's threads


class Program:
    def __init__(self, ops: list, n_inputs: int, output: int, slots: int, info: dict | None = None):
        self.ops, self.n_inputs, self.output, self.slots = ops, n_inputs, output, slots
        self.info = info or {}
        # Padded input buffers and float outputs, reused by the next run of the same input shapes: their
        # padding is written once, and large arrays are not allocated and faulted in again on every run.
        # A run that finds them in use by another thread allocates its own. Parts of a batch that run at once
        # (`run`) have a set each.
        self._buffers: dict = {}
        self._lock = threading.Lock()
        self._part_buffers: list[dict] = []
        self._parts_lock = threading.Lock()

    def _inputs(self, inputs) -> list[np.ndarray]:
        if len(inputs) != self.n_inputs:
            raise JPQError(f"this program takes {self.n_inputs} input(s), got {len(inputs)}.")
        arrays = []
        for x in inputs:
            x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if x.ndim != 4:
                raise JPQError(f"inputs must be N x C x H x W arrays, got shape {x.shape}.")
            arrays.append(np.ascontiguousarray(x, np.float32))
        return arrays

    def _execute(self, arrays: list[np.ndarray], times: dict | None = None, buffers: dict | None = None) -> np.ndarray:
        """Run the ops on `arrays` with `buffers`, a dict this call uses alone (by default the program's own if
        no other run holds them, else new ones); a copy of the output."""
        if buffers is not None:
            return self._run_ops(arrays, times, buffers)
        mine = self._lock.acquire(blocking=False)
        try:
            return self._run_ops(arrays, times, self._buffers if mine else {})
        finally:
            if mine:
                self._lock.release()

    def _run_ops(self, arrays: list[np.ndarray], times: dict | None, buffers: dict) -> np.ndarray:
        env = [None] * self.slots
        env[:self.n_inputs] = arrays
        shapes = tuple(x.shape for x in arrays)
        if buffers.get(SHAPES) != shapes:
            buffers.clear()
            buffers[SHAPES] = shapes
        buffers[THREADS] = numba.get_num_threads()
        try:
            plan = buffers.get((PLAN, buffers[THREADS]))
            if times is None and plan is not None:
                self._run_plan(plan, env, buffers)
            elif times is None:  # no clock reads around each op: at batch 1 they add up to a few percent
                for op in self.ops:
                    op.run(env, buffers)
                if buffers.get(FRESH) is False:  # a complete run over buffers that an earlier one filled
                    buffers[PLAN, buffers[THREADS]] = self._plan(env, buffers)
            else:
                for op in self.ops:
                    start = time.perf_counter()
                    op.run(env, buffers)
                    times[op.name] += (time.perf_counter() - start) * 1e3
        except BaseException:
            buffers.clear()  # half-written buffers are not reused
            raise
        buffers[FRESH] = False
        return np.array(env[self.output])  # a copy: the buffers are reused by the next run

    def _plan(self, env: list, buffers: dict) -> list:
        """How later runs with `buffers` make the ops' calls: [(ops, (call, residuals, outputs, stores) or None)],
        the convs' planned calls (`Conv.planned`), where consecutive convs that call `kernels.sparse_conv_serial`
        alone with arguments of one type make one call of `kernels.sparse_convs_serial` (at ResNet-20's batch 1
        unboxing 24 arguments a layer cost 4% of a run). `residuals` are the (slot, array) a call holds for; a
        residual that a planned conv's kept output is always holds (the same array every run), so only others
        are checked, and a conv with one stays alone."""
        planned = [op.planned(env, buffers) for op in self.ops]
        kept = {id(array) for step in planned if step is not None for _, array in step.outputs}
        plan, group = [], []

        def close_group():
            if len(group) == 1:
                op, step, _ = group[0]
                plan.append(([op], (step.call, (), step.outputs, ())))
            elif group:
                calls = kernels.conv_calls(group[0][1].serial_args)
                for _, step, _ in group[1:]:
                    kernels.add_conv_call(calls, step.serial_args)
                kernel = kernels.sparse_convs_serial
                kernel.compile((kernel.typeof_pyval(calls),))
                plan.append(([op for op, _, _ in group], (functools.partial(entry_point(kernel, [calls]), calls), (),
                                                         tuple(out for _, step, _ in group for out in step.outputs), ())))
            group.clear()

        for op, step in zip(self.ops, planned):
            stable = step is not None and (not step.residual or id(step.residual[1]) in kept)
            if stable and step.serial_args is not None and not step.stores:
                types = tuple(numba.typeof(a) for a in step.serial_args)
                if group and types != group[0][2]:
                    close_group()
                group.append((op, step, types))
                continue
            close_group()
            if step is None:
                plan.append(([op], None))
            else:
                residuals = () if stable else (step.residual,)
                plan.append(([op], (step.call, residuals, step.outputs, step.stores)))
        close_group()
        return plan

    def _run_plan(self, plan: list, env: list, buffers: dict) -> None:
        """The ops with `plan` (`_plan`): a planned call, or where there is none, or a residual is another array
        this time, the ops' `run`. At ResNet-20's batch 1 the Python around each kernel call and numba's
        dispatch were a fifth of the run."""
        for ops, step in plan:
            if step is not None:
                call, residuals, outputs, stores = step
                for slot, bound in residuals:
                    if env[slot] is not bound:
                        break
                else:
                    for slot, store in stores:
                        store(env[slot])
                    call()
                    for slot, output in outputs:
                        env[slot] = output
                    continue
            for op in ops:
                op.run(env, buffers)

    def run(self, *inputs) -> np.ndarray:
        """The network's output for `inputs` (N x C x H x W each), as a float32 numpy array. A batch may run
        in parts (`micro_batch`), with several threads one part per thread at a time (`_run_parts`); each
        sample's output is the same either way."""
        arrays = self._inputs(inputs)
        parts = self._parts(arrays)
        return self._execute(arrays) if len(parts) == 1 else self._run_parts(parts)

    def _parts(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        """The batch as `run` takes it: in parts of `micro_batch` samples (one part when it runs whole)."""
        n, part = arrays[0].shape[0], self.micro_batch(arrays)
        return [arrays] if part >= n else [[x[i:i + part] for x in arrays] for i in range(0, n, part)]

    def _run_parts(self, parts: list[list[np.ndarray]]) -> np.ndarray:
        """The outputs of `parts`, concatenated. With T threads the parts run on T worker threads at once, each
        kernel on its worker's thread alone, with a buffer set per worker: at a part's size one layer is too
        little work to split across threads (ResNet-20, batch 16, 90%: two threads 6.8 ms against one
        thread's 4.9 ms, every layer split). numba's thread count is per thread; PyTorch's (the dense path's
        int8 products) is the process's, so it is 1 until the parts are done."""
        workers = min(numba.get_num_threads(), len(parts))
        if workers == 1 or not self._parts_lock.acquire(blocking=False):
            return np.concatenate([self._execute(p) for p in parts])
        try:
            self._part_buffers += [{} for _ in range(workers - len(self._part_buffers))]
            torch_threads = torch.get_num_threads()
            try:
                groups = [_worker_pool().submit(self._run_serially, parts[j::workers], self._part_buffers[j])
                          for j in range(workers)]
                wait(groups)  # all of them, also when one fails: the buffer sets are free again after
                outputs = [group.result() for group in groups]
            finally:
                torch.set_num_threads(torch_threads)
        finally:
            self._parts_lock.release()
        return np.concatenate([outputs[i % workers][i // workers] for i in range(len(parts))])

    def _run_serially(self, parts: list[list[np.ndarray]], buffers: dict) -> list[np.ndarray]:
        numba.set_num_threads(1)
        torch.set_num_threads(1)
        return [self._execute(p, buffers=buffers) for p in parts]

    @functools.cached_property
    def samples_independent(self) -> bool:
        """Whether every op computes each sample from that sample alone, so that a batch can run in parts."""
        return all(op.per_sample for op in self.ops)

    def micro_batch(self, arrays: list[np.ndarray]) -> int:
        """Samples per part when a batch of `arrays` runs in parts: depth first, so that a part's activations
        stay in cache from one layer to the next instead of streaming through memory, where the weights stay
        in cache beside them too (at most MICRO_BATCH_MAX_WEIGHTS). A part holds about MICRO_BATCH_BYTES of
        the first layer's float output, and with T threads at most 1 / T of the batch (a part per thread); its
        size divides the batch (every part alike, so the buffers of one part size are reused), else the batch
        runs whole."""
        n = arrays[0].shape[0]
        if n == 1:
            return 1
        first = next((op for op in self.ops if isinstance(op, Conv)), None)
        if (first is None or not self.samples_independent or self.nbytes > MICRO_BATCH_MAX_WEIGHTS
                or any(x.shape[0] != n for x in arrays)):
            return n
        h, w = arrays[0].shape[2:]
        per_sample = 4 * first.shape[0] * -(-h // first.stride[0]) * -(-w // first.stride[1])
        target = max(1, min(MICRO_BATCH_BYTES // per_sample, n // numba.get_num_threads()))
        part = max(d for d in range(1, min(n, target) + 1) if n % d == 0)
        return part if 2 * part > target else n

    def profile(self, *inputs, repeats: int = 1) -> dict[str, float]:
        """Milliseconds per layer (glue ops by their role), median over `repeats` runs. A batch that `run` splits
        is timed in the same parts, one after the other, summed per layer (with several threads `run` takes
        them at once, so there the sum exceeds its time)."""
        times = defaultdict(list)
        parts = self._parts(self._inputs(inputs))
        for _ in range(repeats):
            run = defaultdict(float)
            for piece in parts:
                self._execute(piece, run)
            for k, v in run.items():
                times[k].append(v)
        return {k: float(np.median(v)) for k, v in times.items()}

    @property
    def layers(self) -> list[Conv]:
        return [op for op in self.ops if isinstance(op, Conv)]

    def layer_bytes(self) -> dict[str, int]:
        """Packed weight bytes per layer: values, index, per-channel scales and biases."""
        return {op.name: op.nbytes for op in self.layers}

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(self.layer_bytes().values())

    def summary(self) -> list[dict]:
        """Per layer: path (integer or float), bits, encoding, kept weights, packed bytes."""
        return [{"layer": op.name, "path": "integer" if op.integer else "float", "wbits": op.bits,
                 "abits": op.act["bits"] if op.act else None, "encoding": op.encoding, "bytes": op.nbytes}
                for op in self.layers]

    def to_bytes(self) -> bytes:
        """The program file's contents: safetensors, the packed arrays plus the op list as JSON metadata."""
        from safetensors.numpy import save

        arrays = {f"{i}.{k}": np.ascontiguousarray(v) for i, op in enumerate(self.ops) for k, v in op.arrays().items()}
        header = {"format": FORMAT, "n_inputs": self.n_inputs, "output": self.output, "slots": self.slots,
                  "info": self.info, "ops": [op.describe() for op in self.ops]}
        return save(arrays, metadata={"program": json.dumps(header)})

    def save(self, path) -> Path:
        """One program file (`to_bytes`), written atomically."""
        path = Path(path)
        data = self.to_bytes()
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return path


def load_program(path) -> Program:
    """A program saved by `Program.save` (safetensors: no code runs on load)."""
    import safetensors

    path = Path(path)
    if not path.exists():
        raise JPQError(f"{path}: no such program file; compile one with compile_network(...).save(path).")
    again = "compile and save it again."
    with decoding(path, "not a readable program file", again):
        with safetensors.safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    if "program" not in meta:
        raise JPQError(f"{path}: a safetensors file without an engine program in its metadata.")
    with decoding(path, "a damaged program file", again, describe=lambda exc: f"{type(exc).__name__}: {str(exc)[:120]}"):
        header = json.loads(meta["program"])
        if not isinstance(header, dict) or header.get("format") not in READABLE:
            found = header.get("format") if isinstance(header, dict) else None
            raise JPQError(f"{path}: program format {found!r}, this engine reads {FORMAT!r}.")
        ops = []
        for i, d in enumerate(header["ops"]):
            mine = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(i)}
            ops.append(op_from(d, mine))
        link(ops, header["output"])
        return Program(ops, header["n_inputs"], header["output"], header["slots"], header.get("info"))


def compile_network(model: torch.nn.Module, example_inputs: tuple | None = None) -> Program:
    """Compile a compressed (or plain) network in eval mode into an engine program.

    With `example_inputs`, the program also records the cost model's weight memory per layer
    (`jpq_core.costs.network_cost`) for comparison with its measured packed size (`memory_report`).
    """
    from torch.nn.utils import parametrize

    with parametrize.cached():  # lowering reads each compressed weight several times: quantize it once
        ops, n_inputs, output, slots, _ = lower(model)
    program = Program(ops, n_inputs, output, slots)
    if example_inputs is not None:
        from jpq_core.layers import prunable_layers

        program.info["cost_model_weight_bits"] = cost_model_bits(model, example_inputs)
        # Layers whose bias the cost model prices (a bias of their own); the others' biases in the program
        # come from folding batch norm, which the cost model leaves out (memory_report shows them apart).
        program.info["cost_model_biased"] = sorted(k for k, m in prunable_layers(model).items() if m.bias is not None)
    return program


def cost_model_bits(model, example_inputs) -> dict[str, float]:
    """{layer: weight bits} by the cost model, for the masks and bit widths the network carries."""
    from jpq_core.compressed import activation_bits, transform
    from jpq_core.costs import layer_geometry, network_cost
    from jpq_core.layers import prunable_layers

    layers = prunable_layers(model)
    masks, wbits, abits, per_channel = {}, {}, {}, True
    for name, layer in layers.items():
        q = transform(layer)
        masks[name] = q.mask if q is not None else layer.weight.detach() != 0
        wbits[name] = q.bits if q is not None else None
        per_channel = q.per_channel if q is not None else per_channel
        abits[name] = activation_bits(layer)
    cost = network_cost(model, masks, wbits, abits, layer_geometry(model, example_inputs), per_channel)
    return {c["name"]: c["weight_bits"] for c in cost["layers"]}


def memory_report(program: Program) -> dict:
    """Measured packed bytes against the cost model's weight memory, in total and per layer.

    The program also stores the biases of folded batch norm (4 bytes per output channel), which the cost
    model does not count (it prices weights, indices, scales and a layer's own bias): they are reported as
    `folded_bn_bytes`, and `ratio` compares like with like, (program - folded batch norm) / cost model.
    """
    model = program.info.get("cost_model_weight_bits")
    if model is None:
        raise JPQError("this program was compiled without example inputs, so it has no cost-model figures.")
    biased = set(program.info.get("cost_model_biased", ()))
    layers = [{"layer": op.name, "program_bytes": op.nbytes, "cost_model_bytes": model[op.name] / 8,
               "folded_bn_bytes": 0 if op.name in biased else op.bias.nbytes} for op in program.layers]
    total_model = sum(model.values()) / 8
    folded = sum(layer["folded_bn_bytes"] for layer in layers)
    return {"program_bytes": program.nbytes, "folded_bn_bytes": folded, "cost_model_bytes": total_model,
            "ratio": (program.nbytes - folded) / total_model if total_model else None, "layers": layers}
