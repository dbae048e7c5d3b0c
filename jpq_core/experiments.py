"""The measurements behind docs/results.md: named sets of compression runs, resumable, one JSON line each.

    python -m jpq_core experiments run claims --network resnet20    # run (or finish) a set
    python -m jpq_core experiments report                           # write docs/results.md

Each finished run appends one line to `cached_runs/results/compress_runs.jsonl` (written whole and flushed
to disk; a line cut short by a kill is ignored on reading), keyed by its full configuration, so running a
set again skips what is done and finishes the rest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from jpq_core.checkpoints import library_versions
from jpq_core.pipeline import CompressionConfig

RESULTS = Path(__file__).resolve().parents[1] / "cached_runs" / "results" / "compress_runs.jsonl"
# Fine-tuning budget per run of these sets (the same for every configuration of a network).
BUDGET = {"stereo": 300, "resnet20": 200}
CRITERIA = ("magnitude", "taylor", "taylor-abs-norm", "fisher", "random")
DEFAULT_CALIBRATION = CompressionConfig().calibration_batches
CLAIM_SPARSITIES = {"stereo": (0.95, 0.99), "resnet20": (0.9, 0.95, 0.98, 0.99)}


def claim_configs(network: str) -> list[CompressionConfig]:
    """The paper's three claims on `network`: the headline point, criteria compared, pipelines compared."""
    steps = BUDGET[network]
    base = dict(network=network, wbits=4, abits=8, finetune="masked", steps=steps)
    configs = [CompressionConfig(criterion="taylor", sparsity=s, pipeline="prune-then-quantize", **base)
               for s in (0.95, 0.98, 0.99)]
    configs += [CompressionConfig(criterion=c, sparsity=s, pipeline="prune-only", **{**base, "wbits": None, "abits": None})
                for s in CLAIM_SPARSITIES[network] for c in CRITERIA]
    configs += [CompressionConfig(criterion="taylor", sparsity=0.95, pipeline=p, **base)
                for p in ("quantize-then-prune", "joint")]
    configs += [CompressionConfig(criterion="taylor", sparsity=0.95, pipeline="prune-then-quantize", **{**base, "finetune": "distill"})]
    return configs


SETS = {"claims": claim_configs}


