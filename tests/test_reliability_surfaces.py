"""Fuzzed surfaces that are not files a user uploads (issue 22): the fine-tuning job queue's files, a job's run
state, recovery's calibration parameters and the ONNX export's arguments. The quick form of scripts/fuzz.py's
job-files, run-states and recovery-and-export families (the script runs thousands; figures in
docs/reliability.md), plus the messages themselves."""

import json
import os
import random
import time

import pytest

from jpq_core.errors import JPQError
from jpq_core.jobs import JobQueue, new_owner, unreadable_state
from jpq_core.pipeline import CompressionConfig

EXAMPLES = int(os.environ.get("JPQ_FUZZ_EXAMPLES", "40"))


@pytest.mark.parametrize("family, count", [("job-files", EXAMPLES * 5), ("run-states", EXAMPLES * 5),
                                           ("recovery-and-export", EXAMPLES // 2)])
def test_fuzzed_surfaces_never_raise_a_foreign_exception(fuzz, tmp_path, monkeypatch, family, count):
    monkeypatch.setattr(fuzz.ALL["recovery-and-export"], "good_export_share", 0.0)  # a good export takes a minute
    seed = random.randrange(2**32)
    tally = fuzz.run([family], count, seed, tmp_path / "failures", progress=False)[fuzz.ALL[family].name]
    assert tally["inputs"] == count
    assert tally.get("failed", 0) == 0, f"seed {seed}: {tally['failures by type']} (inputs saved in {tmp_path / 'failures'})"


def test_a_damaged_job_file_is_a_failed_job_of_its_owner_and_can_be_dismissed(fuzz, tmp_path):
    queue = JobQueue(tmp_path / "sweeps.jsonl")
    queue.folder.mkdir(parents=True)
    owner = new_owner()
    record = {**fuzz._job_record(owner, "running", time.time()), "id": "target", "resumes": "3"}  # a TypeError in poll before
    (queue.folder / "target.job.json").write_text(json.dumps(record))
    escape = {**fuzz._job_record(owner, "done", time.time()), "id": "../escape"}  # would point cancel at other files
    (queue.folder / "escape.job.json").write_text(json.dumps(escape))
    (queue.folder / "other.job.json").write_text(json.dumps({**fuzz._job_record(new_owner(), "done", time.time()), "id": "other"}))
    mine, problems = queue.jobs_of(owner)
    assert sorted((j.id, j.status, j.damaged) for j in mine) == [("escape", "failed", True), ("target", "failed", True)]
    target = next(j for j in mine if j.id == "target")
    assert target.error.startswith("target.job.json: a damaged job file (ValueError: wrong type or value of resumes)")
    assert "can dismiss it" in target.error and len(problems) == 2
    assert [j.id for j in queue.poll()[0] if not j.damaged] == ["other"]  # the intact job is untouched
    with pytest.raises(JPQError, match="damaged job file"):
        queue.cancel(new_owner(), "target")  # not yours
    queue.cancel(owner, "target")
    assert not (queue.folder / "target.job.json").exists() and (queue.folder / "other.job.json").exists()


def test_a_progress_file_with_wrong_types_reads_as_no_progress(fuzz, tmp_path):
    queue = JobQueue(tmp_path / "sweeps.jsonl")
    queue.folder.mkdir(parents=True)
    job = queue._read_all()[0]  # none: make one through its file
    record = {**fuzz._job_record(new_owner(), "done", time.time()), "id": "a"}
    (queue.folder / "a.job.json").write_text(json.dumps(record))
    job = queue._read_all()[0][0]
    for bad in ({"done": "5"}, {"loss": "x"}, {"total": -1}, {"seconds_per_step": float("nan")}, {"stage": None}):
        good = {"stage": "fine-tuning", "done": 5, "total": 20, "loss": 0.5, "seconds_per_step": 0.3, "time": 1.0}
        (queue.folder / "a.progress.json").write_text(json.dumps({**good, **bad}))
        assert queue.progress(job) is None, bad
    (queue.folder / "a.progress.json").write_text(json.dumps(good))
    assert queue.progress(job).fraction == 0.25


def test_a_damaged_run_state_is_named_so_the_job_starts_afresh(tmp_path):
    path = tmp_path / "j.state.pt"
    assert unreadable_state(path) == ""  # none yet
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert unreadable_state(path)
    import torch

    torch.save({"key": "{}", "stage": 1}, path)
    assert unreadable_state(path) == "it lacks elapsed, model, optimizer, step"


@pytest.mark.parametrize("samples, message", [(0, "from 1 to 10,000, got 0"), (-3, "got -3"), (2**40, "from 1 to 10,000"),
                                              ("8", "got 8"), (True, "got True")])
def test_recovery_samples_out_of_range_are_refused_before_any_work(samples, message):
    with pytest.raises(JPQError, match=message):
        CompressionConfig(network="resnet20", recovery="lsq", recovery_samples=samples).check()


def test_more_stereo_calibration_samples_than_the_limit_are_refused_before_rendering():
    from jpq_core.recovery import MAX_SAMPLES, calibration_inputs

    class Stereo:
        name, data_key = "stereo", "synthetic"

    with pytest.raises(JPQError, match=f"at most {MAX_SAMPLES['stereo']} calibration samples for stereo"):
        calibration_inputs(Stereo(), MAX_SAMPLES["stereo"] + 1)


def test_unknown_recovery_methods_are_named():
    with pytest.raises(JPQError, match="unknown recovery method tea; choose from"):
        CompressionConfig(network="resnet20", recovery="lsq+tea").check()


@pytest.mark.parametrize("target, extra, message", [
    ("missing/net.onnx", [], "the folder .*missing does not exist; create it first"),
    pytest.param("read-only/net.onnx", [], "is not writable; choose another one",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")),
    ("a-file/net.onnx", [], "a-file is a file, not a folder"),
    ("", [], "is not a file name"),
    (".", [], "is a folder"),
    ("net.onnx", ["--batch", "0"], "--batch must be 1 or more, got 0"),
    ("net.onnx", ["--height", "100000", "--width", "100000"], "more than 40,000,000 input pixels"),
])
def test_export_refuses_a_bad_target_before_compressing(tmp_path, capsys, target, extra, message):
    from jpq_core.cli import main

    (tmp_path / "read-only").mkdir()
    (tmp_path / "read-only").chmod(0o500)
    (tmp_path / "a-file").write_text("")
    path = "" if target == "" else str(tmp_path / target)
    start = time.perf_counter()
    try:
        status = main(["export", "--onnx", path, "--network", "resnet20", *extra])
    finally:
        (tmp_path / "read-only").chmod(0o700)
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("error: --") and len(error.strip().splitlines()) == 1, error
    assert __import__("re").search(message, error), error
    assert time.perf_counter() - start < 5  # refused before compression
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-file", "read-only"]


def test_export_of_the_wrong_form_is_an_argparse_error(capsys):
    from jpq_core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--onnx", "x.onnx", "--form", "int8"])
    assert exit_.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
