"""User checkpoints are untrusted: loaded as weights only, size-limited, checked to fit and to be finite.

(tests/test_checkpoints.py has the basics: round trip, a raw pickle that would run code, mismatched names.)
"""

import json
import shutil
import zipfile
from dataclasses import asdict

import pytest
import torch

from jpq_core import checkpoints
from jpq_core.checkpoints import load_weights, read_state_dict, save_checkpoint
from jpq_core.cli import main
from jpq_core.layers import prunable_layers
from jpq_core.errors import JPQError
from jpq_core.models import build_network, load_network
from jpq_core.compressed import add_activation_quantizers, attach
from jpq_core.pipeline import CompressionConfig, load_compressed, save_compressed
from jpq_core.pruning import make_masks


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(0)
    return build_network("resnet20").state_dict()


def test_zip_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path, code_running_object, resnet_state):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({**resnet_state, "fc.weight": code_running_object(target)}, evil)  # a current (zip) torch file
    assert zipfile.is_zipfile(evil)
    with pytest.raises(JPQError, match=r"refused to load: the file holds more than plain weights \(WeightsUnpickler error: Unsupported global"):
        load_weights(build_network("resnet20"), evil)
    assert not target.exists()


def test_whole_pickled_module_is_refused_with_how_to_resave(tmp_path):
    torch.save(build_network("resnet20"), tmp_path / "model.pt")
    with pytest.raises(JPQError, match=r"refused to load.*re-save it with torch.save\(model.state_dict\(\)"):
        read_state_dict(tmp_path / "model.pt")


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch, resnet_state):
    torch.save(resnet_state, tmp_path / "big.pt")
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 2**20)
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: pytest.fail("read despite the limit"))
    with pytest.raises(JPQError, match=r"big.pt: 1 MiB is over the 1 MiB limit|over the 1 MiB limit for checkpoints"):
        read_state_dict(tmp_path / "big.pt")


def test_zip_that_unpacks_beyond_the_limit_is_refused_before_unpacking(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"\0" * (3 * 2**20))  # 3 MiB of zeros in a few kilobytes
    assert bomb.stat().st_size < 2**15
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 2**20)
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: pytest.fail("unpacked despite the limit"))
    with pytest.raises(JPQError, match=r"bomb.pt: unpacks to 3 MiB, over the 1 MiB limit"):
        read_state_dict(bomb)


@pytest.mark.parametrize("state", [
    {1: torch.zeros(2)},
    {"w": torch.zeros(4).to_sparse()},
    {"w": torch.zeros(2, dtype=torch.complex64)},
    {"w": {"nested": torch.zeros(1)}},
    [torch.zeros(2)],
])
def test_odd_state_dicts_are_refused(tmp_path, state):
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(JPQError, match="holds no state dict of plain tensors"):
        read_state_dict(tmp_path / "odd.pt")


