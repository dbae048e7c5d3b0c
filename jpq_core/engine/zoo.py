"""Does the engine run torchvision's classification zoo? One model at a time, as a small record.

`check_model("resnet18")` builds the model randomly initialised (nothing downloads) for the digits data's
10 classes, at the smallest input size it accepts, and compiles it in the engine twice:

- float at 0% sparsity, as built: the engine must agree with PyTorch to float32 rounding (1e-4 relative);
- pruned by magnitude to 90% with 8-bit weights and activations (`compressed`): every layer must run the
  integer path and agree with the fake-quantized PyTorch network within the shipped networks' tolerance
  (tests/test_engine.py: most samples to float rounding, the rest within a rounding step amplified
  downstream, the same top-1 on 90% of the samples).

Models the engine cannot compile are *skipped* with the op that stopped them (the engine's `JPQError`
names it); models over a parameter budget are skipped before they are built (counted on the meta device).
A failed whole-network comparison, or a network that 90% pruning silences (no batch norm to re-estimate:
SqueezeNet; its output is quantization noise), is settled layer by layer (`layer_by_layer`): every engine
op fed PyTorch's own input to it must give PyTorch's output to float rounding, except where a quantized
input sat on a rounding tie, by at most one quantization step of that input through the layer's weights:
*matched per layer* (the whole network's difference is rounding amplified downstream), else a *mismatch*
naming the op. Any other exception becomes an "error" record with its class and message, never escapes.
The table of the whole zoo is in docs/engine.md ("The torchvision zoo"), made by scripts/zoo_check.py.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from jpq_core.engine.program import compile_network
from jpq_core.errors import JPQError

MATCHED, MATCHED_PER_LAYER, SKIPPED_OP, SKIPPED_SIZE, MISMATCH, ERROR = (
    "matched", "matched per layer", "skipped (op)", "skipped (size)", "mismatch", "error")
OUTCOMES = (MATCHED, MATCHED_PER_LAYER, SKIPPED_OP, SKIPPED_SIZE, MISMATCH, ERROR)
SIZES = (32, 64, 75, 96, 128, 160, 224)  # input sizes tried, smallest first (inception_v3 needs 75)
MAX_PARAMS = 30_000_000  # the check's budget: larger models are counted, not built (28M: about 20 s each)
SPARSITY = 0.9
FLOAT_RTOL = 1e-4
LIVE_SIGNAL = 1e-3  # an output scale under this: pruning silenced the network, compared layer by layer only
# x / s + z this close to a rounding tie (k + 1/2) may round either way in float32 (|x / s + z| <= 255 is
# computed to about 3e-5): PyTorch's fake quantizer and the engine may pick different steps there.
TIE = 1e-4


@dataclass
class ZooRecord:
    """What one model's check found. `max_error` is the worst max |engine - PyTorch| / max |PyTorch| of the
    comparisons made; `op` is the op that stopped a skipped model ("LayerNorm", "floordiv", ...)."""

    name: str
    params: int = 0
    size: int | None = None
    outcome: str = ERROR
    reason: str = ""
    op: str = ""
    max_error: float | None = None
    noise: float | None = None  # a failed comparison's: PyTorch's own max error when its input moves by one ulp
    layer: str = ""  # a failed comparison's: the op with the largest error when each op is fed PyTorch's input
    layer_error: float | None = None  # that op's largest |engine - PyTorch| / allowed (<= 1: within tolerance)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def recalibrate_batch_norm(net: nn.Module, task, batches: int = 4) -> nn.Module:
    """A randomly initialised network loses its signal under 90% pruning (layer after layer of shrinking
    activations): re-estimate every batch norm's statistics on data, as one would after pruning, so that
    the comparison is made on activations of ordinary size. Only the batch norms are put in training mode:
    dropout stays off, and auxiliary heads that run only in training (inception_v3's, which need 299 x 299
    inputs) are not run."""
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
    with torch.no_grad():
        for x, _ in task.batches(batches, seed=5):
            net(x)
    return net.eval()


def compressed(model: nn.Module, task, sparsity: float, wbits=8, abits=8) -> nn.Module:
    """Pruned per layer by magnitude and quantized; batch-norm statistics re-estimated before the activation
    ranges are calibrated (a randomly initialised network pruned to 90% otherwise outputs about 1e-14)."""
    from jpq_core.compressed import add_activation_quantizers, attach, calibrate_activations
    from jpq_core.compression import prune_masks
    from jpq_core.pipeline import CompressionConfig

    config = CompressionConfig(criterion="magnitude", sparsity=sparsity, wbits=wbits, abits=abits, finetune="none",
                               allocation="uniform").check()
    net = attach(copy.deepcopy(model).eval(), None, None)
    attach(net, prune_masks(net, task, config, sparsity), wbits)
    recalibrate_batch_norm(net, task)
    if abits is not None:
        add_activation_quantizers(net, abits)
        calibrate_activations(net, task, 2, 0)
    return net.eval()


def float_mismatch(out: np.ndarray, ref: np.ndarray) -> str | None:
    """None when the engine's float output is PyTorch's to float32 rounding (as `np.testing.assert_allclose`
    with rtol=1e-4 and atol=1e-4 of the output's scale); otherwise what differs."""
    scale = float(np.abs(ref).max())
    bad = np.abs(out - ref) > FLOAT_RTOL * (np.abs(ref) + scale)
    if not bad.any():
        return None
    return f"{int(bad.sum())} of {bad.size} outputs differ by more than {FLOAT_RTOL:g} relative (max {relative_error(out, ref):.2e})"


def quantized_mismatch(out: np.ndarray, ref: np.ndarray) -> str | None:
    """None when the engine's 8-bit output agrees with the fake-quantized PyTorch network as the shipped
    networks' tests ask; otherwise the first condition that fails. Float rounding can move an activation
    across a rounding boundary, one step there, amplified downstream in a deep network (RegNet: 3 of 32
    samples): most samples must agree to float rounding, the others stay close."""
    scale = float(np.abs(ref).max())
    per_sample = np.abs(out - ref).max(1)
    exact = float((per_sample <= FLOAT_RTOL * scale).mean())
    if exact < 0.75:
        return f"only {exact:.0%} of samples agree to float rounding (75% needed; max error {relative_error(out, ref):.2e})"
    if np.abs(out - ref).mean() > 0.02 * scale:
        return f"mean error {np.abs(out - ref).mean() / scale:.2e} of the output's scale (0.02 allowed)"
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    if agree < 0.9:
        return f"top-1 agrees on {agree:.0%} of samples (90% needed)"
    return None


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def stopping_op(exc: JPQError) -> tuple[str, str]:
    """(op, reason) of the engine's refusal: "the engine cannot run layer 'x' (LayerNorm); it supports ..."
    gives ("LayerNorm", "layer 'x' (LayerNorm)"); the list of what it supports is left out of the table."""
    message = str(exc).split("; it supports ")[0].removeprefix("the engine cannot run ")
    found = re.search(r"\((\w+)\)", message) if message.startswith("layer ") else re.match(r"(\w+)", message)
    return (found.group(1) if found else message[:40]), message


class AtSize:
    """`task`'s training batches resized to `size` x `size` (bilinear): what a model that needs images larger
    than the data's 32 x 32 is calibrated and compared on."""

    def __init__(self, task, size: int):
        self.task, self.size = task, size

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def batches(self, count: int, seed: int = 0, start: int = 0):
        for x, y in self.task.batches(count, seed, start):
            yield self.resize(x), y

    @staticmethod
    def predict(model, batch):
        return model(batch[0])


def smallest_input(model: nn.Module, num_classes: int, sizes=SIZES) -> int | None:
    """The smallest of `sizes` at which the model's forward runs and gives N x classes logits (None: none):
    most of the zoo runs at 32 x 32, inception_v3 needs 75, ViT and MaxViT only their training size."""
    for size in sizes:
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, 3, size, size))
        except Exception:  # too small for its pooling, its patches or its fixed position embedding
            continue
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (2, num_classes):
            return size
    return None


