"""Compression parameters a user can get wrong: each is refused with a message, and no NaN reaches a report."""

import math

import pytest
import torch

from jpq_core.cli import main
from jpq_core.layers import prunable_layers
from jpq_core.errors import JPQError
from jpq_core.compressed import current_masks
from jpq_core.pipeline import CompressionConfig, compress
from jpq_core.pruning import check_sparsity, make_masks


def _cfg(**kw):
    base = dict(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, abits=8, finetune="none", steps=0,
                calibration_batches=1)
    return CompressionConfig(**{**base, **kw})


@pytest.mark.parametrize("bad", [math.nan, -0.1, 1.0, 1.5, math.inf, "ninety", None, True])
def test_sparsity_outside_0_1_or_not_a_number_is_refused(bad):
    with pytest.raises(JPQError, match=r"sparsity must be in \[0, 1\), got .*0.95 removes 95%"):
        _cfg(sparsity=bad).check()
    with pytest.raises(JPQError, match=r"sparsity must be in \[0, 1\)"):
        make_masks({"a": torch.rand(4, 4)}, {"a": torch.Size((4, 4))}, bad)
    assert check_sparsity(0.0) == 0.0 and check_sparsity(0.999) == 0.999


@pytest.mark.parametrize("field, bad, message", [
    ("wbits", 0, "weight bits must be one of 1, 2, 3, 4, 5, 6, 7, 8, 16, float; got 0"),
    ("wbits", 9, "weight bits must be one of"),
    ("wbits", 4.5, "weight bits must be one of"),
    ("wbits", math.nan, "weight bits must be one of"),
    ("wbits", True, "weight bits must be one of"),
    ("wbits", "4", "weight bits must be one of"),
    ("abits", 2, "activation bits must be one of 4, 5, 6, 7, 8, 10, 12, 16, float; got 2"),
    ("abits", 9, "activation bits must be one of"),
    ("layer_wbits", {"fc": 64}, "weight bits must be one of .* got 64"),
    ("lr", -1.0, "learning rate must be a positive number, got -1.0"),
    ("lr", math.nan, "learning rate must be a positive number, got nan"),
    ("calibration_batches", 0, "calibration batches must be a whole number >= 1, got 0"),
    ("steps", -5, "steps must be 0 or more"),
])
def test_bad_bits_and_settings_are_refused(field, bad, message):
    with pytest.raises(JPQError, match=message):
        _cfg(**{field: bad}).check()


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "nan"], r"sparsity must be in \[0, 1\), got nan"),
    (["--sparsity", "1"], r"sparsity must be in \[0, 1\), got 1.0"),
    (["--wbits", "9"], "weight bits must be one of"),
    (["--abits", "3"], "activation bits must be one of"),
    (["--lr", "-0.1"], "learning rate must be a positive number"),
    (["--layer-wbits", "fc"], "--layer-wbits wants LAYER=BITS pairs"),
])
def test_cli_compress_refuses_bad_parameters_with_one_line(args, message, capsys):
    assert main(["compress", "--network", "resnet20", "--json", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: ") and __import__("re").search(message, err)


def test_cli_compress_refuses_a_non_number_for_bits(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--network", "resnet20", "--wbits", "four"])
    assert exit_.value.code == 2 and "'four' is not a bit width (a whole number or 'float')" in capsys.readouterr().err


def test_sparsity_the_free_layers_cannot_reach_is_refused(digits_task, resnet20):
    # (channel pruning past what whole channels allow: tests/test_channels.py)
    # first and last layers are protected and every other layer keeps a weight, so 99.9% is out of reach
    with pytest.raises(JPQError, match=r"sparsity 0.999 needs \d+ weights removed but only \d+ can be.*lower the sparsity or protect fewer layers"):
        compress(resnet20, digits_task, _cfg(sparsity=0.999))


def test_no_layer_is_pruned_away_entirely_at_extreme_sparsity(digits_task, resnet20):
    net, report = compress(resnet20, digits_task, _cfg(sparsity=0.99, wbits=4))
    kept = {k: int(m.sum()) for k, m in current_masks(net).items()}
    assert set(kept) == set(prunable_layers(net)) and min(kept.values()) >= 1
    assert report["sparsity"] == pytest.approx(0.99, abs=1e-4)
    assert all(math.isfinite(v) for v in report["metrics"].values())
    assert all(layer["sparsity"] < 1.0 for layer in report["layers"])


def test_diverging_fine_tuning_stops_with_advice_instead_of_nan_metrics(digits_task, resnet20, monkeypatch):
    real_loss = digits_task.loss
    monkeypatch.setattr(digits_task, "loss", lambda model, batch: real_loss(model, batch) * float("nan"))
    with pytest.raises(JPQError, match=r"fine-tuning diverged at step 1 of 2 \(the loss became nan\); lower the learning rate"):
        compress(resnet20, digits_task, _cfg(finetune="masked", steps=4))  # 2 steps before quantizing, 2 after


def test_nan_metrics_are_never_reported(digits_task, resnet20, monkeypatch):
    monkeypatch.setattr(digits_task, "evaluate", lambda model: {"top1": float("nan")})
    with pytest.raises(JPQError, match="top1 came out as NaN or infinite.*Try more bits, a lower sparsity"):
        compress(resnet20, digits_task, _cfg())
