"""The fine-tuning job queue the Explore page starts jobs on (jpq_core/jobs.py): order and slots, progress, the
row a finished job adds (once), cancel, kills and restarts, damaged job files, owners; and the page's view of it.

Jobs that only need to occupy a slot run a sleeping process instead of fine-tuning (`SleepingQueue`); the others
fine-tune ResNet-20 on digits for a few steps, in a real process, as the page does.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace

import pytest

from jpq_core.errors import JPQError
from jpq_core.jobs import MAX_RESUMES, JobQueue, budgets, finetune_config, new_owner
from jpq_core.pipeline import CompressionConfig
from jpq_core.sweeps import read_rows

TINY = dict(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, abits=8, calibration_batches=1)
TIMEOUT_S = 240  # a job of a few steps: ~10 s to start a process and load the network on a busy 2-core machine


def tiny(steps: int, **changes) -> CompressionConfig:
    return finetune_config(CompressionConfig(**{**TINY, **changes}), steps)


class SleepingQueue(JobQueue):
    """A queue whose jobs' processes only sleep: they hold a slot (and the job's lock) until killed."""

    def _command(self, job):
        return [sys.executable, "-c", "import time; time.sleep(600)"]


class CrashingQueue(JobQueue):
    """A queue whose jobs' processes die at once, saying why."""

    def _command(self, job):
        return [sys.executable, "-c", "import sys; print('out of memory, say'); sys.exit(9)"]


def stop_every_job(queue: JobQueue) -> None:
    """Cancel whatever the test left (queued first, so that nothing new starts): no process outlives a test."""
    jobs, _ = queue._read_all()
    for job in sorted(jobs, key=lambda j: j.status == "running"):
        if not job.damaged:  # a damaged file's stand-in has no process; the scratch folder goes with the test
            queue.cancel(job.owner, job.id)


@pytest.fixture
def queues(tmp_path):
    """make(kind=JobQueue, slots=None) -> a queue beside a scratch results table; every job stopped afterwards."""
    made = []

    def make(kind=JobQueue, slots=None):
        made.append(kind(tmp_path / "results" / "sweeps.jsonl", slots))
        return made[-1]

    yield make
    for queue in made:
        stop_every_job(queue)


def wait_for(queue: JobQueue, owner: str, job_id: str, done, seen=None):
    """Poll as the page does until done(job) holds; `seen` collects the progress reports seen on the way."""
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        job = next(j for j in queue.jobs_of(owner)[0] if j.id == job_id)
        progress = queue.progress(job)
        if seen is not None and progress is not None:
            seen.append(progress)
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {TIMEOUT_S} s: {job}, log: "
                         f"{queue._file(job_id, 'log').read_text()[-2000:]}")


def stage(queue: JobQueue, job) -> str:
    progress = queue.progress(job)
    return progress.stage if progress else ""


def files_of(queue: JobQueue, job_id: str) -> list[str]:
    return sorted(p.name for p in queue.folder.glob(f"*{job_id}*"))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---- the queue, with sleeping processes ---------------------------------------------------------------------


def test_jobs_run_one_per_slot_and_start_in_the_order_they_came(queues):
    assert JobQueue("t.jsonl").slots == os.cpu_count()  # the page's queue: one running job per core
    queue = queues(SleepingQueue, slots=1)
    owner = new_owner()
    first, second, third = (queue.submit(owner, tiny(10, sparsity=s)) for s in (0.3, 0.5, 0.7))
    jobs = {j.id: j for j in queue.jobs_of(owner)[0]}
    assert [jobs[j.id].status for j in (first, second, third)] == ["running", "queued", "queued"]
    assert [jobs[j.id].position for j in (second, third)] == [1, 2]
    queue.cancel(owner, first.id)  # its slot frees: the next in line starts, not the newest
    jobs = {j.id: j for j in queue.jobs_of(owner)[0]}
    assert first.id not in jobs
    assert (jobs[second.id].status, jobs[third.id].status, jobs[third.id].position) == ("running", "queued", 1)

    two = queues(SleepingQueue, slots=2)  # the same jobs seen by a queue allowed two at a time
    assert sorted(j.status for j in two.jobs_of(owner)[0]) == ["running", "running"]


def test_another_owners_jobs_are_neither_listed_nor_cancelled(queues):
    queue = queues(SleepingQueue, slots=1)
    alice, bob = new_owner(), new_owner()
    job = queue.submit(alice, tiny(10))
    assert [j.id for j in queue.jobs_of(alice)[0]] == [job.id]
    assert queue.jobs_of(bob)[0] == []
    with pytest.raises(JPQError, match="another session"):
        queue.cancel(bob, job.id)
    assert [j.status for j in queue.jobs_of(alice)[0]] == ["running"]
    with pytest.raises(JPQError, match="already fine-tuning this configuration"):
        queue.submit(alice, tiny(10))