def check_model(name: str, task=None, max_params: int = MAX_PARAMS, sparsity: float = SPARSITY,
                quantized: bool = True) -> ZooRecord:
    """Check one torchvision classification model ("resnet18" or "tv:resnet18"); see the module's docstring.
    `quantized=False` checks float at 0% only (the quick pass of the test suite). Never raises."""
    from jpq_core.tasks import ClassificationTask

    record = ZooRecord(name.removeprefix("tv:"))
    start = time.perf_counter()
    try:
        _check(record, task or ClassificationTask("digits", batch_size=16), max_params, sparsity, quantized)
    except Exception as exc:  # anything the check did not foresee is a finding, not a crash of the run
        record.outcome, record.reason = ERROR, f"{type(exc).__name__}: {exc}"
    record.seconds = round(time.perf_counter() - start, 1)
    return record


def _check(record: ZooRecord, task, max_params: int, sparsity: float, quantized: bool) -> None:
    from jpq_core.models import TORCHVISION, build_network, parameter_count

    name = TORCHVISION + record.name
    record.params = parameter_count(name, task.num_classes)
    if record.params > max_params:
        record.outcome = SKIPPED_SIZE
        record.reason = f"{record.params / 1e6:.1f}M parameters, too large for the check's budget ({max_params / 1e6:g}M)"
        return
    model = build_network(name, task.num_classes).eval()
    record.size = smallest_input(model, task.num_classes)
    if record.size is None:
        record.outcome, record.reason = SKIPPED_SIZE, f"runs at none of {', '.join(map(str, SIZES))} px"
        return
    data = AtSize(task, record.size)
    x = data.resize(task.test_x[:16])

    # Float at 0% on the network as built: its batch norms hold their initial statistics (close to the
    # identity). Re-estimated on data they normalise channels of almost no variance with gains up to
    # 1/sqrt(eps), and PyTorch's own output then moves by up to 1e-1 for a one-ulp input change
    # (EfficientNet-B2), which no 1e-4 comparison survives.
    try:
        program = compile_network(model)
    except JPQError as exc:  # the engine names the op it cannot run
        record.outcome = SKIPPED_OP
        record.op, record.reason = stopping_op(exc)
        return
    out, ref = _run(program, model, x)
    record.max_error = relative_error(out, ref)
    if (why := float_mismatch(out, ref)) is not None:
        _settle_layer_by_layer(record, f"float at 0%: {why}", model, x, out, ref)
        return
    if quantized:
        del program  # the float program holds every weight again: free it before the compressed copy is built
        net = compressed(model, data, sparsity)
        program = compile_network(net)
        on_float = [layer.name for layer in program.layers if not layer.integer]
        if on_float:
            record.outcome, record.reason = MISMATCH, f"layers on the float path at w8/a8: {', '.join(on_float[:5])}"
            return
        out, ref = _run(program, net, x)
        scale = float(np.abs(ref).max())
        if scale <= LIVE_SIGNAL:  # no batch norm to re-estimate (SqueezeNet): the output is quantization noise
            _settle_layer_by_layer(record, f"{sparsity:.0%} w8/a8: pruning silences the random network (outputs up to {scale:.0e})",
                      net, x, out, ref)
            return
        record.max_error = max(record.max_error, relative_error(out, ref))
        if (why := quantized_mismatch(out, ref)) is not None:
            _settle_layer_by_layer(record, f"{sparsity:.0%} w8/a8: {why}", net, x, out, ref)
            return
    record.outcome = MATCHED


