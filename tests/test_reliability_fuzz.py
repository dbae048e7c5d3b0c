"""Fuzzing the loaders of untrusted files: every input either loads correctly or raises JPQError, never
anything else; valid inputs are never refused.

Each test tallies the inputs it tried and what became of them. The figures in docs/reliability.md come from

    JPQ_FUZZ_EXAMPLES=300 JPQ_FUZZ_LOG=fuzz.json .venv/bin/pytest -q tests/test_reliability_fuzz.py

(JPQ_FUZZ_EXAMPLES: examples per test, default 40 to keep the suite fast; JPQ_FUZZ_LOG: where the tally goes.)
"""

import io
import json
import os
import struct
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jpq_core.checkpoints import load_weights, read_state_dict
from jpq_core.data.stereo_files import MIN_IMAGE_SIDE, decode_disparity, decode_image
from jpq_core.errors import JPQError

EXAMPLES = int(os.environ.get("JPQ_FUZZ_EXAMPLES", "40"))
TALLY: dict[str, Counter] = {}
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def attempt(target: str, load, *args):
    """load(*args), tallied: the result, or None when it raised JPQError; any other exception fails the test."""
    tally = TALLY.setdefault(target, Counter())
    tally["inputs"] += 1
    try:
        result = load(*args)
    except JPQError:
        tally["refused"] += 1
        return None
    except Exception:
        tally["failures"] += 1
        raise
    tally["loaded"] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def fuzz_log():
    yield
    if os.environ.get("JPQ_FUZZ_LOG"):
        with open(os.environ["JPQ_FUZZ_LOG"], "w") as f:
            json.dump({k: dict(v) for k, v in TALLY.items()}, f, indent=2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---- damage applied to valid files ---------------------------------------------------------------------------

damage_st = st.one_of(
    st.just(("none", 0, 0)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.just(0)),
    st.tuples(st.just("flip"), st.floats(0.0, 0.999), st.integers(1, 255)),
)


def damaged(data: bytes, damage) -> bytes:
    kind, where, xor = damage
    at = int(len(data) * where)
    if kind == "truncate":
        return data[:at]
    if kind == "flip" and data:
        return data[:at] + bytes([data[at] ^ xor]) + data[at + 1:]
    return data


magic_st = st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP",
                            b"\x93NUMPY\x01\x00", b"Pf\n", b"PF\n", b"PK\x03\x04", b"\x80\x04"])


# ---- images --------------------------------------------------------------------------------------------------

def check_image(img, expected_shape=None):
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= MIN_IMAGE_SIDE and np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    if expected_shape is not None:
        assert img.shape[:2] == expected_shape


@fuzz
@given(magic_st, st.binary(max_size=3000))
def test_random_bytes_never_crash_the_image_decoder(magic, data):
    img = attempt("image: random bytes", decode_image, magic + data, "upload")
    if img is not None:
        check_image(img)


@fuzz
@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([1, 3, 4]), st.sampled_from([np.uint8, np.uint16]),
       st.sampled_from([".png", ".jpg", ".bmp", ".tiff", ".webp"]), damage_st, st.integers(0, 2**31))
def test_valid_and_damaged_images_load_or_are_refused(h, w, channels, dtype, ext, damage, seed):
    top = np.iinfo(dtype).max
    pixels = np.random.default_rng(seed).integers(0, top, (h, w, channels), endpoint=True).astype(dtype).squeeze(-1 if channels == 1 else None)
    try:
        ok, buf = cv2.imencode(ext, pixels)
    except cv2.error:  # OpenCV cannot write this combination (e.g. 16-bit JPEG); nothing to test
        ok = False
    if not ok:
        return
    data = damaged(buf.tobytes(), damage)
    img = attempt(f"image: valid {'damaged' if damage[0] != 'none' else 'intact'}", decode_image, data, "upload")
    if damage[0] == "none" and min(h, w) >= MIN_IMAGE_SIDE:
        assert img is not None, "a valid image was refused"
    if img is not None:
        check_image(img, (h, w) if damage[0] == "none" else None)
    if img is not None and damage[0] == "none" and ext == ".png":  # lossless: exact values
        expected = np.atleast_3d(pixels)[:, :, [0, 0, 0] if channels == 1 else [2, 1, 0]] / top
        np.testing.assert_allclose(img, expected, atol=1e-6)


# ---- ground truth --------------------------------------------------------------------------------------------

def check_disparity(disp, expected_shape=None):
    assert disp.dtype == np.float32 and disp.ndim == 2
    finite = np.isfinite(disp)
    assert finite.any() and (disp[finite] >= 0).all() and np.isposinf(disp[~finite]).all()
    if expected_shape is not None:
        assert disp.shape == expected_shape


@fuzz
@given(magic_st, st.binary(max_size=3000))
def test_random_bytes_never_crash_the_ground_truth_reader(magic, data):
    disp = attempt("ground truth: random bytes", decode_disparity, magic + data, "gt")
    if disp is not None:
        check_disparity(disp)


real_dtypes = ["float32", "float64", "float16", "int8", "int32", "uint16", "int64"]
odd_dtypes = ["bool", "complex64", "<U3", "object", "datetime64[s]"]


