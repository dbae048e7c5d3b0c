"""The engine on networks users bring: torchvision's classification zoo and a module of the user's own.

Each network is randomly initialised (nothing downloads), pruned per layer by magnitude, quantized to 8-bit
weights and activations, and run at the data's 32 x 32 size; the engine must match the fake-quantized
PyTorch network within the tolerance of the shipped networks' tests (tests/test_engine.py). The helpers and
tolerances are jpq_core.engine.zoo's, which scripts/zoo_check.py runs over the whole zoo (docs/engine.md).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from jpq_core.engine import compile_network
from jpq_core.engine.zoo import (MATCHED, SKIPPED_OP, SKIPPED_SIZE, check_model, compressed, counts, float_mismatch,
                                 markdown_table, quantized_mismatch, recalibrate_batch_norm)
from jpq_core.errors import JPQError
from jpq_core.models import load_network, torchvision_models
from jpq_core.tasks import ClassificationTask

torch.set_num_threads(1)

# name: (what it brings to the engine beyond the shipped ResNets, sparsity). SqueezeNet has no batch norm to
# re-estimate, and 90% of its random weights silence it (outputs of 1e-5): it is compared at 50%.
ZOO = {
    "tv:resnet18": ("max pooling in the stem, 1x1 downsampling shortcuts", 0.9),
    "tv:mobilenet_v2": ("depthwise convolutions, ReLU6, residuals without activation, dropout", 0.9),
    "tv:mobilenet_v3_small": ("Hardswish, squeeze-excitation (multiply, Hardsigmoid), adaptive pooling", 0.9),
    "tv:efficientnet_b0": ("SiLU, squeeze-excitation with Sigmoid, stochastic depth", 0.9),
    "tv:squeezenet1_0": ("concatenation, max pooling with ceil mode, a conv classifier", 0.5),
    "tv:regnet_x_400mf": ("grouped convolutions, residual adds of two conv branches", 0.9),
}


@pytest.fixture(scope="module")
def task():
    return ClassificationTask("digits", batch_size=16)


@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_model_compiles_and_matches_pytorch(name, task):
    model = load_network(name, None, task.num_classes)
    x = task.test_x[:16]
    # float at 0%: float32 rounding apart
    plain = recalibrate_batch_norm(copy.deepcopy(model), task)
    with torch.no_grad():
        ref = plain(x).numpy()
    assert float_mismatch(compile_network(plain).run(x), ref) is None
    # pruned, w8/a8: every layer on the integer path, within the shipped networks' tolerance
    net = compressed(model, task, ZOO[name][1])
    program = compile_network(net)
    assert all(layer.integer for layer in program.layers)
    with torch.no_grad():
        ref = net(x).numpy()
    out = program.run(x)
    assert np.abs(ref).max() > 1e-3  # a live signal, not a network that pruning silenced
    assert quantized_mismatch(out, ref) is None


# The whole zoo, float at 0%, for every model up to this size: 16 models built and compared (the other 64
# only counted on the meta device): 73-102 s on one thread of the loaded 2-core machine (26 s while the four
# ShuffleNets were skipped at an op). The zoo's 90% w8/a8 comparison is the
# subset ZOO above here, and all of it in docs/engine.md ("The torchvision zoo", scripts/zoo_check.py).
QUICK_ZOO_PARAMS = 5_500_000


def test_every_small_zoo_model_matches_or_is_skipped_with_what_stopped_it(task, record_property):
    """Every torchvision classification model under QUICK_ZOO_PARAMS compiles and matches PyTorch in float,
    or the engine names the op it cannot run; a mismatch, or an error the check did not foresee, fails.
    The skipped models and their ops are recorded (`--junitxml`) and shown when the test fails."""
    records = [check_model(name, task, max_params=QUICK_ZOO_PARAMS, quantized=False) for name in torchvision_models()]
    skipped = {r.name: r.reason for r in records if r.outcome == SKIPPED_OP}
    record_property("skipped_by_op", skipped)
    record_property("counts", counts(records))
    summary = markdown_table([r for r in records if r.outcome != SKIPPED_SIZE])
    print(summary)  # shown with -rP
    assert all(r.outcome in (MATCHED, SKIPPED_OP, SKIPPED_SIZE) for r in records), summary
    assert all(r.op for r in records if r.outcome == SKIPPED_OP), summary
    assert counts(records)[MATCHED] >= 10, summary  # the check ran models, not only skipped them


class _Blocks(nn.Module):
    """The graph ops torchvision's zoo above does not exercise: rectangular kernels with padding per direction,
    LeakyReLU, GELU, average pooling, upsampling, a tensor with numbers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, (1, 3), padding=(0, 1), bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 1))
        self.c = nn.Conv2d(16, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = nn.functional.leaky_relu(self.bn(self.a(x)), 0.1)
        z = nn.functional.gelu(self.b(y))
        z = nn.functional.interpolate(z, scale_factor=(2, 1), mode="nearest")
        h = 1 - self.c(torch.cat([y, z * 0.5 + 1], 1)) / 3 - 0.5
        h = nn.functional.avg_pool2d(h, 3, 2, 1, count_include_pad=False)
        h = nn.functional.adaptive_max_pool2d(h, (4, 4))
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("bits", [(None, None), (8, 8)])
def test_graph_ops_beyond_the_zoo(bits):
    torch.manual_seed(0)
    model = _Blocks().eval()
    task = ClassificationTask("digits", batch_size=8)
    x = task.test_x[:6]
    net = compressed(model, task, 0.5, *bits) if bits[0] else model
    program = compile_network(net)
    with torch.no_grad():
        ref = net(x).numpy()
    out = program.run(x)
    if bits[0] is None:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    else:
        assert all(layer.integer for layer in program.layers)
        assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("mode,align", [("nearest", None), ("bilinear", False), ("bilinear", True), ("nearest-exact", None)])
@pytest.mark.parametrize("size,scale", [((13, 7), None), (None, 1.5), (None, (2, 3))])
def test_interpolation_matches_pytorch(mode, align, size, scale):
    class Up(nn.Module):
        def forward(self, x):
            return nn.functional.interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align)

    x = torch.randn(2, 3, 9, 5)
    with torch.no_grad():
        ref = Up()(x).numpy()
    np.testing.assert_allclose(compile_network(Up().eval()).run(x), ref, rtol=1e-5, atol=1e-5)


