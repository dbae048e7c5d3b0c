"""The engine's dense path (im2col and one matrix product per chunk of samples, then the sparse kernel's own
epilogue) against its sparse path and the PyTorch reference."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jpq_core.compressed import add_activation_quantizers, attach
from jpq_core.engine import ops
from jpq_core.engine.bench import magnitude_compressed
from jpq_core.engine.program import compile_network
from tests.test_engine import compressed_layer, layer_then_same_padding_conv, numba_threads, reference_accumulators

torch.set_num_threads(1)

ALWAYS, NEVER = 0.0, 1.01  # thresholds that put every eligible layer on the dense path, or none


def run_both(model, x, threads: int = 1):
    """(sparse outputs, dense outputs, the dense program) of `model` on x. The dense path runs three times, with
    float32 products and with int8 ones (forced on whatever the CPU; exact either way, fast only with VNNI), by
    gathered columns and by the direct kernel (`ops.DIRECT`: where the CPU has VNNI and VBMI): all must give the
    same outputs bit for bit."""
    outputs, programs = [], []
    for threshold, int8, by_groups in ((NEVER, False, True), (ALWAYS, False, True), (ALWAYS, True, False),
                                       (ALWAYS, True, True)):
        with pytest.MonkeyPatch.context() as patch, numba_threads(threads):
            patch.setattr(ops, "DIRECT", by_groups)
            patch.setattr(ops, "DENSE_FROM_DENSITY", threshold)
            patch.setattr(ops, "DENSE_FROM_DENSITY_STRIDED", threshold)
            patch.setattr(ops, "INT8_FROM_DENSITY", threshold)
            patch.setattr(ops, "QUAD_FROM_DENSITY", threshold)
            patch.setattr(ops, "QUAD_FROM_DENSITY_STRIDED", threshold)
            patch.setattr(ops, "DIRECT_FROM_DENSITY", threshold)
            patch.setattr(ops, "DIRECT_FROM_DENSITY_STRIDED", threshold)
            patch.setattr(ops, "DENSE_MIN_DEPTH", 0)
            patch.setattr(ops, "INT8_MIN_CHANNELS", 0)
            patch.setattr(ops, "DENSE_BELOW_WIDTH", 1 << 30)
            patch.setattr(ops, "int8_products", lambda: int8)
            program = compile_network(model)
            assert all(layer.dense == (threshold == ALWAYS) for layer in program.layers)
            assert all((layer.product_kind == "int8") == (int8 and layer.integer) for layer in program.layers)
            outputs.append(program.run(x))
            ran_dense = [step[-1] is not None for buffers in (program._buffers, *program._part_buffers)
                         for key, step in buffers.items() if isinstance(key, tuple) and key[1] == "step"]
            assert ran_dense and all(r == (threshold == ALWAYS) for r in ran_dense)
            np.testing.assert_array_equal(program.run(x), outputs[-1])  # a second run, on reused buffers
            programs.append(program)
    np.testing.assert_array_equal(outputs[2], outputs[1])
    np.testing.assert_array_equal(outputs[3], outputs[1])
    return outputs[0], outputs[1], programs[1]


def test_int8_products_are_used_only_where_exact_and_fast():
    """The probe answers for this CPU: True only with VNNI in its flags, and then the products are exact."""
    flags = open("/proc/cpuinfo").read().split()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    assert ops.int8_products() == vnni


class Block(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, + x, ReLU: the residual add and the ReLU go into the second conv's
    epilogue, and the first conv writes the second's padded input directly."""

    def __init__(self, c, k, dilation):
        super().__init__()
        pad = (dilation * (k[0] - 1) // 2, dilation * (k[1] - 1) // 2)
        self.conv1, self.bn1 = nn.Conv2d(c, c, k, 1, pad, dilation, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, k, 1, pad, dilation, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def quantized(model, x, sparsity, wbits, seed):
    """`model` with random masks of `sparsity`, `wbits` weights and calibrated 8-bit inputs (None: float)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    attach(model, {name: torch.rand_like(m.weight) >= sparsity for name, m in layers.items()}, wbits)
    if wbits:
        add_activation_quantizers(model, 8)
        model.eval()
        with torch.no_grad():
            model(x)
        for m in layers.values():
            m.input_quantizer.finish_calibration()
    return model.eval()


layer_shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000), "c_in": st.sampled_from([1, 3, 6]), "c_out": st.sampled_from([2, 5, 8]),
    "k": st.sampled_from([1, 3]), "stride": st.sampled_from([1, 2]), "padding": st.integers(0, 2),
    "dilation": st.sampled_from([1, 2]), "groups": st.just(1), "sparsity": st.sampled_from([0.0, 0.5, 0.9]),
})


@settings(max_examples=25, deadline=None)
@given(shape=layer_shapes, wbits=st.sampled_from([2, 4, 8, None]), relu=st.booleans(),
       budget=st.sampled_from([1 << 20, 1, 500, 2000]))
@example(shape=dict(seed=1, c_in=6, c_out=8, k=3, stride=2, padding=1, dilation=1, groups=1, sparsity=0.0), wbits=8,
         relu=True, budget=1 << 20)
@example(shape=dict(seed=2, c_in=6, c_out=8, k=3, stride=1, padding=1, dilation=1, groups=1, sparsity=0.0), wbits=8,
         relu=True, budget=2000)
def test_dense_layer_matches_the_sparse_path_and_the_reference(shape, wbits, relu, budget):
    """Integer layers: the same accumulators, exactly those of the reference, and the same outputs bit for bit
    (the same epilogue). Float layers: the products sum in another order, so within float rounding. Small
    column budgets cut a sample into segments of output rows (the last one overlapping the one before)."""
    model, x = compressed_layer(**shape, wbits=wbits, abits=8 if wbits else None, relu=relu)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "DENSE_CHUNK_BYTES", budget)
        sparse, dense, program = run_both(model, x)
    if wbits:
        np.testing.assert_array_equal(dense, sparse)
        layer = program.layers[0]
        np.testing.assert_array_equal(layer.accumulators(x.numpy()), reference_accumulators(model[0], x))
    else:
        np.testing.assert_allclose(dense, sparse, rtol=1e-5, atol=1e-5 * np.abs(sparse).max())
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.all(np.abs(dense - ref) <= 1e-4 * np.abs(ref).max() + 1e-6)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("budget", [1, 20_000, 1 << 20])
def test_segments_of_rows_on_two_threads(stride, budget):
    """A layer large enough for the parallel kernel, its samples cut into segments of output rows (each
    product followed by the epilogue of its tiles, the last segment overlapping the one before): the
    sparse path's outputs bit for bit."""
    model, _ = compressed_layer(seed=3, c_in=6, c_out=8, k=3, stride=stride, padding=1, dilation=1, groups=1,
                                sparsity=0.0, wbits=8, abits=8)
    x = torch.randn(2, 6, 67 * stride, 83) * 2 + 0.5  # 67 output rows: 16 segments of 4 and one overlapping
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "DENSE_CHUNK_BYTES", budget)
        patch.setattr(ops, "SERIAL_OUTPUTS", 1000)
        sparse, dense, _ = run_both(model, x, threads=2)
    np.testing.assert_array_equal(dense, sparse)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.sampled_from([3, 8]), k=st.sampled_from([(3, 3), (1, 3), (3, 1), (3, 5)]),
       dilation=st.sampled_from([1, 2]), batch=st.sampled_from([1, 3, 4]), sparsity=st.sampled_from([0.0, 0.5]),
       threads=st.sampled_from([1, 2]))
