"""Kills at random: a sweep killed with SIGKILL at random moments and started again, until it is done.

    python scripts/kill_sweep.py                 # 20 kills, tiny ResNet-20 grid, one thread
    python scripts/kill_sweep.py --kills 3 --steps 40

First an uninterrupted run of the grid gives the reference rows and its duration D. Then, in rounds that
each start from an empty table, `python -m jpq_core sweep` is started and killed (SIGKILL to its process
group) at a moment drawn uniformly from [0, D], again and again, until a start finishes on its own; rounds
repeat until `--kills` kills have landed on a running sweep. After every kill and at the end of each round:
- the table holds only whole rows (a torn last line is allowed: the reader skips it and the next sweep
  cuts it off), no configuration twice;
- every run-state file left in state/ reads with torch.load(weights_only=True), every checkpoint kept
  on the front loads with `load_compressed`;
at the end of each round: every configuration exactly once, each row's numbers equal to the reference
run's (resumed fine-tuning included), no state file left. Meanwhile a reader thread reads the table
every 20 ms with `read_rows`, as the app does, and checks that each row it is shown is whole: it equals
the row finally written for that configuration.

The fine-tuned configuration saves its run state every `--save-every` steps (the library's 100 would
leave nothing to resume in a grid this small); that is the only change from the CLI's behaviour.
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

from jpq_core.sweeps import config_key, load_grid, read_rows  # noqa: E402

GRID = """description = "kill_sweep.py: a tiny grid, ResNet-20 on digits"
network = "resnet20"
calibration_batches = 1

[[grid]]
criterion = "magnitude"
sparsity = [0.5, 0.9]
wbits = 4
abits = 8
finetune = "none"

