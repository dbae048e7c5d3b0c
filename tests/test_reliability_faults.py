"""Saving under faults: a full disk, a read-only folder or a kill mid-write keeps the previous files intact,
says so in words, and leaves no temporary file. (Training killed mid-run and resumed: tests/test_training.py.)
"""

import errno
import json
import os

import pytest
import torch

from jpq_core import checkpoints
from jpq_core.checkpoints import atomic_write, read_sidecar, save_checkpoint
from jpq_core.errors import JPQError
from jpq_core.models import build_network, load_network


@pytest.fixture
def saved(tmp_path):
    """A checkpoint already on disk: the 'previous file' every fault must leave alone."""
    torch.manual_seed(0)
    model = build_network("resnet20")
    save_checkpoint(model, tmp_path / "m.safetensors", {"config": {"network": "resnet20"}, "note": "old"})
    return tmp_path / "m.safetensors", {p.name: p.read_bytes() for p in tmp_path.iterdir()}


def _unchanged(path, before):
    return {p.name: p.read_bytes() for p in path.parent.iterdir()} == before  # same files, same bytes, no temp left


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_keeps_the_previous_file(saved):
    path, before = saved
    def half_then_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        _disk_full()
    with pytest.raises(JPQError, match=r"m.safetensors: could not save \(the disk is full\); the previous file, if any, is unchanged. Please free some space"):
        atomic_write(path, half_then_full)
    assert _unchanged(path, before)


def test_disk_full_inside_safetensors_is_recognised(saved, monkeypatch):
    from safetensors import SafetensorError

    path, before = saved
    def full(state, tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoints, "save_file", full)
    with pytest.raises(JPQError, match=r"could not save \(the disk is full\)"):
        save_checkpoint(build_network("resnet20"), path, {"note": "new"})
    assert _unchanged(path, before)


def test_failure_on_the_sidecar_keeps_the_old_weights_too(saved, monkeypatch):
    path, before = saved
    real_write_text = type(path).write_text
    monkeypatch.setattr(type(path), "write_text", lambda self, *a, **k: _disk_full())
    with pytest.raises(JPQError, match="m.json: could not save"):
        save_checkpoint(build_network("resnet20"), path, {"note": "new"})
    monkeypatch.setattr(type(path), "write_text", real_write_text)
    assert _unchanged(path, before) and read_sidecar(path)["note"] == "old"
    load_network("resnet20", path)  # the old pair still loads


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_folder_says_so(saved, monkeypatch, code):
    path, before = saved
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", refuse)
    with pytest.raises(JPQError, match=r"could not save \(the folder is read-only or not yours to write\).*choose a writable folder"):
        save_checkpoint(build_network("resnet20"), path, {"note": "new"})
    assert _unchanged(path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_really_read_only_folder(saved):
    path, before = saved
    os.chmod(path.parent, 0o555)
    try:
        with pytest.raises(JPQError, match="read-only or not yours to write"):
            atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    finally:
        os.chmod(path.parent, 0o755)
    assert _unchanged(path, before)


def test_rename_failure_keeps_the_previous_file(saved, monkeypatch):
    path, before = saved
    monkeypatch.setattr(checkpoints.os, "replace", _disk_full)
    with pytest.raises(JPQError, match="the disk is full"):
        atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert _unchanged(path, before)


def test_killed_mid_write_leaves_no_temp_and_the_old_file(saved):
    path, before = saved
    def killed(tmp):
        open(tmp, "w").write("par")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed)
    assert _unchanged(path, before)


def test_a_bug_in_the_writer_is_not_disguised_as_a_disk_problem(saved):
    path, before = saved
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda tmp: 1 / 0)
    assert _unchanged(path, before)


def test_successful_save_replaces_both_files_and_is_readable_by_all(saved):
    path, _ = saved
    save_checkpoint(build_network("resnet20"), path, {"config": {"network": "resnet20"}, "note": "new"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json", "m.safetensors"]
    assert json.loads(path.with_suffix(".json").read_text())["note"] == "new"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in path.parent.iterdir())