def test_residual_block_with_rectangular_kernels(seed, c, k, dilation, batch, sparsity, threads):
    """Rectangular kernels, dilation, a residual add with ReLU, a conv writing its consumer's padded input,
    batches of several samples in one product or in chunks, one thread or two (the parallel epilogue)."""
    x = torch.randn(batch, c, 11, 14)
    model = quantized(Block(c, k, dilation), x, sparsity, 8, seed)
    if seed % 2:  # chunks of one sample each
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ops, "DENSE_CHUNK_BYTES", 1)
            sparse, dense, _ = run_both(model, x, threads)
    else:
        sparse, dense, _ = run_both(model, x, threads)
    np.testing.assert_array_equal(dense, sparse)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(dense - ref).max() <= 0.02 * np.abs(ref).max()


@settings(max_examples=6, deadline=None)
@given(shape=layer_shapes.filter(lambda s: s["padding"] <= s["k"] // 2 * s["dilation"]), wbits=st.sampled_from([4, 8]))
def test_dense_layer_feeding_a_fused_consumer(shape, wbits):
    """The first layer stores straight into the second's padded input from the dense accumulators."""
    model = layer_then_same_padding_conv(shape, wbits)
    x = torch.randn(2, shape["c_in"], 12, 15)
    sparse, dense, program = run_both(model, x)
    assert program.layers[0].targets
    np.testing.assert_array_equal(dense, sparse)


def test_linear_layers_on_the_dense_path():
    x = torch.randn(5, 4, 6, 6)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 20), nn.ReLU(), nn.Linear(20, 7))
    model = quantized(model, x, 0.3, 8, 0)
    sparse, dense, program = run_both(model, x)
    assert sum(layer.linear for layer in program.layers) == 2
    np.testing.assert_array_equal(dense, sparse)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(dense - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_layer_over_the_exactness_bound_stays_sparse():
    """Sums that could pass 2^24 accumulate in int32 on the sparse path, whatever the threshold."""
    model, x = compressed_layer(seed=1, c_in=64, c_out=8, k=3, stride=1, padding=1, dilation=1, groups=1,
                                sparsity=0.0, wbits=8, abits=8)
    with torch.no_grad():  # every weight +-1: per-channel scales make every k_w +-127
        model[0].parametrizations.weight.original.copy_(torch.sign(torch.randn_like(model[0].weight)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "DENSE_FROM_DENSITY", ALWAYS)
        patch.setattr(ops, "int8_products", lambda: False)
        layer = compile_network(model).layers[0]
        assert not layer.dense
        np.testing.assert_array_equal(layer.accumulators(x.numpy()), reference_accumulators(model[0], x))
        sparse = compile_network(model).run(x)
        patch.setattr(ops, "int8_products", lambda: True)  # int8 products sum exactly in int32: dense, same sums
        program = compile_network(model)
        assert program.layers[0].dense and program.layers[0].product_kind == "int8"
        np.testing.assert_array_equal(program.run(x), sparse)


def test_the_default_threshold_follows_density_and_stride():
    """Stride-1 layers from DENSE_FROM_DENSITY of their weights kept and DENSE_MIN_DEPTH products per output,
    layers of stride 2 down the rows from DENSE_FROM_DENSITY_STRIDED, grouped ones never (float32 products;
    with int8 products stride-1 layers from INT8_FROM_DENSITY; with quads too from QUAD_FROM_DENSITY and
    QUAD_FROM_DENSITY_STRIDED; where the direct kernel's groups fill (3x3 kernels, not 1x1 ones) from
    DIRECT_FROM_DENSITY and DIRECT_FROM_DENSITY_STRIDED at any depth)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "int8_products", lambda: False)
        float32_thresholds()
        patch.setattr(ops, "int8_products", lambda: True)
        cases = ((16, 1, 0.0, 3), (16, 1, 0.6, 3), (16, 1, 0.75, 3), (16, 2, 0.1, 3), (16, 2, 0.6, 3),
                 (16, 2, 0.9, 3), (16, 1, 0.9, 3), (4, 1, 0.0, 3), (16, 1, 0.0, 1), (16, 2, 0.6, 1))
        for c_in, stride, sparsity, k in cases:
            model, _ = compressed_layer(seed=0, c_in=c_in, c_out=8, k=k, stride=stride, padding=k // 2, dilation=1,
                                        groups=1, sparsity=sparsity, wbits=4, abits=8)
            layer = compile_network(model).layers[0]
            density = int(layer._kernel_weights()[0][-1]) / np.prod(layer.shape)
            quad = layer.quad_weights  # where the CPU has VNNI and VBMI: the sparse kernel's quads
            assert layer.by_groups == (quad and k == 3)
            if layer.by_groups:
                assert layer.dense == (density >= (ops.DIRECT_FROM_DENSITY_STRIDED if stride == 2 else
                                                   ops.DIRECT_FROM_DENSITY))
                continue
            strided, plain = ((ops.QUAD_FROM_DENSITY_STRIDED, ops.QUAD_FROM_DENSITY) if quad else
                              (ops.DENSE_FROM_DENSITY_STRIDED, ops.INT8_FROM_DENSITY))
            expected = density >= strided if stride == 2 else \
                density >= plain and np.prod(layer.shape[1:]) >= ops.DENSE_MIN_DEPTH
            assert layer.dense == expected


def float32_thresholds():
    cases = [(16, 1, 1, 0.0), (4, 1, 1, 0.0), (16, 1, 1, 0.6), (16, 2, 1, 0.6), (16, 2, 1, 0.95), (16, 1, 2, 0.0)]
    for c_in, stride, groups, sparsity in cases:
        model, _ = compressed_layer(seed=0, c_in=c_in, c_out=8, k=3, stride=stride, padding=1, dilation=1,
                                    groups=groups, sparsity=sparsity, wbits=4, abits=8)
        layer = compile_network(model).layers[0]
        density = int(layer._kernel_weights()[0][-1]) / np.prod(layer.shape)
        if stride == 1:
            expected = density >= ops.DENSE_FROM_DENSITY and np.prod(layer.shape[1:]) >= ops.DENSE_MIN_DEPTH
        else:
            expected = density >= ops.DENSE_FROM_DENSITY_STRIDED
        assert layer.dense == (groups == 1 and expected)
    assert [compile_network(compressed_layer(seed=0, c_in=c, c_out=8, k=3, stride=s, padding=1, dilation=1, groups=1,
                                             sparsity=p, wbits=4, abits=8)[0]).layers[0].dense
            for c, s, p in ((16, 1, 0.0), (4, 1, 0.0), (16, 2, 0.6), (16, 2, 0.95))] == [True, False, True, False]


@pytest.fixture(scope="module")
def resnet():
    from jpq_core.models import load_network
    from jpq_core.tasks import make_task

    return load_network("resnet20"), make_task("resnet20")


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_whole_resnet20_on_the_dense_path_matches_reference(resnet, sparsity):
    model, task = resnet
    net = magnitude_compressed(model, task, sparsity, 8, calibration_batches=1)
    x = task.test_x[:16]
    program = compile_network(net)
    if sparsity == 0.0:  # all but fc (64 products per output) and, unless the direct kernel runs it, the first conv (27)
        stem = [] if program.layers[0].by_groups else ["stem.0"]
        assert [layer.name for layer in program.layers if not layer.dense] == stem + ["fc"]
    with torch.no_grad():
        ref = net(x).numpy()
    out = program.run(x)
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    sparse, dense, _ = run_both(net, x)
    np.testing.assert_array_equal(dense, sparse)


def test_a_program_prepared_in_inference_mode_runs_outside_it():
    """The products' tensors are made on the first run; the benchmark makes it in torch.inference_mode, and
    inference tensors cannot be written outside it."""
    model, x = compressed_layer(seed=2, c_in=16, c_out=8, k=3, stride=1, padding=1, dilation=1, groups=1,
                                sparsity=0.0, wbits=8, abits=8)
    program = compile_network(model)
    assert program.layers[0].dense
    with torch.inference_mode():
        first = program.run(x)
    np.testing.assert_array_equal(program.run(x), first)
    with torch.no_grad():
        np.testing.assert_array_equal(program.run(x), first)


@pytest.mark.parametrize("int8", [False, True])
def test_wide_rows_stay_on_the_sparse_path_with_float32_products(int8):
    """With float32 products, layers of DENSE_BELOW_WIDTH output columns or more run the sparse kernel
    (measured faster on wide rows); with int8 products rows of any width go dense, but not a layer of fewer
    than INT8_MIN_CHANNELS output channels."""
    model, _ = compressed_layer(seed=3, c_in=16, c_out=8, k=3, stride=1, padding=1, dilation=1, groups=1,
                                sparsity=0.0, wbits=8, abits=8)
    narrow, _ = compressed_layer(seed=3, c_in=16, c_out=ops.INT8_MIN_CHANNELS - 1, k=3, stride=1, padding=1,
                                 dilation=1, groups=1, sparsity=0.0, wbits=8, abits=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "int8_products", lambda: int8)
        cases = ((model, ops.DENSE_BELOW_WIDTH - 1, True), (model, ops.DENSE_BELOW_WIDTH, int8),
                 (narrow, ops.DENSE_BELOW_WIDTH - 1, not int8))
        for net, width, dense in cases:
            program = compile_network(net)
            program.run(torch.randn(1, 16, 5, width))
            assert [step[-1] is not None for key, step in program._buffers.items()
                    if isinstance(key, tuple) and key[1] == "step"] == [dense]


@pytest.mark.parametrize("threshold", [ALWAYS, NEVER])
def test_a_conv_written_as_one_run_leaves_its_consumers_padding(threshold):
    """A 3x3 conv feeding another (rows as far apart in its accumulators as in the consumer's padded input)
    stores each channel's rows as one run, padding columns between them included, then sets those back: after
    runs on both paths the consumer's padding still holds its zero point everywhere."""
    shape = dict(seed=3, c_in=8, c_out=16, k=3, stride=1, padding=1, dilation=1, groups=1, sparsity=0.3)
    model = layer_then_same_padding_conv(shape, 8)
    x = torch.randn(2, 8, 9, 11) * 2 + 0.5
    # one thread: the batch runs whole, in the program's own buffers (on more it runs in parts, each with its own)
    with pytest.MonkeyPatch.context() as patch, numba_threads(1):
        for name in ("DENSE_FROM_DENSITY", "DENSE_FROM_DENSITY_STRIDED", "INT8_FROM_DENSITY", "QUAD_FROM_DENSITY",
                     "QUAD_FROM_DENSITY_STRIDED"):
            patch.setattr(ops, name, threshold)
        patch.setattr(ops, "DENSE_MIN_DEPTH", 0)
        program = compile_network(model)
        for _ in range(3):
            program.run(x)
    consumer = program.layers[1]
    padded = program._buffers[id(consumer)][0]
    zero = consumer.store_params()[2]
    border = np.ones(padded.shape[-2:], bool)
    border[1:-1, 1:-1] = False
    assert (padded[..., border] == zero).all()
    assert (padded[..., ~border] != zero).any()
