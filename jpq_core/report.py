"""The results table as a DataFrame, its Pareto fronts, and `docs/results.md` with PNG figures.

    python -m jpq_core report                 # docs/results.md + docs/figures/*.png from the sweeps table

`load_results` and `pareto_front` are what the dashboard's trade-off page calls. The report answers the
paper's three claims (Yu, Wu, Klopp et al. 2020) on our networks from the measured rows only:
memory and hardware cost cut at which accuracy loss, Taylor against the other criteria, joint against
separate pruning and quantization. Every figure names the sweep grids whose rows it shows.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from jpq_core.checkpoints import atomic_write
from jpq_core.sweeps import AXES, RESULTS, ROOT, checkpoint_dir, config_key, pareto_mask, primary_metric, read_rows

CRITERIA = ("magnitude", "taylor", "taylor-square", "taylor-abs-norm", "fisher", "random")
PIPELINES = ("prune-then-quantize", "quantize-then-prune", "joint")
LOSS_LEVELS = (0.5, 2.0, 5.0, 10.0)
WIN_MARGIN = 0.01  # a criterion wins a sparsity when it beats the next one by at least 1 point  # accuracy loss in points for the "cut at which loss" table
METRIC_LABEL = {"bad3": "Middlebury bad-3 (%)", "top1": "digits top-1 (%)"}


def bits_label(bits) -> str:
    return "float" if bits is None or (isinstance(bits, float) and math.isnan(bits)) else str(int(bits))


def _loss_pt(value, dense, higher: bool) -> float:
    """Accuracy lost against the dense network, in points (NaN when the row lacks the metric)."""
    if value is None or dense is None:
        return math.nan
    return 100 * ((dense - value) if higher else (value - dense))


def load_results(path=None) -> tuple[pd.DataFrame, list[str]]:
    """The sweeps table as a DataFrame (one row per finished configuration) and the problems found reading it.

    Columns: the axes (network, criterion, granularity, sparsity, wbits, abits, pipeline, finetune, budget,
    seed; wbits/abits NaN = float), every metric (top1, or epe/bad1/bad2/bad3/coverage) and `dense_` metric,
    every cost figure (weight_bits, memory_ratio, bops_ratio, energy_ratio, hardware_cost_ratio, ...),
    achieved_sparsity, wall_s, engine_ms (None without the engine), git_rev, grid, version_* and added here:
    recovery (the one-shot recovery method, "none" for rows before it existed), wbits_label/abits_label
    ("4", "float"), metric (the network's headline metric name), headline (its value),
    loss_pt (accuracy lost against the dense network, in points; negative = better than dense), and
    checkpoint (path of the saved fine-tuned network when it is on the Pareto front, else None).
    A bad line is left out and described in `problems` (file and line); the good rows are all returned.
    """
    path = Path(path) if path else RESULTS
    rows, problems = read_rows(path)
    if not rows:
        return pd.DataFrame(columns=[*AXES, "id", "metric", "headline", "loss_pt", "memory_ratio", "bops_ratio"]), problems
    versions = pd.DataFrame([r.get("versions") or {} for r in rows]).add_prefix("version_")
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("crc", "versions")} for r in rows])
    df = pd.concat([df, versions], axis=1)
    df["recovery"] = [(r["config"] if isinstance(r.get("config"), dict) else {}).get("recovery", "none") for r in rows]
    df["wbits_label"] = [bits_label(r["wbits"]) for r in rows]
    df["abits_label"] = [bits_label(r["abits"]) for r in rows]
    metric = [primary_metric(r["network"]) for r in rows]
    df["metric"] = [m for m, _ in metric]
    df["headline"] = [r.get(m) for r, (m, _) in zip(rows, metric)]
    df["loss_pt"] = [_loss_pt(r.get(m), r.get(f"dense_{m}"), higher) for r, (m, higher) in zip(rows, metric)]
    folder = checkpoint_dir(path)
    df["checkpoint"] = [str(f) if (f := folder / f"{i}.safetensors").exists() else None for i in df["id"]]
    return df, problems


RUN_KINDS = ("fine-tuned", "recovered", "raw")


def run_kind(df: pd.DataFrame) -> pd.Series:
    """Per row: "fine-tuned" (trained after compression), "recovered" (repaired in one shot on calibration
    data, no training) or "raw" (neither: what pruning and quantization alone do)."""
    recovery = df["recovery"] if "recovery" in df else pd.Series("none", index=df.index)
    return pd.Series(["fine-tuned" if ft != "none" else "recovered" if rec != "none" else "raw"
                      for ft, rec in zip(df["finetune"], recovery)], index=df.index, dtype=object)


def pareto_front(df: pd.DataFrame, x: str, y: str, x_lower_is_better: bool = True,
                 y_lower_is_better: bool = True) -> pd.DataFrame:
    """The rows of `df` that no other row beats in both `x` and `y` (ties kept), sorted by `x`."""
    if df.empty:
        return df
    keep = pareto_mask(df[x].tolist(), df[y].tolist(), x_lower_is_better, y_lower_is_better)
    return df[keep].sort_values(x)


# ---- figures ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _file_name(name: str) -> str:
    """`name` as a portable file name: a network name may hold ':' (tv:resnet18) or a path (a user factory)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def _save(fig, name: str, folder: Path) -> Path:
    path = folder / f"{_file_name(name)}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


def _commands(rows: pd.DataFrame) -> str:
    """How the rows of a figure or table were produced: the sweep commands of their grids."""
    out = []
    for grid in sorted(rows["grid"].dropna().unique()):
        if grid.startswith("imported"):
            out.append(f"rows {grid} (each: `python -m jpq_core compress ... --json`, its configuration in the table)")
        else:
            out.append(f"`python -m jpq_core sweep configs/{grid}.toml`")
    return "; ".join(out) + "; then `python -m jpq_core report`."


def tradeoff_figure(df: pd.DataFrame, network: str, folder: Path) -> Path:
    """Headline metric against weight memory and BOPs (log scale), every row, the front drawn."""
    plt = _pyplot()
    d = df[df.network == network]
    metric, higher = primary_metric(network)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = dict(zip(["2", "3", "4", "8", "16", "float"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, x, label in ((axes[0], "memory_ratio", "weight memory vs dense float32 (with index overhead)"),
                         (axes[1], "bops_ratio", "BOPs vs dense float32")):
        for (kind, wb), part in d.groupby([run_kind(d), "wbits_label"]):
            ax.scatter(100 * part[x], 100 * part[metric], s=14 if kind == "raw" else 36, alpha=0.75,
                       marker={"fine-tuned": "o", "recovered": "^", "raw": "x"}[kind], color=colours.get(wb),
                       label=f"{kind if kind != 'raw' else 'no fine-tuning'}, weights {wb}" + ("" if wb == "float" else "-bit"))
        front = pareto_front(d, x, metric, True, not higher)
        ax.step(100 * front[x], 100 * front[metric], where="post", color="black", lw=1, label="Pareto front")
        ax.axhline(100 * d[f"dense_{metric}"].iloc[0], color="grey", ls="--", lw=1, label="dense float32")
        _log_percent_axis(ax)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(METRIC_LABEL[metric])
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{network}: accuracy against memory and hardware cost ({len(d)} configurations)")
    return _save(fig, f"tradeoff-{network}", folder)


def _log_percent_axis(ax):
    """Log-scale x axis of percentages (values already x100) labelled 1%, 2%, 5%, 10%, ..."""
    from matplotlib.ticker import LogLocator, NullFormatter, PercentFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(PercentFormatter(decimals=None))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _lines(ax, d: pd.DataFrame, by: str, x: str, metric: str, order=None):
    keys = [k for k in (order or sorted(d[by].unique())) if k in set(d[by])]
    for k in keys:
        part = d[d[by] == k].sort_values(x)
        ax.plot(part[x], 100 * part[metric], marker="o", ms=4, label=str(k))
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)


def _default_recipe(d: pd.DataFrame) -> pd.DataFrame:
    """The rows fine-tuned the default way: one-shot pruning, a constant rate, the min/max step, one global
    threshold, min/max activation ranges, seed 0 (other seeds are the seed section's); so that one cell of a
    comparison is one recipe."""
    if d.empty:
        return d
    config = [c if isinstance(c, dict) else {} for c in d.config]
    default = pd.Series([c.get("schedule", "oneshot") == "oneshot" and c.get("lr_schedule", "constant") == "constant"
                         and not c.get("learned_step") and c.get("allocation", "global") == "global"
                         and c.get("calibration", "minmax") == "minmax" and c.get("seed", 0) == 0 for c in config],
                        index=d.index)
    return d[default]


def _same_budget_default_recipe(d: pd.DataFrame) -> pd.DataFrame:
    """The default-recipe rows that spent the grid's usual budget (the most common one)."""
    d = _default_recipe(d)
    return d if d.empty else d[d.budget == d.budget.mode().iloc[0]]


def criteria_rows(df: pd.DataFrame, network: str) -> dict[str, pd.DataFrame]:
    """The criteria comparisons: fine-tuned (prune only, float; and 4-bit weights, prune first, the headline
    setting, which also shows where accuracy breaks) and without fine-tuning (4-bit, prune first)."""
    d = df[(df.network == network) & (df.granularity == "weight") & df.criterion.isin(CRITERIA)]
    return {
        "fine-tuned, prune only, float": _same_budget_default_recipe(d[(d.finetune == "masked") & (d.pipeline == "prune-only")]),
        "fine-tuned, 4-bit weights, 8-bit activations, prune then quantize": _same_budget_default_recipe(
            d[(d.finetune == "masked") & (d.pipeline == "prune-then-quantize") & (d.wbits_label == "4")
              & (d.abits_label == "8")]),
        "no fine-tuning, 4-bit weights, prune then quantize":
            d[(run_kind(d) == "raw") & (d.pipeline == "prune-then-quantize") & (d.wbits_label == "4")],
    }


def criteria_figure(df: pd.DataFrame, network: str, folder: Path) -> Path | None:
    parts = {k: v for k, v in criteria_rows(df, network).items() if not v.empty}
    if not parts:
        return None
    plt = _pyplot()
    metric, _ = primary_metric(network)
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    for ax, (title, d) in zip(axes[0], parts.items()):
        _lines(ax, d, "criterion", "sparsity", metric, CRITERIA)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("weight sparsity")
        ax.set_ylabel(METRIC_LABEL[metric])
    fig.suptitle(f"{network}: importance criteria compared")
    return _save(fig, f"criteria-{network}", folder)


def pipeline_rows(df: pd.DataFrame, network: str) -> pd.DataFrame:
    """Fine-tuned Taylor runs at 95% with 8-bit activations, one recipe and budget (`_same_budget_default_recipe`),
    one per pipeline and weight width."""
    return _same_budget_default_recipe(df[(df.network == network) & (df.criterion == "taylor") & (df.sparsity == 0.95)
                                          & (df.finetune == "masked") & df.pipeline.isin(PIPELINES) & (df.abits_label == "8")])


def pipeline_figure(df: pd.DataFrame, network: str, folder: Path) -> Path | None:
    ft = pipeline_rows(df, network)
    noft = df[(df.network == network) & (df.criterion == "taylor") & (run_kind(df) == "raw") & (df.wbits_label == "4")
              & df.pipeline.isin(PIPELINES)]
    if ft.empty and noft.empty:
        return None
    plt = _pyplot()
    metric, _ = primary_metric(network)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    order = ["2", "3", "4", "8", "float"]
    ft = ft.assign(bit_order=[order.index(b) if b in order else len(order) for b in ft.wbits_label])
    _lines(axes[0], ft, "pipeline", "bit_order", metric, PIPELINES)
    axes[0].set_xticks(range(len(order)), order)
    axes[0].set_xlabel("weight bits (95% sparsity, Taylor, fine-tuned)")
    _lines(axes[1], noft, "pipeline", "sparsity", metric, PIPELINES)
    axes[1].set_xlabel("weight sparsity (4-bit, Taylor, no fine-tuning)")
    for ax in axes:
        ax.set_ylabel(METRIC_LABEL[metric])
    fig.suptitle(f"{network}: joint against separate pruning and quantization")
    return _save(fig, f"pipelines-{network}", folder)


def granularity_figure(df: pd.DataFrame, network: str, folder: Path) -> Path | None:
    d = df[(df.network == network) & (run_kind(df) == "raw") & (df.wbits_label == "4") & (df.pipeline == "prune-then-quantize")]
    if d.empty or (d.granularity == "channel").sum() == 0:
        return None
    plt = _pyplot()
    metric, _ = primary_metric(network)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for crit, part in d.groupby("criterion"):
        part = part.sort_values("memory_ratio")
        ax.plot(100 * part["memory_ratio"], 100 * part[metric], marker="o" if part.granularity.iloc[0] == "channel" else ".",
                ls="-" if part.granularity.iloc[0] == "channel" else ":", label=f"{crit} ({part.granularity.iloc[0]})")
    _log_percent_axis(ax)
    ax.set_xlabel("weight memory vs dense float32")
    ax.set_ylabel(METRIC_LABEL[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{network}: channel against weight pruning (4-bit, no fine-tuning)")
    return _save(fig, f"granularity-{network}", folder)


# ---- the page ---------------------------------------------------------------------------------------------


def cut_at_loss(df: pd.DataFrame, network: str) -> list[str]:
    """For each allowed accuracy loss, the smallest memory, BOPs and hardware cost measured within it."""
    d = df[df.network == network]
    out = ["| accuracy loss allowed | configurations within it | smallest memory | smallest BOPs | smallest hardware cost (est.) | configuration of the smallest memory |",
           "| --- | --- | --- | --- | --- | --- |"]
    for level in LOSS_LEVELS:
        ok = d[d.loss_pt <= level]
        if ok.empty:
            out.append(f"| {level:g} pt | 0 | - | - | - | - |")
            continue
        best = ok.loc[ok.memory_ratio.idxmin()]
        out.append(f"| {level:g} pt | {len(ok)} | {_pct(ok.memory_ratio.min())} | {_pct(ok.bops_ratio.min())} | "
                   f"{_pct(ok.hardware_cost_ratio.min())} | {describe(best)} |")
    return out


def finetuning_label(r) -> str:
    """"distill 3000 steps, gradual, cosine lr, uniform allocation": mode, budget, and the schedules, a learned
    step, the layer allocation and the activation calibration when they are not the defaults (one-shot,
    constant rate, min/max step, one global threshold, min/max ranges)."""
    config = r.config if isinstance(r.get("config"), dict) else {}
    allocation = config.get("allocation", "global")
    extra_allocation = [f"{allocation} allocation"] if allocation != "global" else []
    if config.get("calibration", "minmax") != "minmax":
        extra_allocation.append(f"{config['calibration']} activation ranges")
    recovery = config.get("recovery", "none")
    extra_allocation += [f"{recovery} recovery"] if recovery != "none" else []
    if r.finetune == "none":
        return ", ".join(["no fine-tuning", *extra_allocation])
    schedule = config.get("schedule", "oneshot")
    extra = [schedule] if schedule != "oneshot" else []
    if config.get("lr_schedule", "constant") != "constant":
        extra.append(f"{config['lr_schedule']} lr")
    if config.get("learned_step"):
        extra.append("learned step (LSQ)")
    seed = [f"seed {config['seed']}"] if config.get("seed", 0) != 0 else []
    return ", ".join([f"{r.finetune} {int(r.budget)} steps", *extra, *extra_allocation, *seed])


def describe(r) -> str:
    ft = finetuning_label(r)
    return (f"{r.criterion}, {_pct(r.sparsity)}, w{r.wbits_label}/a{r.abits_label}, {r.pipeline}, {ft}: "
            f"{r.metric} {_pct(r.headline)}")


def headline_claim(df: pd.DataFrame) -> list[str]:
    """Issue 3's stereo target: prune-then-quantize, Taylor, fine-tuned, >= 95% sparsity, 4/8 bits: bad-3 within
    2 points of dense, memory <= 2% and BOPs <= 0.5% of dense."""
    d = df[(df.network == "stereo") & (df.pipeline == "prune-then-quantize") & df.criterion.str.startswith("taylor")
           & (df.sparsity >= 0.95) & (df.wbits_label == "4") & (df.abits_label == "8") & (df.finetune != "none")]
    if d.empty:
        return ["No fine-tuned stereo run at the headline setting is in the table yet."]
    out = ["| sparsity | fine-tuning | bad-3 | loss | memory | BOPs | bad-3 within 2 pt | memory <= 2% | BOPs <= 0.5% |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    for _, r in d.sort_values(["sparsity", "budget"]).iterrows():
        out.append(f"| {_pct(r.sparsity)} | {finetuning_label(r)} | {_pct(r.bad3)} | {r.loss_pt:+.2f} pt | "
                   f"{_pct(r.memory_ratio)} | {_pct(r.bops_ratio)} | {yes(r.loss_pt <= 2)} | {yes(r.memory_ratio <= 0.02)} | "
                   f"{yes(r.bops_ratio <= 0.005)} |")
    met = d[(d.loss_pt <= 2) & (d.memory_ratio <= 0.02) & (d.bops_ratio <= 0.005)]
    out += ["", f"**Met by {len(met)} of {len(d)} runs.**" if len(met) else
            f"**Not met**: no run reaches all three. The closest in accuracy loses {d.loss_pt.min():.1f} points of bad-3; "
            f"memory ranges {_pct(d.memory_ratio.min())}-{_pct(d.memory_ratio.max())} and BOPs "
            f"{_pct(d.bops_ratio.min())}-{_pct(d.bops_ratio.max())} of dense over these runs."]
    return out


def _matrix(d: pd.DataFrame, higher: bool) -> tuple[list[str], dict]:
    """Markdown table sparsity x criterion of the headline metric, best per row in bold; and the outright wins."""
    names = [c for c in CRITERIA if c in set(d.criterion)]
    out = ["| sparsity | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    wins = dict.fromkeys(names, 0)
    for s, part in d.groupby("sparsity"):
        vals = {c: part[part.criterion == c].headline.mean() for c in names}
        present = {c: v for c, v in vals.items() if not math.isnan(v)}
        best = (max if higher else min)(present.values()) if present else None
        ranked = sorted(present.values(), reverse=higher)
        if len(ranked) > 1 and abs(ranked[0] - ranked[1]) >= WIN_MARGIN:  # ties and noise at chance are nobody's win
            wins[next(c for c, v in present.items() if v == best)] += 1
        out.append(f"| {_pct(s)} | " + " | ".join("" if math.isnan(v) else (f"**{_pct(v)}**" if v == best else _pct(v))
                                                    for v in vals.values()) + " |")
    return out, wins


def criteria_section(df: pd.DataFrame, network: str) -> list[str]:
    _, higher = primary_metric(network)
    out = []
    for title, d in criteria_rows(df, network).items():
        if d.empty:
            continue
        table, wins = _matrix(d, higher)
        ranking = ", ".join(f"{c} {n}" for c, n in sorted(wins.items(), key=lambda kv: -kv[1]))
        budget = f" ({int(d.budget.iloc[0])} steps)" if title.startswith("fine") else ""
        out += [f"**{title}{budget}**: best at each sparsity in bold; wins by at least 1 point: {ranking}.", ""] + table + \
               ["", "Produced by: " + _commands(d), ""]
    return out


def pipeline_section(df: pd.DataFrame, network: str) -> list[str]:
    d = pipeline_rows(df, network)
    if d.empty:
        return []
    _, higher = primary_metric(network)
    order = ["2", "3", "4", "8", "float"]
    out = ["| weight bits | " + " | ".join(PIPELINES) + " | best |", "| --- |" + " --- |" * (len(PIPELINES) + 1)]
    joint_wins = rows = 0
    for b in [b for b in order if b in set(d.wbits_label)]:
        part = d[d.wbits_label == b]
        vals = {p: part[part.pipeline == p].headline.mean() for p in PIPELINES}
        present = {p: v for p, v in vals.items() if not math.isnan(v)}
        best = (max if higher else min)(present, key=present.get) if len(present) == len(PIPELINES) else "-"
        if best != "-":
            rows += 1
            joint_wins += best == "joint"
        out.append(f"| {b} | " + " | ".join("" if math.isnan(v) else _pct(v) for v in vals.values()) + f" | {best} |")
    setting = f"Taylor, 95% sparsity, 8-bit activations, {int(d.budget.iloc[0])} masked fine-tuning steps"
    out += ["", f"Joint is best at {joint_wins} of the {rows} bit widths where all three pipelines ran ({setting})."
            if rows else f"Not every pipeline has run yet at this setting ({setting}).", "", "Produced by: " + _commands(d), ""]
    return out


def finetune_mode_section(df: pd.DataFrame, network: str) -> list[str]:
    """The fine-tuning modes under one budget at the headline setting (Taylor, 95%, 4/8 bits, prune first)."""
    d = df[(df.network == network) & (df.criterion == "taylor") & (df.sparsity == 0.95) & (df.finetune != "none")
           & (df.pipeline == "prune-then-quantize") & (df.wbits_label == "4") & (df.abits_label == "8")]
    metric, higher = primary_metric(network)
    out = []
    for budget, part in _default_recipe(d).groupby("budget"):  # one table per budget at which two modes or more ran
        if part.finetune.nunique() < 2:
            continue
        best = (part.headline.max() if higher else part.headline.min())
        out += [f"Taylor, 95%, w4/a8, prune-then-quantize, one-shot, constant rate, {int(budget)} steps each; best in bold.", "",
                f"| fine-tuning | {metric} | loss against dense |", "| --- | --- | --- |"]
        for _, r in part.sort_values("finetune").iterrows():
            value = f"**{_pct(r.headline)}**" if r.headline == best else _pct(r.headline)
            out.append(f"| {r.finetune} | {value} | {r.loss_pt:+.2f} pt |")
        out += ["", "Produced by: " + _commands(part), ""]
    return out


def learned_step_section(df: pd.DataFrame) -> list[str]:
    """Each run with a learned step (LSQ) next to its twin: the same configuration with the min/max step."""
    keyed = {config_key(r.config): r for _, r in df.iterrows() if isinstance(r.config, dict)}
    out = []
    for _, r in df.iterrows():
        if not (isinstance(r.config, dict) and r.config.get("learned_step")):
            continue
        twin = keyed.get(config_key({**r.config, "learned_step": False}))
        if twin is None:
            continue
        _, higher = primary_metric(r.network)
        gain = (r.headline - twin.headline) * (100 if higher else -100)
        out.append(f"| {r.network} | {r.criterion}, {_pct(r.sparsity)}, w{r.wbits_label}/a{r.abits_label}, {r.pipeline}, "
                   f"{finetuning_label(twin)} | {r.metric} | {_pct(twin.headline)} | {_pct(r.headline)} | {gain:+.2f} pt |")
    if not out:
        return []
    return ["| network | setting | metric | min/max step (STE) | learned step (LSQ) | LSQ better by |",
            "| --- | --- | --- | --- | --- | --- |", *out, ""]


def calibration_section(df: pd.DataFrame) -> list[str]:
    """The same runs with activation ranges calibrated three ways (min/max, percentile, MSE), side by side."""
    methods = ("minmax", "percentile", "mse")
    groups: dict[str, dict] = {}
    for _, r in df.iterrows():
        if isinstance(r.config, dict) and r.config.get("calibration", "minmax") in methods:
            rest = config_key({**r.config, "calibration": "minmax"})
            groups.setdefault(rest, {})[r.config.get("calibration", "minmax")] = r
    out = []
    for runs in groups.values():
        if len(runs) < 2:
            continue
        base = runs.get("minmax", next(iter(runs.values())))
        cells = [_pct(runs[m].headline) if m in runs else "-" for m in methods]
        pruning = f"{base.criterion}, {_pct(base.sparsity)}" if base.sparsity > 0 else "no pruning"
        out.append(f"| {base.network} | {pruning}, w{base.wbits_label}/a{base.abits_label}, "
                   f"{base.pipeline}, {finetuning_label(runs.get('minmax', base))} | {base.metric} | {' | '.join(cells)} |")
    if not out:
        return []
    return ["| network | setting | metric | min/max | percentile (99.99%) | MSE |", "| --- | --- | --- | --- | --- | --- |",
            *sorted(out), ""]


def seed_section(df: pd.DataFrame) -> list[str]:
    """Runs that differ only by their seed, side by side: how far apart the seed alone puts two rows."""
    groups: dict[str, list] = {}
    for _, r in df.iterrows():
        if isinstance(r.config, dict) and r.finetune != "none":
            groups.setdefault(config_key({**r.config, "seed": 0}), []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) < 2:
            continue
        runs = sorted(runs, key=lambda r: r.config.get("seed", 0))
        base = runs[0]
        values = [100 * r.headline for r in runs]
        mean = sum(values) / len(values)
        out.append(f"| {base.network} | {base.criterion}, {_pct(base.sparsity)}, w{base.wbits_label}/a{base.abits_label}, "
                   f"{base.pipeline}, {finetuning_label(base)} | {base.metric} | "
                   f"{', '.join(f'{v:.2f}%' for v in values)} ({', '.join(str(r.config.get('seed', 0)) for r in runs)}) | "
                   f"{mean:.2f}% | {max(values) - min(values):.2f} pt |")
    if not out:
        return []
    return ["| network | setting | metric | by seed (seeds) | mean | spread (max - min) |",
            "| --- | --- | --- | --- | --- | --- |", *sorted(out), ""]


def _shown(path: Path, base: Path) -> str:
    """`path` relative to `base` when it is inside the repository (portable links), else absolute."""
    return os.path.relpath(path, base) if ROOT in Path(path).resolve().parents else str(path)


def grid_section(df: pd.DataFrame, folder: Path = ROOT / "configs") -> list[str]:
    """The shipped grids: what each covers (its description) and how much of it is in the table."""
    import tomllib

    from jpq_core.sweeps import config_key, expand_grid

    done = set(df["config"].map(config_key)) if "config" in df else set()
    out = ["## The sweeps", "",
           "The whole product of criteria, sparsities, bit widths and pipelines with fine-tuning does not fit this "
           "machine's CPU (a fine-tuned stereo configuration takes about 7 minutes on one core), so the shipped grids "
           "cover every axis in parts: broad grids without fine-tuning (seconds per configuration) for the trade-off "
           "curves, and fine-tuned subsets for the claims. Rows measured earlier by the older claims set were imported "
           "into the table, not re-run. A grid that is not complete finishes when its sweep command is run again.", "",
           "| grid | what it covers | configurations done |", "| --- | --- | --- |"]
    for path in sorted(folder.glob("*.toml")):
        if path.stem == "smoke":
            continue
        spec = tomllib.loads(path.read_text())
        configs = expand_grid(spec, str(path))
        n_done = sum(config_key(c) in done for c in configs)
        about = " ".join(spec.get("description", "").split())
        out.append(f"| `configs/{path.name}` | {about} | {n_done} of {len(configs)} |")
    return out + [""]


def _long_runs(df: pd.DataFrame) -> str:
    """" (3 stereo runs have longer budgets: 3,000 steps (2), 10,000 steps (1))", from the table."""
    long = df[(df.network == "stereo") & (df.budget > 300)]
    if long.empty:
        return ""
    counts = long.budget.astype(int).value_counts().sort_index()
    return (f" ({len(long)} stereo runs have longer budgets: "
            + ", ".join(f"{b:,} steps ({n})" for b, n in counts.items()) + "; configs/stereo-long.toml)")


LONG_RUN_CURVE = ROOT / "cached_runs" / "long_run" / "stereo-headline-curve.jsonl"


def long_run_section(curve: Path, df: pd.DataFrame) -> list[str]:
    """The headline run's learning curve (`scripts/headline_run.sh`: Middlebury bad-3 every 2,500 steps), as far
    as it has gone; nothing when there is no curve file or the table has no stereo rows (a report of another
    network's sweep)."""
    if "dense_bad3" not in df or not (df.network == "stereo").any():
        return []
    try:
        points = [json.loads(line) for line in Path(curve).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    if not points:
        return []
    dense = df[df.network == "stereo"]["dense_bad3"].dropna()
    dense_bad3 = float(dense.iloc[0]) if len(dense) else None
    out = ["### The long run (40,000 steps, in progress until its network is shipped)", "",
           "Taylor, 95%, 4-bit weights, 8-bit activations, prune-then-quantize, one-shot, masked fine-tuning with the "
           "rate held and decayed over the last 20% of each stage (`scripts/headline_run.sh`, resumable; its state is "
           f"committed under `cached_runs/long_run/`). Bad-3 on Middlebury every 2,500 steps, from `{_shown(Path(curve), ROOT)}`. "
           "Stage 1 fine-tunes the pruned float network (weights masked, not yet quantized); stage 2 the quantized one.", "",
           "| step | stage | weights | bad-3 | loss against dense | EPE |", "| --- | --- | --- | --- | --- | --- |"]
    for p in points:
        bad3 = p["metrics"]["bad3"]
        loss = f"{(bad3 - dense_bad3) * 100:+.2f} pt" if dense_bad3 is not None else "n/a"
        out.append(f"| {p['step']:,} | {p['stage']} | {'4-bit' if p.get('quantized') else 'float, masked'} | "
                   f"{_pct(bad3)} | {loss} | {p['metrics']['epe']:.3f} |")
    return out + [""]

def results_page(df: pd.DataFrame, figures: dict[str, Path], problems: list[str], results_path: Path, page: Path) -> str:
    rel = lambda p: os.path.relpath(p, Path(page).parent)  # noqa: E731
    counts = df.groupby(["network", "grid"]).size()
    out = ["# Results", "",
           f"Written by `python -m jpq_core report` from `{_shown(results_path, ROOT)}` "
           f"({len(df)} configurations). Every number is measured by running the code, except energy and hardware cost, "
           "which are estimates from the 45 nm model in [costs.md](costs.md). Accuracy loss is in points of the "
           "headline metric against the dense float32 network (bad-3 on the Middlebury motorcycle pair for stereo, "
           "top-1 on the digits test split for ResNet-20). Fine-tuning ran on a CPU, so budgets are small: "
           f"200 steps for ResNet-20, 300 for stereo{_long_runs(df)}; rows without fine-tuning show what pruning and "
           "quantization alone do. Rows measured before the cost model chose the CSR index width per layer (revision 683eeaf) "
           "priced every index at 4 bits, so their memory figures are upper bounds: at 95% sparsity the per-layer "
           "width gives about 2.0% of dense where 4 bits gave 2.7% (see costs.md).", "",
           "| network | grid | configurations |", "| --- | --- | --- |"]
    out += [f"| {n} | {g} | {c} |" for (n, g), c in counts.items()] + [""]
    out += grid_section(df)
    if problems:
        out += ["Problems reading the table (those lines are left out):", ""] + [f"- {p}" for p in problems] + [""]
    if df["engine_ms"].notna().any() if "engine_ms" in df else False:
        out += [f"Engine latency measured for {int(df['engine_ms'].notna().sum())} rows (column `engine_ms`).", ""]
    else:
        out += ["The `engine_ms` column is empty: engine latency is opt-in (`python -m jpq_core sweep GRID --engine-latency`) "
                "and the shipped grids ran without it, on a CPU shared with other jobs where latencies are not comparable "
                "between rows; the engine's own benchmark measures speed.", ""]

    seeds = seed_section(df)
    if seeds:
        out += ["## How much the seed alone moves a row", "",
                "The same fine-tuned configuration run with other seeds (which change the calibration batches behind the "
                "scores and activation ranges, and the fine-tuning batches). Two recipes whose rows below differ by less "
                "than their setting's spread here are not told apart by one run each. Produced by: "
                + _commands(df[[isinstance(c, dict) and c.get("seed", 0) != 0 for c in df.config]]), "", *seeds]
    out += ["## Stereo headline (issue 3's target)", "", *headline_claim(df), ""]
    out += long_run_section(LONG_RUN_CURVE, df)
    out += ["## Memory and hardware cost cut, at which accuracy loss", ""]
    for network in sorted(df.network.unique()):
        d = df[df.network == network]
        out += [f"### {network}", "", f"Dense float32: {METRIC_LABEL[d.metric.iloc[0]].split(' (')[0]} "
                f"{_pct(d['dense_' + d.metric.iloc[0]].iloc[0])}.", "", *cut_at_loss(df, network), ""]
        if f"tradeoff-{network}" in figures:
            out += [f"![{network} trade-offs]({rel(figures[f'tradeoff-{network}'])})", "",
                    "All rows of the network; the black line is the Pareto front. Produced by: " + _commands(d), ""]
    out += ["## Taylor against the other criteria", ""]
    for network in sorted(df.network.unique()):
        out += [f"### {network}", "", *criteria_section(df, network)]
        if {"fisher", "taylor-square"} <= set(df[df.network == network].criterion):
            out += ["`fisher` (0.5 E[g^2] w^2) and `taylor-square` (E[(g w)^2] = w^2 E[g^2]) rank weights identically, "
                    "so their columns agree wherever both ran.", ""]
        if f"criteria-{network}" in figures:
            out += [f"![{network} criteria]({rel(figures[f'criteria-{network}'])})", ""]
        if f"granularity-{network}" in figures:
            g = df[(df.network == network) & (run_kind(df) == "raw") & (df.wbits_label == "4")]
            out += [f"![{network} channel vs weight]({rel(figures[f'granularity-{network}'])})", "",
                    "Channel criteria remove whole coupled channels (torch-pruning groups); produced by: " + _commands(g), ""]
    out += ["## Joint against separate pruning and quantization", "",
            "All pipelines spend the same number of fine-tuning steps, but not in the same place (`jpq_core/pipeline.py`): "
            "prune-then-quantize fine-tunes half after pruning and half after quantizing; quantize-then-prune spends "
            "half before the network is pruned; joint prunes gradually and reaches the final sparsity only at the end "
            "of its budget. With short budgets the last two leave fewer steps to recover from the final mask, which "
            "the float-weight rows (where the order of quantization hardly matters) show.", ""]
    for network in sorted(df.network.unique()):
        section = pipeline_section(df, network)
        out += [f"### {network}", ""] + (section or ["No fine-tuned pipeline comparison for this network yet.", ""])
        if f"pipelines-{network}" in figures:
            out += [f"![{network} pipelines]({rel(figures[f'pipelines-{network}'])})", "",
                    "Right: without fine-tuning, joint is quantize-then-prune exactly (no steps to prune gradually over), "
                    "so it is not run there.", ""]
    out += ["## Fine-tuning modes under one budget", "",
            "masked: the task loss with the pruned weights held at zero; distill: half the task loss, half a "
            "distance to the dense network's own outputs (smooth L1 to its disparities; KL divergence at temperature 4 "
            "to its class probabilities); distill-cost (stereo): the task loss plus the KL divergence from the dense "
            "network's distribution over disparity shifts in the cost volume to the compressed one's, at every "
            "1/4-resolution pixel; regrow: masked, plus RigL-style mask updates every 25 steps "
            "(drop the smallest kept weights, grow the pruned ones with the largest accumulated gradient). "
            "One run each: a difference smaller than the seed spread of its setting (section 'How much the seed alone "
            "moves a row') does not tell two modes apart.", ""]
    for network in sorted(df.network.unique()):
        out += [f"### {network}", ""] + (finetune_mode_section(df, network) or
                                          ["No comparison of fine-tuning modes for this network yet.", ""])
    lsq = learned_step_section(df)
    if lsq:
        out += ["## Learned step size against the min/max step", "",
                "QAT with the weight step fixed at max|w| / qmax (straight-through estimator) against the same run with "
                "the step learned (LSQ, Esser et al. 2020; capped at max|w| / qmax, so it can only clip). "
                "Produced by: " + _commands(df[[isinstance(c, dict) and bool(c.get("learned_step")) for c in df.config]]), "",
                *lsq]
    calibration = calibration_section(df)
    if calibration:
        out += ["## Activation calibration", "",
                "How the 8-bit (or narrower) activation ranges are chosen, on the same runs: min/max of the calibration "
                "batches, the 0.01% and 99.99% quantiles, or the clipping of the min/max range that minimises the "
                "squared quantization error. Produced by: "
                + _commands(df[[isinstance(c, dict) and c.get("calibration", "minmax") != "minmax" for c in df.config]]), "",
                *calibration]
    return "\n".join(out) + "\n"


def write_report(results=None, out: Path = ROOT / "docs" / "results.md", figures: Path | None = None) -> list[str]:
    """Write the results page and its figures; returns the problems found reading the table."""
    results = Path(results) if results else RESULTS
    out = Path(out)
    figures = Path(figures) if figures else out.parent / "figures"
    df, problems = load_results(results)
    if df.empty:
        from jpq_core.errors import JPQError

        raise JPQError(f"{results}: no complete rows to report on; run a sweep first (python -m jpq_core sweep configs/smoke.toml).")
    made = {}  # "tradeoff-NETWORK" etc. -> its file (named portably, so not always the key)
    for network in sorted(df.network.unique()):
        for kind, make in (("tradeoff", tradeoff_figure), ("criteria", criteria_figure), ("pipelines", pipeline_figure),
                           ("granularity", granularity_figure)):
            path = make(df, network, figures)
            if path is not None:
                made[f"{kind}-{network}"] = path
    text = results_page(df, made, problems, results, out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return problems
