"""The results table as the app reads it, its Pareto fronts, and docs/results.md written from the rows."""

import json
import math
import shutil

import pandas as pd
import pytest

from jpq_core import sweeps
from jpq_core.cli import main
from jpq_core.report import load_results, pareto_front, write_report


def test_pareto_front_keeps_exactly_the_unbeaten_points():
    df = pd.DataFrame({"memory": [1.0, 2.0, 2.0, 3.0, 0.5, 1.0], "top1": [0.5, 0.9, 0.8, 0.9, 0.1, 0.5]})
    front = pareto_front(df, "memory", "top1", x_lower_is_better=True, y_lower_is_better=False)
    assert list(zip(front.memory, front.top1)) == [(0.5, 0.1), (1.0, 0.5), (1.0, 0.5), (2.0, 0.9)]  # ties both kept
    error = pareto_front(df.rename(columns={"top1": "error"}), "memory", "error", True, True)
    assert list(zip(error.memory, error.error)) == [(0.5, 0.1)]
    assert pareto_front(df.iloc[:0], "memory", "top1").empty


def test_the_shipped_table_reads_cleanly_with_the_columns_the_app_uses(root):
    df, problems = load_results(root / "cached_runs" / "results" / "sweeps.jsonl")
    assert problems == []
    assert set(df.network) <= {"stereo", "resnet20"} and df["id"].is_unique
    for column in (*sweeps.AXES, "memory_ratio", "bops_ratio", "hardware_cost_ratio", "energy_ratio", "achieved_sparsity",
                   "wall_s", "git_rev", "engine_ms", "version_torch", "headline", "loss_pt", "checkpoint"):
        assert column in df.columns
    r = df[df.network == "resnet20"].iloc[0]
    assert math.isclose(r.loss_pt, 100 * (r.dense_top1 - r.top1))
    s = df[df.network == "stereo"].iloc[0]
    assert math.isclose(s.loss_pt, 100 * (s.bad3 - s.dense_bad3)) and s.headline == s.bad3
    assert set(df[df.wbits.isna()].wbits_label) <= {"float"}
    for path in df.checkpoint.dropna():  # checkpoints kept for fine-tuned points on the front only
        assert df[df.checkpoint == path].finetune.iloc[0] != "none"


def test_the_report_is_written_from_the_rows_and_says_which_claim_is_not_met(root, tmp_path):
    table = tmp_path / "results.jsonl"
    shutil.copyfile(root / "cached_runs" / "results" / "sweeps.jsonl", table)
    with open(table, "a") as f:
        f.write('{"network": "stereo", "crit')  # a torn last line: named on the page, the rest reported
    page = tmp_path / "docs" / "results.md"
    problems = write_report(table, page)
    text = page.read_text()
    df, _ = load_results(table)
    assert len(problems) == 1 and "line" in problems[0] and "Problems reading the table" in text
    assert f"({len(df)} configurations)" in text
    for name in ("tradeoff-resnet20", "tradeoff-stereo", "criteria-resnet20", "pipelines-resnet20"):
        png = tmp_path / "docs" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(figures/{name}.png)" in text
    head = df[(df.network == "stereo") & (df.pipeline == "prune-then-quantize") & df.criterion.str.startswith("taylor")
              & (df.sparsity >= 0.95) & (df.wbits_label == "4") & (df.finetune != "none")]
    met = head[(head.loss_pt <= 2) & (head.memory_ratio <= 0.02) & (head.bops_ratio <= 0.005)]
    assert (f"**Met by {len(met)} of {len(head)} runs.**" if len(met) else "**Not met**") in text
    best = head.loc[head.loss_pt.idxmin()]
    assert f"{100 * best.bad3:.2f}%" in text  # the measured number itself
    assert "python -m jpq_core sweep configs/resnet20-tradeoffs.toml" in text


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "r.md")]) == 2
    assert "no complete rows" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_finetuning_labels_tell_apart_runs_that_differ_only_in_how_they_spend_the_budget():
    """The headline table lists several 95% runs; each label must say what differs (schedule, rate, allocation)."""
    from jpq_core.report import finetuning_label

    def row(finetune="masked", budget=300, **config):
        return pd.Series({"finetune": finetune, "budget": budget, "config": config})

    assert finetuning_label(row(schedule="oneshot", lr_schedule="constant", allocation="global")) == "masked 300 steps"
    assert finetuning_label(row("distill", 3000, schedule="gradual", lr_schedule="cosine")) == \
        "distill 3000 steps, gradual, cosine lr"
    assert finetuning_label(row(allocation="uniform")) == "masked 300 steps, uniform allocation"
    assert finetuning_label(row("none", 0, allocation="sensitivity")) == "no fine-tuning, sensitivity allocation"
    assert finetuning_label(row("none", 0, allocation="recovery-aware", recovery="lsq")) == \
        "no fine-tuning, recovery-aware allocation, lsq recovery"


