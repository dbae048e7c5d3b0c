"""One-shot recovery (jpq_core/recovery.py): the solves against hand computations, the guarantees (masks,
grid), bad input, the engine, and a short end-to-end run on the stereo network."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from jpq_core import recovery
from jpq_core.errors import JPQError
from jpq_core.compressed import add_activation_quantizers, attach, calibrate_activations
from jpq_core.quantization import quantize_weight


class TinyTask:
    """A classification-shaped task around random 3 x 8 x 8 images (what `calibration_inputs` reads)."""

    name = "classification"
    batch_size = 16

    def __init__(self, n=256, seed=0, shape=(3, 8, 8)):
        g = torch.Generator().manual_seed(seed)
        self.train_x = torch.randn(n, *shape, generator=g)
        self.train_y = torch.randint(0, 4, (n,), generator=g)
        self.data = f"tiny{seed}{shape}"
        self.shape = shape

    @property
    def data_key(self):
        return self.data

    def trace_inputs(self):
        return (torch.zeros(1, *self.shape),)

    def batches(self, count, seed=0, start=0):
        for i in range(start, count):
            yield self.train_x[i * 16:(i + 1) * 16], self.train_y[i * 16:(i + 1) * 16]

    @staticmethod
    def predict(model, batch):
        return model(batch[0])


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def random_masks(net, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(l.weight.shape, generator=g) < keep for n, l in recovery.prunable_layers(net).items()}


def test_least_squares_restores_a_layer_when_the_mask_keeps_every_weight():
    dense = tiny_net()
    net = attach(copy.deepcopy(dense), None, None)
    with torch.no_grad():  # damage every weight and bias; the dense network's outputs are the targets
        for layer in recovery.prunable_layers(net).values():
            layer.parametrizations.weight.original.add_(0.3 * torch.randn_like(layer.weight))
            if layer.bias is not None:
                layer.bias.add_(0.2)
    recovery.apply(net, dense, TinyTask(), "lsq", samples=256, damping=1e-9)
    for name, layer in recovery.prunable_layers(net).items():
        torch.testing.assert_close(layer.weight, recovery.prunable_layers(dense)[name].weight, atol=1e-3, rtol=1e-3)
    x = TinyTask(n=32, seed=1).train_x
    torch.testing.assert_close(net(x), dense(x), atol=1e-3, rtol=1e-3)


def test_a_linear_layer_gets_the_known_masked_least_squares_solution():
    """Each output's kept weights and bias are ordinary least squares of the dense outputs on its kept inputs."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    task = TinyTask(n=200, shape=(12,))
    masks = {"1": torch.rand(5, 12) < 0.5}
    net = attach(copy.deepcopy(dense), masks, None)
    recovery.apply(net, dense, task, "lsq", samples=200, damping=1e-10)
    x = recovery.calibration_inputs(task, 200, 0)[0].double().numpy()
    y = x @ dense[1].weight.detach().double().numpy().T + dense[1].bias.detach().double().numpy()
    for r in range(5):
        kept = masks["1"][r].numpy()
        design = np.hstack([x[:, kept], np.ones((len(x), 1))])
        solution = np.linalg.lstsq(design, y[:, r], rcond=None)[0]
        np.testing.assert_allclose(net[1].weight[r, kept].detach().numpy(), solution[:-1], atol=1e-4)
        np.testing.assert_allclose(float(net[1].bias[r].detach()), solution[-1], atol=1e-4)
        assert (net[1].weight[r, ~kept] == 0).all()


