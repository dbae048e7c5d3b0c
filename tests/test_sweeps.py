"""Sweeps: grids expand to the product, every configuration ends as exactly one row (also after a kill),
a damaged table keeps its good rows and names the bad lines, and Ray gives the rows the local pool gives."""

import json
from pathlib import Path
from dataclasses import asdict
import os
import signal
import subprocess
import sys
import time

import pytest

from jpq_core import sweeps
from jpq_core.errors import JPQError
from jpq_core.pipeline import CompressionConfig, load_compressed

# Seconds per configuration on one core: magnitude needs no gradient pass, one calibration batch.
TINY = """
network = "resnet20"
calibration_batches = 1
abits = 8
[[grid]]
criterion = "magnitude"
sparsity = [0.3, 0.5, 0.7, 0.9]
wbits = 4
finetune = "none"
"""
# The measured columns that must not depend on where a configuration ran.
MEASURED = ("top1", "dense_top1", "achieved_sparsity", "weight_bits", "memory_ratio", "bops", "energy_pj", "finetune_steps")


def _grid(tmp_path, text=TINY, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_grid_is_the_product_of_its_axes(tmp_path):
    spec = {"network": "resnet20", "grid": [
        {"criterion": ["magnitude", "taylor", "group-l1"], "granularity": "weight", "sparsity": [0.5, 0.9],
         "wbits": [4, "float"], "pipeline": ["prune-then-quantize", "joint"], "finetune": ["none", "masked"],
         "budget": [10, 20], "calibration": "percentile"}]}
    configs = sweeps.expand_grid(spec)
    # group-l1 is channel level and filtered out; with finetune "none" the budgets collapse to 0 steps
    assert len(configs) == 2 * 2 * 2 * 2 * (1 + 2)
    assert {c.criterion for c in configs} == {"magnitude", "taylor"}
    assert {c.wbits for c in configs} == {4, None}
    assert {c.steps for c in configs if c.finetune == "none"} == {0}
    assert {c.steps for c in configs if c.finetune == "masked"} == {10, 20}
    assert all(c.calibration == "percentile" for c in configs)
    assert len({sweeps.config_key(c) for c in configs}) == len(configs)


@pytest.mark.parametrize("option, other", [("lr_schedule", "cosine"), ("learned_step", True)])
def test_rows_from_before_an_option_existed_still_match_their_configuration(option, other):
    """Shipped rows lack the later options (`lr_schedule`: they all used a constant rate; `learned_step`): a
    rerun must skip them, while a run with the option set is a different configuration."""
    old_row = asdict(CompressionConfig(network="stereo", sparsity=0.95, wbits=4))
    del old_row[option]
    assert sweeps.config_key(old_row) == sweeps.config_key(CompressionConfig(network="stereo", sparsity=0.95, wbits=4))
    assert sweeps.config_key(old_row) != sweeps.config_key(
        CompressionConfig(network="stereo", sparsity=0.95, wbits=4, **{option: other}))


def test_grid_mistakes_are_named(tmp_path):
    with pytest.raises(JPQError, match=r"bad\.toml, grid block 1: unknown key sparsities"):
        sweeps.load_grid(_grid(tmp_path, '[[grid]]\nnetwork = "resnet20"\ncriterion = "taylor"\nsparsities = [0.5]\n', "bad.toml"))
    with pytest.raises(JPQError, match=r"grid block 2: .*sparsity"):
        sweeps.load_grid(_grid(tmp_path, 'network = "resnet20"\n[[grid]]\ncriterion = "taylor"\n[[grid]]\ncriterion = "taylor"\nsparsity = 1.5\n'))
    with pytest.raises(JPQError, match="not a valid TOML"):
        sweeps.load_grid(_grid(tmp_path, "[[grid]\n"))
    with pytest.raises(JPQError, match="no such grid file"):
        sweeps.load_grid(tmp_path / "missing.toml")


def test_a_tiny_grid_runs_end_to_end_and_a_rerun_skips_it(tmp_path):
    table = tmp_path / "results.jsonl"
    text = TINY.replace("[0.3, 0.5, 0.7, 0.9]", "[0.3, 0.9]") + \
        '[[grid]]\ncriterion = "magnitude"\nsparsity = 0.5\nwbits = 8\nfinetune = "masked"\nbudget = 2\n'
    configs = sweeps.load_grid(_grid(tmp_path, text))
    summary = sweeps.run_sweep(configs, table, workers=1, grid="tiny", progress=False)
    assert (summary.total, summary.ran, summary.skipped, summary.failed) == (3, 3, 0, [])
    rows, problems = sweeps.read_rows(table)
    assert problems == [] and len(rows) == 3
    for r, c in zip(rows, configs):
        assert (r["network"], r["criterion"], r["sparsity"], r["wbits"], r["pipeline"]) == (c.network, c.criterion, c.sparsity, c.wbits, c.pipeline)
        assert abs(r["achieved_sparsity"] - c.sparsity) < 1e-3 and 0 < r["memory_ratio"] < 1
        assert r["grid"] == "tiny" and r["versions"]["torch"] and r["git_rev"] and r["wall_s"] > 0
        assert "engine_ms" in r
    assert rows[0]["top1"] > rows[1]["top1"]  # 30% of weights removed hurts less than 90%
    # the only fine-tuned point is on its own front: its compressed network is kept beside the table
    tuned = rows[2]
    saved = table.parent / "checkpoints" / f"{tuned['id']}.safetensors"
    net, side = load_compressed(saved)
    assert side["compression"]["finetune"] == "masked" and side["metrics"]["top1"] == tuned["top1"]

    assert not list((table.parent / "state").glob("*"))  # progress files of finished runs are gone

    again = sweeps.run_sweep(configs, table, workers=1, progress=False)
    assert (again.ran, again.skipped) == (0, 3)
    assert len(sweeps.read_rows(table)[0]) == 3


def test_a_sweep_killed_inside_a_configuration_goes_on_from_its_progress_file(tmp_path, digits_task, resnet20):
    from jpq_core.pipeline import compress

    table = tmp_path / "results.jsonl"
    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, finetune="masked",
                               steps=4, calibration_batches=1)
    _, reference = compress(resnet20, digits_task, config)

    class Killed(Exception):
        pass

    def kill_in_second_stage(kind, i, n, seen=[]):  # noqa: B006 - counts fine-tuning stages across calls
        seen.append((kind, i))
        if kind == "fine-tune" and seen.count(("fine-tune", 1)) == 2:
            raise Killed

    state = Path(sweeps.state_file(table, config))
    with pytest.raises(Killed):  # what a sweep killed in the second stage leaves: the first stage's end, saved
        compress(resnet20, digits_task, config, progress=kill_in_second_stage, state=state)
    assert state.exists()
    summary = sweeps.run_sweep([config], table, workers=1, progress=False)
    assert summary.ran == 1 and not state.exists()
    row = sweeps.read_rows(table)[0][0]
    assert row["top1"] == reference["metrics"]["top1"] and row["weight_bits"] == reference["cost"]["weight_bits"]