def test_criteria_tables_compare_one_recipe_at_one_budget():
    """A 95% cell must not average the plain 300-step run with a cosine-rate run or a 3,000-step run."""
    from jpq_core.report import criteria_rows

    def row(bad3, budget=300, **config):
        return {"network": "stereo", "granularity": "weight", "criterion": "taylor", "sparsity": 0.95,
                "finetune": "masked", "pipeline": "prune-then-quantize", "wbits_label": "4", "abits_label": "8",
                "budget": budget, "headline": bad3, "config": {"schedule": "oneshot", **config}}

    df = pd.DataFrame([row(0.33), row(0.52, lr_schedule="cosine"), row(0.34, allocation="uniform"),
                       row(0.25, budget=3000), row(0.40, sparsity_note="another 300-step run")])
    part = criteria_rows(df, "stereo")["fine-tuned, 4-bit weights, 8-bit activations, prune then quantize"]
    assert sorted(part.headline) == [0.33, 0.40]


def test_pipeline_table_cells_hold_one_recipe_at_one_budget():
    """The 4-bit prune-then-quantize cell once averaged the 300-step run with 3,000-step, cosine and LSQ runs."""
    from jpq_core.report import pipeline_rows

    def row(pipeline, bad3, budget=300, **config):
        return {"network": "stereo", "criterion": "taylor", "sparsity": 0.95, "finetune": "masked", "pipeline": pipeline,
                "wbits_label": "4", "abits_label": "8", "budget": budget, "headline": bad3, "config": {"schedule": "oneshot", **config}}

    df = pd.DataFrame([row("prune-then-quantize", 0.33), row("joint", 0.37), row("prune-then-quantize", 0.20, budget=3000),
                       row("prune-then-quantize", 0.52, lr_schedule="cosine"), row("prune-then-quantize", 0.30, learned_step=True),
                       row("quantize-then-prune", 0.46)])
    assert sorted(pipeline_rows(df, "stereo").headline) == [0.33, 0.37, 0.46]


def test_learned_step_runs_are_shown_next_to_their_min_max_twin():
    from jpq_core.pipeline import CompressionConfig
    from dataclasses import asdict
    from jpq_core.report import learned_step_section

    def row(top1, **kw):
        config = asdict(CompressionConfig(network="resnet20", sparsity=0.95, wbits=3, finetune="masked", steps=200, **kw))
        return pd.Series({"network": "resnet20", "criterion": "taylor", "sparsity": 0.95, "wbits_label": "3", "abits_label": "8",
                          "pipeline": "prune-then-quantize", "finetune": "masked", "budget": 200, "metric": "top1",
                          "headline": top1, "config": config})

    lonely = row(0.5, learned_step=True, seed=1)  # no min/max run with seed 1: nothing to compare it with
    df = pd.DataFrame([row(0.9574), row(0.9700, learned_step=True), row(0.8, lr_schedule="cosine"), lonely])
    lines = [line for line in learned_step_section(df) if line.startswith("| resnet20")]
    assert len(lines) == 1 and "95.74%" in lines[0] and "97.00%" in lines[0] and "+1.26 pt" in lines[0]
    from jpq_core.report import finetune_mode_section

    def row(finetune, bad3, budget=300, **config):
        return {"network": "stereo", "criterion": "taylor", "sparsity": 0.95, "finetune": finetune,
                "pipeline": "prune-then-quantize", "wbits_label": "4", "abits_label": "8", "budget": budget,
                "headline": bad3, "loss_pt": (bad3 - 0.138) * 100, "grid": "g", "config": {"schedule": "oneshot", **config}}

    df = pd.DataFrame([row("masked", 0.33), row("distill", 0.36), row("regrow", 0.31),
                       row("distill", 0.20, budget=3000), row("masked", 0.52, lr_schedule="cosine"),
                       row("masked", 0.30, seed=1)])  # another seed is not another cell
    table = [line for line in finetune_mode_section(df, "stereo") if line.startswith("| ") and "%" in line]
    assert [line.split(" | ")[0] for line in table] == ["| distill", "| masked", "| regrow"]
    assert "**31.00%**" in table[2] and "**" not in table[0] + table[1]
    # a second budget at which two modes ran gets a table of its own
    section = finetune_mode_section(pd.concat([df, pd.DataFrame([row("distill-cost", 0.18, budget=3000)])]), "stereo")
    assert sum("steps each" in line for line in section) == 2 and any("3000 steps each" in line for line in section)
    assert any(line.startswith("| distill-cost | **18.00%** |") for line in section)