def test_damaged_job_files_are_named_and_the_queue_goes_on(queues):
    queue = queues(SleepingQueue, slots=1)
    queue.folder.mkdir(parents=True)
    (queue.folder / "c0ffee.job.json").write_text('{"id": "c0ffee", "owner": "abc", "conf')  # cut off mid-write
    (queue.folder / "bad.job.json").write_text('{"id": "bad", "owner": 3, "config": [], "created": "x"}')
    (queue.folder / "binary.job.json").write_bytes(b"\xff\xfe\x00garbage")
    owner = new_owner()
    job = queue.submit(owner, tiny(10))
    jobs, problems = queue.jobs_of(owner)
    assert [j.status for j in jobs] == ["running"]
    assert len(problems) == 3 and all("a damaged job file" in p and "dismiss it" in p for p in problems)
    assert {p.split(":")[0].rsplit("/", 1)[-1] for p in problems} == {"c0ffee.job.json", "bad.job.json", "binary.job.json"}
    with pytest.raises(JPQError, match="damaged job file"):
        queue.cancel(owner, "c0ffee")
    queue.cancel(owner, job.id)


def test_a_job_whose_process_keeps_dying_is_resumed_a_few_times_then_reported(queues):
    queue = queues(CrashingQueue)
    owner = new_owner()
    job = queue.submit(owner, tiny(10))
    job = wait_for(queue, owner, job.id, lambda j: not j.active)
    assert job.status == "failed" and job.resumes == MAX_RESUMES
    assert f"stopped {MAX_RESUMES + 1} times" in job.error and "out of memory, say" in job.error


def test_bad_input_gets_a_clear_message(queues, monkeypatch):
    queue = queues(SleepingQueue)
    with pytest.raises(JPQError, match="owner token"):
        queue.submit("not a token", tiny(10))
    with pytest.raises(JPQError, match="whole number of steps"):
        tiny(0)
    with pytest.raises(JPQError, match="fine-tuning mode"):
        queue.submit(new_owner(), CompressionConfig(**TINY, finetune="none", steps=0))
    with pytest.raises(JPQError, match="unknown criterion|criterion"):
        finetune_config(CompressionConfig(**{**TINY, "criterion": "tea-leaves"}), 10)
    monkeypatch.setenv("JPQ_JOB_BUDGETS", "20,lots")
    with pytest.raises(JPQError, match="JPQ_JOB_BUDGETS"):
        budgets()
    monkeypatch.setenv("JPQ_JOB_BUDGETS", "20, 300")
    assert budgets() == (20, 300)


def test_the_link_keeps_a_job_token_and_names_a_bad_one():
    from jpq_core.links import read_link

    token = new_owner()
    assert read_link({"network": "resnet20", "job_owner": token})[1] == []
    notices = read_link({"network": "resnet20", "job_owner": "x'; DROP"})[1]
    assert len(notices) == 1 and "not a fine-tuning job token" in notices[0]


# ---- real fine-tuning ------------------------------------------------------------------------------------


def test_a_finished_job_adds_its_row_once_and_explore_finds_it(queues):
    from jpq_core.live import LiveConfig, matching_runs
    from jpq_core.report import load_results

    from jpq_core.sweeps import table_lock

    queue = queues()
    owner = new_owner()
    seen = []
    with table_lock(queue.table):  # a sweep writing the table: the finished job waits to add its row, and says so
        job = queue.submit(owner, tiny(12))
        wait_for(queue, owner, job.id, lambda j: stage(queue, j).startswith("waiting for the results table"), seen)
    job = wait_for(queue, owner, job.id, lambda j: not j.active, seen)
    assert job.status == "done", job.error
    steps = [p.done for p in seen if p.stage in ("fine-tuning", "evaluating")]
    assert len(set(steps)) >= 2 and steps == sorted(steps) and steps[-1] == 12  # the progress moved, up to the budget
    assert all(p.loss > 0 for p in seen if p.stage == "fine-tuning")
    assert any(p.eta_s is not None and p.eta_s > 0 for p in seen)

    rows, problems = read_rows(queue.table)
    assert problems == [] and [r["id"] for r in rows] == [job.row_id]
    assert (rows[0]["finetune"], rows[0]["budget"], rows[0]["grid"]) == ("distill", 12, "page")
    results = load_results(queue.table)[0]
    runs = matching_runs(results, LiveConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, abits=8))
    assert list(runs["id"]) == [job.row_id]
    assert runs.iloc[0]["checkpoint"].endswith(f"{job.row_id}.safetensors")  # its network, beside the table
    assert files_of(queue, job.id) == [f"{job.id}.job.json", f"{job.id}.lock", f"{job.id}.log"]  # no state left
    with pytest.raises(JPQError, match="already in the results table"):
        queue.submit(owner, tiny(12))


def _wait_for_a_saved_state(queue, owner, job):
    """Until the job is in its second fine-tuning stage (the first one's end is saved in its state file)."""

    def in_second_stage(j):
        progress = queue.progress(j)
        return queue._file(j.id, "state.pt").exists() and progress is not None and progress.done > j.budget // 2

    return wait_for(queue, owner, job.id, in_second_stage)


