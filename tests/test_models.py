"""Networks take any input size and have the documented size."""

import pytest
import torch

from jpq_core.errors import JPQError
from jpq_core.models import build_network
from jpq_core.models.stereo import correlation_volume, soft_argmin


@pytest.mark.parametrize("h,w", [(37, 53), (64, 129), (101, 96)])
def test_stereo_output_matches_odd_input_sizes(h, w):
    model = build_network("stereo").eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, h, w), torch.rand(2, 3, h, w))
    assert out.shape == (2, h, w)
    assert torch.all(out >= 0)


def test_stereo_network_is_compact():
    model = build_network("stereo")
    assert sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert model.max_disparity >= 64


def test_correlation_peaks_at_the_true_shift():
    torch.manual_seed(0)
    right = torch.randn(1, 64, 6, 40)
    left = torch.zeros_like(right)
    left[..., 5:] = right[..., :-5]  # left x sees right x - 5
    cost = correlation_volume(left, right, 12)
    assert cost[0, :, :, 20:].argmax(0).eq(5).all()
    # soft-argmin of sharp logits recovers the shift
    assert soft_argmin(cost * 100)[0, 0, :, 20:].sub(5).abs().max() < 1e-3


def test_resnets_classify_32x32():
    r20 = build_network("resnet20")
    n = sum(p.numel() for p in r20.parameters())
    assert 260_000 < n < 290_000  # He et al.: 0.27M
    assert r20(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert build_network("resnet18")(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_network_is_a_clear_error():
    with pytest.raises(JPQError, match="unknown network 'vgg'"):
        build_network("vgg")


def test_googlenet_is_built_without_its_training_only_heads_and_loads_weights_that_have_them(tmp_path):
    """GoogLeNet's auxiliary classifiers run only in training (where the forward returns a tuple); the library
    builds it without them, and torchvision-style weights that include them still load."""
    import torchvision
    from safetensors.torch import save_file

    from jpq_core.models import load_network

    with_heads = torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=True)
    assert any(k.startswith("aux1.") for k in with_heads.state_dict())
    path = tmp_path / "googlenet.safetensors"
    save_file({k: v.contiguous() for k, v in with_heads.state_dict().items()}, str(path))
    net = load_network("tv:googlenet", path, num_classes=10)
    assert not any(k.startswith(("aux1.", "aux2.")) for k in net.state_dict())
    assert torch.equal(net.state_dict()["fc.weight"], with_heads.state_dict()["fc.weight"])
    net.train()
    assert isinstance(net(torch.zeros(2, 3, 32, 32)), torch.Tensor)  # training mode too: one output, no tuple


def test_the_stereo_scalar_stage_finishes_the_matching_with_the_current_cost_scale():
    """What recovery's scale refit compares: soft-argmin of the forward's own logits, for any cost scale."""
    from jpq_core.models.stereo import StereoNet, soft_argmin

    torch.manual_seed(0)
    net = StereoNet().eval()
    left, right = torch.rand(1, 3, 36, 70), torch.rand(1, 3, 36, 70)
    with torch.no_grad():
        finish = net.scalar_stage(left, right)
        for scale in (8.0, 2.5):
            net.cost_scale.fill_(scale)
            torch.testing.assert_close(finish(), soft_argmin(net.forward_with_logits(left, right)[1]))