def config_key(config: CompressionConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def read_results(path: Path = RESULTS) -> list[dict]:
    """Every complete line of the results file; a truncated last line (a killed run) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_result(row: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_set(name: str, network: str, path: Path = RESULTS, log=print, shard: tuple[int, int] = (0, 1)) -> int:
    """Run every configuration of set `name` for `network` not yet in `path`; returns how many ran.

    `shard=(i, n)` runs every n-th configuration starting at i, so n processes can share a set.
    """
    from jpq_core.models import load_network
    from jpq_core.pipeline import compress
    from jpq_core.tasks import make_task

    done = {config_key(CompressionConfig(**r["config"])) for r in read_results(path)}
    todo = [c for c in SETS[name](network)[shard[0]::shard[1]] if config_key(c) not in done]
    if not todo:
        return 0
    model, task = load_network(network), make_task(network)
    for i, config in enumerate(todo):
        start = time.time()
        _, report = compress(model, task, config)
        report.pop("layers")
        report.pop("sensitivity", None)
        report.update(set=name, versions=library_versions(), wall_seconds=round(time.time() - start, 1))
        append_result(report, path)
        log(f"[{i + 1}/{len(todo)}] {network} {config.pipeline} {config.criterion} s={config.sparsity} "
            f"w{config.wbits}a{config.abits}: {report['metrics']} ({report['wall_seconds']}s)")
    return len(todo)


def command_for(c: dict) -> str:
    """The `compress` command that reproduces one run."""
    bits = lambda b: "float" if b is None else str(b)  # noqa: E731
    return (f"python -m jpq_core compress --network {c['network']} --criterion {c['criterion']} --sparsity {c['sparsity']} "
            f"--wbits {bits(c['wbits'])} --abits {bits(c['abits'])} --pipeline {c['pipeline']} --finetune {c['finetune']} "
            f"--steps {c['steps']}" + ("" if c["calibration_batches"] == DEFAULT_CALIBRATION else f" --calibration-batches {c['calibration_batches']}")
            + " --json")


def _metric(network: str) -> tuple[str, str, bool]:
    """(key, label, higher is better) of the headline metric."""
    return ("bad3", "Middlebury bad-3", False) if network == "stereo" else ("top1", "digits top-1", True)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def report(rows: list[dict]) -> str:
    """docs/results.md from the results rows: the headline point, criteria and pipelines, per network."""
    out = ["# Results", "",
           "Every number below comes from `python -m jpq_core experiments run claims --network NETWORK`, which runs the",
           "`compress` commands shown (one per row) and appends to `cached_runs/results/compress_runs.jsonl`; this page is",
           "written from that file by `python -m jpq_core experiments report`. Energy and hardware cost are estimates",
           "(45 nm model, see [costs.md](costs.md)); accuracy, sparsity, memory and BOPs are measured or counted.",
           f"Fine-tuning budget: {BUDGET['stereo']} steps of 4 synthetic 192x384 scenes (stereo), {BUDGET['resnet20']} steps of",
           "64 digits (ResNet-20), the same for every configuration of a network.", ""]
    for network in ("stereo", "resnet20"):
        mine = [r for r in rows if r["network"] == network]
        if not mine:
            continue
        key, label, higher = _metric(network)
        dense = mine[0]["dense_metrics"][key]
        out += [f"## {network}", "", f"Dense float32 {label}: **{_pct(dense)}**.", ""]

        head = sorted((r for r in mine if r["config"]["pipeline"] == "prune-then-quantize" and r["config"]["criterion"] == "taylor"),
                      key=lambda r: (r["config"]["finetune"], r["sparsity"]))
        if head:
            out += ["### Prune then quantize (Taylor, 4-bit weights, 8-bit activations)", "",
                    f"| sparsity | fine-tuning | {label} | change | memory vs dense | BOPs vs dense | energy (est.) | hardware cost (est.) |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in head:
                c, m = r["cost"], r["metrics"][key]
                out.append(f"| {_pct(r['sparsity'])} | {r['config']['finetune']} | {_pct(m)} | {100 * (m - dense):+.2f} pt | "
                           f"{_pct(c['memory_ratio'])} | {_pct(c['bops_ratio'])} | {_pct(c['energy_ratio'])} | {_pct(c['hardware_cost_ratio'])} |")
            out += ["", "Commands:", ""] + [f"    {command_for(r['config'])}" for r in head] + [""]

        crit = [r for r in mine if r["config"]["pipeline"] == "prune-only"]
        if crit:
            sparsities = sorted({r["config"]["sparsity"] for r in crit})
            names = [c for c in CRITERIA if any(r["config"]["criterion"] == c for r in crit)]
            table = {(r["config"]["sparsity"], r["config"]["criterion"]): r["metrics"][key] for r in crit}
            out += ["### Criteria compared (prune only, float, masked fine-tuning, same budget)", "",
                    f"{label} after pruning and fine-tuning; best per row in bold.", "",
                    "| sparsity | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
            for s in sparsities:
                vals = {n: table.get((s, n)) for n in names}
                present = [v for v in vals.values() if v is not None]
                best = (max if higher else min)(present) if present else None
                cells = ["" if v is None else (f"**{_pct(v)}**" if v == best else _pct(v)) for v in vals.values()]
                out.append(f"| {_pct(s)} | " + " | ".join(cells) + " |")
            example = next(r for r in crit)
            out += ["", f"Command (one row, one criterion): `{command_for(example['config'])}`", ""]

        pipes = [r for r in mine if r["config"]["sparsity"] == 0.95 and r["config"]["finetune"] == "masked"
                 and r["config"]["criterion"] == "taylor" and r["config"]["wbits"] == 4]
        if len(pipes) > 1:
            out += ["### Pipelines compared (Taylor, 95% sparsity, 4/8 bits, same budget)", "",
                    f"| pipeline | {label} | memory vs dense | BOPs vs dense |", "| --- | --- | --- | --- |"]
            for r in sorted(pipes, key=lambda r: r["config"]["pipeline"]):
                out.append(f"| {r['config']['pipeline']} | {_pct(r['metrics'][key])} | {_pct(r['cost']['memory_ratio'])} | {_pct(r['cost']['bops_ratio'])} |")
            out += ["", f"Command: `{command_for(pipes[0]['config'])}` (with each `--pipeline`)", ""]
    return "\n".join(out) + "\n"
