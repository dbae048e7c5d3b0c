"""The engine's shape and layout glue (reshape, permute, chunk / split, layer norm, constant tensors) and what
the lowering builds with it: ShuffleNet-V2's channel shuffle, ConvNeXt's channels-last block kept NCHW."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt

from jpq_core.engine import compile_network
from jpq_core.engine.ops import Glue, op_from
from jpq_core.engine.program import load_program
from jpq_core.engine.zoo import MATCHED, check_model, compressed, float_mismatch, quantized_mismatch
from jpq_core.tasks import ClassificationTask

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return ClassificationTask("digits", batch_size=16)


def glue(op, inputs, **params):
    """Run one glue op as a program does, after a round trip through its file description."""
    described = Glue("test", op, list(range(len(inputs))), len(inputs), params).describe()
    loaded = op_from(described, {})
    env = [np.ascontiguousarray(x.numpy(), np.float32) for x in inputs] + [None]
    loaded.run(env, {})
    return env[-1]


def test_constant_glue_broadcasts_as_pytorch():
    x, scale, shift = torch.randn(2, 5, 3, 4), torch.randn(5, 1, 1), torch.randn(4)
    np.testing.assert_array_equal(glue("constant", [x], fn="mul", value=scale.flatten().tolist(), shape=[5, 1, 1]),
                                  (x * scale).numpy())
    np.testing.assert_array_equal(glue("constant", [x], fn="add", value=shift.tolist(), shape=[4]), (x + shift).numpy())


@pytest.mark.parametrize("axes,shape", [([1], (2, 6, 3, 5)), ([-1], (2, 3, 5, 6)), ([-3, -2, -1], (2, 4, 3, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_glue_matches_pytorch(axes, shape, affine):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    normalized = [shape[a] for a in axes]
    weight, bias = (torch.randn(normalized), torch.randn(normalized)) if affine else (None, None)
    moved = x.movedim(1, -1) if axes == [1] else x  # PyTorch normalises the last axes
    ref = nn.functional.layer_norm(moved, normalized, weight, bias, 1e-6)
    ref = ref.movedim(-1, 1) if axes == [1] else ref
    out = glue("layer_norm", [x], axes=axes, weight=None if weight is None else weight.flatten().tolist(),
               bias=None if bias is None else bias.flatten().tolist(), eps=1e-6)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_permute_reshape_and_split_glue_match_pytorch():
    x = torch.randn(2, 6, 3, 4)
    np.testing.assert_array_equal(glue("permute", [x], axes=[0, 2, 3, 1]), x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(glue("permute", [x], axes=[1, 0]), x.transpose(0, 1).numpy())  # leading axes only
    # ShuffleNet's view(b, groups, c // groups, h, w), sizes read from input 1's shape when the op runs
    shape = [["dim", 1, 0], 2, ["floordiv", ["dim", 1, 1], 2], ["dim", 1, 2], -1]
    np.testing.assert_array_equal(glue("reshape", [x, x], shape=shape), x.view(2, 2, 3, 3, 4).numpy())
    for chunks, index in ((2, 1), (4, 2), (5, 0)):
        np.testing.assert_array_equal(glue("split", [x], dim=1, index=index, chunks=chunks),
                                      torch.chunk(x, chunks, 1)[index].numpy())
    for sizes, index in ((4, 1), ([1, 5], 1), ([2, 1, 3], 2)):
        np.testing.assert_array_equal(glue("split", [x], dim=-3, index=index, sizes=sizes),
                                      torch.split(x, sizes, -3)[index].numpy())


class _Shuffle(nn.Module):
    """ShuffleNet-V2's unit: chunk, one branch, concatenation, channel shuffle by sizes read from the shape."""

    def __init__(self, channels=8, groups=2):
        super().__init__()
        self.groups = groups
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(channels // 2, channels // 2, 1), nn.BatchNorm2d(channels // 2), nn.ReLU())
        self.head = nn.Conv2d(channels, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        left, right = x.chunk(2, dim=1)
        x = torch.cat((left, self.branch(right)), dim=1)
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        a, rest = torch.split(x, [3, 5], dim=1)
        return self.head(torch.cat((rest, a), 1)).permute(0, 2, 3, 1).flatten(1)  # a permute that must run


def test_shape_arithmetic_and_layout_ops_lower_and_match_pytorch(tmp_path):
    torch.manual_seed(0)
    model = _Shuffle().eval()
    x = torch.randn(3, 3, 7, 5)
    program = compile_network(model)
    assert {op.op for op in program.ops if isinstance(op, Glue)} == {"split", "concat", "reshape", "permute", "flatten"}
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(program.run(x), ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 4, 6)  # the sizes are read when the program runs, for any input size
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(load_program(program.save(tmp_path / "shuffle.jpq")).run(x), ref, rtol=1e-5, atol=1e-5)


def small_convnext(seed=0) -> nn.Module:
    """torchvision's ConvNeXt with ConvNeXt-Tiny's blocks, narrow and shallow, its layer scales drawn around 1
    (the default 1e-6 would hide the blocks' result behind the residuals)."""
    torch.manual_seed(seed)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.1, num_classes=10)
    for block in model.modules():
        if isinstance(block, CNBlock):
            block.layer_scale.data.uniform_(0.5, 1.5)
    return model.eval()


def test_convnext_block_runs_nchw_with_its_linear_layers_as_1x1_convolutions(task, tmp_path):
    model = small_convnext()
    program = compile_network(model)
    glue_ops = [op.op for op in program.ops if isinstance(op, Glue)]
    # no permute runs, and the layer scales and residual adds are in the convolutions' epilogues
    assert sorted(set(glue_ops)) == ["activation", "global_avg_pool", "layer_norm"], glue_ops
    pointwise = [op for op in program.layers if op.name.endswith(("block.3", "block.5"))]
    assert len(pointwise) == 6 and all(op.shape[2:] == (1, 1) and not op.linear for op in pointwise)
    assert all(op.residual is not None for op in program.layers if op.name.endswith("block.5"))
    x = task.test_x[:16]
    with torch.no_grad():
        ref = model(x).numpy()
    assert float_mismatch(program.run(x), ref) is None
    net = compressed(model, task, 0.9)
    program = compile_network(net)
    assert all(layer.integer for layer in program.layers)
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(ref).max() > 1e-3
    out = program.run(x)
    assert quantized_mismatch(out, ref) is None
    np.testing.assert_array_equal(load_program(program.save(tmp_path / "convnext.jpq")).run(x), out)


def test_a_linear_layer_on_channels_last_that_is_not_permuted_back_still_matches():
    """A permute whose tensor something else reads runs; the linear layer over its channels stays a 1x1
    convolution of the NCHW tensor, its result permuted where it is read."""

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 8, 3), nn.LayerNorm(8), nn.Linear(8, 4)

        def forward(self, x):
            h = self.conv(x).permute(0, 2, 3, 1)
            alike = h * 0.5 + torch.relu(h)  # runs on the NCHW tensor, permuted once at the flatten
            mixed = h + torch.cat((h, h), 3).chunk(2, 3)[0]  # a tensor computed channels-last: h's permute runs
            return torch.cat([t.flatten(1) for t in (self.fc(self.norm(h)), alike, mixed)], 1)

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    x = torch.randn(2, 3, 6, 5)
    program = compile_network(model)
    assert [op.shape for op in program.layers] == [(8, 3, 3, 3), (4, 8, 1, 1)]
    assert [op.op for op in program.ops if isinstance(op, Glue)].count("permute") == 3
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(program.run(x), ref, rtol=1e-5, atol=1e-5)


def test_shufflenet_v2_matches_pytorch_in_the_zoo_check(task):
    record = check_model("shufflenet_v2_x0_5", task)
    assert record.outcome == MATCHED, record