def test_runs_differing_only_by_seed_are_shown_with_their_spread():
    from dataclasses import asdict

    from jpq_core.pipeline import CompressionConfig
    from jpq_core.report import seed_section

    def row(bad3, seed, **kw):
        config = asdict(CompressionConfig(network="stereo", sparsity=0.95, wbits=4, abits=8, steps=300, seed=seed, **kw))
        return pd.Series({"network": "stereo", "criterion": "taylor", "sparsity": 0.95, "wbits_label": "4", "abits_label": "8",
                          "pipeline": "prune-then-quantize", "finetune": "masked", "budget": 300, "metric": "bad3",
                          "headline": bad3, "config": config})

    df = pd.DataFrame([row(0.3325, 0), row(0.3747, 2), row(0.3500, 1), row(0.40, 1, calibration="percentile")])
    lines = [line for line in seed_section(df) if line.startswith("| stereo")]
    assert len(lines) == 1  # the percentile run has no twin with another seed
    assert "33.25%, 35.00%, 37.47% (0, 1, 2)" in lines[0] and lines[0].endswith("| 35.24% | 4.22 pt |")


def test_calibrations_of_one_run_are_side_by_side_and_kept_out_of_the_default_recipe():
    from dataclasses import asdict

    from jpq_core.pipeline import CompressionConfig
    from jpq_core.report import _same_budget_default_recipe, calibration_section

    def row(bad3, abits=8, **kw):
        config = asdict(CompressionConfig(network="stereo", sparsity=0.0, wbits=None, abits=abits, pipeline="quantize-only",
                                          finetune="none", steps=0, **kw))
        return pd.Series({"network": "stereo", "criterion": "magnitude", "sparsity": 0.0, "wbits_label": "float",
                          "abits_label": str(abits), "pipeline": "quantize-only", "finetune": "none", "budget": 0,
                          "metric": "bad3", "headline": bad3, "config": config})

    df = pd.DataFrame([row(0.1734), row(0.1402, calibration="percentile"), row(0.1482, calibration="mse"),
                       row(0.30, abits=4), row(0.50, abits=6, calibration="mse")])  # lone runs: nothing to compare
    lines = [line for line in calibration_section(df) if line.startswith("| stereo")]
    assert len(lines) == 1 and "/a8" in lines[0] and "activation ranges" not in lines[0]
    assert lines[0].endswith("| 17.34% | 14.02% | 14.82% |")
    kept = _same_budget_default_recipe(df.assign(finetune="masked", budget=300))
    assert sorted(kept.headline) == [0.1734, 0.30]


def test_the_long_run_curve_is_tabled_as_far_as_it_has_gone(tmp_path):
    from jpq_core.report import long_run_section

    curve = tmp_path / "curve.jsonl"
    assert long_run_section(curve, pd.DataFrame({"network": [], "dense_bad3": []})) == []  # no run yet: no section
    curve.write_text("\n".join(json.dumps({"step": s, "stage": st, "quantized": q, "metrics": {"bad3": b, "epe": 2.5}})
                               for s, st, q, b in ((2500, 1, False, 0.20), (22500, 2, True, 0.16))) + "\n")
    lines = long_run_section(curve, pd.DataFrame({"network": ["stereo"], "dense_bad3": [0.138]}))
    rows = [line for line in lines if line.startswith("| 2")]
    assert rows == ["| 2,500 | 1 | float, masked | 20.00% | +6.20 pt | 2.500 |",
                    "| 22,500 | 2 | 4-bit | 16.00% | +2.20 pt | 2.500 |"]
    # a report of another network's sweep (no stereo rows, no stereo columns) has no stereo long-run section
    assert long_run_section(curve, pd.DataFrame({"network": ["tv:resnet18"], "dense_top1": [0.7]})) == []