def test_cancel_leaves_no_row_no_state_and_no_process(queues):
    queue = queues()
    owner = new_owner()
    job = _wait_for_a_saved_state(queue, owner, queue.submit(owner, tiny(8)))
    queue.cancel(owner, job.id)
    assert gone(job.pid)
    assert files_of(queue, job.id) == []
    assert read_rows(queue.table)[0] == []
    assert not list((queue.table.parent / "checkpoints").glob("*"))
    assert queue.jobs_of(owner)[0] == []


def test_a_killed_job_continues_from_its_state_and_finishes_exactly_once(queues):
    queue = queues()
    owner = new_owner()
    job = _wait_for_a_saved_state(queue, owner, queue.submit(owner, tiny(8)))
    os.killpg(job.pid, signal.SIGKILL)  # the job's process, as a crash or an OOM kill would
    deadline = time.time() + 10
    while queue._process_alive(job.id) and time.time() < deadline:
        time.sleep(0.05)
    assert queue._file(job.id, "state.pt").exists()  # what it continues from

    restarted = JobQueue(queue.table)  # a server started again sees the job's process gone
    job = wait_for(restarted, owner, job.id, lambda j: not j.active)
    assert job.status == "done" and job.resumes == 1, job
    assert [r["id"] for r in read_rows(queue.table)[0]] == [job.row_id]

    # killed after adding its row but before saying so: continued, it finds its row and adds no other
    lost = restarted._read(restarted._file(job.id, "job.json"))
    restarted._write(replace(lost, status="running", row_id=None, pid=None))
    again = wait_for(restarted, owner, job.id, lambda j: not j.active)
    assert again.status == "done" and again.row_id == job.row_id and again.resumes == 2
    assert len(read_rows(queue.table)[0]) == 1


# ---- the page ---------------------------------------------------------------------------------------------


@pytest.fixture
def page_table(queues, monkeypatch):
    """The app's results table (and so its jobs folder) moved to the scratch table of `queues`; budgets of 6 steps."""
    import streamlit as st

    import jpq_core.report as report

    table = queues(SleepingQueue).table
    monkeypatch.setattr(report, "RESULTS", table)
    monkeypatch.setenv("JPQ_JOB_BUDGETS", "6,20")
    st.cache_data.clear()
    yield table
    st.cache_data.clear()


def _explore(root, **query):
    """Explore on ResNet-20 without recovery (tested on its own; here it would only add its seconds per page)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(root / "app.py"), default_timeout=240)
    at.query_params.update(network="resnet20", criterion="magnitude", sparsity="0.5", wbits="8", abits="8",
                           recovery="none", **query)
    return at.run()


def _texts(at) -> str:
    return " ".join(e.value for kind in (at.info, at.success, at.error, at.caption) for e in kind)


def test_explore_queues_a_job_keeps_it_over_a_reload_and_cancels_it(root, queues, page_table):
    busy = queues(SleepingQueue)  # another session's jobs hold every core
    stranger = new_owner()
    for sparsity in (0.3, 0.7, 0.8, 0.9)[:busy.slots]:
        busy.submit(stranger, tiny(10, sparsity=sparsity))

    at = _explore(root)
    assert not at.exception
    assert [r.options for r in at.radio if r.key == "job_budget"] == [["6 steps", "20 steps"]]
    assert "No measured fine-tuning time of this network yet" in _texts(at)  # an empty table: nothing to go by
    at.button(key="job_start").click().run()
    assert not at.exception and not at.error
    assert "queued, number 1 in line" in _texts(at)
    token = at.query_params["job_owner"]
    token = token[-1] if isinstance(token, list) else token
    (job,) = JobQueue(page_table).jobs_of(token)[0]
    assert job.config["sparsity"] == 0.5 and job.budget == 6 and job.status == "queued"

    reloaded = _explore(root, job_owner=token)  # the same link opened again: the same jobs
    assert "queued, number 1 in line" in _texts(reloaded) and not reloaded.warning
    other = _explore(root)  # a session without the token sees none of them
    assert "queued, number" not in _texts(other) and not other.exception

    reloaded.button(key=f"job_cancel_{job.id}").click().run()
    assert not reloaded.exception and "queued, number" not in _texts(reloaded)
    assert JobQueue(page_table).jobs_of(token)[0] == [] and files_of(busy, job.id) == []


def test_the_time_estimate_comes_from_the_tables_fine_tuned_rows():
    import pandas as pd

    from jpq_core.jobs import estimate_seconds

    rows = pd.DataFrame({"network": ["resnet20"] * 4 + ["stereo"], "finetune": ["distill", "masked", "distill", "none", "distill"],
                         "budget": [200, 200, 6, 0, 300], "wall_s": [100.0, 60.0, 30.0, 5.0, 900.0]})
    assert estimate_seconds(rows, "resnet20", 300) == pytest.approx(150.0)  # distill, 200 steps: 0.5 s per step
    assert estimate_seconds(rows, "stereo", 10) == pytest.approx(30.0)
    assert estimate_seconds(rows, "tv:resnet18", 10) is None and estimate_seconds(rows.iloc[:0], "stereo", 10) is None
