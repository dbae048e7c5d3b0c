"""Fine-tuning jobs started from the app: a small queue kept on disk, one process per running job.

A job is one compression configuration (`CompressionConfig`) with a fine-tuning budget the user picked. Its
process (`python -m jpq_core.jobs TABLE ID`) runs it as a sweep runs a configuration (`sweeps.run_config`, with
a state file so that it can continue after a kill), or as the same Ray task when a cluster is configured
(`cluster.configured_address`), and then adds its row to the results table the pages read, with its network
in checkpoints/ beside it, exactly as a sweep would.

Everything lives in `jobs/` beside the results table, so jobs survive page reloads and server restarts.
Every file is written whole (temporary file, then rename), so a reader never sees half of one:

    ID.job.json       the job: owner, configuration, status (queued, running, done, failed), resumes, error
    ID.progress.json  written by the job's process about once a second: stage, steps done, loss, time per step
    ID.state.pt       the run's resumable state (`pipeline.RunState`); the run deletes it when it completes
    ID.log            the process's output, where the reason of a failure is
    ID.lock           held (flock) by the job's process for as long as it lives: a poll that can take it
                      knows the process is gone, whatever killed it
    .queue.lock       held for a moment by whoever changes job files (a poll, a cancel, a finishing job)

Nobody runs in the background: whoever calls `poll` (the page, about once a second while it shows a job)
advances the queue. It starts queued jobs, oldest first, while fewer than `slots` run (one per CPU core), and
puts a running job whose process has died back at the head of the queue, to continue from its state file, at
most MAX_RESUMES times before reporting it failed. The row is written only by the job's own process, once it
has finished, holding the table's lock, and only when the table does not hold that configuration already:
a kill at any moment leaves no partial row and no duplicate.

A job file that cannot be read (cut short, edited by hand, wrong types, missing keys) is listed as a failed
job of the owner it names (when it names a valid one) with the reason, and named in `poll`'s problems; the
queue goes on with every other job, and its owner can dismiss it. A damaged run state is set aside: the job
starts its fine-tuning afresh and says so. `poll`, `jobs_of` and `progress` raise nothing but JPQError
(issue 22: tests/test_reliability_jobs.py and scripts/fuzz.py's job-files family fuzz them).

Jobs belong to an owner token (the page keeps one per browser session, in its link): a session lists and
cancels only its own jobs; a finished job is shared with everyone through its row in the results table.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from jpq_core.errors import JPQError
from jpq_core.pipeline import CompressionConfig

BUDGETS = (300, 1000, 3000)  # fine-tuning steps the page offers; JPQ_JOB_BUDGETS="20,300" changes them
FINETUNE_MODE = "distill"  # what the page's jobs fine-tune with (as Explore's command to copy does)
GRID = "page"  # the `grid` column of a job's row: where it came from
MAX_RESUMES = 3  # a job whose process died is continued this many times, then reported failed
KEEP_FINISHED_S = 24 * 3600  # finished and failed jobs are listed for a day (their rows stay in the table)
PROGRESS_EVERY_S = 1.0  # how often a job's process rewrites its progress file
ACTIVE = ("queued", "running")
_OWNER = re.compile(r"[A-Za-z0-9_-]{16,64}")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a file name's stem: no dots, no slashes
_children: list[subprocess.Popen] = []  # job processes this process started, reaped by `poll`


def new_owner() -> str:
    """A fresh owner token (unguessable, URL-safe)."""
    return secrets.token_urlsafe(12)


def is_owner_token(text) -> bool:
    """Whether `text` can be an owner token (what a link must hold to be read as one)."""
    return isinstance(text, str) and _OWNER.fullmatch(text) is not None


def budgets() -> tuple[int, ...]:
    """The fine-tuning budgets (steps) the page offers: BUDGETS, or the list in JPQ_JOB_BUDGETS."""
    text = os.environ.get("JPQ_JOB_BUDGETS", "").strip()
    if not text:
        return BUDGETS
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise JPQError(f"JPQ_JOB_BUDGETS={text!r}: give whole numbers of steps separated by commas, e.g. 300,1000.")
    return values


def finetune_config(config: CompressionConfig, steps: int) -> CompressionConfig:
    """`config` (e.g. the live configuration, which has no fine-tuning) fine-tuned for `steps` steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise JPQError(f"a fine-tuning budget is a whole number of steps, 1 or more, not {steps!r}.")
    return replace(config, finetune=FINETUNE_MODE, steps=steps).check()