[[grid]]
criterion = "magnitude"
sparsity = 0.9
wbits = 4
abits = 8
finetune = "masked"
budget = {steps}
"""
# What must match the reference run: configuration, metrics and costs (not times, revision or versions).
VOLATILE = {"wall_s", "git_rev", "versions", "crc", "grid", "engine_ms"}


def sweep_command(grid: Path, table: Path, save_every: int) -> list[str]:
    code = ("import sys, jpq_core.pipeline as p; p.CHECKPOINT_EVERY = int(sys.argv[1]); from jpq_core.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(save_every), "sweep", str(grid), "--out", str(table), "--workers", "1", "--quiet"]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in VOLATILE}


class Reader(threading.Thread):
    """Reads the table every 20 ms as the app would; keeps every row it was shown, to check afterwards."""

    def __init__(self, table: Path):
        super().__init__(daemon=True)
        self.table, self.reads, self.shown, self.torn, self.errors = table, 0, [], 0, []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                rows, problems = read_rows(self.table)
            except Exception as exc:  # noqa: BLE001 - a reader must never fail: count it
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            self.reads += 1
            self.shown.extend(rows)
            self.torn += sum("cut short" in p for p in problems)
            self.errors += [p for p in problems if "cut short" not in p]
            time.sleep(0.02)


def check_files(table: Path, configs, failures: list[str], final: bool) -> dict:
    """The checks after a kill (and at the end of a round, `final`); returns what was found."""
    import torch

    from jpq_core.errors import JPQError
    from jpq_core.pipeline import load_compressed

    rows, problems = read_rows(table)
    bad = [p for p in problems if not ("cut short" in p and final is False)]
    failures += [f"table: {p}" for p in bad]
    keys = [config_key(r["config"]) for r in rows]
    if len(keys) != len(set(keys)):
        failures.append(f"table: a configuration appears twice ({len(keys)} rows, {len(set(keys))} configurations)")
    states = sorted((table.parent / "state").glob("*.pt")) if (table.parent / "state").exists() else []
    for s in states:
        try:
            torch.load(s, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{s.name}: unreadable run state ({type(exc).__name__}: {str(exc)[:100]})")
    folder = table.parent / "checkpoints"
    for ckpt in sorted(folder.glob("*.safetensors")) if folder.exists() else []:
        try:
            load_compressed(ckpt)
        except JPQError as exc:
            failures.append(f"{ckpt.name}: kept checkpoint does not load ({exc})")
    leftovers = sorted(p.name for p in table.parent.rglob("*.tmp"))
    if final:
        done = set(keys)
        missing = [c for c in configs if config_key(c) not in done]
        if missing or len(rows) != len(configs):
            failures.append(f"round end: {len(rows)} rows for {len(configs)} configurations ({len(missing)} missing)")
        if states:
            failures.append(f"round end: run states left: {[s.name for s in states]}")
    return {"rows": len(rows), "torn": sum("cut short" in p for p in problems), "states": len(states), "leftovers": leftovers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of the fine-tuned configuration")
    parser.add_argument("--save-every", type=int, default=10, help="fine-tuning steps between run-state saves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the tally here")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop killing after this long (the round in progress is finished unkilled); the tally says how many kills landed")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grid = tmp / "kill.toml"
        grid.write_text(GRID.format(steps=args.steps))
        configs = load_grid(grid)

        reference_table = tmp / "reference" / "table.jsonl"
        t0 = time.perf_counter()
        proc = start(sweep_command(grid, reference_table, args.save_every))
        out = proc.communicate()[0].decode()
        duration = time.perf_counter() - t0
        if proc.returncode != 0:
            print(out)
            raise SystemExit("the reference run failed")
        reference = {config_key(r["config"]): comparable(r) for r in read_rows(reference_table)[0]}
        print(f"reference run: {len(configs)} configurations in {duration:.0f} s (kills drawn from [0, {duration:.0f}] s)", flush=True)

        kills, starts, rounds, landed = 0, 0, 0, []
        torn_seen, leftovers_seen, states_seen = 0, set(), 0
        readers = []
        deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else float("inf")
        while kills < args.kills and time.perf_counter() < deadline:
            rounds += 1
            table = tmp / f"round{rounds}" / "table.jsonl"
            table.parent.mkdir()
            reader = Reader(table)
            reader.start()
            readers.append(reader)
            while True:
                starts += 1
                proc = start(sweep_command(grid, table, args.save_every))
                moment = rng.uniform(0, duration)
                try:
                    proc.wait(timeout=moment)
                except subprocess.TimeoutExpired:
                    before = len(read_rows(table)[0])
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    found = check_files(table, configs, failures, final=False)
                    torn_seen += found["torn"]
                    states_seen += found["states"] > 0
                    leftovers_seen.update(found["leftovers"])
                    landed.append(f"{moment:.1f}s:{before}rows{'+state' if found['states'] else ''}")
                    print(f"  kill {kills} (round {rounds}) at {moment:.1f} s: {found['rows']} rows, "
                          f"{found['states']} run state(s), torn last line: {found['torn']}", flush=True)
                    if kills >= args.kills or time.perf_counter() > deadline:
                        proc = start(sweep_command(grid, table, args.save_every))  # finish the round unkilled
                        proc.wait()
                    else:
                        continue
                out = proc.stdout.read().decode() if proc.stdout else ""
                if proc.returncode != 0:
                    failures.append(f"round {rounds}: the sweep exited with {proc.returncode}: {out[-300:]}")
                break
            time.sleep(0.1)
            reader.stop.set()
            reader.join()
            check_files(table, configs, failures, final=True)
            final = {config_key(r["config"]): r for r in read_rows(table)[0]}
            for key, row in final.items():
                if comparable(row) != reference.get(key):
                    diff = sorted(k for k in set(comparable(row)) | set(reference.get(key, {}))
                                  if comparable(row).get(k) != reference.get(key, {}).get(k))
                    failures.append(f"round {rounds}: {row['criterion']} s={row['sparsity']} {row['finetune']} differs "
                                    f"from the uninterrupted run in {diff[:6]}")
            for row in reader.shown:
                if row != final.get(config_key(row["config"])):
                    failures.append(f"round {rounds}: the reader was shown a row that is not the one written")
                    break
            failures += [f"round {rounds}: reader: {e}" for e in reader.errors]
            print(f"round {rounds} done: {len(final)} rows for {len(configs)} configurations, failures so far: {len(failures)}", flush=True)

        reads = sum(r.reads for r in readers)
        shown = sum(len(r.shown) for r in readers)
        tally = {"configurations": len(configs), "reference_seconds": round(duration), "kills": kills, "starts": starts,
                 "rounds": rounds, "kill_moments": landed, "kills_with_a_run_state_on_disk": states_seen,
                 "torn_last_lines_seen_after_kills": torn_seen, "leftover_temporary_files": sorted(leftovers_seen),
                 "reader_reads": reads, "reader_rows_shown": shown,
                 "reader_torn_lines_skipped": sum(r.torn for r in readers), "failures": failures}
    print(f"{kills} kills (SIGKILL) at random moments in {rounds} round(s), {starts} starts of the sweep; "
          f"{states_seen} kills left a fine-tuning run state to resume; torn last lines after a kill: {torn_seen}")
    print(f"every round: {len(configs)} configurations, each exactly once, numbers equal to the uninterrupted run: "
          f"{'yes' if not failures else 'NO'}")
    print(f"reader: {reads} reads during the runs, {shown} rows shown, all whole: "
          f"{'yes' if not any('reader' in f for f in failures) else 'NO'}; torn lines it skipped: {tally['reader_torn_lines_skipped']}")
    print(f"temporary files left by kills (ignored by every reader): {len(leftovers_seen)} {sorted(leftovers_seen)[:5]}")
    return finish(failures, tally, args.json)


def finish(failures: list[str], tally: dict, json_path: Path | None) -> int:
    """The end of a kill script: the failures printed, the tally written as JSON when asked, the exit status."""
    print(f"failures: {len(failures)}")
    for f in failures:
        print(f"  {f}")
    if json_path:
        json_path.write_text(json.dumps(tally, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
