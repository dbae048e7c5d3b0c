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
    The stem and the fc store their inputs (the image, the pooled features) themselves, each run anew."""
    from jpq_core.models import load_network
    from jpq_core.tasks import make_task

    task = make_task("resnet20")
    net = magnitude_compressed(load_network("resnet20"), task, sparsity, 8, calibration_batches=1)
    program = compile_network(net)
    inputs = [task.test_x[i:i + 1] for i in range(4)] + [task.test_x[4:6]] + [task.test_x[i:i + 1] for i in range(6, 9)]
    outputs = [program.run(x) for x in inputs]
    steps = planned_steps(program)
    planned = [name for names, step in steps if step is not None for name in names]
    assert planned == [layer.name for layer in program.layers]  # every conv, stem and fc too
    assert [names for names, step in steps if step is not None and step[3]] == [["stem.0"], ["fc"]]  # store inputs
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