def test_an_op_the_engine_cannot_run_is_named():
    class Roll(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.roll(self.conv(x), 1, 2)

    class SizeTest(nn.Module):
        def forward(self, x):
            return x * (x.size(2) == 8)

    with pytest.raises(JPQError, match=r"cannot run roll"):
        compile_network(Roll().eval())
    with pytest.raises(JPQError, match=r"cannot run eq.*tensor's shape"):
        compile_network(SizeTest().eval())  # shape arithmetic is followed into reshapes only
    with pytest.raises(JPQError, match=r"'1' \(GroupNorm\)"):
        compile_network(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)).eval())
    with pytest.raises(JPQError, match="not one tensor"):
        class Pair(nn.Module):
            def forward(self, x):
                return x, x
        compile_network(Pair().eval())
    with pytest.raises(JPQError, match="the engine could not trace"):
        class Branchy(nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x
        compile_network(Branchy().eval())


FACTORY = '''
import torch.nn as nn

def small(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, num_classes))

def broken():
    raise RuntimeError("no weights here")

def not_a_module():
    return 42


class Features(nn.Module):
    """Returns a dict, or with `spatial` a feature map: not N x classes logits."""

    def __init__(self, spatial=False):
        super().__init__()
        self.spatial, self.conv = spatial, nn.Conv2d(3, 10, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if self.spatial else {"logits": self.conv(x).mean((2, 3))}


def a_dict():
    return Features()


def a_feature_map():
    return Features(spatial=True)


def too_large():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 200_000))  # 614M parameters: 2.3 GiB in float32
'''


def test_user_factory_from_the_cli(tmp_path, capsys):
    import json

    from jpq_core.cli import main

    path = tmp_path / "mine.py"
    path.write_text(FACTORY)
    code = main(["compress", "--model", f"{path}:small", "--criterion", "magnitude", "--sparsity", "0.5", "--finetune",
                 "none", "--steps", "0", "--calibration-batches", "1", "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["network"] == f"user:{path}:small" and report["sparsity"] == pytest.approx(0.5, abs=0.05)
    for factory, message in (("broken", "raised RuntimeError: no weights here"), ("not_a_module", "returned a int, not a torch.nn.Module"),
                             ("missing", "defines no function 'missing'"),
                             ("a_dict", "its forward returned a dict, not a tensor"),
                             ("a_feature_map", "returned a tensor of shape (2, 10, 32, 32) for 2 images"),
                             ("too_large", "has 614,600,000 parameters, over the 512 MiB limit")):
        assert main(["evaluate", "--model", f"{path}:{factory}", "--data", "digits"]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", f"{tmp_path / 'nothere.py'}:small"]) == 2
    assert "not a Python file" in capsys.readouterr().err


def test_weights_of_another_architecture_name_the_tensors_that_do_not_fit(root, capsys):
    from jpq_core.cli import main

    resnet20 = root / "cached_runs" / "checkpoints" / "resnet20.safetensors"
    assert main(["evaluate", "--network", "tv:mobilenet_v3_small", "--checkpoint", str(resnet20), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not fit the MobileNetV3 network" in err and "Traceback" not in err
    assert "missing: classifier.0.bias" in err and "unexpected: fc.bias, fc.weight" in err  # named, sorted, a few of each


def test_zoo_names_and_sizes():
    from jpq_core.models import build_network, task_of

    assert task_of("tv:mobilenet_v2") == "classification"
    assert build_network("tv:mobilenet_v2", num_classes=7)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(JPQError, match="no classification model 'nonet'"):
        build_network("tv:nonet")
    with pytest.raises(JPQError, match="over the 512 MiB limit"):
        load_network("tv:vit_h_14")


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_pytorch_s_sparse_path_computes_grouped_convolutions(groups):
    """The Engine page's third timing (CSR weight x unfolded input) runs MobileNet's depthwise layers too."""
    from jpq_core.engine.bench import TorchSparseConv

    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups).eval()
    x = torch.rand(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(TorchSparseConv(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_calibration_names_the_layers_an_eval_forward_never_runs(task):
    """GoogLeNet's auxiliary classifiers run only in training (the library builds it without them; a user's own
    network may have such layers): activation calibration (eval mode) cannot see their inputs, and says which
    layers those are rather than only that some quantizer saw nothing."""
    from jpq_core.models import build_network

    with_heads = build_network("tv:googlenet", task.num_classes, aux_logits=True).eval()
    with pytest.raises(JPQError, match=r"saw no data at 6 layer\(s\) \(aux1\.conv\.conv, aux1\.fc1, aux1\.fc2, \.\.\.\)"):
        compressed(with_heads, task, 0.5)


def test_the_zoo_check_reports_a_wrong_engine_and_an_unforeseen_error(task, monkeypatch):
    """The zoo check can fail: an engine whose classifier is 1% off is a mismatch, and the layer-by-layer
    comparison names that layer (PyTorch's own one-ulp sensitivity is ~1e-6 here); an exception it did not
    foresee becomes an error record instead of escaping."""
    import jpq_core.engine.zoo as zoo
    from jpq_core.engine.ops import Conv

    right = Conv.run

    def one_percent_off_at_the_classifier(self, env, buffers):
        right(self, env, buffers)
        if self.name == "classifier.1":
            env[self.output] = env[self.output] * np.float32(1.01)

    monkeypatch.setattr(Conv, "run", one_percent_off_at_the_classifier)
    record = zoo.check_model("mnasnet0_5", task, quantized=False)
    assert record.outcome == zoo.MISMATCH and record.reason.startswith("float at 0%"), record
    assert record.max_error == pytest.approx(0.01, rel=0.01) and record.noise < 1e-4
    assert record.layer == "classifier.1" and record.layer_error > 10, record
    monkeypatch.setattr(Conv, "run", right)
    monkeypatch.setattr(zoo, "smallest_input", lambda *args: 1 / 0)
    record = zoo.check_model("mnasnet0_5", task)
    assert record.outcome == zoo.ERROR and record.reason == "ZeroDivisionError: division by zero"


def test_layer_by_layer_feeds_each_op_pytorch_s_input_and_compares_its_output(task):
    """What settles a whole-network comparison that rounding defeats: every op of a compressed MobileNet-V3,
    fed PyTorch's own values of its inputs, gives PyTorch's value of the node it computes within tolerance."""
    from jpq_core.engine.zoo import layer_by_layer

    model = load_network("tv:mobilenet_v3_small", None, task.num_classes)
    net = compressed(model, task, 0.9)
    layer, ratio, compared = layer_by_layer(net, task.test_x[:8])
    assert compared >= len(compile_network(net).layers)  # every conv and linear layer, and glue
    assert 0 <= ratio <= 1, (layer, ratio)


def test_the_tie_bound_is_one_input_step_through_the_weights_where_the_input_sat_on_a_tie(task):
    """A quantized input exactly between two steps may round either way in PyTorch and in the engine: the
    allowed difference is one step of it through the layer's |weights| at the outputs that read it, and
    nothing elsewhere."""
    from jpq_core.engine.lowering import lower
    from jpq_core.engine.ops import Conv
    from jpq_core.engine.packing import decode
    from jpq_core.engine.zoo import tie_bound

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, task.num_classes))
    conv = next(op for op in lower(compressed(model, task, 0.5), fused=False)[0] if isinstance(op, Conv))
    s, z = conv.act["scale"], conv.act["zero"]
    codes = np.full((1, 3, 6, 6), 7.0)
    codes[0, 1, 2, 3] = 7.5  # on a tie
    bound = tie_bound(conv, [((codes - z) * s).astype(np.float32)])
    assert bound.shape == (1, 4, 6, 6) and bound.max() > 0
    pos, vals = decode(conv.encoding, conv.values, conv.index, conv.bits, int(np.prod(conv.shape)), conv.entries)
    weights = np.zeros(int(np.prod(conv.shape)), np.float32)
    weights[pos] = np.abs(vals)
    weights = weights.reshape(conv.shape) * np.abs(conv.scale).reshape(-1, 1, 1, 1)
    # output (y, x) reads input (2, 3) through kernel tap (2 - y + 1, 3 - x + 1)
    for y in range(6):
        for x in range(6):
            ky, kx = 2 - y + 1, 3 - x + 1
            expected = s * weights[:, 1, ky, kx] if 0 <= ky < 3 and 0 <= kx < 3 else np.zeros(4)
            np.testing.assert_allclose(bound[0, :, y, x], expected, rtol=1e-5, atol=1e-12)


def test_an_engine_run_leaves_pytorch_s_thread_count_alone(root):
    """numba's thread pool, started by the first parallel kernel, used to reset the OpenMP thread count that
    PyTorch shares: after one engine run, a process set to one thread ran PyTorch on all cores (on the loaded
    test machine, 30-50x slower; the zoo tests here took minutes). A fresh process, importing and setting the
    count in the order of this file, with PyTorch run once before the engine (without that, no reset)."""
    import subprocess
    import sys

    code = ("import torch; from jpq_core.engine import compile_network; torch.set_num_threads(1); nn = torch.nn; "
            "net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval(); "
            "x = torch.rand(4, 3, 64, 64); net(x); compile_network(net).run(x); print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"