def test_an_imported_report_brings_its_saved_network_when_on_the_front(tmp_path, monkeypatch, digits_task, resnet20):
    from jpq_core.pipeline import compress, save_compressed

    monkeypatch.chdir(tmp_path)  # a report's "saved" path is relative to where compress ran
    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, finetune="masked",
                               steps=2, calibration_batches=1)
    net, report = compress(resnet20, digits_task, config)
    report["saved"] = str(save_compressed(net, Path("runs") / "mine", report))  # relative, as the CLI writes it
    (tmp_path / "reports.jsonl").write_text(json.dumps(report) + "\n")
    table = tmp_path / "results.jsonl"
    assert sweeps.import_reports("reports.jsonl", table, "imported from reports.jsonl") == (1, [])
    row = sweeps.read_rows(table)[0][0]
    kept = tmp_path / "checkpoints" / f"{row['id']}.safetensors"
    assert load_compressed(kept)[1]["metrics"]["top1"] == row["top1"]  # the only fine-tuned row: on the front


def _fake_row(i: int) -> dict:
    row = {a: 0 for a in sweeps.REQUIRED}
    row.update(network="resnet20", criterion="magnitude", sparsity=i / 10, config={"seed": i}, id=f"r{i}", top1=0.5)
    return row


def test_a_damaged_table_names_the_bad_lines_and_keeps_the_good_rows(tmp_path):
    table = tmp_path / "results.jsonl"
    for i in range(3):
        sweeps.append_row(table, _fake_row(i))
    lines = table.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["top1"] = 0.99  # a number changed by hand: the row's checksum no longer fits
    table.write_text("\n".join([lines[0], json.dumps(edited), "not json at all", lines[2]]) + "\n" + lines[2][:40])
    rows, problems = sweeps.read_rows(table)
    assert [r["id"] for r in rows] == ["r0", "r2"]
    assert len(problems) == 3 and all(str(table) in p for p in problems)
    assert "line 2 fails its checksum" in problems[0]
    assert "line 3 is not valid JSON" in problems[1]
    assert "line 5 is cut short" in problems[2]

    from jpq_core.report import load_results

    df, problems_df = load_results(table)
    assert list(df["id"]) == ["r0", "r2"] and problems_df == problems

    assert sweeps.repair_tail(table)  # the next sweep cuts the torn line, then appends on a fresh line
    sweeps.append_row(table, _fake_row(7))
    rows, problems = sweeps.read_rows(table)
    assert [r["id"] for r in rows] == ["r0", "r2", "r7"] and len(problems) == 2


