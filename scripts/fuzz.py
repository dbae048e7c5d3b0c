"""Mutation fuzzing of every loader of untrusted files: each input loads (and passes a sanity check) or
raises JPQError; anything else is a failure, saved for replay (issue 22).

    python scripts/fuzz.py                      # 10,000 inputs per family, one thread
    python scripts/fuzz.py --inputs 200 --families images ground-truth

Four families, each mutating valid seed files the project itself writes:
- images: PNG (8/16 bit, grey, RGB, RGBA), JPEG, BMP, TIFF, WebP -> `decode_image` (also the downscaling path);
- ground truth: NPY (several dtypes, format 1.0 and 2.0), PFM, 16-bit PNG -> `decode_disparity`;
- checkpoints: a ResNet-20 as safetensors and as a PyTorch zip, each with its JSON sidecar -> `load_network`,
  and a compressed ResNet-20 (weights, masks, bit widths in its sidecar) -> `load_compressed`;
- engine programs: a compiled, pruned and 4-bit-quantized network -> `load_program`.
Mutations (1-3 stacked per input): bit flips, random or "interesting" bytes (0, 0xff, 0x7f, 0x80) and
integers (0, -1, 2**31-1, 2**63, ...) written over 1-8 byte fields, truncation, insertion, deletion and
duplication of byte ranges, the same kinds restricted to the header (first 128 bytes, or the NPY header
text, the safetensors JSON header, the zip central directory), and for JSON (sidecars, program headers)
structured edits: a value replaced by another type, a huge number, NaN, a deep nest; a key removed.

Four more families report instead of raising, or take parameters rather than files; name them with --families:
- links: the Explore page (AppTest) opened with random query parameters: no exception, every ignored value named;
- job-files: the fine-tuning queue's job and progress files damaged: poll/jobs_of/progress raise nothing, the
  damaged job is listed as failed, the intact one beside it is untouched;
- run-states: a page job's state.pt damaged: `jobs.unreadable_state` says why (the job starts afresh) or it loads;
- recovery-and-export: recovery methods and sample counts, and `python -m jpq_core export` arguments.

Each input runs under a time limit (default 20 s; over it counts as a failure). Failing inputs go to
`--out` (default fuzz-failures/) with the exception, to replay with `--replay FILE`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jpq_core.errors import JPQError  # noqa: E402

INTERESTING_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x22, 0x7B, 0x7D, 0x28, 0x29, 0x5C]
INTERESTING_INTS = [0, 1, -1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]


class Hang(BaseException):
    """An input took longer than the time limit (a BaseException so no wrapper can turn it into JPQError)."""


# ---- mutations -------------------------------------------------------------------------------------------------

def _span(rng: random.Random, n: int, region: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = region if region else (0, n)
    return lo, max(lo + 1, min(hi, n))


def mutate_bytes(data: bytes, rng: random.Random, region: tuple[int, int] | None = None) -> tuple[bytes, str]:
    """One random byte-level mutation, anywhere or inside `region` (start, end); returns (bytes, what was done)."""
    b = bytearray(data)
    if not b:
        return bytes(rng.randbytes(rng.randint(1, 16))), "random bytes"
    lo, hi = _span(rng, len(b), region)
    at = rng.randrange(lo, hi) if hi <= len(b) else rng.randrange(len(b))
    kind = rng.choice(["flip", "flip", "byte", "interesting-byte", "int", "truncate", "insert", "delete", "duplicate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(lo, min(hi, len(b)))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        b[at] = rng.randrange(256)
    elif kind == "interesting-byte":
        b[at] = rng.choice(INTERESTING_BYTES)
    elif kind == "int":
        width = rng.choice([1, 2, 4, 8])
        value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
        b[at:at + width] = value.to_bytes(width, rng.choice(["little", "big"]))
    elif kind == "truncate":
        b = b[:at]
    elif kind == "insert":
        b[at:at] = rng.randbytes(rng.randint(1, 64)) if rng.random() < 0.5 else bytes([rng.choice(INTERESTING_BYTES)]) * rng.randint(1, 64)
    elif kind == "delete":
        del b[at:at + rng.randint(1, 64)]
    else:
        start = rng.randrange(len(b))
        b[at:at] = b[start:start + rng.randint(1, 256)]
    return bytes(b), f"{kind}@{at}"


def random_json_value(rng: random.Random):
    return rng.choice([None, True, 0, -1, 2**64, 1e308, float("nan"), float("inf"), -0.5, "", "x" * rng.randint(1, 40),
                       "resnet20", "stereo", "float", [], [1, 2], {}, {"a": 1}, [[[[[]]]]], "\u00e9\ud7ff"])


def mutate_json(obj, rng: random.Random):
    """A copy of a JSON object with one value replaced, one key removed or added, or a deep nest put in."""
    obj = json.loads(json.dumps(obj))
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])

    walk(obj, [])
    path = rng.choice(paths)
    if not path:
        return random_json_value(rng) if rng.random() < 0.3 else obj
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    kind = rng.random()
    if kind < 0.6:
        parent[path[-1]] = random_json_value(rng)
    elif kind < 0.8:
        del parent[path[-1]]
    elif kind < 0.9 and isinstance(parent, dict):
        parent[rng.choice(["extra", "compressed", "config", "ops", "format", "\x00"])] = random_json_value(rng)
    else:
        nest = []
        for _ in range(rng.choice([10, 500])):  # deeper nests: Checkpoints.mutate writes them as bytes
            nest = [nest]
        parent[path[-1]] = nest
    return obj


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


# ---- families: seeds, mutation, load, check --------------------------------------------------------------------

class Family:
    """Valid seeds, a mutation of one, and the loader that reads it (returning something to check)."""
    name = ""
    time_limit = None  # seconds per input, when this family needs more than --time-limit (a page run)

    def seeds(self, work: Path) -> list:
        raise NotImplementedError

    def mutate(self, seed, rng: random.Random):
        """(a damaged input, a description of the damage)."""
        data, how = seed, []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            region = self.header(data) if rng.random() < 0.4 else None
            data, what = mutate_bytes(data, rng, region)
            how.append(("header:" if region else "") + what)
        return data, " + ".join(how)

    def header(self, data: bytes) -> tuple[int, int]:
        return 0, 128

    def load(self, item, work: Path):
        raise NotImplementedError

    @staticmethod
    def check(result) -> None:
        """Assert that what loaded is sane (shapes, ranges, finite values)."""

    @staticmethod
    def verdict(result) -> str:
        """'loaded', or 'refused' for a surface that does not raise on bad input but reports it (a page naming
        what it ignored, a job file listed as a failed job): the tally counts it with the refusals."""
        return "loaded"


class Images(Family):
    name = "images"

    def seeds(self, work):
        import cv2

        rng = np.random.default_rng(0)
        out = []
        for ext, dtype, channels in [(".png", np.uint8, 3), (".png", np.uint16, 1), (".png", np.uint8, 4), (".png", np.uint16, 3),
                                     (".jpg", np.uint8, 3), (".jpg", np.uint8, 1), (".bmp", np.uint8, 3), (".tiff", np.uint16, 3),
                                     (".webp", np.uint8, 3)]:
            h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
            pixels = rng.integers(0, np.iinfo(dtype).max, (h, w, channels), endpoint=True).astype(dtype)
            out.append(cv2.imencode(ext, pixels.squeeze(-1) if channels == 1 else pixels)[1].tobytes())
        return out

    def header(self, data):
        return 0, min(len(data), 96)

    def load(self, data, work):
        from jpq_core.data.stereo_files import decode_image

        return decode_image(data, "upload.png", max_pixels=400 if len(data) % 2 else None)

    @staticmethod
    def check(img):
        assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 1
        assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


class GroundTruth(Family):
    name = "ground truth"

    def seeds(self, work):
        import cv2

        rng = np.random.default_rng(1)
        values = rng.uniform(0, 60, (24, 30))
        values[0, :3] = [np.inf, np.nan, -1]
        out = []
        for dtype in ["<f4", ">f8", "<f2", "<i2", "<u2", "<i8"]:
            f = io.BytesIO()
            np.save(f, np.nan_to_num(values, posinf=0).astype(dtype) if dtype[1] in "iu" else values.astype(dtype))
            out.append(f.getvalue())
        f = io.BytesIO()
        np.lib.format.write_array(f, values.astype("<f4"), version=(2, 0))
        out.append(f.getvalue())
        out.append(b"Pf\n30 24\n-1.0\n" + np.flipud(values).astype("<f4").tobytes())
        out.append(b"Pf\n30 24\n1.0\n" + np.flipud(values).astype(">f4").tobytes())
        out.append(cv2.imencode(".png", np.clip(np.nan_to_num(values, posinf=0) * 256, 0, 65535).astype(np.uint16))[1].tobytes())
        return out

    def header(self, data):
        if data.startswith(b"\x93NUMPY") and len(data) >= 12:  # the header text: magic, version, length, then "{'descr': ...}"
            length = struct.unpack("<H", data[8:10])[0] if data[6:7] == b"\x01" else struct.unpack("<I", data[8:12])[0]
            return 6, min(len(data), 12 + length)
        return 0, min(len(data), 32)

    def load(self, data, work):
        from jpq_core.data.stereo_files import decode_disparity

        return decode_disparity(data, "gt.npy")

    @staticmethod
    def check(disp):
        assert disp.dtype == np.float32 and disp.ndim == 2
        finite = np.isfinite(disp)
        assert finite.any() and (disp[finite] >= 0).all() and np.isposinf(disp[~finite]).all()


def _safetensors_header(data: bytes) -> tuple[int, int]:
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    return 0, min(len(data), 8 + n)


class Checkpoints(Family):
    """(kind, weights bytes, sidecar bytes); kind: 'plain' (load_network) or 'compressed' (load_compressed)."""
    name = "checkpoints"

    def seeds(self, work):
        import torch

        from jpq_core.checkpoints import save_checkpoint
        from jpq_core.compressed import add_activation_quantizers, attach
        from jpq_core.layers import prunable_layers
        from jpq_core.models import build_network
        from jpq_core.pipeline import CompressionConfig, save_compressed
        from jpq_core.pruning import make_masks

        torch.manual_seed(0)
        net = build_network("resnet20").eval()
        save_checkpoint(net, work / "plain.safetensors", {"config": {"network": "resnet20", "architecture": {}}})
        torch.save(net.state_dict(), work / "plain.pt")
        layers = prunable_layers(net)
        masks = make_masks({k: l.weight.abs() for k, l in layers.items()}, {k: l.weight.shape for k, l in layers.items()}, 0.5)
        attach(net, masks, 4)
        add_activation_quantizers(net, 8)
        with torch.no_grad():
            net(torch.rand(4, 3, 32, 32))
        for layer in layers.values():
            layer.input_quantizer.finish_calibration()
        report = {"network": "resnet20", "config": asdict(CompressionConfig(network="resnet20")), "metrics": {}, "sparsity": 0.5}
        save_compressed(net, work / "comp.safetensors", report)
        side = (work / "plain.json").read_bytes()
        return [("plain", (work / "plain.safetensors").read_bytes(), side), ("plain", (work / "plain.pt").read_bytes(), side),
                ("compressed", (work / "comp.safetensors").read_bytes(), (work / "comp.json").read_bytes())]

    def mutate(self, seed, rng):
        kind, weights, side = seed
        target = rng.random()
        if target < 0.5:  # the weights
            if weights[:2] == b"PK" and rng.random() < 0.3:  # the zip's central directory: sizes, offsets, versions
                cd = weights.rfind(b"PK\x01\x02", 0, weights.rfind(b"PK\x05\x06"))
                start = weights.find(b"PK\x01\x02")
                data, how = mutate_bytes(weights, rng, (start if cd > 0 else 0, len(weights)))
                return (kind, data, side), "weights central directory:" + how
            data, how = Family.mutate(self, weights, rng)
            return (kind, data, side), "weights " + how
        if target < 0.53:  # a nest deeper than any JSON parser recurses
            return (kind, weights, b'{"config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "sidecar deep-nest"
        if target < 0.8:  # the sidecar's JSON, structurally
            obj = json.loads(side)
            for _ in range(rng.randint(1, 2)):
                obj = mutate_json(obj, rng)
            return (kind, weights, dumps(obj)), "sidecar json-edit"
        data, how = Family.mutate(self, side, rng)
        return (kind, weights, data), "sidecar " + how

    def header(self, data):
        return _safetensors_header(data) if data[:2] != b"PK" else (0, 128)

    def load(self, item, work):
        from jpq_core.models import load_network
        from jpq_core.pipeline import load_compressed

        kind, weights, side = item
        path = work / ("c.safetensors" if weights[:2] != b"PK" else "c.pt")
        path.write_bytes(weights)
        path.with_suffix(".json").write_bytes(side)
        return load_network("resnet20", path) if kind == "plain" else load_compressed(path)[0]

    @staticmethod
    def check(net):
        import torch

        assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


class Programs(Family):
    name = "engine programs"

    def seeds(self, work):
        import torch
        import torch.nn as nn

        from jpq_core.compressed import attach
        from jpq_core.engine import compile_network

        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, groups=2)).eval()
        masks = {n: torch.rand_like(m.weight) > 0.8 for n, m in net.named_children() if isinstance(m, nn.Conv2d)}
        attach(net, masks, 4)
        return [compile_network(net).to_bytes(), compile_network(nn.Sequential(nn.Conv2d(1, 2, 1)).eval()).to_bytes()]

    def mutate(self, seed, rng):
        if rng.random() < 0.3:  # the op list (JSON in the safetensors metadata), structurally
            lo, hi = _safetensors_header(seed)
            header = json.loads(seed[8:hi])
            program = mutate_json(json.loads(header["__metadata__"]["program"]), rng)
            header["__metadata__"]["program"] = dumps(program).decode()
            text = json.dumps(header).encode()
            text += b" " * (-len(text) % 8)
            return struct.pack("<Q", len(text)) + text + seed[hi:], "program json-edit"
        return Family.mutate(self, seed, rng)

    def header(self, data):
        return _safetensors_header(data)

    def load(self, data, work):
        from jpq_core.engine.program import load_program

        path = work / "p.jpqe"
        path.write_bytes(data)
        return load_program(path)


# ---- surfaces that report instead of raising: links, job files, run states; parameters of recovery and export ----

ODD_TEXTS = ["", " ", "nan", "inf", "-inf", "1e400", "-0", "0.9999999", "1", "9" * 5000, "float", "FLOAT", "True",
             "true ", "taylor-abs", "  8 ", "\u0668", "0x10", "1_0", "8.0", "stereo\x00", "\u202eoeretS",
             "'; DROP TABLE--", "%00", "{}", "[]", "resnet20", "magnitude", "0.9", "4", "bn", "obc+bn", "auto",
             "uniform", "channel", "0" * 40, "f" * 40]
TEXT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\t\n\u00e9\u0661\u202e\x00\U0001F600"


def random_text(rng: random.Random) -> str:
    """A query-parameter value as a link may carry it: a near miss of a real value, or random characters."""
    if rng.random() < 0.3:
        return rng.choice(ODD_TEXTS)
    return "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(0, 30)))


def random_link(rng: random.Random, settings: list[str], fixed: dict | None = None) -> dict:
    """Query parameters of a link edited by hand: settings and unknown keys with random values (sometimes
    repeated, as ?a=1&a=2 arrives as a list), plus the `fixed` ones (e.g. a network that keeps a page cheap)."""
    keys = settings + ["job_owner", "foo", "", "Network", "sparsity ", "x" * 300, "\x00", "embed"]
    link = {rng.choice(keys) if rng.random() < 0.8 else random_text(rng):
            random_text(rng) if rng.random() < 0.9 else [random_text(rng), random_text(rng)]
            for _ in range(rng.randint(1, 8))}
    return {**link, **(fixed or {})}


class Links(Family):
    """The Explore page (Streamlit's AppTest, in this process) opened with random query parameters: it opens
    without an exception and shows, as a warning, every notice `read_link` gives (each names what it ignored).
    'refused' in the tally: the page named something it ignored."""
    name = "links"
    page = "app.py"
    time_limit = 600  # the first page of a process loads networks and scores (minutes on a loaded machine)
    # A stereo page per input would take minutes, and so would auto recovery for every new configuration: links
    # keep these (fuzzed with the others in a `1 - fixed_share` of the inputs; the suite keeps them always).
    fixed = {"network": "resnet20", "recovery": "none"}
    fixed_share = 0.8

    def seeds(self, work):
        from dataclasses import fields as dataclass_fields

        from jpq_core.live import LiveConfig

        self.settings = [f.name for f in dataclass_fields(LiveConfig)]
        return [{**self.fixed, "criterion": "magnitude", "sparsity": "0.5"}]

    def mutate(self, seed, rng):
        link = random_link(rng, self.settings, self.fixed if rng.random() < self.fixed_share else None)
        return link, f"{len(link)} parameters"

    def load(self, link, work):
        from streamlit.testing.v1 import AppTest

        from jpq_core.links import read_link

        at = AppTest.from_file(str(ROOT / self.page), default_timeout=600)
        at.query_params.update(link)
        at.run()
        if at.exception:
            raise AssertionError(f"the page raised: {at.exception[0].value[:300]}")
        shown = [w.value for w in at.warning]
        missing = [n for n in read_link(link)[1] if n not in shown]
        assert not missing, f"not shown: {missing[:3]}"
        for message in [e.value for e in at.error] + shown:
            assert "Traceback" not in message and message.strip(), message[:300]
        return read_link(link)[1]

    @staticmethod
    def verdict(notices):
        return "refused" if notices else "loaded"


def _job_record(owner: str, status: str, created: float) -> dict:
    from jpq_core.jobs import finetune_config
    from jpq_core.pipeline import CompressionConfig

    config = finetune_config(CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, abits=8,
                                               calibration_batches=1), 20)
    record = {"id": "target", "owner": owner, "config": asdict(config), "created": created, "status": status,
              "ray_address": None, "pid": None, "started": None, "finished": None, "resumes": 0, "row_id": None,
              "error": None, "note": None}
    if status == "done":
        record.update(started=created + 1, finished=created + 60, row_id="r" * 12, note="about 0.5 s per step")
    if status == "running":
        record.update(pid=2**22 - 1, started=created + 1)
    return record


class JobFiles(Family):
    """The fine-tuning job queue's folder with one job file damaged (bytes or JSON structure) and its progress
    file damaged, beside an intact job of another owner: `poll`, `jobs_of` and `progress` raise nothing, the
    intact job is listed unchanged, and the damaged one is either read as a job or listed as a failed job (to
    the owner it names) with a message naming its file. 'refused' in the tally: listed as a damaged job."""
    name = "job files"
    owner = "fuzzowner0123456789"

    def seeds(self, work):
        now = time.time()
        progress = dumps({"stage": "fine-tuning", "done": 5, "total": 20, "loss": 0.5, "seconds_per_step": 0.3, "time": now})
        return [(dumps(_job_record(self.owner, status, now)), progress) for status in ("queued", "running", "done", "failed")]

    def mutate(self, seed, rng):
        job, progress = seed
        if rng.random() < 0.3:
            obj = mutate_json(json.loads(progress), rng)
            return (job, dumps(obj)), "progress json-edit"
        if rng.random() < 0.5:
            obj = json.loads(job)
            for _ in range(rng.randint(1, 2)):
                obj = mutate_json(obj, rng)
            try:
                return (dumps(obj), progress), "job json-edit"
            except RecursionError:  # two nests stacked: deeper than json writes; as bytes, deeper still
                return (b'{"id": "target", "config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", progress), "job deep-nest"
        data, how = Family.mutate(self, job, rng)
        return (data, progress), "job " + how

    def load(self, item, work):
        import shutil

        from jpq_core.jobs import KEEP_FINISHED_S, Job, JobQueue

        class Queue(JobQueue):
            def _command(self, job):  # a queued job's process: started, ends at once (then continued, then failed)
                return ["true"]

        job_bytes, progress_bytes = item
        table = work / "queue" / "sweeps.jsonl"
        shutil.rmtree(table.parent, ignore_errors=True)
        folder = table.parent / "jobs"
        folder.mkdir(parents=True)
        other = {**_job_record("anotherowner0123456789", "done", time.time() - 100), "id": "other"}
        (folder / "other.job.json").write_bytes(dumps(other))
        (folder / "target.job.json").write_bytes(job_bytes)
        (folder / "target.progress.json").write_bytes(progress_bytes)
        queue = Queue(table, slots=1)
        try:  # what the file says before the poll acts on it
            before = queue._read(folder / "target.job.json")
        except JPQError:
            before = None
        jobs, problems = queue.poll()
        mine, _ = queue.jobs_of(self.owner)
        for job in jobs:
            progress = queue.progress(job)
            assert progress is None or 0 <= progress.fraction <= 1
        by_id = {j.id: j for j in jobs}
        assert Job(**other) == by_id["other"] and json.loads((folder / "other.job.json").read_text()) == other, \
            "the intact job changed"
        if "target" not in by_id:  # only a finished job older than a day is cleared, with every file it had
            assert before is not None and not before.active and time.time() - (before.finished or before.created) > KEEP_FINISHED_S
            assert not list(folder.glob("target.*")) and set(by_id) == {"other"}, sorted(by_id)
            return before
        assert set(by_id) == {"other", "target"}, sorted(by_id)
        target = by_id["target"]
        if target.damaged:
            assert target.status == "failed" and "target.job.json: a damaged job file" in target.error
            assert any(p.startswith("target.job.json: a damaged job file") for p in problems), problems
            if target.owner:  # its owner sees it and can dismiss it
                assert target in mine or target.owner != self.owner
                queue.cancel(target.owner, "target")
                assert not (folder / "target.job.json").exists() and (folder / "other.job.json").exists()
        else:
            assert not problems, problems
        return target

    @staticmethod
    def verdict(job):
        return "refused" if job.damaged else "loaded"


class RunStates(Family):
    """A page job's run state (`pipeline.RunState`'s file), damaged: `jobs.unreadable_state` says why it cannot
    be continued from (the job then starts afresh), or it loads as a state. 'refused': set aside."""
    name = "run states"

    def seeds(self, work):
        import torch
        import torch.nn as nn

        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        net(torch.rand(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        path = work / "seed.state.pt"
        torch.save({"key": "{}", "stage": 1, "step": 10, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "elapsed": 3.5}, path)
        return [path.read_bytes()]

    def load(self, data, work):
        from jpq_core.jobs import unreadable_state

        path = work / "job.state.pt"
        path.write_bytes(data)
        damage = unreadable_state(path)
        assert isinstance(damage, str) and len(damage) < 200
        if damage:
            raise JPQError(damage)
        return path

    @staticmethod
    def check(path):
        import torch

        assert isinstance(torch.load(path, weights_only=True, map_location="cpu"), dict)  # as RunState reads it


class RecoveryAndExport(Family):
    """Parameters a user types: recovery methods and calibration sample counts (`CompressionConfig.check`,
    `recovery.calibration_inputs`), and `python -m jpq_core export` arguments that are checked before any
    work (batch, height, width, the output path, the form). Each is accepted or refused with JPQError (or
    argparse's exit 2 with its message); the export writes no file when refused."""
    name = "recovery and export"
    good_export_share = 0.1  # inputs with a good path, which compress and export (the suite's quick run: none)
    NUMBERS = ["0", "-1", "1", "2", "8", "31", "32", "512", "100000", "99999999999999999999", "1e3", "x", "", "nan", "8.5"]
    METHODS = ["lsq", "bn", "obc", "lsq+bn", "obc+bn", "none", "auto", "lsq+obc", "LSQ", "lsq+", "+", "foo", "", "bn+bn"]

    def seeds(self, work):
        return [("recovery", "lsq+bn", 64, "resnet20")]  # a good export: tests/test_onnx_export.py

    def mutate(self, seed, rng):
        if rng.random() < 0.5:
            count = rng.choice([rng.choice(self.NUMBERS), rng.randint(-5, 2**40), None, True, 3.5, "8"])
            count = int(count) if isinstance(count, str) and count.lstrip("-").isdigit() and rng.random() < 0.7 else count
            return ("recovery", rng.choice(self.METHODS + [random_text(rng)]), count,
                    rng.choice(["resnet20", "stereo"])), "recovery"
        args = []
        for option in ("--batch", "--height", "--width"):
            if rng.random() < 0.5:
                args += [option, rng.choice(self.NUMBERS + [random_text(rng)])]
        if rng.random() < 0.3:
            args += ["--form", rng.choice(["float", "qdq", "int8", "", random_text(rng)])]
        unwritable = ["read-only/net.onnx"] if os.geteuid() != 0 else []  # root writes there (and exports for minutes)
        target = rng.choice(["missing-folder/net.onnx", "a-file/net.onnx", "a-folder", "", "read-only", "\x00net.onnx",
                             "n" * 300 + ".onnx", *unwritable])
        target = "net.onnx" if rng.random() < self.good_export_share else target  # the export runs (about a minute)
        return ("export", args, target), "export " + " ".join(args[::2])

    def load(self, item, work):
        if item[0] == "recovery":
            return self._recovery(*item[1:])
        return self._export(item[1], item[2], work)

    @staticmethod
    def _recovery(method, count, network):
        from jpq_core.pipeline import CompressionConfig
        from jpq_core.recovery import calibration_inputs

        config = CompressionConfig(network=network, recovery=method, recovery_samples=count).check()
        if config.recovery != "none" and config.recovery_samples is not None:
            task = RecoveryAndExport._task(network)
            if network == "resnet20" or config.recovery_samples <= 16:  # stereo crops take 0.5 s each to render
                inputs = calibration_inputs(task, config.recovery_samples)
                assert len(inputs[0]) == config.recovery_samples
        return config

    _tasks: dict = {}

    @staticmethod
    def _task(network):
        from jpq_core.tasks import make_task

        if network not in RecoveryAndExport._tasks:
            RecoveryAndExport._tasks[network] = make_task(network, "digits" if network == "resnet20" else "middlebury")
        return RecoveryAndExport._tasks[network]

    @staticmethod
    def _export(args, target, work):
        import contextlib
        import stat

        from jpq_core.cli import main

        for folder in ("read-only", "a-folder"):
            (work / folder).mkdir(exist_ok=True)
        (work / "a-file").write_text("")
        (work / "read-only").chmod(stat.S_IRUSR | stat.S_IXUSR)
        before = set(os.listdir(work))
        out = io.StringIO()
        argv = ["export", "--onnx", str(work / target) if target else "", "--network", "resnet20", "--criterion",
                "magnitude", "--sparsity", "0.5", "--calibration-batches", "1", "--threads", "1", "--json", *args]
        try:
            with contextlib.redirect_stderr(out), contextlib.redirect_stdout(io.StringIO()):
                status = main(argv)
        except SystemExit as exc:  # argparse: a value of the wrong form, with its message
            assert exc.code == 2 and "error:" in out.getvalue(), out.getvalue()[-300:]
            raise JPQError(out.getvalue().strip().splitlines()[-1]) from None
        finally:
            (work / "read-only").chmod(stat.S_IRWXU)
        if status == 2:
            message = out.getvalue().strip()
            assert message.startswith("error: ") and "\n" not in message, message[-300:]
            assert not set(os.listdir(work)) - before and not os.listdir(work / "read-only"), "a file was left"
            raise JPQError(message)
        assert status == 0, out.getvalue()[-300:]
        return work / target


FAMILIES = {f.name.replace(" ", "-"): f for f in (Images(), GroundTruth(), Checkpoints(), Programs())}
SURFACES = {f.name.replace(" ", "-"): f for f in (Links(), JobFiles(), RunStates(), RecoveryAndExport())}
ALL = {**FAMILIES, **SURFACES}


# ---- the run ---------------------------------------------------------------------------------------------------

def _alarm(signum, frame):
    raise Hang()


def attempt(family: Family, item, work: Path, time_limit: float) -> tuple[str, BaseException | None]:
    """'loaded', 'refused' or 'failed' (with the exception) for one input."""
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        result = family.load(item, work)
        family.check(result)
        return family.verdict(result), None
    except JPQError:
        return "refused", None
    except (Exception, Hang) as exc:  # noqa: BLE001 - what this script is looking for
        return "failed", exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def save_failure(out: Path, family: Family, index: int, item, how: str, exc: BaseException) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{family.name.replace(' ', '-')}-{index}.json"
    parts = list(item) if isinstance(item, tuple) else [item]
    path.write_text(json.dumps({"family": family.name, "mutation": how, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                                "traceback": "".join(traceback.format_exception(exc))[-3000:],
                                "parts": [{"hex": p.hex()} if isinstance(p, bytes) else p for p in parts]}, indent=1))
    return path


def run(names: list[str], inputs: int, seed: int, out: Path, time_limit: float = 20.0, progress=True) -> dict:
    """Fuzz the named families with `inputs` mutated inputs each; {family: Counter(inputs, loaded, refused, failed, ...)}."""
    signal.signal(signal.SIGALRM, _alarm)
    tallies = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            family = ALL[name]
            seeds = family.seeds(work)
            for s in seeds:  # every seed is valid: the loaders must take it
                status, exc = attempt(family, s, work, family.time_limit or time_limit)
                assert status == "loaded", f"{family.name}: a valid seed was not loaded ({status}: {exc!r})"
            rng = random.Random(f"{seed}-{name}")
            tally, errors, slowest = Counter(), Counter(), (0.0, "")
            start = time.perf_counter()
            for i in range(inputs):
                item, how = family.mutate(rng.choice(seeds), rng)
                t0 = time.perf_counter()
                status, exc = attempt(family, item, work, family.time_limit or time_limit)
                took = time.perf_counter() - t0
                slowest = max(slowest, (took, how))
                tally["inputs"] += 1
                tally[status] += 1
                if exc is not None:
                    kind = f"{type(exc).__name__}: {str(exc)[:80]}"
                    errors[kind] += 1
                    saved = save_failure(out, family, i, item, how, exc)
                    if errors[kind] <= 3:  # the first few of each kind; all are saved
                        print(f"  FAILURE {family.name} #{i} ({how}): {type(exc).__name__}: {str(exc)[:120]} -> {saved}", flush=True)
                if progress and (i + 1) % 1000 == 0:  # the tally so far: a run stopped early still has its figures
                    print(f"  {family.name}: {i + 1}/{inputs}: {tally['loaded']} loaded, {tally['refused']} refused, "
                          f"{tally['failed']} failures ({time.perf_counter() - start:.0f} s)", flush=True)
            tally["seconds"] = round(time.perf_counter() - start)
            tallies[family.name] = {**tally, "failures by type": dict(errors),
                                    "slowest input": {"seconds": round(slowest[0], 2), "mutation": slowest[1]}}
            print(f"{family.name}: {tally['inputs']} inputs, {tally['loaded']} loaded and checked, {tally['refused']} refused "
                  f"with JPQError, {tally['failed']} failures ({tally['seconds']} s; slowest input {slowest[0]:.2f} s)", flush=True)
    return tallies


def replay(path: Path) -> None:
    record = json.loads(path.read_text())
    family = next(f for f in ALL.values() if f.name == record["family"])
    parts = [bytes.fromhex(p["hex"]) if isinstance(p, dict) else p for p in record["parts"]]
    item = tuple(parts) if len(parts) > 1 else parts[0]
    with tempfile.TemporaryDirectory() as tmp:
        family.load(item, Path(tmp))  # raises as it did
    print("loaded without error")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="mutated inputs per family (default 10,000)")
    parser.add_argument("--families", nargs="+", choices=list(ALL), default=list(FAMILIES),
                        help="default: the four file loaders; the surfaces (links, job-files, run-states, "
                             "recovery-and-export) are named here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="where failing inputs are saved")
    parser.add_argument("--json", type=Path, help="also write the tally here")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per input before it counts as a hang")
    parser.add_argument("--max-memory-gib", type=float, default=8.0, help="address-space limit, so a decoder that "
                        "believes an absurd header fails here instead of taking the machine's memory")
    parser.add_argument("--replay", type=Path, help="load one saved failing input again, showing its traceback")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.replay:
        replay(args.replay)
        return 0
    limit = int(args.max_memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    tallies = run(args.families, args.inputs, args.seed, args.out, args.time_limit)
    total = Counter()
    for t in tallies.values():
        total.update({k: v for k, v in t.items() if isinstance(v, int)})
    print(f"all: {total['inputs']} inputs, {total['loaded']} loaded, {total['refused']} refused, {total['failed']} failures")
    if args.json:
        args.json.write_text(json.dumps({"inputs_per_family": args.inputs, "seed": args.seed, "families": tallies}, indent=2) + "\n")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
