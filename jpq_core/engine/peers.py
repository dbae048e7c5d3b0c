"""The engine's peers in `bench engine --peers`: ONNX Runtime (fp32 and int8 static) and DeepSparse.

Per configuration of the benchmark, the compressed network is exported to ONNX in its float form
(`jpq_core.onnx_export`: the effective weights, exact zeros where pruned, checked in ONNX Runtime against
PyTorch) and timed as
- ONNX Runtime fp32: that file, all graph optimisations on;
- ONNX Runtime int8: that file quantized by ONNX Runtime's own static quantization (`quant_pre_process`, then
  `quantize_static`: QDQ format, int8 weights per output channel, uint8 activations, min/max ranges) from
  the project's calibration data (`calibration_inputs`);
- DeepSparse (optional): the float file in another interpreter (`SubprocessTimer` running
  `deepsparse_timer.py`), since DeepSparse needs numpy<2 and onnx<1.15; exported for it at an older opset and
  IR version that it reads (`for_deepsparse`).
ONNX Runtime gets the benchmark's thread count as intra-op threads (one inter-op thread), DeepSparse as
cores. Every peer is a function (or a timer) that `bench.time_interleaved` times in turns with dense
PyTorch and the engine. Peers are optional: one that cannot run is left out with a note saying why, and
the benchmark carries on.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from jpq_core.compressed import calibration_batches
from jpq_core.errors import JPQError

DEEPSPARSE_TIMER = Path(__file__).with_name("deepsparse_timer.py")
# DeepSparse 1.8 (the last release) loads models through an ONNX Runtime that reads IR versions up to 9 and opsets
# up to 19, without Pad of opset 19; the exporter writes IR 10 (at opset 21, `onnx_export.OPSET`, by default).
PEERS = ("onnxruntime", "onnxruntime_int8", "deepsparse")  # the benchmark's rows gain PEER_ms for each


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime cannot be a peer here (a package missing), or None when it can."""
    from jpq_core.onnx_export import require_onnx

    try:
        require_onnx()
    except JPQError as error:
        return str(error)
    return None


