"""Experiment sets resume where they stopped and the report is written from the measured rows."""

import json

import jpq_core.experiments as ex
from jpq_core.pipeline import CompressionConfig


def _tiny_set(network):
    base = dict(network=network, wbits=4, abits=8, finetune="masked", steps=2, calibration_batches=1)
    return [CompressionConfig(criterion=c, sparsity=0.9, pipeline="prune-only", **{**base, "wbits": None, "abits": None})
            for c in ("magnitude", "random")] + [CompressionConfig(criterion="taylor", sparsity=0.95, pipeline="prune-then-quantize", **base)]


def test_a_set_resumes_and_a_cut_line_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setitem(ex.SETS, "tiny", _tiny_set)
    path = tmp_path / "runs.jsonl"
    assert ex.run_set("tiny", "resnet20", path, log=lambda *_: None) == 3
    rows = ex.read_results(path)
    assert len(rows) == 3 and {r["config"]["criterion"] for r in rows} == {"magnitude", "random", "taylor"}
    with open(path, "a") as f:
        f.write('{"network": "resnet20", "config": {"crit')  # a run killed while writing
    assert len(ex.read_results(path)) == 3
    assert ex.run_set("tiny", "resnet20", path, log=lambda *_: None) == 0  # nothing to redo

    text = ex.report(ex.read_results(path))
    assert "## resnet20" in text and "Criteria compared" in text
    top1 = rows[0]["metrics"]["top1"]
    assert f"{100 * top1:.2f}%" in text  # the measured number, not a placeholder
    assert ex.command_for(rows[2]["config"]) in text
    assert "--calibration-batches 1" in ex.command_for(rows[2]["config"])


def test_commands_in_the_report_reproduce_the_configuration():
    c = json.loads(ex.config_key(CompressionConfig(network="stereo", criterion="fisher", sparsity=0.98, wbits=None, abits=8)))
    cmd = ex.command_for(c)
    assert "--criterion fisher --sparsity 0.98 --wbits float --abits 8" in cmd
