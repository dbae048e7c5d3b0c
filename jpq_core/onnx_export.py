"""ONNX export of a compressed network, checked by running the file in ONNX Runtime against PyTorch.

A compressed network (`jpq_core.compression.compress_without_training`, `jpq_core.pipeline.compress`,
`load_compressed`) exports in one of two forms:

- "float": the plain network computing with the effective weights (`jpq_core.compressed.detach`): pruned
  weights are exact zeros, kept ones sit on their quantization grid, activations stay float. Its PyTorch
  reference is that plain network; ONNX Runtime must agree within `FLOAT_RTOL` of the output's largest
  magnitude. This is the file any runtime can take (the engine benchmark's peers time it).
- "qdq": the compressed network as it computes. Every compressed layer's input goes through
  QuantizeLinear -> DequantizeLinear with the layer's own calibrated activation scale and zero point
  (uint8 for 4-8 activation bits, uint16 for 10-16, a Clip in front where the width is below the
  container's), and its weights are stored as integers k (int8; int16 for asymmetric 8-bit and 16-bit
  weights) with a per-output-channel DequantizeLinear, w_eff = s_w[c] * k exactly, the engine's
  `integer_weights`. Float weights and float activations stay float; everything between the layers (batch
  norm, residual adds, the stereo network's correlation and soft-argmin) is float, as in PyTorch. Its
  reference is the fake-quantized PyTorch network itself; the two may differ where float rounding moves an
  activation across a rounding boundary of the next quantizer, one quantization step there, which later
  layers carry on. The check bounds the largest output difference by `QDQ_STEPS` step of an 8-bit grid over
  the reference output's range (measured: 1e-6 of the range on ResNet-20 and the stereo network).

How: the exporter is `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript), at opset
`OPSET`. For the QDQ form each compressed layer is replaced, in a copy, by `QDQLayer`, which calls PyTorch's
`quantized_decomposed` quantize/dequantize ops; the exporter translates those into QuantizeLinear and
DequantizeLinear nodes with the integer weights as initializers. (Those ops ignore their quant_min and
quant_max in ONNX, hence the explicit Clip for narrower widths.) The graph's shapes are those of the example
inputs: the stereo network pads its input to a multiple of 8, which torch.export cannot express for a
symbolic size.

Files are written to a temporary file beside the target, checked, then renamed: a failed export or check
leaves no file behind. An op the exporter cannot translate is a `JPQError` naming it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from jpq_core.compressed import detach
from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers

FORMS = ("float", "qdq")
OPSET = 21  # QuantizeLinear/DequantizeLinear with 16-bit types
FLOAT_RTOL = 1e-4  # float form: ONNX Runtime within this share of max |reference output|
QDQ_STEPS = 1.0  # QDQ form: max |difference| within this many steps of an 8-bit grid over the output's range


def require_onnx() -> None:
    """Raise a JPQError saying what to install when the export's packages (onnx, onnxscript for the exporter,
    onnxruntime for the check) are missing."""
    missing = []
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise JPQError(f"ONNX export needs {', '.join(missing)}: pip install {' '.join(missing)} "
                       "(pinned versions in requirements.txt).")


# ---- the QDQ form ------------------------------------------------------------------------------------------


def _quantized_ops():
    """PyTorch's quantize/dequantize ops that torch.onnx translates to QuantizeLinear/DequantizeLinear
    (registered by importing their module)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


def _container(bits: int, signed: bool) -> tuple[torch.dtype, int, int]:
    """(dtype, its min, its max): the 8- or 16-bit integer type that holds `bits`-bit values."""
    if bits <= 8:
        return (torch.int8, -128, 127) if signed else (torch.uint8, 0, 255)
    return (torch.int16, -32768, 32767) if signed else (torch.uint16, 0, 65535)


