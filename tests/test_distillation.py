"""Distillation from the dense stereo network's cost volume (fine-tuning mode distill-cost)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from jpq_core.models import load_network
from jpq_core.pipeline import CompressionConfig, compress
from jpq_core.tasks import StereoTask


@pytest.fixture(scope="module")
def stereo():
    return load_network("stereo").eval()


@pytest.fixture(scope="module")
def small_task():
    return StereoTask("synthetic", crop=(64, 128), batch_size=2)


def _matching_kl(student, teacher, batch) -> float:
    """Mean over 1/4-res pixels of KL(teacher's distribution over shifts || student's), both in eval mode."""
    with torch.no_grad():
        _, s = student.eval().forward_with_logits(batch[0], batch[1])
        _, t = teacher.eval().forward_with_logits(batch[0], batch[1])
    return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="none").sum(1).mean())


def test_forward_with_logits_gives_forwards_output_and_the_logits_behind_it(stereo):
    left, right = torch.rand(1, 3, 60, 100), torch.rand(1, 3, 60, 100)  # padded inside to 64 x 104
    with torch.no_grad():
        out, logits = stereo.forward_with_logits(left, right)
        assert torch.equal(out, stereo(left, right))
    assert logits.shape == (1, stereo.shifts, 16, 26)


def test_cost_distillation_adds_nothing_against_itself_and_pulls_only_the_student(stereo, small_task):
    batch = small_task.batch(0)
    student, teacher = copy.deepcopy(stereo).eval(), copy.deepcopy(stereo).eval()
    assert small_task.cost_distill_loss(student, teacher, batch).item() == pytest.approx(small_task.loss(student, batch).item(), abs=1e-6)
    with torch.no_grad():
        student.aggregation[2][0].weight.mul_(0.5)
    loss = small_task.cost_distill_loss(student, teacher, batch)
    assert loss.item() > small_task.loss(student, batch).item() + 1e-3  # the KL term is there, and positive
    loss.backward()
    assert student.aggregation[2][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_cost_fine_tuning_brings_the_pruned_network_closer_to_the_dense_one(stereo, small_task):
    cfg = dict(network="stereo", criterion="magnitude", sparsity=0.7, wbits=None, abits=None, pipeline="prune-only",
               calibration_batches=1)
    pruned, _ = compress(stereo, small_task, CompressionConfig(**cfg, finetune="none", steps=0))
    tuned, report = compress(stereo, small_task, CompressionConfig(**cfg, finetune="distill-cost", steps=12))
    assert report["finetune_steps"] == 12
    held_out = small_task.batch(10_000, seed=99)
    assert _matching_kl(tuned, stereo, held_out) < 0.8 * _matching_kl(pruned, stereo, held_out)


@pytest.mark.parametrize("mode", ["distill", "distill-cost"])
def test_a_distillation_step_runs_the_compressed_network_once(stereo, small_task, mode):
    """One forward pass of the student per step: a second one would cost time and, in training mode, move its
    batch-norm statistics twice."""
    student, teacher = copy.deepcopy(stereo).train(), copy.deepcopy(stereo).eval()
    calls = []
    student.features.register_forward_hook(lambda *a: calls.append(1))
    batch = small_task.batch(0)
    if mode == "distill":
        with torch.no_grad():
            target = small_task.predict(teacher, batch)
        loss = small_task.distill_loss(student, target, batch)
    else:
        loss = small_task.cost_distill_loss(student, teacher, batch)
    assert len(calls) == 2  # the shared feature extractor sees the left and the right view once each
    assert torch.isfinite(loss)
