"""The compression pipeline: budgets, zeros that stay zero, and the stereo network kept close."""

import pytest
import torch

from jpq_core.layers import prunable_layers
from jpq_core.errors import JPQError
from jpq_core.models import load_network, shipped_checkpoint
from jpq_core.compressed import current_masks, effective_state_dict
from jpq_core.pipeline import PIPELINES, CompressionConfig, compress, load_compressed, save_compressed
from jpq_core.tasks import StereoTask


def _cfg(**kw):
    base = dict(network="resnet20", criterion="taylor", sparsity=0.8, wbits=4, abits=8, finetune="masked", steps=6, calibration_batches=2)
    return CompressionConfig(**{**base, **kw})


def test_masked_finetuning_keeps_pruned_weights_exactly_zero(digits_task, resnet20):
    net, report = compress(resnet20, digits_task, _cfg(pipeline="prune-then-quantize"))
    masks = current_masks(net)
    state = effective_state_dict(net)
    for name in prunable_layers(net):
        assert torch.all(state[f"{name}.weight"][~masks[name]] == 0), name
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert report["cost"]["sparsity"] == pytest.approx(report["sparsity"])
    assert resnet20.fc.weight.count_nonzero() == resnet20.fc.weight.numel()  # the input network is untouched


def test_every_pipeline_spends_the_same_budget(digits_task, resnet20):
    used = {p: compress(resnet20, digits_task, _cfg(pipeline=p, criterion="magnitude"))[1]["finetune_steps"] for p in PIPELINES}
    assert set(used.values()) == {6}


def test_more_sparsity_costs_less_memory_and_accuracy_does_not_improve(digits_task, resnet20):
    low = compress(resnet20, digits_task, _cfg(sparsity=0.5, finetune="none", criterion="magnitude"))[1]
    high = compress(resnet20, digits_task, _cfg(sparsity=0.98, finetune="none", criterion="magnitude"))[1]
    assert high["cost"]["memory_ratio"] < low["cost"]["memory_ratio"]
    assert high["cost"]["bops_ratio"] < low["cost"]["bops_ratio"]
    assert high["metrics"]["top1"] <= low["metrics"]["top1"]


def test_bad_configuration_is_refused_with_a_clear_message(digits_task, resnet20):
    for kw, msg in (({"sparsity": 1.0}, "sparsity must be"), ({"wbits": 9}, "weight bits"), ({"pipeline": "x"}, "unknown pipeline"),
                    ({"finetune": "x"}, "fine-tuning mode"), ({"criterion": "x"}, "unknown criterion"),
                    ({"lr_schedule": "step"}, "learning-rate schedule"),
                    ({"learned_step": True, "symmetric": False}, "learned step sizes"),
                    ({"finetune": "distill-cost"}, "distils the stereo network's cost volume"),
                    ({"layer_wbits": {"stem.9": 4}}, "no layer named stem.9")):
        with pytest.raises(JPQError, match=msg):
            compress(resnet20, digits_task, _cfg(**kw))


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("schedule, stop_at, learned_step", [("oneshot", (2, 13), False), ("gradual", (1, 7), False),
                                                             ("oneshot", (2, 13), True)])
