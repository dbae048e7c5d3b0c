"""Fine-tuning modes: one interface, each mode's own behaviour."""

from __future__ import annotations

import pytest

from jpq_core.compressed import current_masks
from jpq_core.errors import JPQError
from jpq_core.finetuning import FINETUNE_MODES, MODES, FinetuneMode, get_mode
from jpq_core.pipeline import CompressionConfig, compress
from jpq_core.pruning import sparsity_of


def test_every_mode_is_a_finetune_mode_by_its_name():
    assert FINETUNE_MODES == ("none", "masked", "distill", "distill-cost", "regrow")
    for name in MODES:
        assert isinstance(get_mode(name), FinetuneMode) and get_mode(name).name == name
    with pytest.raises(JPQError, match="unknown fine-tuning mode"):
        get_mode("anneal")


def test_cost_distillation_is_for_networks_with_a_cost_volume():
    get_mode("distill-cost").check("stereo")
    with pytest.raises(JPQError, match="for a classifier use distill"):
        get_mode("distill-cost").check("resnet20")


def test_regrowth_moves_the_mask_and_keeps_the_sparsity(digits_task, resnet20):
    config = dict(network="resnet20", criterion="magnitude", sparsity=0.7, wbits=None, abits=None, pipeline="prune-only",
                  steps=30, calibration_batches=1)
    masked, _ = compress(resnet20, digits_task, CompressionConfig(finetune="masked", **config))
    regrown, _ = compress(resnet20, digits_task, CompressionConfig(finetune="regrow", **config))
    before, after = current_masks(masked), current_masks(regrown)
    assert sparsity_of(after) == pytest.approx(sparsity_of(before), abs=1e-9)
    assert any(not bool((before[k] == after[k]).all()) for k in before)  # weights were dropped and grown
    assert all(getattr(m, "dense_grad", None) is None for m in regrown.modules())  # nothing left behind