def calibration_inputs(task, example_inputs: tuple, batches: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """The network inputs of the project's activation calibration (`calibration_batches`: the same batches
    for the same `batches` and `seed`), shaped like `example_inputs`, which the exported graph is fixed to:
    stereo scenes rendered at the example's size (the same synthetic scenes, at another resolution);
    classifier images regrouped into the example's batch size (repeated when there are fewer)."""
    from jpq_core.tasks import StereoTask

    size = tuple(example_inputs[0].shape[-2:])
    if isinstance(task, StereoTask) and tuple(task.crop) != size:
        task = StereoTask(task.eval_data, crop=size, batch_size=task.batch_size)
    count = len(example_inputs)
    parts = list(zip(*(batch[:count] for batch in calibration_batches(task, batches, seed))))
    stacked = [torch.cat(p) for p in parts]
    if tuple(stacked[0].shape[1:]) != tuple(example_inputs[0].shape[1:]):
        raise JPQError(f"the calibration data is {tuple(stacked[0].shape[1:])} per sample, the benchmark's input "
                       f"{tuple(example_inputs[0].shape[1:])}; time ONNX Runtime at the data's size.")
    n = example_inputs[0].shape[0]
    repeats = -(-n // stacked[0].shape[0])  # ceil: enough samples for one batch of n
    stacked = [x.repeat(repeats, *([1] * (x.dim() - 1))) for x in stacked]
    return [tuple(x[i:i + n] for x in stacked) for i in range(0, stacked[0].shape[0] - n + 1, n)]


def quantize_int8(float_path: Path, int8_path: Path, calibration: list[tuple]) -> None:
    """ONNX Runtime's static int8 quantization of the float model at `float_path`, calibrated on `calibration`
    (lists of network inputs), written to `int8_path`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, model_path):
            from jpq_core.onnx_export import feeds, onnxruntime_session

            session = onnxruntime_session(model_path)
            self.feeds = iter([feeds(session, inputs) for inputs in calibration])

        def get_next(self):
            return next(self.feeds, None)

    prepared = int8_path.with_name(int8_path.stem + "-prepared.onnx")
    # shapes inferred, batch norm folded: what quantization expects. The graph's shapes are static (the export's),
    # which ONNX's own shape inference covers; ONNX Runtime's symbolic one fails on the stereo network's constants.
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(int8_path), Reader(prepared), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


class SubprocessTimer:
    """A peer timed in another interpreter: `python deepsparse_timer.py MODEL SHAPES THREADS`, one process for
    the whole measurement, asked for N calls at a time (see that file's docstring). `ms_per_call(n)` is what
    `bench.time_interleaved` reads instead of timing a call itself, which would count the round trip."""

    def __init__(self, python: str, script: Path, model_path: Path, shapes: list, threads: int):
        self.log = tempfile.TemporaryFile()  # its stderr, read when it fails (a pipe could fill and block it)
        try:
            self.process = subprocess.Popen([python, str(script), str(model_path), json.dumps(shapes), str(threads)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        except OSError as error:
            raise JPQError(f"cannot run {python}: {error.strerror or error}.") from None

    def ms_per_call(self, calls: int) -> float:
        try:
            self.process.stdin.write(f"{calls}\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            return float(json.loads(line))
        except (OSError, ValueError, TypeError):
            self.close()
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise JPQError(f"the timer in {self.process.args[0]} gave no time: {' | '.join(tail) or 'no output'}.") from None

    def __call__(self):
        self.ms_per_call(1)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def peer_runs(net, inputs: tuple, task, threads: int, calibration_batches: int, seed: int,
              deepsparse_python: str | None = None, notes: dict | None = None):
    """{peer name: function or timer} for `bench.time_interleaved`: "onnxruntime", "onnxruntime_int8" and, with
    `deepsparse_python`, "deepsparse", for the compressed `net` on `inputs`. A peer that cannot run is left
    out and `notes[peer]` says why. The exported files live in a temporary folder while the context lasts."""
    from jpq_core.onnx_export import export_onnx, feeds, onnxruntime_session

    notes = {} if notes is None else notes
    runs, timers = {}, []
    missing = onnxruntime_missing()
    with tempfile.TemporaryDirectory(prefix="jpq-peers-") as folder:
        try:
            if missing:
                notes["onnxruntime"] = missing
            else:
                float_path, int8_path = Path(folder, "float.onnx"), Path(folder, "int8.onnx")
                export_onnx(net, inputs, float_path, "float", threads)
                runs["onnxruntime"] = _session_run(onnxruntime_session(float_path, threads), inputs, feeds)
                quantize_int8(float_path, int8_path,
                              calibration_inputs(task, inputs, calibration_batches, seed))
                runs["onnxruntime_int8"] = _session_run(onnxruntime_session(int8_path, threads), inputs, feeds)
                if deepsparse_python:
                    try:
                        legacy_path = for_deepsparse(net, inputs, Path(folder, "deepsparse.onnx"), threads)
                        timer = SubprocessTimer(deepsparse_python, DEEPSPARSE_TIMER, legacy_path,
                                                [list(x.shape) for x in inputs], threads)
                        timers.append(timer)
                        timer()  # compiles there; a failure is reported here, before the timed rounds
                        runs["deepsparse"] = timer
                    except JPQError as error:
                        notes["deepsparse"] = str(error)
            if deepsparse_python and missing:
                notes["deepsparse"] = "not timed: it runs the float ONNX export, which needs " + missing
            yield runs
        finally:
            for timer in timers:
                timer.close()


def for_deepsparse(net, inputs: tuple, path: Path, threads: int) -> Path:
    """The float export of `net` as DeepSparse 1.8 runs it best, written to `path`: traced at opset 18 (checked in
    ONNX Runtime like every export) and stamped IR version 9, then converted to opset 17 (IR 8) where onnx's
    version converter can. At opset 18 ReduceMean takes its axes as an input, which DeepSparse seems to leave to
    its ONNX Runtime: ResNet-20 at 90% ran 0.78 ms a call so, 0.28 with the axes an attribute (opset 17). The
    converter leaves opset 18's `noop_with_empty_axes` on the node; at its default, 0, it is dropped. Pad has no
    converter to 17: the stereo network stays at 18."""
    import onnx
    from onnx import version_converter

    from jpq_core.onnx_export import export_onnx

    export_onnx(net, inputs, path, "float", threads, opset=18)
    model = onnx.load(str(path))
    model.ir_version = 9
    try:
        model = version_converter.convert_version(model, 17)
        model.ir_version = 8
        for node in model.graph.node:
            for attribute in list(node.attribute):
                if attribute.name == "noop_with_empty_axes" and attribute.i == 0:
                    node.attribute.remove(attribute)
    except Exception:  # noqa: BLE001 - the converter's errors, one kind per op without an adapter: keep opset 18
        pass
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _session_run(session, inputs, feeds):
    feed = feeds(session, inputs)
    return lambda: session.run(None, feed)


def versions(deepsparse_python: str | None = None) -> dict:
    """{package: version} of the peers installed here, and DeepSparse's in `deepsparse_python` where it answers,
    for the benchmark's output."""
    found = {}
    for package in ("onnxruntime", "onnx"):
        with contextlib.suppress(ImportError):
            found[package] = __import__(package).__version__
    if deepsparse_python:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            answer = subprocess.run([deepsparse_python, "-c", "import deepsparse; print(deepsparse.__version__)"],
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
            if answer.returncode == 0 and answer.stdout.strip():
                found["deepsparse"] = answer.stdout.strip().splitlines()[-1]
    return found
