"""Later runs of a program take its planned calls (`Program._run_plan`): the same outputs as a first run."""

import numba
import numpy as np
import pytest
import torch
import torch.nn as nn

from jpq_core.compressed import add_activation_quantizers, attach
from jpq_core.engine.bench import magnitude_compressed
from jpq_core.engine.program import PLAN, compile_network

torch.set_num_threads(1)


def planned_steps(program) -> list:
    """The program's plan (`Program._plan`) as [(names of its ops, (call, residuals, outputs, stores) or None)]."""
    plan = next((v for k, v in program._buffers.items() if isinstance(k, tuple) and k[0] == PLAN), [])
    return [([op.name for op in ops], step) for ops, step in plan]


@pytest.mark.parametrize("sparsity", [0.0, 0.95])
def test_planned_runs_give_a_fresh_programs_outputs(sparsity):
    """Run after run over the same buffers (the third on takes the plan), for new inputs of the same shape
    and after a run at another size, ResNet-20 gives what a program that never ran gives for that input;
    at 0% most layers take the dense path (products, then the kernel's epilogue), at 95% most are sparse.
    The stem stores its input (the image) itself, each run anew; the pool writes the fc's input."""
    from jpq_core.models import load_network
    from jpq_core.tasks import make_task

    task = make_task("resnet20")
    net = magnitude_compressed(load_network("resnet20"), task, sparsity, 8, calibration_batches=1)
    program = compile_network(net)
    inputs = [task.test_x[i:i + 1] for i in range(4)] + [task.test_x[4:6]] + [task.test_x[i:i + 1] for i in range(6, 9)]
    outputs = [program.run(x) for x in inputs]
    steps = planned_steps(program)
    planned = [name for names, step in steps if step is not None for name in names]
    assert planned == [op.name for op in program.ops]  # every conv, stem and fc too, and the pool
    assert [names for names, step in steps if step is not None and step[3]] == [["stem.0"]]  # stores its input
    if sparsity:  # runs of sparse layers as one call each
        assert max(len(names) for names, _ in steps) >= 5
    for x, out in zip(inputs, outputs):
        np.testing.assert_array_equal(out, compile_network(net).run(x))


class InputResidual(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x): conv2's residual is the program's input, a new array every
    run, while conv1 stores its input for it (so conv2 has a planned call)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def test_a_residual_that_is_another_array_each_run_is_read_each_run():
    torch.manual_seed(0)
    model = InputResidual()
    attach(model, {name: torch.rand_like(conv.weight) >= 0.5 for name, conv in (("conv1", model.conv1),
                                                                                ("conv2", model.conv2))}, 8)
    add_activation_quantizers(model, 8)
    model.eval()
    model(torch.randn(2, 4, 9, 11))
    for conv in (model.conv1, model.conv2):
        conv.input_quantizer.finish_calibration()
    program = compile_network(model)
    assert program.layers[1].residual is not None
    for seed in range(4):
        x = torch.randn(1, 4, 9, 11, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(program.run(x), compile_network(model).run(x))
    names, (_, residuals, _, _) = planned_steps(program)[1]
    assert names == ["conv2"] and residuals  # checked each run: the input is not a planned conv's output


def test_a_plan_is_per_thread_count():
    from jpq_core.models import load_network
    from jpq_core.tasks import make_task

    task = make_task("resnet20")
    net = magnitude_compressed(load_network("resnet20"), task, 0.9, 8, calibration_batches=1)
    program = compile_network(net)
    x = task.test_x[:4]
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 1, 2, 1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            runs.append(program.run(x))
    finally:
        numba.set_num_threads(before)
    for out in runs[1:]:
        np.testing.assert_array_equal(out, runs[0])


class PooledHead(nn.Module):
    """conv -> global average pool -> linear (as torchvision's classifiers); with `features`, the pooled vector is
    an output too."""

    def __init__(self, features: bool = False):
        super().__init__()
        self.features = features
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        pooled = torch.flatten(self.pool(torch.relu(self.conv(x))), 1)
        logits = self.fc(pooled)
        return torch.cat([logits, pooled], 1) if self.features else logits


def _pooled_head(features: bool):
    torch.manual_seed(0)
    model = PooledHead(features)
    attach(model, {"conv": torch.rand_like(model.conv.weight) >= 0.5, "fc": torch.rand_like(model.fc.weight) >= 0.3}, 8)
    add_activation_quantizers(model, 8)
    model.eval()
    model(torch.randn(4, 3, 10, 12))
    for layer in (model.conv, model.fc):
        layer.input_quantizer.finish_calibration()
    return model


def test_a_pool_read_by_a_linear_layer_alone_writes_its_input():
    """The pool stores its means straight into the linear layer's quantized input, the bytes the layer's own store
    of the pooled floats would write, run after run (planned: one compiled call); the outputs are the unfused
    program's and PyTorch's."""
    from jpq_core.engine import kernels

    model = _pooled_head(features=False)
    program = compile_network(model)
    pool = next(op for op in program.ops if getattr(op, "op", None) == "global_avg_pool")
    fc = program.layers[-1]
    assert pool.consumers == [fc] and fc.fused
    unfused = compile_network(model)
    for op in unfused.ops:
        op.targets, op.consumers = None, []
    unfused.layers[-1].fused = None
    for seed, n in enumerate((3, 1, 1, 1, 1)):
        x = torch.randn(n, 3, 10, 12, generator=torch.Generator().manual_seed(seed))
        out = program.run(x)
        np.testing.assert_array_equal(out, unfused.run(x))
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), atol=0.05)
    names, step = planned_steps(program)[1]
    assert names == [pool.name] and step is not None  # a compiled call in later runs
    conv_out = program._buffers[(id(program.layers[0]), "out")]
    pooled = np.empty((1, 8, 1, 1), np.float32)
    kernels.global_avg_pool_serial(conv_out, pooled)
    expected = np.zeros_like(program._buffers[id(fc)][0])
    kernels.pad_input_serial(pooled, expected, 0, 0, 0, *fc.store_params())
    np.testing.assert_array_equal(program._buffers[id(fc)][0], expected)


def test_a_pool_that_something_else_reads_keeps_its_output():
    model = _pooled_head(features=True)
    program = compile_network(model)
    pool = next(op for op in program.ops if getattr(op, "op", None) == "global_avg_pool")
    assert not pool.consumers
    for seed in range(3):
        x = torch.randn(1, 3, 10, 12, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            np.testing.assert_allclose(program.run(x), model(x).numpy(), atol=0.05)