def of_configuration(jobs: list["Job"], config: CompressionConfig) -> list["Job"]:
    """The jobs that fine-tune `config` (whatever their budget or fine-tuning mode)."""
    from jpq_core.pipeline import config_identity

    def without_training(c) -> dict:
        return {k: v for k, v in config_identity(c).items() if k not in ("finetune", "steps")}

    wanted = without_training(config)
    return [j for j in jobs if without_training(j.config) == wanted]


def estimate_seconds(results, network: str, steps: int) -> float | None:
    """About how long `steps` fine-tuning steps of `network` take: the median wall time per step of the network's
    fine-tuned rows in the results table (`report.load_results`; page jobs' rows count too), preferring rows
    fine-tuned as jobs are (FINETUNE_MODE) and long enough (100 steps or more) for a run's fixed cost (scores,
    evaluation) to matter little; None without any such row."""
    if results is None or results.empty or "wall_s" not in results:
        return None
    rows = results[(results["network"] == network) & (results["finetune"] != "none") & (results["budget"] > 0)
                   & (results["wall_s"] > 0)]
    for preferred in (lambda r: r["budget"] >= 100, lambda r: r["finetune"] == FINETUNE_MODE):
        if preferred(rows).any():
            rows = rows[preferred(rows)]
    if rows.empty:
        return None
    return float(statistics.median(rows["wall_s"] / rows["budget"])) * steps


@dataclass
class Job:
    """One job as its file holds it."""

    id: str
    owner: str
    config: dict  # a CompressionConfig as a dict
    created: float
    status: str = "queued"  # queued, running, done, failed
    ray_address: str | None = None  # the cluster it runs on; None: a process on this machine
    pid: int | None = None
    started: float | None = None
    finished: float | None = None
    resumes: int = 0  # times its process died and it was put back in the queue
    row_id: str | None = None  # done: its row in the results table
    error: str | None = None  # failed: why
    note: str | None = None  # what the owner should know (e.g. "continued after its process stopped")
    position: int | None = field(default=None, compare=False)  # queued: place in line (1 = next); `jobs_of`, not stored
    damaged: bool = field(default=False, compare=False)  # its file could not be read: a failed stand-in (`_read_all`)

    @property
    def budget(self) -> int:
        return self.config.get("steps", 0)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass
class Progress:
    """What a running job's process last reported."""

    stage: str  # starting, fine-tuning, evaluating, writing the row, waiting for the table
    done: int  # fine-tuning steps done
    total: int  # the budget
    loss: float | None  # mean loss of the steps since the previous report
    seconds_per_step: float | None  # measured by this process
    time: float

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds of fine-tuning left (evaluation and writing the row come after)."""
        return None if self.seconds_per_step is None else (self.total - self.done) * self.seconds_per_step


class JobQueue:
    """The jobs kept beside one results table (`table`), run at most `slots` at a time (default: one per core)."""

    def __init__(self, table, slots: int | None = None):
        self.table = Path(table)
        self.folder = self.table.parent / "jobs"
        self.slots = slots or os.cpu_count() or 1

    # ---- what sessions call -------------------------------------------------------------------------------

    def submit(self, owner: str, config: CompressionConfig) -> Job:
        """Queue `config` (with its fine-tuning budget) for `owner`, and start it at once if a slot is free."""
        from jpq_core.cluster import configured_address
        from jpq_core.sweeps import config_key, read_rows

        if not is_owner_token(owner):
            raise JPQError("this session has no valid owner token for fine-tuning jobs; reload the page.")
        config = config.check()
        if config.finetune == "none" or config.steps < 1:
            raise JPQError("a fine-tuning job needs a fine-tuning mode and a budget of 1 step or more.")
        key = config_key(config)
        if any(config_key(r["config"]) == key for r in read_rows(self.table)[0]):
            raise JPQError("this configuration with this budget is already in the results table (see the fine-tuned "
                           "runs above); pick another budget to fine-tune it again.")
        with self._locked():
            mine, _ = self._read_all()
            if any(j.owner == owner and j.active and config_key(j.config) == key for j in mine):
                raise JPQError("you are already fine-tuning this configuration with this budget (see its progress below).")
            job = Job(id=secrets.token_hex(6), owner=owner, config=asdict(config), created=time.time(),
                      ray_address=configured_address())
            self._write(job)
        self.poll()
        return job

    def poll(self) -> tuple[list[Job], list[str]]:
        """Advance the queue (see the module's docstring); returns (every job, problems reading job files)."""
        global _children
        if not self.folder.exists():
            return [], []  # no job yet: a visit leaves no folder behind
        with self._locked():
            _children = [p for p in _children if p.poll() is None]  # reap the processes that ended
            jobs, problems = self._read_all()
            for i, job in enumerate(jobs):
                with self._job_problems(job, problems):  # one job's files in a bad way: the others go on
                    if job.status == "running" and not self._process_alive(job.id):
                        jobs[i] = self._after_death(job)
                    elif not job.active and time.time() - (job.finished or job.created) > KEEP_FINISHED_S:
                        self._delete_files(job.id)
            jobs = [j for j in jobs if self._file(j.id, "job.json").exists()]
            running = sum(j.status == "running" for j in jobs)
            for i, job in enumerate(jobs):
                if job.status == "queued" and running < self.slots:
                    with self._job_problems(job, problems):
                        jobs[i] = self._start(job)
                        running += 1
        return jobs, problems

    @contextlib.contextmanager
    def _job_problems(self, job: Job, problems: list[str]):
        """Inside: an operating-system error on one job's files (a lock file that is a folder, a full disk) is
        added to `problems`, naming the job, and the poll goes on with the other jobs."""
        try:
            yield
        except OSError as exc:
            problems.append(f"job {job.id}: its files in {self.folder} cannot be used ({exc.strerror or exc}); it is "
                            "left as it is. Fix the folder's permissions or delete the job's files.")

    def jobs_of(self, owner: str) -> tuple[list[Job], list[str]]:
        """`poll`, then `owner`'s jobs only, oldest first, each queued one with its place in line (counting
        everyone's queued jobs); and the problems reading job files."""
        jobs, problems = self.poll()
        queued = [j for j in jobs if j.status == "queued"]
        return [replace(j, position=queued.index(j) + 1 if j in queued else None) for j in jobs if j.owner == owner], problems

    def progress(self, job: Job) -> Progress | None:
        """The job's last progress report; None before the first, or when it cannot be read."""
        try:
            data = json.loads(self._file(job.id, "progress.json").read_text())
            progress = Progress(**{f.name: data[f.name] for f in fields(Progress)})
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        return progress if _valid_progress(progress) else None

    def cancel(self, owner: str, job_id: str) -> None:
        """Stop `owner`'s job: kill its process (a queued job has none) and delete every file it made, so that
        no row, state or partial output is left. A finished job is only forgotten: its row stays in the table."""
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise JPQError(f"{str(job_id)[:40]!r} is not a job id.")
        with self._locked():
            path = self._file(job_id, "job.json")
            try:
                job = self._read(path)
            except FileNotFoundError:
                raise JPQError("that job is no longer in the queue.") from None
            except JPQError:  # damaged: the owner it names (if any) may dismiss it
                if _named_owner(path) != owner:
                    raise
                self._delete_files(job_id)
                return
            if job.owner != owner:
                raise JPQError("that job belongs to another session.")
            if job.status == "running":
                self._kill(job)
            self._delete_files(job_id)

    # ---- files ------------------------------------------------------------------------------------------

    def _file(self, job_id: str, suffix: str) -> Path:
        return self.folder / f"{job_id}.{suffix}"

    @contextlib.contextmanager
    def _locked(self):
        """Hold the queue's lock: one reader-and-writer of job files at a time, across processes."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".queue.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JPQError(f"{self.folder}: the fine-tuning job folder cannot be used ({exc.strerror or exc}); fix its "
                           "permissions, or move away whatever is in its place, so that jobs can run.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, job: Job) -> None:
        from jpq_core.checkpoints import atomic_write

        text = json.dumps({k: v for k, v in asdict(job).items() if k not in ("position", "damaged")}, sort_keys=True)
        atomic_write(self._file(job.id, "job.json"), lambda tmp: Path(tmp).write_text(text))

    @staticmethod
    def _read(path: Path) -> Job:
        """The job in `path`; a JPQError naming the file when it is not a job file (FileNotFoundError when gone)."""
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"it holds {type(data).__name__}, not a job")
            job = Job(**{k: v for k, v in data.items() if k not in ("position", "damaged")})
            wrong = _wrong_fields(job, path.name[:-len(".job.json")])
            if wrong:
                raise ValueError(wrong)
            return job
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
            raise JPQError(f"{path.name}: a damaged job file ({type(exc).__name__}: {str(exc)[:120]}); it is listed as "
                           "failed to the owner it names, who can dismiss it (its fine-tuning, if any, is lost) and start "
                           "the job again; it is cleared after a day.") from None

    def _read_all(self) -> tuple[list[Job], list[str]]:
        jobs, problems = [], []
        for path in sorted(self.folder.glob("*.job.json")):
            try:
                jobs.append(self._read(path))
            except FileNotFoundError:  # cancelled meanwhile
                continue
            except JPQError as exc:
                problems.append(str(exc))
                jobs.append(_stand_in(path, str(exc)))
        return sorted(jobs, key=lambda j: (j.created, j.id)), problems

    def _delete_files(self, job_id: str) -> None:
        for path in [*self.folder.glob(f"{job_id}.*"), *self.folder.glob(f".{job_id}.*")]:  # .*: temporary files
            path.unlink(missing_ok=True)

    # ---- processes --------------------------------------------------------------------------------------

    def _process_alive(self, job_id: str) -> bool:
        """Whether the job's process lives: it holds the job's lock file until it exits, however it exits."""
        fd = os.open(self._file(job_id, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _start(self, job: Job) -> Job:
        """Start the job's process (it inherits the job's lock, taken here, so it is never seen as dead)."""
        from jpq_core.sweeps import ROOT

        fd = os.open(self._file(job.id, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is already running (started by a poll killed before it saved)
                job = replace(job, status="running", started=job.started or time.time())
                self._write(job)
                return job
            with open(self._file(job.id, "log"), "ab") as log:
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                proc = subprocess.Popen(self._command(job), cwd=ROOT,
                                        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        pass_fds=(fd,), start_new_session=True)
        finally:
            os.close(fd)  # the child keeps its copy, and with it the lock
        _children.append(proc)
        job = replace(job, status="running", pid=proc.pid, started=time.time())
        self._write(job)
        return job

    def _command(self, job: Job) -> list[str]:
        """The job's process: this module run as a program (`run`)."""
        return [sys.executable, "-m", "jpq_core.jobs", str(self.table), job.id]

    def _after_death(self, job: Job) -> Job:
        """A running job whose process is gone without saying so: back to the queue, or failed after MAX_RESUMES."""
        last = self._last_output(job.id)
        if job.resumes >= MAX_RESUMES:
            job = replace(job, status="failed", finished=time.time(), error=f"its process stopped {job.resumes + 1} "
                          f"times before finishing; the last thing it wrote: {last}")
            for suffix in ("state.pt", "progress.json"):
                self._file(job.id, suffix).unlink(missing_ok=True)
        else:
            job = replace(job, status="queued", pid=None, resumes=job.resumes + 1,
                          note=f"its process stopped (a restart or a kill) and it continues from its last save "
                               f"(resume {job.resumes + 1} of at most {MAX_RESUMES})")
        self._write(job)
        return job

    def _last_output(self, job_id: str) -> str:
        try:
            lines = [ln for ln in self._file(job_id, "log").read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1][-300:] if lines else "nothing"

    def _kill(self, job: Job, timeout_s: float = 20.0) -> None:
        """Kill the job's process and everything it started, and wait until it is gone."""
        if job.pid and self._process_alive(job.id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)  # its own session: the group is the job
        deadline = time.time() + timeout_s
        while self._process_alive(job.id):
            if time.time() > deadline:
                raise JPQError(f"job {job.id}'s process (pid {job.pid}) did not stop; stop it by hand.")
            time.sleep(0.05)
        for proc in [p for p in _children if p.pid == job.pid]:
            proc.wait()

    # ---- the job's own process --------------------------------------------------------------------------

    def run(self, job_id: str) -> int:
        """The job's process: fine-tune, then add the row (see the module's docstring). Exit status 0 when the
        job is done (or was cancelled meanwhile), 2 when it failed with a JPQError, 1 on anything else."""
        from jpq_core.sweeps import config_key, git_revision, read_rows

        with self._locked():
            try:
                job = self._read(self._file(job_id, "job.json"))
            except FileNotFoundError:
                return 0  # cancelled before it started
            except JPQError as exc:  # damaged: the queue lists it as failed, saying why
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if job.status != "running":
                return 0
            self._write(replace(job, pid=os.getpid()))
        report = _ProgressWriter(self._file(job_id, "progress.json"), job.budget)
        try:
            key = config_key(job.config)
            row = None
            if not any(config_key(r["config"]) == key for r in read_rows(self.table)[0]):
                report.stage("starting")
                row = self._fine_tune(job, report)
            self._add_row(job_id, key, row, git_revision(), report)
            return 0
        except JPQError as exc:
            self._fail(job_id, str(exc))
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 - a bug: the job says so, the log has the trace
            traceback.print_exc()
            self._fail(job_id, f"{type(exc).__name__}: {exc} (a bug; the trace is in {self._file(job_id, 'log')})")
            return 1

    def _fine_tune(self, job: Job, report: "_ProgressWriter") -> dict:
        """The job's row (with its network's files under "_files"), from `sweeps.run_config` here or on Ray."""
        from jpq_core import sweeps

        if job.ray_address:
            import ray

            report.stage(f"running on the Ray cluster at {job.ray_address}")
            _, row = ray.get(sweeps.submit_to_ray(job.ray_address, job.config, keep_checkpoint=True))
            return row
        state = self._file(job.id, "state.pt")
        damage = unreadable_state(state)
        if damage:  # the run cannot continue from it: start afresh rather than fail the job
            state.unlink(missing_ok=True)
            report.done = 0
            self._annotate(job.id, f"its saved run state could not be read ({damage}), so its fine-tuning started afresh")
        return sweeps.run_config(job.config, keep_checkpoint=True, state=str(state), training=report.step)

    def _annotate(self, job_id: str, note: str) -> None:
        """Set the job's note (what its owner should know), unless it was cancelled or damaged meanwhile."""
        with self._locked():
            with contextlib.suppress(FileNotFoundError, JPQError):
                self._write(replace(self._read(self._file(job_id, "job.json")), note=note))

    def _add_row(self, job_id: str, key: str, row: dict | None, revision: str, report: "_ProgressWriter") -> None:
        """Holding the table's lock (waiting for a sweep that holds it) and the queue's: unless the job was
        cancelled meanwhile, append the row (when the table lacks this configuration), keep its network beside
        the table, and mark the job done."""
        from jpq_core.sweeps import append_row, config_key, read_rows, repair_tail, table_lock, write_checkpoint

        report.stage("writing the row")
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(table_lock(self.table))
            except JPQError:  # a sweep writes this table: the row waits for it
                report.stage("waiting for the results table (a sweep is writing it)")
                held.enter_context(table_lock(self.table, wait=True))
            held.enter_context(self._locked())
            try:
                job = self._read(self._file(job_id, "job.json"))
            except FileNotFoundError:
                return  # cancelled: it leaves nothing
            repair_tail(self.table)
            existing = next((r for r in read_rows(self.table)[0] if config_key(r["config"]) == key), None)
            if existing is None and row is None:  # the table lost the row it had when the job began
                raise JPQError("the results table no longer holds this configuration's row; start the job again.")
            if existing is None:
                files = row.pop("_files")
                row.update(git_rev=revision, grid=GRID)
                write_checkpoint(self.table, row["id"], files)
                append_row(self.table, row)
                existing = row
            self._write(replace(job, status="done", finished=time.time(), row_id=existing["id"], error=None,
                                note=f"about {report.seconds_per_step:.2f} s per step" if report.seconds_per_step
                                else job.note))
            for suffix in ("state.pt", "progress.json"):
                self._file(job_id, suffix).unlink(missing_ok=True)

    def _fail(self, job_id: str, reason: str) -> None:
        with self._locked():
            try:
                job = self._read(self._file(job_id, "job.json"))
            except (FileNotFoundError, JPQError):
                return
            self._write(replace(job, status="failed", finished=time.time(), error=reason))
            for suffix in ("state.pt", "progress.json"):
                self._file(job_id, suffix).unlink(missing_ok=True)