def test_batch_norm_reestimation_equals_statistics_by_hand():
    dense = tiny_net()
    net = attach(copy.deepcopy(dense), random_masks(dense, 0.3), None)
    task = TinyTask()
    recovery.apply(net, dense, task, "bn", samples=128)
    x = recovery.calibration_inputs(task, 128, 0)[0]
    with torch.no_grad():
        z = net[0](x)  # the conv's output: what its batch norm sees
    torch.testing.assert_close(net[1].running_mean, z.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net[1].running_var, z.transpose(0, 1).flatten(1).var(1, unbiased=True), atol=1e-5, rtol=1e-4)
    # bias correction: conv 3 has a bias and no batch norm; its mean output is the dense one's
    with torch.no_grad():
        mid, mid_dense = net[:4](x), dense[:4](x)
    torch.testing.assert_close(mid.mean((0, 2, 3)), mid_dense.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_obs_update_on_a_tiny_layer_equals_brute_force():
    """One output, five inputs, one weight to remove: obc removes the weight whose removal (with the others
    refitted) costs least, and its update equals both the refit and the OBS formula."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 400, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [0.3], [2.0], [0.7], [1.5]], dtype=torch.float64)
    X[1] += 0.8 * X[0]  # correlated inputs: where OBS and magnitude differ
    w_true = torch.tensor([[0.5, -1.0, 0.2, 0.9, -0.05]], dtype=torch.float64)
    Y = w_true @ X + 0.01 * torch.randn(1, 400, generator=g, dtype=torch.float64)
    H, B = X @ X.T, Y @ X.T
    problem = recovery.LayerProblem(w_true.float(), torch.tensor([[True, True, True, True, False]]), H.float(), B.float(),
                                    False, None, True, True, 1e-12, "tiny")
    weight, mask, _ = recovery.OptimalBrainCompression().fit(problem)
    # brute force: every choice of the removed weight, the others refitted by least squares
    costs = {}
    for q in range(5):
        keep = [i for i in range(5) if i != q]
        w = torch.linalg.lstsq(X[keep].T, Y[0]).solution
        costs[q] = (float(((w @ X[keep] - Y[0]) ** 2).sum()), w)
    best = min(costs, key=lambda q: costs[q][0])
    assert int((~mask[0]).nonzero()) == best
    keep = [i for i in range(5) if i != best]
    np.testing.assert_allclose(weight[0, keep].double().numpy(), costs[best][1].numpy(), rtol=1e-4, atol=1e-5)
    # the OBS formula from the dense optimum: δw = -w_q / [H⁻¹]_qq · H⁻¹[:, q]
    Hinv = torch.linalg.inv(H)
    optimum = (B @ Hinv)[0]
    obs = optimum - optimum[best] / Hinv[best, best] * Hinv[:, best]
    np.testing.assert_allclose(weight[0].double().numpy(), obs.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,wbits", [("lsq", 4), ("obc", 4), ("lsq+bn", 3), ("obc+bn", 8), ("bn", 4), ("obc", 2)])
def test_masks_and_the_grid_are_preserved(method, wbits):
    dense = tiny_net()
    masks = random_masks(dense, 0.4)
    net = attach(copy.deepcopy(dense), masks, wbits)
    add_activation_quantizers(net, 8)
    task = TinyTask()
    calibrate_activations(net, task, 2, 0)
    recovery.apply(net, dense, task, method, samples=128)
    for name, layer in recovery.prunable_layers(net).items():
        t = layer.parametrizations.weight[0]
        w = layer.weight.detach()
        assert bool(((w != 0) <= t.mask).all()), name  # pruned weights exactly zero
        if method.startswith("obc"):  # obc picks its own mask, at the layer's density
            assert int(t.mask.sum()) == int(masks[name].sum())
        else:
            assert torch.equal(t.mask, masks[name])
        if wbits >= 3:
            torch.testing.assert_close(quantize_weight(w, wbits), w, atol=0, rtol=0)  # already on the grid
        else:  # ternary: one magnitude per output channel (to float rounding of the straight-through sum)
            for row in w.flatten(1):
                kept = row[row != 0].abs()
                assert len(kept) == 0 or float(kept.max() - kept.min()) <= 1e-6 * float(kept.max())
        assert torch.isfinite(w).all()


class Scaled(nn.Module):
    """A network with a scalar parameter of its own on the root module (like the stereo network's cost scale)."""

    def __init__(self, gain=3.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x):
        return self.gain * self.conv(x)


def test_the_scalar_refit_finds_the_multiplier_that_matches_the_dense_output():
    dense, net = Scaled(3.0).eval(), Scaled(3.0 / 1.7).eval()  # the copy's gain 1.7x too small
    inputs = (torch.randn(4, 3, 8, 8),)
    factors = recovery.refit_scalars(net, dense, inputs)
    assert set(factors) == {"gain"} and factors["gain"] == pytest.approx(1.7, rel=0.05)
    assert float(net.gain) == pytest.approx(3.0, rel=0.05)
    assert torch.equal(net.conv.weight, dense.conv.weight)  # nothing but the scalar changes


def test_the_scalar_refit_never_does_worse_on_its_inputs_and_skips_networks_without_scalars():
    dense, inputs = Scaled(3.0).eval(), (torch.randn(4, 3, 8, 8),)
    same = copy.deepcopy(dense)
    assert recovery.refit_scalars(same, dense, inputs) == {"gain": 1.0} and float(same.gain) == 3.0
    for seed in range(5):  # damaged copies: whatever the search finds, never further from dense than before
        net = copy.deepcopy(dense)
        with torch.no_grad():
            net.conv.weight.add_(torch.randn(net.conv.weight.shape, generator=torch.Generator().manual_seed(seed)))
            before = float((net(*inputs) - dense(*inputs)).abs().mean())
            recovery.refit_scalars(net, dense, inputs)
            assert float((net(*inputs) - dense(*inputs)).abs().mean()) <= before
    plain = tiny_net()
    assert recovery.refit_scalars(plain, tiny_net(), (torch.randn(2, 3, 8, 8),)) == {}
    assert recovery.scalar_parameters(plain) == {}


def test_scale_combines_with_the_layer_methods_and_reports_its_multipliers():
    assert recovery.check_methods("scale+lsq") == "lsq+scale"
    assert recovery.check_methods("scale+bn+obc") == "obc+bn+scale"
    dense = tiny_net()
    net = attach(copy.deepcopy(dense), random_masks(dense, 0.5), 4)
    report = recovery.apply(net, dense, TinyTask(), "lsq+scale", samples=64)
    assert report["method"] == "lsq+scale" and report["scalars"] == {} and report["seconds"] >= 0


def test_bad_input_gets_clear_messages():
    dense, task = tiny_net(), TinyTask(n=64)
    net = attach(copy.deepcopy(dense), random_masks(dense, 0.5), None)
    with pytest.raises(JPQError, match="unknown recovery method"):
        recovery.apply(net, dense, task, "lsq+magic")
    with pytest.raises(JPQError, match="choose one of them"):
        recovery.apply(net, dense, task, "lsq+obc")
    with pytest.raises(JPQError, match="at least 32"):
        recovery.apply(net, dense, task, "lsq", samples=4)
    with pytest.raises(JPQError, match="has 64"):
        recovery.apply(net, dense, task, "lsq", samples=65)
    with pytest.raises(JPQError, match="differ"):
        recovery.apply(net, nn.Sequential(nn.Conv2d(3, 8, 3)), task, "lsq", samples=64)
    with pytest.raises(JPQError, match="has none"):
        recovery.apply(net, dense, type("NoData", (), {"name": "segmentation"})(), "lsq", samples=64)
    empty = random_masks(dense, 0.5)
    empty["3"][:] = False
    with pytest.raises(JPQError, match="keeps no weights"):
        recovery.apply(attach(copy.deepcopy(dense), empty, None), dense, task, "lsq", samples=64)
    # a singular system: every input of the first layer constant zero; damping rescues it, without NaN
    zeros = TinyTask(n=64)
    zeros.train_x.zero_()
    zeros.data = "zeros"
    recovery.apply(net, dense, zeros, "lsq", samples=64)
    assert all(torch.isfinite(l.weight).all() for l in recovery.prunable_layers(net).values())


def test_a_singular_system_without_damping_that_helps_is_refused():
    H = torch.zeros(3, 3)
    with pytest.raises(JPQError, match="stays singular"):
        recovery.damped_cholesky(H - torch.eye(3), torch.eye(3) * 1e-3, 0.01, "x")


def test_a_recovered_network_compiles_in_the_engine_and_matches_its_reference():
    from jpq_core.engine.bench import magnitude_compressed
    from jpq_core.engine.program import compile_network
    from jpq_core.models import load_network
    from jpq_core.tasks import make_task

    model, task = load_network("resnet20"), make_task("resnet20")
    net = magnitude_compressed(model, task, 0.9, 4, calibration_batches=2)
    recovery.apply(net, model, task, "obc+bn", samples=128)
    x = task.test_x[:32]
    program = compile_network(net)
    with torch.no_grad():
        ref = net(x).numpy()
    out = program.run(x)
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_recovery_lowers_stereo_bad3_end_to_end():
    """The pipeline with recovery on (prune-then-quantize, no fine-tuning) at 80%, w4/a8, against without:
    the synthetic validation scenes at their small size keep this short."""
    from jpq_core.models import load_network
    from jpq_core.pipeline import CompressionConfig, compress
    from jpq_core.tasks import StereoTask

    torch.set_num_threads(1)
    model, task = load_network("stereo"), StereoTask(eval_data="middlebury")
    results = {}
    for method in ("none", "lsq+bn"):
        config = CompressionConfig(network="stereo", criterion="magnitude", sparsity=0.8, wbits=4, abits=8,
                                   finetune="none", steps=0, calibration_batches=1, recovery=method, recovery_samples=4)
        _, report = compress(model, task, config)
        results[method] = report
    assert results["lsq+bn"]["recovery"]["method"] == "lsq+bn" and results["lsq+bn"]["recovery"]["seconds"] > 0
    assert results["none"]["recovery"]["method"] == "none"
    assert results["lsq+bn"]["metrics"]["bad3"] < results["none"]["metrics"]["bad3"] - 0.2


def test_sweeps_and_the_command_line_take_a_recovery():
    from jpq_core.cli import build_parser
    from jpq_core.pipeline import config_identity
    from jpq_core.sweeps import expand_grid

    configs = expand_grid({"grid": [{"network": "stereo", "criterion": "magnitude", "sparsity": [0.8, 0.9],
                                     "finetune": "none", "recovery": ["none", "bn+lsq"]}]})
    assert [(c.sparsity, c.recovery) for c in configs] == [(0.8, "none"), (0.8, "lsq+bn"), (0.9, "none"), (0.9, "lsq+bn")]
    assert "recovery" not in config_identity(configs[0])  # rows saved before recovery existed are still found
    with pytest.raises(JPQError, match="unknown recovery"):
        expand_grid({"grid": [{"network": "stereo", "criterion": "magnitude", "recovery": "adaround"}]})
    args = build_parser().parse_args(["compress", "--recovery", "obc+bn", "--recovery-samples", "16"])
    assert (args.recovery, args.recovery_samples) == ("obc+bn", 16)
