"""Whatever a third-party decoder raises on bad bytes reaches the user as JPQError naming the file (issue 22).

The first two tests are the escapes the 1,500-example fuzz run found; the parametrized ones make every
decoder a loader calls raise exception types that no loader lists, to show that the class is fixed, not
the two instances.
"""

import io
import json
import tokenize

import numpy as np
import pytest
import torch

from jpq_core import checkpoints
from jpq_core.checkpoints import read_sidecar, read_state_dict
from jpq_core.data import stereo_files
from jpq_core.data.stereo_files import decode_disparity, decode_image
from jpq_core.engine.program import load_program
from jpq_core.errors import JPQError


def npy_bytes(array) -> bytes:
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def test_npy_ground_truth_with_an_unclosed_header_is_refused_naming_the_file():
    data = npy_bytes(np.ones((4, 5), np.float32))
    damaged = data.replace(b"}", b" ", 1)  # one byte: numpy's header parser raises tokenize.TokenError
    with pytest.raises(tokenize.TokenError):
        np.lib.format.read_array_header_1_0(_after_magic(damaged))
    with pytest.raises(JPQError, match=r"^gt\.npy: not a plain NumPy array file \(.*\); save the array again with numpy\.save"):
        decode_disparity(damaged, "gt.npy")


def _after_magic(data: bytes) -> io.BytesIO:
    f = io.BytesIO(data)
    np.lib.format.read_magic(f)
    return f


def test_torch_zip_with_a_damaged_version_byte_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"a": torch.ones(3)}, path)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"PK\x01\x02") + 6] ^= 0x80  # 'version needed to extract' of the first entry: zipfile raises NotImplementedError
    path.write_bytes(bytes(raw))
    with pytest.raises(JPQError, match=r"s\.pt: not a readable checkpoint \(.*zip file version"):
        read_state_dict(path)


ODD_ERRORS = [NotImplementedError("zip file version 12.8"), tokenize.TokenError("EOF in multi-line statement", (2, 0)),
              SyntaxError("bad input"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
              RecursionError("maximum recursion depth exceeded"), MemoryError(), OverflowError("int too large"),
              LookupError("unknown encoding"), AssertionError()]


def _raiser(exc):
    def raise_it(*args, **kwargs):
        raise exc
    return raise_it


@pytest.fixture
def files(tmp_path):
    """One valid file per loader, and the loader that reads it."""
    import cv2
    from safetensors.torch import save_file

    from jpq_core.engine.program import compile_network

    img = tmp_path / "l.png"
    cv2.imwrite(str(img), np.full((20, 20, 3), 100, np.uint8))
    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(json.dumps({"config": {}}))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)).eval()
    compile_network(net).save(tmp_path / "p.jpqe")
    return tmp_path


DECODERS = {  # loader -> (the decoder it calls, patched to raise, and a call of the loader)
    "image header (Pillow)": ("jpq_core.data.stereo_files.Image.open", lambda d: stereo_files.decode_image((d / "l.png").read_bytes(), str(d / "l.png"))),
    "image pixels (OpenCV)": ("jpq_core.data.stereo_files.cv2.imdecode", lambda d: stereo_files.decode_image((d / "l.png").read_bytes(), str(d / "l.png"))),
    "npy header": ("numpy.lib.format.read_array_header_1_0", lambda d: decode_disparity(npy_bytes(np.ones((3, 3))), "gt.npy")),
    "npy data": ("numpy.load", lambda d: decode_disparity(npy_bytes(np.ones((3, 3))), "gt.npy")),
    "pfm data": ("numpy.frombuffer", lambda d: decode_disparity(b"Pf\n2 2\n-1.0\n" + bytes(16), "gt.pfm")),
    "safetensors": ("jpq_core.checkpoints.load_file", lambda d: read_state_dict(d / "w.safetensors")),
    "torch zip index": ("zipfile.ZipFile.infolist", lambda d: read_state_dict(d / "w.pt")),
    "torch.load": ("jpq_core.checkpoints.torch.load", lambda d: read_state_dict(d / "w.pt")),
    "sidecar JSON": ("jpq_core.checkpoints.json.loads", lambda d: read_sidecar(d / "w.safetensors")),
    "engine program": ("safetensors.safe_open", lambda d: load_program(d / "p.jpqe")),
    "engine program ops": ("jpq_core.engine.program.op_from", lambda d: load_program(d / "p.jpqe")),
}