class QDQLayer(nn.Module):
    """A compressed conv or linear layer as ONNX's QDQ form computes it: its input quantized and de-quantized
    with the layer's calibrated (scale, zero point), its weights integers times per-channel scales."""

    def __init__(self, compressed: nn.Module, plain: nn.Module, name: str):
        """`compressed`: the layer in the compressed network (its quantizers); `plain`: the same layer in
        `detach`'s copy (geometry, bias and, for float weights, the weight)."""
        super().__init__()
        from jpq_core.engine.lowering import activation_quantization, integer_weights

        self.layer = plain
        k, scales, _, stored_bits = integer_weights(compressed, name)
        self.integer_weights = k is not None
        if self.integer_weights:
            dtype, lo, hi = _container(stored_bits, signed=True)
            self.weight_range = (lo, hi, dtype)
            self.register_buffer("k", torch.from_numpy(k).to(dtype))
            self.register_buffer("weight_scale", torch.from_numpy(np.ascontiguousarray(scales)).float())
            self.register_buffer("weight_zero", torch.zeros(len(scales), dtype=torch.int64))
        self.activation = activation_quantization(compressed)  # {"bits", "scale", "zero"} or None

    def weight(self) -> torch.Tensor:
        if not self.integer_weights:
            return self.layer.weight
        lo, hi, dtype = self.weight_range
        return _quantized_ops().dequantize_per_channel(self.k, self.weight_scale, self.weight_zero, 0, lo, hi, dtype)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.activation
        if a is None:
            return x
        qmax = 2 ** a["bits"] - 1
        dtype, lo, hi = _container(a["bits"], signed=False)
        if qmax < hi:  # QuantizeLinear saturates at the container's ends only
            x = torch.clamp(x, max=a["scale"] * (qmax - a["zero"]))
        ops = _quantized_ops()
        q = ops.quantize_per_tensor(x, a["scale"], int(a["zero"]), 0, qmax, dtype)
        return ops.dequantize_per_tensor(q, a["scale"], int(a["zero"]), 0, qmax, dtype)

    def forward(self, x):
        x = self.quantized_input(x)
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, self.weight(), self.layer.bias)
        return self.layer._conv_forward(x, self.weight(), self.layer.bias)


def qdq_network(net: nn.Module) -> nn.Module:
    """A copy of the compressed `net` with every conv and linear layer a `QDQLayer` (what the QDQ form exports)."""
    plain = detach(net)
    for name, layer in prunable_layers(net).items():
        plain.set_submodule(name, QDQLayer(layer, plain.get_submodule(name), name))
    return plain.eval()


# ---- export and check ---------------------------------------------------------------------------------------


def to_onnx_model(model: nn.Module, example_inputs: tuple, opset: int = OPSET):
    """`model` as an onnx.ModelProto at `opset`, traced at the shapes of `example_inputs`; an op the exporter
    cannot translate is a JPQError naming it."""
    require_onnx()
    _quantized_ops()  # registered before the exporter's first call, which fixes the ops it can translate
    names = [f"input{i}" for i in range(len(example_inputs))] if len(example_inputs) > 1 else ["input"]
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(model.eval(), tuple(example_inputs), None, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=["output"], verbose=False, optimize=False)
    except Exception as error:  # the exporter's errors are RuntimeErrors of several kinds
        raise JPQError(f"cannot export to ONNX: {_unexported_op(error)}") from error
    # Constants folded and dead nodes removed, but none of the exporter's pattern rewrites (`optimize=True`):
    # they fold batch norm into the convolutions' weights, which would take them off their grid.
    from onnxscript import optimizer

    optimizer.fold_constants(program.model)
    optimizer.remove_unused_nodes(program.model)
    return program.model_proto


def _unexported_op(error: Exception) -> str:
    """What the exporter could not translate, from its error message."""
    text = str(error)
    found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text) \
        or re.search(r"target=torch\.ops\.([\w.]+)", text)
    if found:
        return f"the op {found.group(1)} has no ONNX translation."
    summary = re.search(r"## Exception summary\s+(.+)", text)
    return (summary.group(1) if summary else text.splitlines()[0] if text else type(error).__name__).strip()