def _settle_layer_by_layer(record: ZooRecord, why: str, net: nn.Module, x: torch.Tensor, out: np.ndarray, ref: np.ndarray) -> None:
    """Settle a failed whole-network comparison layer by layer (`layer_by_layer`): MATCHED_PER_LAYER when
    every op is within its tolerance (at 90% w8/a8 a rounding step taken the other way on a tie is amplified
    downstream), else a MISMATCH naming the op. PyTorch's own sensitivity is recorded beside it: how far its
    output moves when every input pixel moves by one float32 ulp (up, then down; the larger)."""
    with torch.no_grad():
        record.noise = max(relative_error(net(torch.from_numpy(np.nextafter(x.numpy(), np.float32(way)))).numpy(), ref)
                           for way in (np.inf, -np.inf))
    record.layer, record.layer_error, compared = layer_by_layer(net, x)
    within = record.layer_error <= 1.0
    record.outcome = MATCHED_PER_LAYER if within else MISMATCH
    record.reason = (f"{why}; fed PyTorch's input, each of {compared} ops is within its tolerance (worst {record.layer}: "
                     f"{record.layer_error:.1e} of it)" if within else
                     f"{why}; fed PyTorch's input, op {record.layer} is off by {record.layer_error:.1f} times its tolerance")
    record.reason += f"; PyTorch itself moves by {record.noise:.1e} for a one-ulp input change"


