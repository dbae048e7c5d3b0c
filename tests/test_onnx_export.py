"""ONNX export of compressed networks (float and int8 QDQ) checked in ONNX Runtime, and the engine
benchmark's peers (ONNX Runtime fp32 and int8, DeepSparse through another interpreter).

Each export traces the network with torch.export (about 5-10 s for ResNet-20, 15-25 s for the stereo network
at 64 x 128 on this loaded 2-core machine), so the compressed networks and their exports are module fixtures.
"""

import json
import os
import stat
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from jpq_core.compressed import effective_weights
from jpq_core.engine.bench import bench_inputs, benchmark, magnitude_compressed
from jpq_core.errors import JPQError
from jpq_core.onnx_export import check_in_onnxruntime, export_onnx

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small_resnet(resnet20, digits_task):
    """ResNet-20 at 90% sparsity, 4-bit weights, 8-bit activations (one calibration batch), on two 32x32 images."""
    return magnitude_compressed(resnet20, digits_task, 0.9, 4, calibration_batches=1), bench_inputs("resnet20", 2)


@pytest.fixture(scope="module")
def exports(small_resnet, tmp_path_factory):
    """{form: (export_onnx's report, onnx.ModelProto)} of `small_resnet`."""
    net, inputs = small_resnet
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for form in ("float", "qdq"):
        report = export_onnx(net, inputs, folder / f"resnet20-{form}.onnx", form)
        out[form] = report, onnx.load(report["path"])
    return out