_STATUSES = (*ACTIVE, "done", "failed")


def _number(value, optional: bool = False) -> bool:
    """A finite int or float (not a bool); None too when `optional`."""
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value, optional: bool = True) -> bool:
    return isinstance(value, str) or (optional and value is None)


def _wrong_fields(job: Job, stem: str) -> str:
    """What is wrong with a job read from file `stem`.job.json, in words ('' when nothing). Every field is
    checked, because poll, the page and the job's own process use them all: a `resumes` of "3" or a `finished`
    of [] would otherwise raise TypeError there, and an `id` that is not the file's own (e.g. "../x") would
    point `cancel` at other files."""
    if job.id != stem or not _JOB_ID.fullmatch(str(job.id)):
        return f"its id {str(job.id)[:40]!r} is not its file's name"
    checks = {"owner": _text(job.owner, optional=False), "status": job.status in _STATUSES,
              "created": _number(job.created), "started": _number(job.started, True),
              "finished": _number(job.finished, True), "pid": _count(job.pid, True) and job.pid != 0,
              "resumes": _count(job.resumes), "ray_address": _text(job.ray_address), "row_id": _text(job.row_id),
              "error": _text(job.error), "note": _text(job.note), "config": isinstance(job.config, dict)}
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        return f"wrong type or value of {', '.join(wrong)}"
    wrong = _wrong_config_types(job.config)
    if wrong:
        return f"wrong type of config.{', config.'.join(wrong)}"
    try:  # the configuration its process will run
        config = CompressionConfig(**job.config).check()
    except (JPQError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        return f"its configuration does not hold: {str(exc)[:120]}"
    if config.finetune == "none" or not _count(config.steps) or config.steps < 1:
        return "its configuration has no fine-tuning budget"
    return ""


_MAYBE_NONE = ("wbits", "abits", "lr", "recovery_samples")  # fields whose default is not their only type


def _wrong_config_types(config: dict) -> list[str]:
    """The configuration's fields whose type is not their default's (a number where a number goes, a bits
    dict of names to whole numbers or None). `CompressionConfig.check` checks values, not the type of every
    field: a 500-deep list as `seed` passed it and then broke `asdict` in the poll (found by scripts/fuzz.py)."""
    from dataclasses import fields as config_fields

    default = CompressionConfig()
    wrong = []
    for f in config_fields(CompressionConfig):
        value, usual = config.get(f.name, getattr(default, f.name)), getattr(default, f.name)
        if f.name in _MAYBE_NONE:
            ok = value is None or _number(value)
        elif isinstance(usual, bool):
            ok = isinstance(value, bool)
        elif isinstance(usual, int):
            ok = _count(value) or (isinstance(value, int) and not isinstance(value, bool))
        elif isinstance(usual, float):
            ok = _number(value)
        elif isinstance(usual, str):
            ok = isinstance(value, str)
        else:  # layer_wbits, layer_abits
            ok = isinstance(value, dict) and all(isinstance(k, str) and (v is None or _count(v)) for k, v in value.items())
        if not ok:
            wrong.append(f.name)
    return wrong


def _named_owner(path: Path) -> str | None:
    """The owner token a damaged job file still names, if it names a valid one (else None: nobody's)."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and is_owner_token(data.get("owner")):
            return data["owner"]
    return None


def _stand_in(path: Path, reason: str) -> Job:
    """A failed job standing for a job file that cannot be read, so that its owner sees it failed and why
    (and can dismiss it); nobody's when the file names no valid owner. Its time is the file's, so it is
    cleared after KEEP_FINISHED_S like any finished job."""
    try:
        when = path.stat().st_mtime
    except OSError:
        when = time.time()
    return Job(id=path.name[:-len(".job.json")], owner=_named_owner(path) or "", config={}, created=when,
               status="failed", finished=when, error=reason, damaged=True)


def _valid_progress(progress: Progress) -> bool:
    """Whether a progress report read from file has usable values (the page formats each of them)."""
    return (isinstance(progress.stage, str) and _count(progress.done) and _count(progress.total)
            and _number(progress.loss, True) and _number(progress.seconds_per_step, True)
            and (progress.seconds_per_step is None or progress.seconds_per_step >= 0) and _number(progress.time))


def unreadable_state(path: Path) -> str:
    """Why the run state at `path` cannot be continued from ('' when it can, or when there is none): it must
    load with torch.load(weights_only=True) as a dict with the keys `pipeline.RunState` saves. A job's owner
    cannot delete the file by hand as a CLI user would, so the job sets a damaged one aside and starts afresh."""
    import torch

    from jpq_core.untrusted import cause

    if not path.exists():
        return ""
    try:
        with warnings.catch_warnings():  # torch's warnings about odd pickle protocols: the reason below says enough
            warnings.simplefilter("ignore")
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to decode means the file cannot be continued from
        return cause(exc, 120)
    missing = {"key", "stage", "step", "model", "optimizer", "elapsed"} - set(saved if isinstance(saved, dict) else ())
    return f"it lacks {', '.join(sorted(missing))}" if missing else ""


class _ProgressWriter:
    """Writes a job's progress file (whole, by rename) at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, path: Path, total: int):
        self.path, self.total = path, total
        self.done, self.losses, self.last_loss = 0, [], None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # a continued job: start from its last report
            before = json.loads(path.read_text())
            self.done, self.last_loss = int(before["done"]), before["loss"]
        self.first = None  # (time, steps done) at the first step this process saw
        self.written = 0.0
        self.seconds_per_step = None

    def stage(self, name: str) -> None:
        from jpq_core.checkpoints import atomic_write

        text = json.dumps({"stage": name, "done": self.done, "total": self.total, "loss": self.last_loss,
                           "seconds_per_step": self.seconds_per_step, "time": time.time()})
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        self.written = time.time()

    def step(self, done: int, total: int, loss: float) -> None:
        """`pipeline.compress`'s `training` callback: after every fine-tuning step."""
        now = time.time()
        self.done, self.total = done, total
        self.losses.append(loss)
        if self.first is None:
            self.first = (now, done)
        elif done > self.first[1]:
            self.seconds_per_step = (now - self.first[0]) / (done - self.first[1])
        if now - self.written >= PROGRESS_EVERY_S or done == total:
            self.last_loss = sum(self.losses) / len(self.losses)
            self.losses = []
            self.stage("evaluating" if done == total else "fine-tuning")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m jpq_core.jobs RESULTS_TABLE JOB_ID (started by the app's job queue, not by hand)")
    sys.exit(JobQueue(sys.argv[1]).run(sys.argv[2]))
