"""`evaluate --checkpoint` takes the compressed networks the project saves, and says what they are."""

from __future__ import annotations

import json
import shutil

import pytest

from jpq_core.cli import main
from jpq_core.errors import JPQError
from jpq_core.pipeline import load_any

SHIPPED = "cached_runs/results/checkpoints/98c9abc2b1c8.safetensors"  # ResNet-20, taylor 95%, 4/8 bits, fine-tuned


def _evaluate(capsys, *args):
    code = main(["evaluate", *args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_a_shipped_compressed_network_is_evaluated_and_described(root, capsys):
    side = json.loads((root / SHIPPED).with_suffix(".json").read_text())
    code, result, err = _evaluate(capsys, "--network", "resnet20", "--checkpoint", str(root / SHIPPED))
    assert code == 0, err
    described = result["compressed"]
    assert (described["criterion"], described["wbits"], described["abits"]) == ("taylor", 4, 8)
    assert described["target_sparsity"] == 0.95 and described["sparsity"] == pytest.approx(side["sparsity"])
    assert described["finetune"] == "masked"
    # the network as it was measured when it was saved (same test split, masks and quantizers restored)
    assert result["metrics"]["top1"] == pytest.approx(side["metrics"]["top1"], abs=0.005)


def test_a_plain_checkpoint_says_nothing_about_compression(root, capsys):
    code, result, err = _evaluate(capsys, "--network", "resnet20", "--checkpoint",
                                  str(root / "cached_runs" / "checkpoints" / "resnet20.safetensors"))
    assert code == 0, err
    assert "compressed" not in result


def test_a_compressed_network_without_its_sidecar_loads_as_its_pruned_weights(root, tmp_path):
    alone = tmp_path / "upload.safetensors"
    shutil.copyfile(root / SHIPPED, alone)  # the .json stays behind, as in an upload of one file
    net, described = load_any("resnet20", alone)
    assert described["sparsity"] == pytest.approx(json.loads((root / SHIPPED).with_suffix(".json").read_text())["sparsity"])
    assert "sidecar" in described["note"]
    weights = [m.weight for m in net.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() > 1]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) > 0.9


def test_the_wrong_network_is_named(root):
    with pytest.raises(JPQError, match="--network resnet20"):
        load_any("stereo", root / SHIPPED)
