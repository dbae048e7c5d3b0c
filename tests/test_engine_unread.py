"""Channels that nothing reads (`jpq_core.engine.unread`): never computed, and the outputs unchanged."""

import numpy as np
import torch
import torch.nn as nn

from jpq_core.compressed import add_activation_quantizers, attach
from jpq_core.engine.lowering import lower
from jpq_core.engine.program import compile_network
from tests.test_engine import compressed_layer, numba_threads


def three_layers() -> tuple[nn.Sequential, torch.Tensor]:
    """A dense 3 -> 12 layer, a sparse 12 -> 8 one whose output channel o keeps weights only on input channel
    o + 1, and a sparse 8 -> 4 one that keeps weights only on input channels 0 and 2 (each conv -> BN -> ReLU)."""
    first, x = compressed_layer(seed=3, c_in=3, c_out=12, k=3, stride=1, padding=1, dilation=1, groups=1,
                                sparsity=0.0, wbits=8, abits=8)
    torch.manual_seed(4)
    model = nn.Sequential(*first, nn.Conv2d(12, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    second = torch.zeros_like(model[3].weight, dtype=torch.bool)
    second[torch.arange(8), torch.arange(8) + 1] = True
    third = torch.zeros_like(model[6].weight, dtype=torch.bool)
    third[:, [0, 2]] = True
    attach(model, {"0": model[0].weight.detach() != 0, "3": second, "6": third}, 8)
    add_activation_quantizers(model, 8)
    model.eval()
    model(torch.randn(4, 3, 20, 23))
    for i in (0, 3, 6):
        model[i].input_quantizer.finish_calibration()
    return model.eval(), torch.randn(1, 3, 20, 23)


def test_only_the_channels_that_the_output_depends_on_are_computed():
    """The last layer reads channels 0 and 2 of the second, which read channels 1 and 3 of the first: the rest
    are never computed (their bytes in the consumer's input stay the padding value, run after run), and the
    output is bit for bit that of the same program computing every channel, within quantization of PyTorch's."""
    model, x = three_layers()
    with torch.no_grad():
        ref = model(x).numpy()
    for threads in (1, 2):
        with numba_threads(threads):
            program = compile_network(model)
            first, second, third = program.layers
            assert np.flatnonzero(~first.unread).tolist() == [1, 3]
            assert np.flatnonzero(~second.unread).tolist() == [0, 2]
            assert third.unread is None  # the program's output
            everything = compile_network(model)
            for layer in everything.layers:
                layer.unread = None
            for _ in range(2):  # the second run reuses the buffers
                out = program.run(x)
                np.testing.assert_array_equal(out, everything.run(x))
                assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
                held = program._buffers[id(second)][0]  # the second layer's input, which the first writes
                padding = np.uint8(round(float(second.act["zero"])))
                assert (np.delete(held, [1, 3], axis=2) == padding).all()
                assert not (held[:, :, [1, 3]] == padding).all()


def test_layer_by_layer_programs_compute_every_channel():
    """Compiled without fusion (`zoo.layer_by_layer` compares every op's float output with PyTorch's), each
    layer stores its whole output itself: nothing is unread."""
    model, _ = three_layers()
    ops = lower(model, fused=False)[0]
    assert all(op.unread is None for op in ops if op.kind == "conv")