def onnxruntime_session(model_or_path, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads and one inter-op thread (the engine and
    PyTorch run with the same count), all graph optimisations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feeds(session, inputs: tuple) -> dict:
    """{input name: float32 array} for `session.run`."""
    return {i.name: np.ascontiguousarray(np.asarray(x, dtype=np.float32)) for i, x in zip(session.get_inputs(), inputs)}


def check_in_onnxruntime(model_or_path, reference: nn.Module, inputs: tuple, form: str, threads: int = 1) -> dict:
    """Run the export in ONNX Runtime and compare it with `reference` (the PyTorch network it came from, in
    the same form) on `inputs`: {"ok", "rule", "max_abs_diff", "tolerance", "output_scale", ...}."""
    session = onnxruntime_session(model_or_path, threads)
    got = session.run(None, feeds(session, inputs))[0]
    with torch.inference_mode():
        want = reference(*inputs).float().numpy()
    if got.shape != want.shape:
        return {"ok": False, "form": form, "problem": f"output shape {got.shape}, PyTorch's {want.shape}"}
    diff = np.abs(got.astype(np.float64) - want)
    scale = float(np.abs(want).max()) or 1.0
    if form == "float":
        tolerance, rule = FLOAT_RTOL * scale, f"max |diff| <= {FLOAT_RTOL:g} x max |output|"
    else:
        tolerance = QDQ_STEPS * (float(want.max() - want.min()) or scale) / 255
        rule = f"max |diff| <= {QDQ_STEPS:g} step of an 8-bit grid over the output's range"
    return {"ok": bool(diff.max() <= tolerance), "form": form, "rule": rule, "max_abs_diff": float(diff.max()),
            "tolerance": tolerance, "output_scale": scale}


def export_onnx(net: nn.Module, example_inputs: tuple, path, form: str = "float", threads: int = 1,
                opset: int = OPSET) -> dict:
    """Write the compressed `net` as ONNX in `form` ("float" or "qdq", see the module docstring) to `path`,
    traced at `example_inputs` at `opset` (the QDQ form's 16-bit types need OPSET), after checking it in ONNX
    Runtime against PyTorch on those inputs.

    Returns {"path", "form", "bytes", "opset", "nodes": {op type: count}, "check": `check_in_onnxruntime`'s
    dict}. An unwritable path (found before the export's work), an op without ONNX translation or a failed
    check is a JPQError, and no file is left."""
    if form not in FORMS:
        raise JPQError(f"the ONNX form must be one of {', '.join(FORMS)}, not {form!r}.")
    with atomic_output(Path(path)) as out:
        reference = detach(net).eval() if form == "float" else net.eval()
        model = to_onnx_model(detach(net) if form == "float" else qdq_network(net), example_inputs, opset)
        check = check_in_onnxruntime(model, reference, example_inputs, form, threads)
        if not check["ok"]:
            raise JPQError(f"the {form} ONNX export does not match PyTorch: {check}; nothing written.")
        data = model.SerializeToString()
        out.write(data)
    nodes: dict[str, int] = {}
    for node in model.graph.node:
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
    return {"path": str(path), "form": form, "bytes": len(data), "opset": opset, "nodes": nodes, "check": check}


@contextlib.contextmanager
def atomic_output(path: Path):
    """A binary file to write `path` through: a temporary file beside it, opened first (so that an unwritable
    folder is found before any work) and renamed to `path` when the block ends without an error, deleted
    otherwise. Readers see the old file or the whole new one, never half of it."""
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as error:
        raise JPQError(f"cannot write {path}: {error.strerror or error}.") from None
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
        os.replace(temporary, path)
    except OSError as error:
        raise JPQError(f"cannot write {path}: {error.strerror or error}.") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
