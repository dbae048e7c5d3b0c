"""Checkpoints round-trip exactly, and untrusted files never run code."""

import pickle

import pytest
import torch

from jpq_core.checkpoints import load_weights, read_sidecar, save_checkpoint
from jpq_core.errors import JPQError
from jpq_core.models import build_network, load_network


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_network("resnet20").eval()
    save_checkpoint(model, tmp_path / "m.safetensors", {"config": {"network": "resnet20"}, "note": "x"})
    loaded = load_network("resnet20", tmp_path / "m.safetensors")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    side = read_sidecar(tmp_path / "m.safetensors")
    assert side["note"] == "x" and "torch" in side["versions"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left


def test_plain_torch_state_dict_loads(tmp_path):
    model = build_network("resnet20").eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = load_weights(build_network("resnet20").eval(), tmp_path / "m.pt")
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(other(x), model(x))


def test_pickle_that_would_run_code_is_refused(tmp_path, code_running_object):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"conv.weight": code_running_object(target)}, f)
    with pytest.raises(JPQError, match="refused to load"):
        load_weights(build_network("resnet20"), evil)
    assert not target.exists()


def test_wrong_architecture_names_the_tensors(tmp_path):
    save_checkpoint(build_network("resnet20"), tmp_path / "r.safetensors", {})
    with pytest.raises(JPQError) as err:
        load_weights(build_network("stereo"), tmp_path / "r.safetensors")
    msg = str(err.value)
    assert "missing: " in msg and "unexpected: " in msg and "aggregation.0.0.weight" in msg and "fc.weight" in msg


def test_wrong_shapes_are_named(tmp_path):
    state = build_network("resnet20").state_dict()
    state["fc.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(JPQError, match=r"fc.weight \(5, 64\) vs \(10, 64\)"):
        load_weights(build_network("resnet20"), tmp_path / "s.pt")


def test_garbage_and_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(JPQError, match="not a readable checkpoint"):
        load_weights(build_network("resnet20"), tmp_path / "g.safetensors")
    with pytest.raises(JPQError, match="no such checkpoint"):
        load_weights(build_network("resnet20"), tmp_path / "none.pt")


def test_checkpoint_of_another_network_is_refused(tmp_path):
    save_checkpoint(build_network("resnet20"), tmp_path / "r.safetensors", {"config": {"network": "resnet20"}})
    with pytest.raises(JPQError, match="is a 'resnet20' checkpoint"):
        load_network("stereo", tmp_path / "r.safetensors")


def test_safetensors_whose_header_length_starts_like_a_pickle_loads(tmp_path):
    # A header of 128 + 256k bytes begins with 0x80, the pickle protocol byte; such a file is still safetensors.
    from safetensors.torch import save_file

    from jpq_core.checkpoints import read_state_dict

    for pad in range(400):
        path = tmp_path / "w.safetensors"
        save_file({"w" * (pad + 1): torch.ones(2)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no name length gave a header starting with 0x80")
    assert torch.equal(read_state_dict(path)["w" * (pad + 1)], torch.ones(2))


def test_every_shipped_front_checkpoint_loads_with_its_rows_sparsity():
    from jpq_core.compressed import current_masks
    from jpq_core.pipeline import load_compressed
    from jpq_core.sweeps import RESULTS, checkpoint_dir, read_rows

    rows = {r["id"]: r for r in read_rows(RESULTS)[0]}
    shipped = sorted(checkpoint_dir(RESULTS).glob("*.safetensors"))
    assert shipped
    for path in shipped:
        net, _ = load_compressed(path)
        masks = current_masks(net)
        sparsity = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert sparsity == pytest.approx(rows[path.stem]["achieved_sparsity"], abs=1e-6), path.name