@pytest.mark.filterwarnings("ignore:.*encountered in cast:RuntimeWarning")  # NaN/inf cast to integers on purpose
@fuzz
@given(st.lists(st.integers(0, 30), min_size=0, max_size=3), st.sampled_from(real_dtypes + odd_dtypes),
       st.sampled_from(["pfm", "npy", "png"]), st.floats(allow_nan=True, allow_infinity=True), damage_st, st.integers(0, 2**31))
def test_valid_and_damaged_ground_truth_loads_or_is_refused(shape, dtype, fmt, special, damage, seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(-5, 100, shape)
    if values.size:
        values.flat[rng.integers(values.size)] = special  # NaN, inf, negative or huge somewhere
    if fmt == "npy":
        array = values.astype(object) if dtype == "object" else values.astype(dtype) if dtype != "datetime64[s]" else values.astype("int64").astype(dtype)
        f = io.BytesIO()
        np.save(f, array)
        data, intact_ok = f.getvalue(), dtype in real_dtypes and len(shape) == 2
    elif fmt == "pfm":
        if len(shape) != 2:
            return
        data = f"Pf\n{shape[1]} {shape[0]}\n-1.0\n".encode() + np.flipud(values).astype("<f4").tobytes()
        array, intact_ok = values.astype(np.float32), True
    else:
        if len(shape) != 2 or 0 in shape:
            return
        array = np.clip(np.nan_to_num(values, nan=0, posinf=0, neginf=0) * 256, 0, 65535).astype(np.uint16)
        data, intact_ok = cv2.imencode(".png", array)[1].tobytes(), True
    with np.errstate(invalid="ignore", over="ignore"):
        known = np.isfinite(np.asarray(array, np.float32)) & (np.asarray(array, np.float32) >= 0) if intact_ok else None
    if fmt == "png" and intact_ok:
        known = array > 0
    disp = attempt(f"ground truth: {'damaged' if damage[0] != 'none' else 'intact'}", decode_disparity, damaged(data, damage), "gt")
    if damage[0] == "none" and intact_ok and 0 not in shape and known.any():
        assert disp is not None, "valid ground truth was refused"
        check_disparity(disp, tuple(shape))
        assert (np.isfinite(disp) == known).all()  # unknown exactly where the file says so
    elif disp is not None:
        check_disparity(disp)


# ---- checkpoints ---------------------------------------------------------------------------------------------

def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


@fuzz
@given(magic_st, st.binary(max_size=3000))
def test_random_bytes_never_crash_the_checkpoint_reader(workdir, magic, data):
    path = workdir / "random.bin"
    path.write_bytes(magic + data)
    state = attempt("checkpoint: random bytes", read_state_dict, path)
    assert state is None or all(isinstance(v, torch.Tensor) for v in state.values())


header_entry_st = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "C64", "X9", 3]),
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.lists(st.integers(0, 4), max_size=3),
    "data_offsets": st.lists(st.integers(-5, 200), min_size=0, max_size=3),
})


@fuzz
@given(st.dictionaries(st.text(max_size=8), header_entry_st, max_size=4), st.booleans(), st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_random_safetensors_headers_never_crash_the_checkpoint_reader(workdir, entries, honest_length, length, body):
    header = json.dumps(entries).encode()
    path = workdir / "random.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if honest_length else length) + header + body)
    state = attempt("checkpoint: random safetensors header", read_state_dict, path)
    assert state is None or all(isinstance(v, torch.Tensor) for v in state.values())


@fuzz
@given(st.data(), st.sampled_from(["safetensors", "torch"]), damage_st)
def test_random_state_dicts_load_exactly_or_are_refused(workdir, data, fmt, damage):
    model = small_net()
    state = {}
    for name, tensor in model.state_dict().items():
        action = data.draw(st.sampled_from(["keep", "keep", "keep", "drop", "reshape", "retype", "nan"]), label=name)
        if action == "drop":
            continue
        if action == "reshape":
            tensor = torch.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3), label="shape"))
        elif action == "retype":
            tensor = tensor.to(data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.bool, torch.uint8])))
        elif action == "nan" and tensor.is_floating_point() and tensor.numel():
            tensor = tensor.clone()
            tensor.view(-1)[0] = float("nan")
        state[name] = tensor.contiguous()
    if data.draw(st.booleans(), label="extra tensor"):
        state["extra.weight"] = torch.zeros(2)
    path = workdir / f"state.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    path.write_bytes(damaged(path.read_bytes(), damage))
    loaded = attempt(f"checkpoint: state dict ({'damaged' if damage[0] != 'none' else 'intact'})", load_weights, small_net(), path)
    own = model.state_dict()
    fits = set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)
    if damage[0] == "none" and fits and all(torch.isfinite(v.double()).all() for v in state.values()):
        assert loaded is not None, "a fitting, finite state dict was refused"
    if loaded is None:
        return
    assert fits
    for k, v in loaded.state_dict().items():
        assert not v.is_floating_point() or torch.isfinite(v).all()
        if damage[0] == "none":  # what loaded is what the file holds, in the network's dtypes
            torch.testing.assert_close(v, state[k].to(v.dtype), rtol=0, atol=0, msg=k)