def test_a_table_path_that_is_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(JPQError, match="not a file"):
        sweeps.read_rows(tmp_path)


def test_a_killed_sweep_finishes_each_configuration_exactly_once(tmp_path, root):
    grid = _grid(tmp_path, TINY.replace("[0.3, 0.5, 0.7, 0.9]", "[0.3, 0.5, 0.9]"))
    table = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "jpq_core", "sweep", str(grid), "--workers", "1", "--out", str(table), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (table.exists() and table.read_text().count("\n") >= 1):
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    done_before = len(sweeps.read_rows(table)[0])
    assert 1 <= done_before < 3
    with open(table, "a") as f:  # as if the kill had come in the middle of writing a row
        f.write('{"network": "resnet20", "criterion": "magn')
    summary = sweeps.run_sweep(sweeps.load_grid(grid), table, workers=1, progress=False)
    assert summary.ran == 3 - done_before and summary.skipped == done_before
    rows, problems = sweeps.read_rows(table)
    assert problems == []
    assert sorted(r["sparsity"] for r in rows) == [0.3, 0.5, 0.9]


def test_ray_gives_the_rows_the_local_pool_gives(tmp_path):
    ray = pytest.importorskip("ray")
    text = TINY.replace("[0.3, 0.5, 0.7, 0.9]", "[0.5]") + '[[grid]]\ncriterion = "magnitude"\nsparsity = 0.8\nwbits = 4\nfinetune = "masked"\nbudget = 2\n'
    configs = sweeps.load_grid(_grid(tmp_path, text))
    pool = sweeps.run_sweep(configs, tmp_path / "pool" / "results.jsonl", workers=2, progress=False)
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, runtime_env=sweeps.ray_runtime_env(), include_dashboard=False,
             log_to_driver=False)
    try:
        on_ray = sweeps.run_sweep(configs, tmp_path / "ray" / "results.jsonl", ray_address="auto", progress=False)
    finally:
        ray.shutdown()
    assert pool.ran == on_ray.ran == 2 and not pool.failed and not on_ray.failed
    by_id = lambda path: {r["id"]: r for r in sweeps.read_rows(path)[0]}  # noqa: E731
    a, b = by_id(tmp_path / "pool" / "results.jsonl"), by_id(tmp_path / "ray" / "results.jsonl")
    assert a.keys() == b.keys()
    for rid in a:
        assert {k: a[rid][k] for k in MEASURED} == {k: b[rid][k] for k in MEASURED}
    # the fine-tuned point's checkpoint came back from the Ray worker to the driver
    tuned = next(r for r in b.values() if r["finetune"] == "masked")
    assert (tmp_path / "ray" / "checkpoints" / f"{tuned['id']}.safetensors").exists()


def test_two_sweeps_cannot_write_one_table_at_once(tmp_path):
    table = tmp_path / "results.jsonl"
    with sweeps._TableLock(table):
        with pytest.raises(JPQError, match="another sweep is writing this table"):
            sweeps.run_sweep([], table, workers=1, progress=False)
    assert sweeps.run_sweep([], table, workers=1, progress=False).total == 0


def test_a_torchvision_network_sweeps_and_reports_like_the_shipped_ones(tmp_path):
    """Any registered network is a grid's `network`: a randomly initialised torchvision model (no fine-tuning)
    gets its rows, and the report draws it under a file name without the ':' of its name."""
    from jpq_core import report

    table = tmp_path / "results.jsonl"
    configs = sweeps.expand_grid({"grid": [{"network": "tv:mobilenet_v3_small", "criterion": "magnitude",
                                            "sparsity": [0.5, 0.9], "wbits": 8, "abits": 8, "finetune": "none"}]})
    summary = sweeps.run_sweep(configs, table, workers=1, progress=False)
    assert (summary.ran, summary.failed) == (2, [])
    df, problems = report.load_results(table)
    assert problems == [] and list(df.network) == ["tv:mobilenet_v3_small"] * 2 and set(df.metric) == {"top1"}
    assert df.memory_ratio.iloc[1] < df.memory_ratio.iloc[0] < 1
    assert report.write_report(table, tmp_path / "results.md") == []
    figure = tmp_path / "figures" / "tradeoff-tv-mobilenet_v3_small.png"
    assert figure.exists() and "(figures/tradeoff-tv-mobilenet_v3_small.png)" in (tmp_path / "results.md").read_text()
