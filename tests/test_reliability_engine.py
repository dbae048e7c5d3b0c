"""Fuzzing the engine's program files and its compiler: a damaged or hand-made program file, or a layer the
engine cannot run, raises JPQError (with the file or the layer named), never anything else.

Uses the tally of tests/test_reliability_fuzz.py, so `JPQ_FUZZ_LOG` collects these figures too.
"""

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from jpq_core.engine import compile_network
from jpq_core.engine.program import load_program
from jpq_core.errors import JPQError
from tests.test_reliability_fuzz import attempt, fuzz


@pytest.fixture(scope="module")
def program_bytes(tmp_path_factory):
    from jpq_core.compressed import attach

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    masks = {n: torch.rand_like(m.weight) > 0.8 for n, m in net.named_children() if isinstance(m, nn.Conv2d)}
    attach(net, masks, 4)
    path = tmp_path_factory.mktemp("program") / "net.jpqe"
    compile_network(net).save(path)
    return path.read_bytes()


def _load(tmp_path, data: bytes):
    path = tmp_path / "fuzzed.jpqe"
    path.write_bytes(data)
    return load_program(path)


@fuzz
@given(data=st.data())
def test_a_damaged_program_file_loads_or_is_refused(tmp_path_factory, program_bytes, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    raw = bytearray(program_bytes)
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=2048)))
    attempt("engine program file", _load, tmp, bytes(raw))


def _with_header(program_bytes: bytes, edit) -> bytes:
    """The program file with its JSON header (safetensors metadata) changed by `edit`."""
    n = struct.unpack("<Q", program_bytes[:8])[0]
    header = json.loads(program_bytes[8:8 + n])
    meta = json.loads(header["__metadata__"]["program"])
    edit(meta)
    header["__metadata__"]["program"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + program_bytes[8 + n:]


@pytest.mark.parametrize("edit", [
    lambda m: m.update(format="jpq-engine/999"),
    lambda m: m.pop("ops"),
    lambda m: m.update(ops="not a list"),
    lambda m: m["ops"].append({"kind": "nonsense"}),
    lambda m: m["ops"][0].clear(),
], ids=["format", "no-ops", "ops-not-a-list", "unknown-op", "empty-op"])
def test_a_program_with_a_hand_edited_header_is_refused(tmp_path, program_bytes, edit):
    with pytest.raises(JPQError):
        _load(tmp_path, _with_header(program_bytes, edit))


@fuzz
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), k=st.sampled_from([1, 2, 3, 5]), stride=st.integers(1, 3),
       padding=st.integers(0, 3), dilation=st.integers(1, 3), groups=st.sampled_from([1, 2]),
       size=st.integers(1, 12), bits=st.sampled_from([None, 2, 4, 8]))
def test_the_compiler_runs_any_conv_it_accepts_and_refuses_the_rest(c_in, c_out, k, stride, padding, dilation, groups, size, bits):
    from jpq_core.compressed import attach

    def build_and_run():
        conv = nn.Conv2d(c_in * groups, c_out * groups, k, stride, padding, dilation, groups=groups)
        net = attach(nn.Sequential(conv).eval(), None, bits)
        x = torch.randn(1, c_in * groups, size, size)
        with torch.no_grad():
            reference = net(x).numpy()  # PyTorch refuses impossible geometry with its own error: not ours to test
        out = compile_network(net).run(x)
        np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(reference).max())))
        return out

    try:
        torch.nn.functional.conv2d(torch.zeros(1, c_in * groups, size, size), torch.zeros(c_out * groups, c_in, k, k),
                                   stride=stride, padding=padding, dilation=dilation, groups=groups)
    except RuntimeError:
        return  # the geometry is impossible (kernel larger than the padded input)
    attempt("engine compiler", build_and_run)
