"""Gradient statistics are computed once and then read back, keyed by weights and calibration data."""

import torch

import jpq_core.score_cache as sc
from jpq_core.models import build_network
from jpq_core.compressed import attach
from jpq_core.tasks import ClassificationTask


def test_second_request_reads_the_cache_and_other_keys_recompute(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "_memory", {})
    task = ClassificationTask("digits", batch_size=16)
    torch.manual_seed(0)
    model = build_network("resnet20")
    calls = []
    first = sc.cached_gradient_stats(model, task, 2, 0, tmp_path, progress=lambda i, n: calls.append(i))
    assert calls == [1, 2] and len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(sc, "_memory", {})  # a new process: only the disk is left
    again = sc.cached_gradient_stats(model, task, 2, 0, tmp_path, progress=lambda i, n: calls.append(i))
    assert calls == [1, 2]  # nothing recomputed
    torch.testing.assert_close(again.mean_gw_abs["fc"], first.mean_gw_abs["fc"])
    sc.cached_gradient_stats(model, task, 2, 1, tmp_path)  # other calibration seed
    attach(model, None, 4)  # same raw weights, quantized: other gradients
    sc.cached_gradient_stats(model, task, 2, 0, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_damaged_cache_file_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "_memory", {})
    task = ClassificationTask("digits", batch_size=8)
    model = build_network("resnet20")
    sc.cached_gradient_stats(model, task, 1, 0, tmp_path)
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(b"garbage")
    monkeypatch.setattr(sc, "_memory", {})
    stats = sc.cached_gradient_stats(model, task, 1, 0, tmp_path)
    assert stats.batches == 1 and path.stat().st_size > 100


def test_a_cache_folder_that_cannot_be_written_does_not_stop_scoring(tmp_path, monkeypatch):
    import errno
    import os

    import jpq_core.checkpoints as checkpoints
    from jpq_core.models import build_network
    from jpq_core.score_cache import _memory, cached_gradient_stats
    from jpq_core.tasks import make_task

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.os, "replace", disk_full)
    _memory.clear()
    stats = cached_gradient_stats(build_network("resnet20"), make_task("resnet20"), 1, 0, cache_dir=tmp_path)
    assert stats.batches == 1
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