def initializers(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_float_export_holds_the_effective_weights_and_matches_pytorch(small_resnet, exports):
    net, _ = small_resnet
    report, model = exports["float"]
    assert report["check"]["ok"] and report["check"]["max_abs_diff"] <= 1e-4 * report["check"]["output_scale"]
    stored = initializers(model)
    for name, weight in effective_weights(net).items():  # exact zeros where pruned, kept weights on their grid
        np.testing.assert_array_equal(stored[f"{name}.weight"], weight.numpy())
    assert "BatchNormalization" in report["nodes"]  # not folded into the weights
    assert "QuantizeLinear" not in report["nodes"]


def test_qdq_export_has_the_networks_integers_and_scales(small_resnet, exports):
    from jpq_core.engine.lowering import activation_quantization, integer_weights
    from jpq_core.layers import prunable_layers

    net, _ = small_resnet
    report, model = exports["qdq"]
    assert report["check"]["ok"]
    assert report["check"]["max_abs_diff"] <= report["check"]["tolerance"]  # one 8-bit step of the output's range
    stored = initializers(model)
    layers = prunable_layers(net)
    for name, layer in layers.items():
        k, _, _, _ = integer_weights(layer, name)
        np.testing.assert_array_equal(stored[f"{name}.k"], k)  # 4-bit integers stored as int8
        assert stored[f"{name}.k"].dtype == np.int8
    # every compressed layer's input passes a QuantizeLinear with its own calibrated scale and zero point
    constants = {o: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"
                 for o in n.output}
    values = {**constants, **stored}
    quantizers = {(float(values[n.input[1]]), int(values[n.input[2]])) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for layer in layers.values():
        a = activation_quantization(layer)
        assert any(abs(s - a["scale"]) <= 1e-7 * a["scale"] and z == a["zero"] for s, z in quantizers)


def test_qdq_check_notices_a_wrong_network(small_resnet, exports, resnet20):
    _, inputs = small_resnet
    _, model = exports["qdq"]
    check = check_in_onnxruntime(model, resnet20.eval(), inputs, "qdq")  # the dense network is not this export
    assert not check["ok"] and check["max_abs_diff"] > check["tolerance"]


def test_stereo_qdq_export_matches_pytorch(tmp_path):
    """The stereo network (correlation volume, soft-argmin, bilinear upsampling) at 64 x 128: ~30 s here."""
    from jpq_core.models import load_network
    from jpq_core.tasks import StereoTask

    net = magnitude_compressed(load_network("stereo"), StereoTask(crop=(64, 128), batch_size=1), 0.95, 8,
                               calibration_batches=1)
    report = export_onnx(net, bench_inputs("stereo", 1, 64, 128), tmp_path / "stereo.onnx", "qdq")
    assert report["check"]["ok"], report["check"]
    assert report["nodes"]["QuantizeLinear"] >= 20 and report["nodes"]["Softmax"] == 1


@pytest.mark.parametrize("wbits, symmetric, abits", [(8, False, 4), (16, True, 12), (2, True, 8)])
def test_qdq_containers_for_other_widths(tmp_path, wbits, symmetric, abits):
    """Asymmetric 8-bit and 16-bit weights as int16, ternary as int8; 4-bit activations clipped inside uint8,
    12-bit ones in uint16."""
    from jpq_core.compressed import add_activation_quantizers, attach

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    attach(model, None, wbits, symmetric)
    add_activation_quantizers(model, abits)
    x = torch.randn(2, 3, 12, 12)
    model(x)  # the calibration batch
    for i in (0, 3):
        model[i].input_quantizer.finish_calibration()
    report = export_onnx(model, (x,), tmp_path / "small.onnx", "qdq")
    assert report["check"]["ok"], report["check"]
    stored = initializers(onnx.load(report["path"]))
    assert stored["0.k"].dtype == (np.int16 if wbits == 16 or not symmetric else np.int8)


class Mystery(nn.Module):
    def forward(self, x):
        return torch.ops.jpq_test.mystery(x)


@torch.library.custom_op("jpq_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_without_onnx_translation_is_named(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), Mystery()).eval()
    target = tmp_path / "mystery.onnx"
    with pytest.raises(JPQError, match="jpq_test.mystery"):
        export_onnx(net, (torch.rand(1, 3, 8, 8),), target)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_path_is_a_clear_error_and_leaves_no_file(small_resnet, tmp_path):
    net, inputs = small_resnet
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(JPQError, match="cannot write"):
        export_onnx(net, inputs, not_a_folder / "net.onnx")
    with pytest.raises(JPQError, match="cannot write"):
        export_onnx(net, inputs, tmp_path / "missing" / "net.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_clear_error(small_resnet, tmp_path):
    net, inputs = small_resnet
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(JPQError, match="cannot write"):
            export_onnx(net, inputs, tmp_path / "net.onnx")
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tmp_path, capsys):
    from jpq_core.cli import main

    path = tmp_path / "r20.onnx"
    code = main(["export", "--onnx", str(path), "--network", "resnet20", "--criterion", "magnitude", "--sparsity", "0.8",
                 "--wbits", "8", "--calibration-batches", "1", "--form", "qdq", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["check"]["ok"] and report["form"] == "qdq" and report["input"] == [[1, 3, 32, 32]]
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["r20.onnx"]


@pytest.fixture
def fake_deepsparse(tmp_path):
    """An "interpreter" that answers every timing request with 1.5 ms (the DeepSparse timer's protocol), and
    "1.8.0-fake" when asked for deepsparse's version."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 1.8.0-fake; exit 0; fi\nwhile read calls; do echo 1.5; done\n')
    script.chmod(0o755)
    return str(script)


def test_bench_engine_peers(fake_deepsparse):
    result = benchmark("resnet20", [0.9], [8], repeats=1, torch_sparse=False, first_call=False, peers=True,
                       deepsparse_python=fake_deepsparse)
    row = result["results"][0]
    assert row["onnxruntime_ms"] > 0 and row["onnxruntime_int8_ms"] > 0
    assert row["deepsparse_ms"] == 1.5
    assert result["peer_notes"] == {} and "onnxruntime" in result["peer_versions"]
    assert result["peer_versions"]["deepsparse"] == "1.8.0-fake"  # asked of the interpreter that times it
    fastest = min(row["onnxruntime_ms"], row["onnxruntime_int8_ms"], 1.5)
    assert row["vs_fastest_peer"] == pytest.approx(fastest / row["engine_ms"])
    [target] = result["targets"]  # ResNet-20 at 90%: at least 1.0x the fastest peer
    assert target["ratio"] == pytest.approx(row["vs_fastest_peer"]) and target["met"] == (target["ratio"] >= 1.0)
    machine = result["machine"]  # what the times depend on besides the code, for reading them on another machine
    assert machine["cpu"] and machine["cores"] >= 1
    assert set(machine["vector"]) <= {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}
    assert machine["wide_vectors"] == ("avx512f" in machine["vector"] and "NUMBA_CPU_FEATURES" not in os.environ
                                       and "NUMBA_CPU_NAME" not in os.environ)


def test_bench_engine_without_onnxruntime_says_so(monkeypatch, capsys, fake_deepsparse):
    from jpq_core.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    code = main(["bench", "engine", "--network", "resnet20", "--sparsities", "0.9", "--wbits", "8", "--repeats", "1",
                 "--no-torch-sparse", "--no-first-call", "--peers", "--deepsparse-python", fake_deepsparse, "--json"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    row = result["results"][0]
    assert row["engine_ms"] > 0 and row["onnxruntime_ms"] is None and row["onnxruntime_int8_ms"] is None
    assert "onnxruntime" in result["peer_notes"]["onnxruntime"]
    assert "note: onnxruntime was not timed" in captured.err
    assert result["targets"] == [] and "target" not in captured.err  # nothing to hold the engine against


def test_a_failing_deepsparse_interpreter_is_a_note(tmp_path, resnet20, digits_task):
    from jpq_core.engine.peers import peer_runs

    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named deepsparse' >&2\nexit 1\n")
    broken.chmod(0o755)
    net = magnitude_compressed(resnet20, digits_task, 0.5, 8, calibration_batches=1)
    notes = {}
    with peer_runs(net, bench_inputs("resnet20", 1), digits_task, 1, 1, 0, str(broken), notes) as runs:
        assert set(runs) == {"onnxruntime", "onnxruntime_int8"}
    assert "No module named deepsparse" in notes["deepsparse"]


def test_deepsparse_gets_an_export_it_reads(small_resnet, exports, tmp_path):
    """DeepSparse 1.8 reads ONNX IR up to 9 and runs ReduceMean natively only with its axes as an attribute
    (opset 17): the file it gets is that, and computes what the float export computes."""
    import onnxruntime as ort

    from jpq_core.engine.peers import for_deepsparse

    net, inputs = small_resnet
    model = onnx.load(for_deepsparse(net, inputs, tmp_path / "deepsparse.onnx", 1))
    assert model.ir_version == 8 and [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    [mean] = [node for node in model.graph.node if node.op_type == "ReduceMean"]
    assert {a.name for a in mean.attribute} == {"axes", "keepdims"} and len(mean.input) == 1
    feed = {"input": inputs[0].numpy()}
    ours = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    theirs = ort.InferenceSession(exports["float"][1].SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