def test_nan_weights_are_refused_naming_the_tensors(tmp_path, resnet_state):
    state = dict(resnet_state)
    state["fc.weight"] = state["fc.weight"].clone()
    state["fc.weight"][0, 0] = float("nan")
    state["stem.0.weight"] = torch.full_like(state["stem.0.weight"], float("inf"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(JPQError, match=r"NaN or infinite values in: stem.0.weight, fc.weight\. The weights are broken"):
        load_weights(build_network("resnet20"), tmp_path / "nan.pt")


@pytest.mark.parametrize("command", ["evaluate", "compress"])
def test_cli_refuses_nan_checkpoints_with_one_line(tmp_path, resnet_state, command, capsys):
    state = {k: (torch.full_like(v, float("nan")) if k == "fc.bias" else v) for k, v in resnet_state.items()}
    torch.save(state, tmp_path / "nan.pt")
    assert main([command, "--network", "resnet20", "--checkpoint", str(tmp_path / "nan.pt"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "NaN or infinite values in: fc.bias" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("sidecar, message", [
    ('{"config": {"network": "resnet20"', "sidecar is not valid JSON"),
    ("[1, 2, 3]", "sidecar should be a JSON object with a 'config' object"),
    ('{"config": "resnet20"}', "sidecar should be a JSON object with a 'config' object"),
    ('{"config": {"network": "stereo", "architecture": {"width": 3}}}', r"architecture settings \{'width': 3\} do not build a 'stereo' network"),
    ('{"config": {"network": "stereo", "architecture": {"channels": 100000}}}', "network of .* parameters, over the checkpoint size limit"),
    ('{"config": {"network": "resnet20"}}', "is a 'resnet20' checkpoint, not 'stereo'"),
])
def test_corrupt_sidecar_is_a_clear_error(tmp_path, sidecar, message):
    save_checkpoint(build_network("stereo"), tmp_path / "m.safetensors", {"config": {"network": "stereo"}})
    (tmp_path / "m.json").write_text(sidecar)
    with pytest.raises(JPQError, match=message):
        load_network("stereo", tmp_path / "m.safetensors")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A small compressed ResNet-20 (half its weights pruned, 4-bit weights, 8-bit calibrated inputs) on disk."""
    torch.manual_seed(0)
    net = build_network("resnet20").eval()
    layers = prunable_layers(net)
    masks = make_masks({k: l.weight.abs() for k, l in layers.items()}, {k: l.weight.shape for k, l in layers.items()}, 0.5)
    attach(net, masks, 4)
    add_activation_quantizers(net, 8)
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
    for layer in layers.values():
        layer.input_quantizer.finish_calibration()
    report = {"network": "resnet20", "config": asdict(CompressionConfig(network="resnet20")), "metrics": {}, "sparsity": 0.5}
    return save_compressed(net, tmp_path_factory.mktemp("compressed") / "c.safetensors", report)


def _copy(compressed, tmp_path):
    shutil.copy(compressed, tmp_path / "c.safetensors")
    shutil.copy(compressed.with_suffix(".json"), tmp_path / "c.json")
    return tmp_path / "c.safetensors"


def test_intact_compressed_file_loads(compressed, tmp_path):
    net, side = load_compressed(_copy(compressed, tmp_path))
    assert side["layer_wbits"]["fc"] == 4 and torch.isfinite(net(torch.rand(1, 3, 32, 32))).all()


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("compressed"), "not a compressed network"),
    (lambda s: s.pop("compression"), r"sidecar of this compressed network is damaged \('compression' lacks"),
    (lambda s: s["config"].update(network="vgg"), r"damaged \('config.network' is 'vgg'"),
    (lambda s: s.update(layer_wbits=[4, 4]), "damaged .*'layer_wbits' and 'layer_abits' must map layers"),
    (lambda s: s["layer_wbits"].update(fc=9), "weight bits must be one of"),
    (lambda s: s["layer_abits"].pop("fc"), r"masks or bit widths do not fit the resnet20 network: fc \(no bit width\)"),
])
def test_damaged_compressed_sidecar_is_named(compressed, tmp_path, damage, message):
    path = _copy(compressed, tmp_path)
    side = json.loads(path.with_suffix(".json").read_text())
    damage(side)
    path.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(JPQError, match=message):
        load_compressed(path)


def test_missing_sidecar_or_weights_of_a_compressed_network(compressed, tmp_path):
    path = _copy(compressed, tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(JPQError, match="not a compressed network"):
        load_compressed(path)
    path = _copy(compressed, tmp_path)
    path.unlink()
    with pytest.raises(JPQError, match="no such checkpoint file"):
        load_compressed(path)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("jpq_mask::fc"), r"fc \(no mask\)"),
    (lambda s: s.update({"jpq_mask::fc": torch.ones(10, 63, dtype=torch.uint8)}), r"fc \(mask \(10, 63\) vs weight \(10, 64\)\)"),
    (lambda s: s.update({"jpq_mask::fc9": torch.ones(1, dtype=torch.uint8)}), r"fc9 \(no such layer\)"),
    (lambda s: s.update({"fc.input_quantizer.hi": torch.tensor(float("nan"))}), r"NaN or infinite values in: fc.input_quantizer.hi"),
    (lambda s: s.pop("fc.weight"), "does not fit the ResNet20 network; missing: fc.weight"),
])
def test_damaged_compressed_weights_or_masks_are_named(compressed, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    path = _copy(compressed, tmp_path)
    state = load_file(str(path))
    damage(state)
    save_file(state, str(path))
    with pytest.raises(JPQError, match=message):
        load_compressed(path)