@pytest.mark.parametrize("exc", ODD_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_any_error_a_decoder_raises_becomes_jpq_error_naming_the_file(files, monkeypatch, decoder, exc):
    target, load = DECODERS[decoder]
    monkeypatch.setattr(target, _raiser(exc))
    with pytest.raises(JPQError) as info:
        load(files)
    message = str(info.value)
    assert any(name in message for name in ("l.png", "gt.npy", "gt.pfm", "w.safetensors", "w.pt", "w.json", "p.jpqe")), message
    if not decoder.startswith("image"):  # image decoders' words name memory addresses; "PNG or JPEG expected" says more
        words = str(exc.args[0]) if exc.args else type(exc).__name__
        assert words in message or type(exc).__name__ in message, message  # what went wrong, in the decoder's words


def test_keyboard_interrupt_inside_a_decoder_is_not_disguised(files, monkeypatch):
    monkeypatch.setattr("jpq_core.checkpoints.torch.load", _raiser(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        read_state_dict(files / "w.pt")


def test_a_deeply_nested_json_sidecar_is_refused(tmp_path):
    (tmp_path / "m.json").write_text("[" * 200_000)
    with pytest.raises(JPQError, match=r"m\.json: the checkpoint's sidecar is not valid JSON"):
        read_sidecar(tmp_path / "m.safetensors")


def test_npy_header_with_a_huge_shape_is_refused_before_allocating():
    data = npy_bytes(np.ones((2, 2), np.float32)).replace(b"(2, 2)", b"(9999999999999999999999, 2)".ljust(6))
    with pytest.raises(JPQError, match=r"gt\.npy: "):
        decode_disparity(data, "gt.npy")


def test_image_decoder_error_from_opencv_names_the_file(monkeypatch):
    import cv2

    ok, buf = cv2.imencode(".png", np.zeros((20, 20), np.uint8))
    monkeypatch.setattr("jpq_core.data.stereo_files.cv2.imdecode", _raiser(cv2.error("Insufficient memory")))
    with pytest.raises(JPQError, match=r"^up\.png: not a readable image"):
        decode_image(buf.tobytes(), "up.png")


def test_a_compressed_sidecar_without_config_is_named(tmp_path):
    """Found by scripts/fuzz.py (a JSON edit of the sidecar): a KeyError escaped from load_compressed."""
    from jpq_core.pipeline import load_compressed

    torch.save({"w": torch.ones(2)}, tmp_path / "c.pt")
    (tmp_path / "c.json").write_text(json.dumps({"compressed": True, "compression": {}, "layer_wbits": {}, "layer_abits": {}}))
    with pytest.raises(JPQError, match=r"c\.json: the sidecar of this compressed network is damaged \('config.network' is None"):
        load_compressed(tmp_path / "c.pt")


def test_a_damaged_training_state_is_named(tmp_path):
    from jpq_core.training import TrainConfig, train

    (tmp_path / "train_state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(JPQError, match=r"train_state\.pt: not a training state written by train \(.*\); delete it to start afresh"):
        train(TrainConfig(network="resnet20", data="digits", steps=1, batch_size=4, lr=0.01), tmp_path, progress=False)


def test_a_grid_or_report_nested_too_deep_is_named(tmp_path):
    from jpq_core.sweeps import import_reports, load_grid

    (tmp_path / "g.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(JPQError, match=r"g\.toml: not a valid TOML grid"):
        load_grid(tmp_path / "g.toml")
    (tmp_path / "r.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    added, problems = import_reports(tmp_path / "r.jsonl", tmp_path / "t.jsonl")
    assert added == 0 and "line 1 is not a compress report" in problems[0]


def test_a_png_chunk_claiming_more_than_the_file_is_refused_before_opencv(monkeypatch):
    """Found by scripts/fuzz.py: one byte of a 4 KB PNG's IDAT length made OpenCV take 0.6 GB and 3 s to refuse it."""
    import cv2

    png = bytearray(cv2.imencode(".png", np.zeros((17, 38, 3), np.uint16))[1].tobytes())
    idat = png.index(b"IDAT") - 4
    png[idat] = 0x20  # IDAT length: ~537 MB
    monkeypatch.setattr("jpq_core.data.stereo_files.cv2.imdecode", _raiser(AssertionError("OpenCV was given the file")))
    with pytest.raises(JPQError, match=r"^l\.png: not a readable image \(PNG or JPEG expected\); the file may be truncated or corrupt\.$"):
        decode_image(bytes(png), "l.png")
    with pytest.raises(JPQError, match=r"^gt\.png: not a readable image"):
        decode_disparity(bytes(png), "gt.png")
