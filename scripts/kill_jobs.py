"""Kills at random: a page-started fine-tuning job killed with SIGKILL at random moments, polled on until it is done.

    python scripts/kill_jobs.py                  # 20 kills, ResNet-20 on digits, one thread
    python scripts/kill_jobs.py --kills 2 --steps 20

First the same job runs uninterrupted (submitted through `JobQueue` beside its own table, polled until done)
for the reference row, its duration D and its time per fine-tuning step t (the job's own progress reports),
so F = D - steps * t is what every start costs besides its steps (process start, the pipeline's structural
steps replayed, evaluation, the row). Then the job is submitted beside an empty table and polled as the page
polls (every `--poll-s` seconds); each time a poll starts its process, a kill moment is drawn uniformly from the
time that start still needs: F + t * (steps - k), k the steps its saved run state holds (0 without one).
(Drawing from D - the state's `elapsed` instead, as a first version did, underestimates a restart: it replays
the structural steps and starts a process again, so most kills then landed before fine-tuning resumed.)
At that moment the job's process group gets SIGKILL, and the server is restarted:
the JobQueue object is dropped and a new one made on the same table (the processes the old one started are
forgotten by it, as a restarted server forgets them; this script reaps them as init would). Between polls the
server is also restarted at random (`--server-restarts`, the chance per poll) without a kill. After
`--kills` kills (or --max-minutes) the job is polled until it finishes. A start that finishes before its kill
ends its round; rounds, each from an empty table, go on until the kills are spent.

After every kill: the table holds at most the job's one row and no partial line (a torn last line would be
counted and must be gone at the end), every job file reads as a job (`JobQueue._read`), every progress file
as JSON, every run-state file with torch.load(weights_only=True). At the end: exactly one row, for the job's
configuration; the job done, pointing at that row, with one resume per kill; no state, progress or temporary
file left beside the table; the kept network loads; the row's numbers equal the reference run's (resumed
fine-tuning included: training batches are a function of (seed, step), see `pipeline.RunState`). A reader
thread reads the table every 20 ms (`read_rows`, as the app does) and the job files (as a page's poll would,
without the queue's lock), and must be shown only whole rows equal to the one finally written, and only
readable job files.

Two things differ from the page's own jobs, both set by this script, not the library: the job's process saves
its run state every `--save-every` steps (the library's 100 would leave nothing to resume in a job this small),
and the poller continues a dead job up to --kills + 1 times (`jobs.MAX_RESUMES` is 3 for the page).
Prints a tally; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from kill_sweep import comparable, finish  # noqa: E402

from jpq_core import jobs  # noqa: E402
from jpq_core.errors import JPQError  # noqa: E402
from jpq_core.pipeline import CompressionConfig  # noqa: E402
from jpq_core.sweeps import config_key, read_rows  # noqa: E402

CONFIG = dict(network="resnet20", criterion="magnitude", sparsity=0.7, wbits=4, abits=8, calibration_batches=1)
OWNER = "kill-jobs-owner-0000"


class KillQueue(jobs.JobQueue):
    """The page's queue, whose jobs' processes save their run state every `save_every` steps."""

    save_every = 10

    def _command(self, job):
        code = ("import sys, jpq_core.finetuning as f; f.CHECKPOINT_EVERY = int(sys.argv[1]); "
                "from jpq_core.jobs import JobQueue; sys.exit(JobQueue(sys.argv[2]).run(sys.argv[3]))")
        return [sys.executable, "-c", code, str(self.save_every), str(self.table), job.id]


class Reader(threading.Thread):
    """Reads the table and the job files every 20 ms as the app would; keeps every row it was shown."""

    def __init__(self, table: Path):
        super().__init__(daemon=True)
        self.table, self.reads, self.shown, self.torn, self.errors = table, 0, [], 0, []
        self.job_reads = 0
        self.stop = threading.Event()

    def run(self):
        queue = jobs.JobQueue(self.table)
        while not self.stop.is_set():
            try:
                rows, problems = read_rows(self.table)
                found, bad = queue._read_all() if queue.folder.exists() else ([], [])
            except Exception as exc:  # noqa: BLE001 - a reader must never fail: count it
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)
                continue
            self.reads += 1
            self.job_reads += len(found)
            self.shown.extend(rows)
            self.torn += sum("cut short" in p for p in problems)
            self.errors += [p for p in problems if "cut short" not in p] + bad
            time.sleep(0.02)


def steps_done(queue: jobs.JobQueue, job) -> int:
    """About the fine-tuning steps a restart need not repeat: the last progress report's count (global over the
    configuration's fine-tuning stages, unlike the run state's step; ahead of the last save by less than
    --save-every steps)."""
    progress = queue.progress(job)
    return progress.done if progress else 0


def check_files(table: Path, key: str, failures: list[str], final: bool, where: str) -> dict:
    """The checks after a kill (and at the end, `final`); returns what was found."""
    import torch

    rows, problems = read_rows(table)
    torn = sum("cut short" in p for p in problems)
    failures += [f"{where}: table: {p}" for p in problems if final or "cut short" not in p]
    keys = [config_key(r["config"]) for r in rows]
    if len(rows) > 1 or any(k != key for k in keys):
        failures.append(f"{where}: table: {len(rows)} rows ({len(set(keys))} configurations); only the job's one may be there")
    folder = table.parent / "jobs"
    for path in sorted(folder.glob("*.job.json")):
        try:
            jobs.JobQueue._read(path)
        except (JPQError, FileNotFoundError) as exc:
            failures.append(f"{where}: {path.name}: {exc}")
    progress = sorted(folder.glob("*.progress.json"))
    for path in progress:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            failures.append(f"{where}: {path.name}: unreadable progress ({exc})")
    states = sorted(folder.glob("*.state.pt"))
    for path in states:
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{where}: {path.name}: unreadable run state ({type(exc).__name__}: {str(exc)[:100]})")
    temps = sorted(str(p.relative_to(table.parent)) for p in table.parent.rglob("*.tmp"))
    if final:
        if len(rows) != 1:
            failures.append(f"{where}: {len(rows)} rows at the end, not exactly 1")
        if states or progress or temps:
            failures.append(f"{where}: files left at the end: {[p.name for p in states + progress] + temps}")
    return {"rows": len(rows), "torn": torn, "states": len(states), "temps": temps}


def wait_gone(queue: jobs.JobQueue, job_id: str, timeout_s: float = 30.0) -> bool:
    deadline = time.time() + timeout_s
    while queue._process_alive(job_id):
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_job(table: Path, config: CompressionConfig, args, rng: random.Random | None, timing: tuple | None,
            failures: list[str], log, kills_left: int = 0) -> dict:
    """Submit the job beside `table` and poll until it is done; with `rng`, kill it up to `kills_left` times on the way."""
    queue = KillQueue(table, slots=1)
    orphans: list[subprocess.Popen] = []  # processes started by a server that was restarted since

    def restart_server():
        nonlocal queue
        orphans.extend(jobs._children)
        jobs._children = []
        queue = KillQueue(table, slots=1)

    t0 = time.perf_counter()
    job = queue.submit(OWNER, config)
    started_at, moment = None, None
    kills, starts, server_restarts, moments, with_state, per_step = 0, 0, 0, [], 0, None
    deadline = args.began + 60 * args.max_minutes if args.max_minutes else float("inf")
    timeout = deadline if args.max_minutes else t0 + 3600
    timeout = timeout + 1800
    while True:
        current = next(j for j in queue.jobs_of(OWNER)[0] if j.id == job.id)
        if current.status in ("done", "failed"):
            break
        progress = queue.progress(current)
        per_step = progress.seconds_per_step if progress and progress.seconds_per_step else per_step
        if current.status == "running" and current.pid != (job.pid if started_at else None):
            job, started_at = current, time.perf_counter()  # a poll (re)started its process
            starts += 1
            if rng is not None and kills < kills_left and time.perf_counter() < deadline:
                fixed, per_step = timing  # what every start costs, and each step left
                remaining = fixed + per_step * (config.steps - steps_done(queue, job))
                moment = rng.uniform(0, remaining)
                log(f"  start {starts}: kill drawn at {moment:.1f} s of the {remaining:.0f} s it still needs")
            else:
                moment = None
        if moment is not None and time.perf_counter() - started_at >= moment:
            if queue._process_alive(job.id):
                progress = queue.progress(job)
                os.killpg(job.pid, signal.SIGKILL)
                if not wait_gone(queue, job.id):
                    failures.append(f"kill {kills + 1}: the job's process did not stop")
                for proc in orphans + jobs._children:
                    if proc.poll() is None and proc.pid == job.pid:
                        proc.wait()
                kills += 1
                found = check_files(table, config_key(config), failures, final=False, where=f"kill {kills}")
                with_state += found["states"] > 0
                stage = f"{progress.stage} {progress.done}/{progress.total}" if progress else "no progress yet"
                moments.append(f"{moment:.1f}s ({stage}{', state' if found['states'] else ''}{', row' if found['rows'] else ''})")
                log(f"  kill {kills} at {moment:.1f} s: {stage}; {found['rows']} row(s), {found['states']} run state(s), "
                    f"torn lines {found['torn']}, temporary files {found['temps']}")
                restart_server()  # the restarted server's view: a new JobQueue on the same table
                server_restarts += 1
            moment = None
        elif rng is not None and rng.random() < args.server_restarts:
            restart_server()
            server_restarts += 1
        if time.perf_counter() > timeout:
            failures.append(f"the job did not finish in time: {current}")
            break
        time.sleep(args.poll_s)
    for proc in orphans + jobs._children:
        proc.wait()
    seconds = time.perf_counter() - t0
    final = next(j for j in queue.jobs_of(OWNER)[0] if j.id == job.id)
    return {"job": final, "seconds": seconds, "kills": kills, "starts": starts, "server_restarts": server_restarts,
            "moments": moments, "with_state": with_state, "per_step": per_step, "log": queue._file(job.id, "log").read_text(errors="replace")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200, help="the job's fine-tuning budget (steps)")
    parser.add_argument("--save-every", type=int, default=10, help="fine-tuning steps between run-state saves")
    parser.add_argument("--poll-s", type=float, default=0.25, help="seconds between polls (the page: about 1)")
    parser.add_argument("--server-restarts", type=float, default=0.05,
                        help="chance per poll of a server restart (a new JobQueue object) without a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the tally here")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop killing this long after the start, reference run included (the job then finishes unkilled); the tally says how many kills landed")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.began = time.perf_counter()  # --max-minutes counts from here, the reference run included
    rng = random.Random(args.seed)
    log = (lambda _: None) if args.quiet else (lambda text: print(text, flush=True))
    KillQueue.save_every = args.save_every
    jobs.MAX_RESUMES = args.kills + 1
    config = jobs.finetune_config(CompressionConfig(**CONFIG), args.steps)
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref_table = tmp / "reference" / "sweeps.jsonl"
        reference = run_job(ref_table, config, args, None, None, failures, log)
        if reference["job"].status != "done":
            print(reference["log"][-2000:])
            raise SystemExit(f"the reference job did not finish: {reference['job']}")
        ref_rows = read_rows(ref_table)[0]
        duration, per_step = reference["seconds"], reference["per_step"] or 0.0
        fixed = max(1.0, duration - per_step * args.steps)  # process start, the pipeline's steps replayed, evaluation, row
        print(f"reference job: {args.steps} steps of {config.finetune} fine-tuning in {duration:.0f} s from submit to done "
              f"({per_step:.2f} s per step, {fixed:.0f} s besides); a start with k steps saved needs about "
              f"{fixed:.0f} + {per_step:.2f} * ({args.steps} - k) s", flush=True)

        totals = dict(kills=0, starts=0, server_restarts=0, with_state=0, reads=0, shown=0, job_reads=0, torn=0,
                      seconds=0.0)
        moments, rounds, statuses = [], 0, []
        while True:  # rounds, each from an empty table, until the kills are spent (or the time)
            rounds += 1
            table = tmp / f"round{rounds}" / "sweeps.jsonl"
            table.parent.mkdir()
            reader = Reader(table)
            reader.start()
            log(f"round {rounds}")
            killed = run_job(table, config, args, rng, (fixed, per_step), failures, log,
                             kills_left=args.kills - totals["kills"])
            time.sleep(0.1)
            reader.stop.set()
            reader.join()
            where = f"round {rounds}"
            job = killed["job"]
            check_files(table, config_key(config), failures, final=True, where=where)
            rows = read_rows(table)[0]
            if job.status != "done" or not rows or job.row_id != rows[0]["id"]:
                failures.append(f"{where}: the job is {job.status} (row {job.row_id}, error {job.error}); log: {killed['log'][-500:]}")
            if job.resumes != killed["kills"]:
                failures.append(f"{where}: the job was continued {job.resumes} times for {killed['kills']} kills")
            if rows:
                from jpq_core.pipeline import load_compressed

                try:
                    load_compressed(table.parent / "checkpoints" / f"{rows[0]['id']}.safetensors")
                except (JPQError, OSError) as exc:
                    failures.append(f"{where}: the job's kept network does not load ({exc})")
                mine, ref = comparable(rows[0]), comparable(ref_rows[0])
                if mine != ref:
                    diff = sorted(k for k in set(mine) | set(ref) if mine.get(k) != ref.get(k))
                    failures.append(f"{where}: the row differs from the uninterrupted run's in {diff[:8]}: "
                                    f"{[(k, mine.get(k), ref.get(k)) for k in diff[:3]]}")
            for row in reader.shown:
                if not rows or row != rows[0]:
                    failures.append(f"{where}: reader: shown a row that is not the one finally written")
                    break
            failures += [f"{where}: reader: {e}" for e in reader.errors[:10]]
            for k in ("kills", "starts", "server_restarts", "with_state", "seconds"):
                totals[k] += killed[k]
            totals["reads"] += reader.reads
            totals["shown"] += len(reader.shown)
            totals["job_reads"] += reader.job_reads
            totals["torn"] += reader.torn
            moments += killed["moments"]
            statuses.append(f"{job.status}/{job.resumes} resumes/{len(rows)} row")
            log(f"round {rounds} done: {killed['kills']} kills, the job {statuses[-1]}; failures so far: {len(failures)}")
            out_of_time = args.max_minutes and time.perf_counter() > args.began + 60 * args.max_minutes
            if totals["kills"] >= args.kills or out_of_time:
                break

        tally = {"steps": args.steps, "save_every": args.save_every, "reference_seconds": round(duration),
                 "reference_seconds_per_step": round(per_step, 3), "reference_seconds_besides_steps": round(fixed),
                 "killed_runs_seconds": round(totals["seconds"]), "rounds": rounds, "round_ends": statuses,
                 "kills": totals["kills"], "starts": totals["starts"], "server_restarts": totals["server_restarts"],
                 "kill_moments": moments, "kills_with_a_run_state_on_disk": totals["with_state"],
                 "reader_reads": totals["reads"], "reader_rows_shown": totals["shown"],
                 "reader_job_files_read": totals["job_reads"], "reader_torn_lines_skipped": totals["torn"],
                 "failures": failures}
    print(f"{totals['kills']} kills (SIGKILL to the job's process group) at random moments in {rounds} round(s), "
          f"{totals['starts']} starts of its process, {totals['server_restarts']} server restarts (a new JobQueue; "
          f"{totals['kills']} of them right after a kill); {totals['with_state']} kills left a run state to continue from")
    print(f"every round: the job done, resumed once per kill, exactly 1 row, numbers equal to the uninterrupted run: "
          f"{'yes' if not failures else 'NO'} ({'; '.join(statuses)}); state/progress/temporary files left: "
          f"{'none' if not any('left at the end' in f for f in failures) else 'YES'}")
    print(f"reader: {totals['reads']} reads, {totals['shown']} rows shown, {totals['job_reads']} job files read, all whole: "
          f"{'yes' if not any('reader' in f for f in failures) else 'NO'}; torn lines skipped: {totals['torn']}")
    return finish(failures, tally, args.json)


if __name__ == "__main__":
    sys.exit(main())