def test_an_interrupted_run_goes_on_from_its_state_file_to_the_uninterrupted_result(digits_task, resnet20, tmp_path,
                                                                                   monkeypatch, schedule, stop_at, learned_step):
    """Killed in the second (QAT) or first (gradual pruning) stage, then started again with the same --state:
    the same network and report as a run never interrupted (learned steps included), and the state file is
    gone at the end."""
    import jpq_core.finetuning as finetuning

    monkeypatch.setattr(finetuning, "CHECKPOINT_EVERY", 5)
    cfg = _cfg(pipeline="prune-then-quantize", steps=40, schedule=schedule, learned_step=learned_step)
    reference_net, reference = compress(resnet20, digits_task, cfg)

    stage, seen = [0], []

    def stop(kind, i, n):
        if kind == "fine-tune":
            if i == 1:
                stage[0] += 1
            if (stage[0], i) == stop_at:
                raise _Interrupt

    state = tmp_path / "run.state"
    with pytest.raises(_Interrupt):
        compress(resnet20, digits_task, cfg, progress=stop, state=state)
    assert state.exists()
    net, report = compress(resnet20, digits_task, cfg, progress=lambda kind, i, n: seen.append((kind, i)), state=state)
    steps = [i for kind, i in seen if kind == "fine-tune"]
    saved = stop_at[1] // 5 * 5  # the last save before the interruption
    assert steps[0] == saved  # resumed there: what was done before is not done again
    assert len(steps) == 1 + (20 - saved) + (20 if stop_at[0] == 1 else 0)
    assert not state.exists()
    assert report["metrics"] == reference["metrics"] and report["cost"] == reference["cost"]
    ours, theirs = effective_state_dict(net), effective_state_dict(reference_net)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_learning_curve_records_each_point_once_across_an_interruption(digits_task, resnet20, tmp_path, monkeypatch):
    """Points every 10 steps of each stage, on the global step axis, marked quantized in the QAT stage; a run killed
    after a point and resumed from the save before it does not write that point twice; recording changes nothing."""
    import jpq_core.finetuning as finetuning
    from jpq_core.curve import LearningCurve

    monkeypatch.setattr(finetuning, "CHECKPOINT_EVERY", 5)
    cfg = _cfg(pipeline="prune-then-quantize", steps=40)
    _, reference = compress(resnet20, digits_task, cfg)
    curve, state = LearningCurve(tmp_path / "curve.jsonl", every=10), tmp_path / "run.state"

    def stop(kind, i, n):
        if kind == "fine-tune" and curve.points() and len(curve.points()) == 3 and i == 12:
            raise _Interrupt  # in the QAT stage, after its first point and its save at 10
    with pytest.raises(_Interrupt):
        compress(resnet20, digits_task, cfg, progress=stop, state=state, curve=curve)
    _, report = compress(resnet20, digits_task, cfg, state=state, curve=curve)
    points = curve.points()
    assert [(p["stage"], p["stage_step"], p["step"], p["quantized"]) for p in points] == \
        [(1, 10, 10, False), (1, 20, 20, False), (2, 10, 30, True), (2, 20, 40, True)]
    assert all(0 <= p["metrics"]["top1"] <= 100 for p in points)
    assert points[-1]["metrics"] == report["metrics"]  # the last point is the finished network
    assert report["metrics"] == reference["metrics"]


def test_a_state_file_of_another_run_is_refused(digits_task, resnet20, tmp_path):
    state = tmp_path / "run.state"
    state.write_bytes(b"not a state")
    with pytest.raises(JPQError, match="not a run state"):
        compress(resnet20, digits_task, _cfg(), state=state)
    torch.save({"key": "another run"}, state)
    with pytest.raises(JPQError, match="another run"):
        compress(resnet20, digits_task, _cfg(), state=state)
    assert state.exists()  # nothing is lost: the user decides


