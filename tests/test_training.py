"""Training lowers the loss, and an interrupted run resumes to exactly the same weights."""

import pytest
import torch

import jpq_core.training as training
from jpq_core.data.synthetic_stereo import make_batch
from jpq_core.models import build_network, load_network
from jpq_core.tasks import stereo_loss
from jpq_core.training import TrainConfig, train


def test_a_few_stereo_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_network("stereo").train()
    left, right, gt = (torch.from_numpy(a) for a in make_batch([1, 2], 64, 160, 40.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = stereo_loss(model(left, right), gt, model.max_disparity)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def _cfg():
    return TrainConfig(network="resnet20", data="digits", steps=6, batch_size=16, lr=0.05, save_every=3, seed=3)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    train(_cfg(), tmp_path / "straight", progress=False)

    real_lr = training.cosine_lr

    def crash_at_step_4(base, step, total, warmup):
        if step == 4:
            raise KeyboardInterrupt  # the process is killed mid-run
        return real_lr(base, step, total, warmup)

    monkeypatch.setattr(training, "cosine_lr", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "resnet20.safetensors").exists()
    monkeypatch.setattr(training, "cosine_lr", real_lr)
    sidecar = train(_cfg(), tmp_path / "resumed", progress=False)
    assert sidecar["steps"] == 6 and [h["step"] for h in sidecar["history"]] == [3, 6]

    a = load_network("resnet20", tmp_path / "straight" / "resnet20.safetensors").state_dict()
    b = load_network("resnet20", tmp_path / "resumed" / "resnet20.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resuming_with_other_settings_is_refused(tmp_path):
    train(_cfg(), tmp_path, progress=False)
    other = _cfg()
    other.lr = 0.1
    with pytest.raises(Exception, match="other settings"):
        train(other, tmp_path, progress=False)
