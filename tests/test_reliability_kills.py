"""A results table read while it is being written, and by a writer killed mid-row, shows only whole rows.

The whole kill-and-restart run of a sweep (20 SIGKILLs, every configuration exactly once) is
scripts/kill_sweep.py, with its figures in docs/reliability.md; this is its fast part: a writer process
appends large rows with `append_row` while this process reads the table with `read_rows` as fast as it can,
then the writer is killed with SIGKILL at a random moment.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from jpq_core.sweeps import REQUIRED, _crc, read_rows, repair_tail

WRITER = """
import sys
from jpq_core.sweeps import REQUIRED, append_row
table = sys.argv[1]
for i in range(300):
    row = {c: i for c in REQUIRED}
    row.update(config={"n": i}, padding="x" * 50_000)  # large rows: a write takes long enough to be caught mid-way
    append_row(table, row)
"""


def test_rows_read_during_writes_and_after_a_kill_are_whole(tmp_path):
    table = tmp_path / "table.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(table)], env=env)
    started = time.monotonic()
    while not (table.exists() and table.stat().st_size) and time.monotonic() - started < 120:
        time.sleep(0.01)  # the writer imports torch first: seconds on a busy machine
    deadline = time.monotonic() + random.uniform(0.5, 1.5)
    reads, torn_seen, counts = 0, 0, []
    try:
        while time.monotonic() < deadline or reads <= 10:  # a loaded machine reads slowly: at least 11 reads
            rows, problems = read_rows(table)
            reads += 1
            for row in rows:  # whole: every column, the CRC of exactly what was written, padding complete
                assert row["crc"] == _crc(row) and row["padding"] == "x" * 50_000
                assert all(row[c] == row["id"] for c in REQUIRED if c != "config")
            assert [r["id"] for r in rows] == list(range(len(rows)))  # in order, none missing, none twice
            assert all("cut short" in p and f"line {len(rows) + 1} " in p for p in problems), problems  # only the last line
            torn_seen += bool(problems)
            counts.append(len(rows))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert reads > 10 and counts == sorted(counts) and counts[-1] > 0
    rows, problems = read_rows(table)
    assert len(rows) >= counts[-1] and len(problems) <= 1
    repair_tail(table)  # what the next sweep does first
    assert read_rows(table) == (rows, [])
    assert table.read_bytes().endswith(b"\n")


def test_a_table_line_nested_too_deep_is_named_and_the_good_rows_kept(tmp_path):
    """Found while fuzzing: json.loads raises RecursionError on a 100,000-deep nest, which escaped read_rows."""
    from jpq_core.sweeps import append_row

    table = tmp_path / "t.jsonl"
    row = {c: 1 for c in REQUIRED}
    append_row(table, row)
    with open(table, "ab") as f:
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    append_row(table, {**row, "id": 2})
    rows, problems = read_rows(table)
    assert [r["id"] for r in rows] == [1, 2]
    assert problems == [f"{table}: line 2 is not valid JSON; it is skipped and its configuration will run again."]


def test_a_page_job_killed_and_its_server_restarted_finishes_once_with_the_uninterrupted_numbers(tmp_path):
    """scripts/kill_jobs.py's quick form: 2 SIGKILLs of a 10-step fine-tuning job, server restarts between polls."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    tally_file = tmp_path / "tally.json"
    done = subprocess.run([sys.executable, str(root / "scripts" / "kill_jobs.py"), "--kills", "2", "--steps", "10",
                           "--save-every", "5", "--server-restarts", "0.2", "--quiet", "--json", str(tally_file)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    tally = json.loads(tally_file.read_text())
    assert tally["failures"] == [] and tally["kills"] == 2  # each round: done, once per kill resumed, one row
    assert tally["starts"] == 2 + tally["rounds"] and all(end.startswith("done/") for end in tally["round_ends"])
    assert tally["server_restarts"] >= 2 and tally["reader_reads"] > 0