def layer_by_layer(net: nn.Module, x: torch.Tensor) -> tuple[str, float, int]:
    """Each engine op of `net` (compiled without fusion) fed PyTorch's own values of its inputs on x, its output
    compared with PyTorch's value of the node it computes. Allowed per output: float rounding (FLOAT_RTOL of
    the value and of the tensor's scale), plus, for a layer with quantized input, one quantization step at
    every input that sat on a rounding tie (`tie_bound`). Returns (the op with the largest error relative to
    what is allowed, that ratio, how many ops were compared)."""
    from jpq_core.engine.lowering import lower, trace
    from jpq_core.engine.ops import THREADS, Conv

    ops, _, _, slots, origins = lower(net, fused=False)
    values = _node_values(trace(net, type(net).__name__), x)
    forced = {}
    for slot, name in origins.items():
        if isinstance(values.get(name), np.ndarray):
            forced[slot] = values[name]
            forced[slot].flags.writeable = False  # an op writing into its input would show here
    env, buffers = [None] * slots, {THREADS: numba.get_num_threads()}
    worst, compared = ("", 0.0), 0
    for op in ops:
        reads = op.inputs + ([op.residual] if isinstance(op, Conv) and op.residual is not None else [])
        for slot in reads:
            env[slot] = forced.get(slot, env[slot])
        op.run(env, buffers)
        ref = forced.get(op.output)
        if ref is None or env[op.output] is None:
            continue
        out = np.asarray(env[op.output]).reshape(ref.shape)
        allowed = FLOAT_RTOL * (np.abs(ref) + np.abs(ref).max())
        if isinstance(op, Conv) and op.act is not None:
            allowed = allowed + tie_bound(op, [env[i] for i in op.inputs]).reshape(ref.shape)
        ratio = float((np.abs(out - ref) / np.maximum(allowed, np.finfo(np.float32).tiny)).max())
        compared += 1
        if ratio >= worst[1]:
            worst = (op.name, ratio)
    return worst[0], worst[1], compared


def _node_values(traced, x: torch.Tensor) -> dict:
    """{node name: its value on x as a float32 numpy array} of every tensor-valued node of the traced graph."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                values[node.name] = np.array(result.detach().numpy(), np.float32)  # a copy: in-place ops follow
            return result

    with torch.no_grad():
        Recorder(fx.GraphModule(traced.root, traced.graph)).run(x)
    return values


def tie_bound(conv, inputs: list[np.ndarray]) -> np.ndarray:
    """How far the outputs of a layer with an input quantizer may move because its input sat on rounding ties: s_a times the
    convolution of the tie mask (|x / s_a + z - k - 1/2| < TIE) with the layer's effective |weights|
    (|k| times its per-channel scale, batch norm folded in), shaped as the layer's output."""
    from jpq_core.engine import packing

    if conv.linear:  # (N, features), or the (N, C, H, W) it flattens
        inputs = [i.reshape(i.shape[0], -1, 1, 1) for i in inputs]
    x = np.concatenate([np.asarray(i, np.float64) for i in inputs], axis=1)
    t = x / conv.act["scale"] + conv.act["zero"]
    ties = torch.from_numpy((np.abs(t - np.floor(t) - 0.5) < TIE).astype(np.float32))
    size = int(np.prod(conv.shape))
    pos, vals = packing.decode(conv.encoding, conv.values, conv.index, conv.bits, size, conv.entries)
    weights = np.zeros(size, np.float32)
    weights[pos] = np.abs(vals)
    weights = weights.reshape(conv.shape) * np.abs(conv.scale).reshape(-1, 1, 1, 1)
    moved = F.conv2d(ties, torch.from_numpy(weights), stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups)
    return moved.numpy() * np.float32(conv.act["scale"])


def _run(program, net: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(engine's output, PyTorch's output) on x."""
    with torch.no_grad():
        ref = net(x).numpy()
    return program.run(x), ref


def counts(records: list[ZooRecord]) -> dict[str, int]:
    """{outcome: how many records have it}, every outcome listed."""
    return {outcome: sum(r.outcome == outcome for r in records) for outcome in OUTCOMES}


def markdown_table(records: list[ZooRecord]) -> str:
    """The records as a markdown table, then the counts, then the skipped models grouped by the op that
    stopped them (what to add to the engine next, and what it would bring)."""
    rows = ["| model | parameters | input | outcome | op, reason or max error | seconds |", "|---|---:|---:|---|---|---:|"]
    for r in records:
        detail = r.reason or (f"max error {r.max_error:.1e}" if r.max_error is not None else "")
        rows.append(f"| {r.name} | {r.params / 1e6:.1f}M | {r.size or '-'} | {r.outcome} | {detail.replace('|', '/')} | {r.seconds:.1f} |")
    lines = ["\n".join(rows), "", "Counts: " + ", ".join(f"{k} {v}" for k, v in counts(records).items()) + "."]
    by_op: dict[str, list[str]] = {}
    for r in records:
        if r.outcome == SKIPPED_OP:
            by_op.setdefault(r.op, []).append(r.name)
    if by_op:
        lines += ["", "Skipped by op:", ""]
        lines += [f"- {op}: {', '.join(names)}" for op, names in sorted(by_op.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(lines) + "\n"