@pytest.mark.parametrize("schedule", ["constant", "cosine", "constant-decay"])
def test_the_learning_rate_schedule_is_the_one_asked_for(digits_task, resnet20, monkeypatch, schedule):
    seen = []
    original = torch.optim.Adam.step

    def record(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    compress(resnet20, digits_task, _cfg(pipeline="prune-only", steps=40, lr=1e-3, lr_schedule=schedule))
    assert len(seen) == 40
    if schedule == "constant":
        assert set(seen) == {1e-3}
    elif schedule == "constant-decay":  # the constant rate for 32 steps, then down towards zero over the last 8
        assert set(seen[:32]) == {1e-3}
        assert all(a > b for a, b in zip(seen[32:], seen[33:]))
        assert seen[-1] < 0.05 * 1e-3
    else:  # warm-up over 2 steps, then decay towards zero; the peak is the rate asked for
        assert seen[0] < seen[1] == pytest.approx(1e-3)
        assert all(a >= b for a, b in zip(seen[1:], seen[2:]))
        assert seen[-1] < 0.01 * 1e-3


def test_short_prune_then_quantize_keeps_the_stereo_output_close():
    model = load_network("stereo")
    task = StereoTask("middlebury", crop=(96, 192), batch_size=2)
    # Measured without fine-tuning: 8-bit weights are lossless, 8-bit activations cost ~0.1 px EPE with
    # percentile ranges, half the weights by magnitude ~0.25 px (pooled Taylor scores cost more: docs/results.md).
    cfg = CompressionConfig(network="stereo", criterion="magnitude", sparsity=0.5, wbits=8, abits=8, finetune="none",
                            steps=0, calibration_batches=2, calibration="percentile")
    net, report = compress(model, task, cfg)
    dense, compressed = report["dense_metrics"], report["metrics"]
    assert compressed["epe"] < dense["epe"] + 0.5
    assert compressed["bad3"] < dense["bad3"] + 0.03
    assert report["cost"]["memory_ratio"] < 0.25 * 1.05  # 8-bit and half the weights


def test_learned_steps_clip_within_their_bound_and_the_saved_network_reloads_identically(digits_task, resnet20, tmp_path):
    """LSQ at 3 bits: the steps move during QAT, never above max|w| / qmax, pruned weights stay zero, and the
    saved network (effective weights only) computes the same outputs when loaded again."""
    from jpq_core.compressed import transform as _transform
    from jpq_core.quantization import step_bound

    net, report = compress(resnet20, digits_task, _cfg(pipeline="prune-then-quantize", wbits=3, steps=20, lr=3e-3, learned_step=True))
    moved = 0
    for name, layer in prunable_layers(net).items():
        t = _transform(layer)
        bound = step_bound(layer.parametrizations.weight.original * t.mask, 3, True)
        step = t.log_step.exp()
        assert torch.all(step <= bound * (1 + 1e-5))
        moved += int((step < bound * (1 - 1e-3)).sum())
        assert torch.all(layer.weight[~t.mask] == 0)
    assert moved > 0
    path = save_compressed(net, tmp_path / "lsq", report)
    again, _ = load_compressed(path)
    x = digits_task.test_x[:32]
    torch.testing.assert_close(again(x), net(x))


def test_saved_compressed_network_reloads_identically(digits_task, resnet20, tmp_path):
    net, report = compress(resnet20, digits_task, _cfg(pipeline="prune-then-quantize", layer_wbits={"fc": 8}))
    path = save_compressed(net, tmp_path / "c", report)
    again, side = load_compressed(path)
    x = digits_task.test_x[:32]
    torch.testing.assert_close(again(x), net(x))
    assert side["layer_wbits"]["fc"] == 8 and side["layer_wbits"]["stem.0"] == 4
    for name, mask in current_masks(again).items():
        assert torch.equal(mask, current_masks(net)[name])
    with pytest.raises(JPQError, match="not a compressed network"):
        load_compressed(shipped_checkpoint("resnet20"))


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_schedules_reach_the_target_with_the_same_budget(digits_task, resnet20, schedule):
    net, report = compress(resnet20, digits_task, _cfg(pipeline="prune-only", schedule=schedule, criterion="magnitude", steps=8))
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert report["finetune_steps"] == 8


def test_channel_criterion_removes_whole_coupled_channels(digits_task, resnet20):
    net, report = compress(resnet20, digits_task, _cfg(pipeline="prune-only", criterion="group-fisher", sparsity=0.3, steps=4))
    assert report["granularity"] == "channel"
    masks = current_masks(net)
    rows_gone = {k: (~m.flatten(1).any(1)).sum().item() for k, m in masks.items() if m.dim() == 4}
    assert sum(rows_gone.values()) > 0
    for k, m in ((k, m) for k, m in masks.items() if m.dim() == 4):  # whole kernels only, never single weights
        per_pos = m.flatten(2).all(2) | ~m.flatten(2).any(2)
        assert per_pos.all(), k
    # the stem feeds every residual add of stage 1: its removed outputs match stage1's conv2 removed outputs
    assert torch.equal(masks["stem.0"].flatten(1).any(1), masks["stage1.0.conv2"].flatten(1).any(1))
    assert report["sparsity"] >= 0.3 - 0.01


def test_sensitivity_allocation_spares_the_sensitive_layers(digits_task, resnet20, monkeypatch):
    monkeypatch.setattr("jpq_core.sensitivity.SCAN_SPARSITIES", (0.0, 0.5, 0.9))  # a short scan
    net, report = compress(resnet20, digits_task, _cfg(pipeline="prune-only", criterion="magnitude", allocation="sensitivity",
                                                        sparsity=0.7, finetune="none", steps=0))
    assert report["sparsity"] == pytest.approx(0.7, abs=0.01)
    scan = report["sensitivity"]
    layers = {l["name"]: l["sparsity"] for l in report["layers"]}
    loss_at_90 = {k: v[scan["sparsities"].index(0.9)] for k, v in scan["layers"].items() if k in layers and layers[k] < 1}
    most, least = max(loss_at_90, key=loss_at_90.get), min(loss_at_90, key=loss_at_90.get)
    if loss_at_90[most] > loss_at_90[least]:
        assert layers[most] <= layers[least]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_fine_tuning_on_a_gpu_that_is_not_there_is_refused_and_auto_picks_the_cpu(digits_task, resnet20):
    with pytest.raises(JPQError, match="no CUDA GPU is visible here"):
        compress(resnet20, digits_task, _cfg(), device="cuda")
    with pytest.raises(JPQError, match="unknown device 'gpu0'"):
        compress(resnet20, digits_task, _cfg(), device="gpu0")
    net, report = compress(resnet20, digits_task, _cfg(steps=2), device="auto")
    assert report["device"] == "cpu" and all(p.device.type == "cpu" for p in net.parameters())
