"""Taylor scores: how importance criteria rank the weights, where they agree, and how sensitive each layer is."""

from __future__ import annotations

import time
from dataclasses import replace

import streamlit as st

from app_support.ui import cached_task, current_config, network_weights, show_error, untrained_notice
from jpq_core import analysis
from jpq_core.errors import JPQError
from jpq_core.models import network_label
from jpq_core.plots import (criteria_comparison_figure, mask_agreement_figure, score_distribution_figure,
                            sensitivity_figure)
from jpq_core.registry import criterion_names, get_criterion
from jpq_core.sensitivity import SCAN_SPARSITIES

st.set_page_config(page_title="Taylor scores - JPQ Explorer", layout="wide")
st.title("Taylor scores: what each criterion would prune")
st.caption(
    "Every weight-level criterion scores each weight; pruning removes the lowest scores. Taylor scores "
    "|g·w| (Molchanov et al. 2017/2019) estimate the loss change when a weight is removed, from one gradient "
    "pass over calibration batches (the same pass, and the same on-disk cache, that compression uses)."
)

NETWORKS = {name: network_label(name) for name in ("resnet20", "stereo")}
CRITERIA = criterion_names("weight")
SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
METRIC_LABELS = {"bad3": "bad-3 increase (share of pixels)", "top1": "top-1 accuracy drop"}

live = current_config()  # the configuration chosen on Explore (or in the URL) sets the defaults here
if live.network not in NETWORKS:  # a torchvision architecture chosen on Explore is offered here too
    NETWORKS[live.network] = network_label(live.network)
controls = st.columns([1.2, 2.5, 2, 1.3])
network = controls[0].selectbox("Network", list(NETWORKS), format_func=NETWORKS.get, key="network",
                                index=list(NETWORKS).index(live.network) if live.network in NETWORKS else 0)
default_criteria = ["magnitude", "taylor"] + ([live.criterion] if live.criterion in CRITERIA else [])
criteria = controls[1].multiselect("Criteria", CRITERIA, default=list(dict.fromkeys(default_criteria)), key="criteria",
                                   help="Weight-level criteria of jpq_core.criteria; pick two or more to compare.")
sparsity = controls[2].select_slider("Sparsity", SPARSITIES, value=live.sparsity if live.sparsity in SPARSITIES else 0.9,
                                     format_func=lambda s: f"{s:.1%}", key="sparsity")
allocation = controls[3].radio("Threshold", ["global", "uniform"], key="allocation", horizontal=True,
                               help="global: one threshold over all layers; uniform: every layer pruned to the "
                                    "same sparsity.")
protect = controls[3].checkbox("First and last layer dense", value=live.protect_first_last, key="protect",
                               help="as compression does by default; untick to reach the highest sparsities")
if not criteria:
    st.info("Pick at least one criterion.")
    st.stop()
# The weights of the sidebar's configuration (an upload) when this is its network, else the shipped ones.
checkpoint = live.checkpoint if network == live.network else ""
shown = replace(live, network=network, checkpoint=checkpoint)
untrained_notice(shown, "Here the scores rank this architecture's weights at initialisation; layer sensitivity does not apply. ")


@st.cache_resource(show_spinner=False, max_entries=8)
def _scores(network: str, checkpoint: str, criteria: tuple, _stats):
    """Scores per criterion; `_stats` is determined by the network and its weights."""
    return analysis.criterion_scores(network_weights(network, checkpoint), criteria, _stats)


@st.cache_data(show_spinner="Ranking the weights...", max_entries=16)
def _rank_agreement(network: str, checkpoint: str, criteria: tuple, _scores):
    return analysis.rank_agreement(_scores)


@st.cache_data(show_spinner=False, max_entries=16)
def _distributions(network: str, checkpoint: str, criteria: tuple, _scores):
    return {name: analysis.score_distribution(_scores[name]) for name in criteria}


try:
    model, task = network_weights(network, checkpoint), cached_task(network)
    stats = None
    if any(get_criterion(c).needs_gradients for c in criteria):
        bar = st.empty()
        start, ran = time.perf_counter(), []

        def progress(i, n):
            ran.append(i)
            bar.progress(i / n, text=f"Gradient pass over calibration batches: {i}/{n}")
        stats = analysis.calibration_stats(model, task, progress)
        bar.empty()
        seconds = time.perf_counter() - start
        st.caption(f"Gradient statistics: {stats.batches} calibration batches, "
                   + (f"computed in {seconds:.1f} s (now cached on disk)." if ran else f"read from the cache in {seconds:.2f} s."))
    scores = _scores(network, checkpoint, tuple(criteria), stats)
    masks = {name: analysis.kept_masks(model, scores[name], sparsity, allocation, protect) for name in criteria}
except JPQError as exc:
    show_error(exc)
    st.stop()

tab_dist, tab_compare, tab_mask, tab_sens = st.tabs(
    ["Score distributions", "Criteria side by side", "Mask of a layer", "Layer sensitivity"])

with tab_dist:
    dists = _distributions(network, checkpoint, tuple(criteria), scores)
    st.plotly_chart(score_distribution_figure(dists), width="stretch", key="dist_figure")
    zero = {name: f"{(df['zero_share'] * df['weights']).sum() / df['weights'].sum():.2%}" for name, df in dists.items()}
    st.caption("Scores differ by orders of magnitude between layers: with a global threshold, the layers whose "
               "scores sit low lose most of their weights. Share of weights with score exactly 0 (not drawn on the "
               "log axis): " + ", ".join(f"{k} {v}" for k, v in zero.items()) + ".")

with tab_compare:
    if len(criteria) < 2:
        st.info("Pick two or more criteria to compare them.")
    else:
        table = analysis.mask_overlap(masks).merge(_rank_agreement(network, checkpoint, tuple(criteria), scores),
                                                   on=["pair", "layer"], sort=False)
        overall = table[table["layer"] == "all layers"]
        cols = st.columns(max(4, 2 * len(overall)))
        for i, row in enumerate(overall.itertuples()):
            cols[2 * i].metric(f"IoU, {row.pair}", f"{row.iou:.3f}",
                               help="Overlap of the kept weights over the whole network at this sparsity.")
            cols[2 * i + 1].metric(f"Spearman, {row.pair}", f"{row.spearman:.3f}",
                                   help="Rank correlation of the pooled scores (what a global threshold ranks).")
        st.plotly_chart(criteria_comparison_figure(table[table["layer"] != "all layers"]), width="stretch",
                        key="compare_figure")
        keep = 1.0 - sparsity
        st.caption(f"For reference, two unrelated (random) criteria keeping {keep:.1%} of a layer overlap with "
                   f"IoU ≈ k/(2-k) = {keep / (2 - keep):.3f}.")
        st.dataframe(table.rename(columns={"iou": "IoU", "spearman": "Spearman rho", "kept_first": "kept (first)",
                                           "kept_second": "kept (second)"}),
                     hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.3f")
                                    for c in ("IoU", "Spearman rho", "kept (first)", "kept (second)")})

with tab_mask:
    layers = list(scores[criteria[0]])
    cols = st.columns(3)
    layer = cols[0].selectbox("Layer", layers, index=min(1, len(layers) - 1), key="mask_layer")
    first = cols[1].selectbox("Criterion A", criteria, index=0, key="mask_a")
    second = cols[2].selectbox("Criterion B", criteria, index=min(1, len(criteria) - 1), key="mask_b")
    grid = analysis.agreement_grid(masks[first][layer], masks[second][layer])
    shape = tuple(scores[first][layer].shape)
    kernel = shape[2:] if len(shape) == 4 else (1, 1)
    st.plotly_chart(mask_agreement_figure(grid, first, second, kernel, f"{layer}: weight shape {shape}"),
                    width="stretch", key="mask_figure")
    kept_a, kept_b = float(masks[first][layer].float().mean()), float(masks[second][layer].float().mean())
    st.caption(f"{first} keeps {kept_a:.1%} of this layer, {second} keeps {kept_b:.1%}; IoU "
               f"{analysis.iou(masks[first][layer], masks[second][layer]):.3f}. Rows whose kernels are all removed "
               "are channels a weight-level criterion happens to empty; channel-level criteria remove them on purpose.")

with tab_sens:
    if shown.untrained:
        st.info("Layer sensitivity is accuracy lost per layer pruned; a network with random weights is at chance "
                "whatever is pruned, so there is nothing to measure. Upload trained weights on Explore to scan it.")
        st.stop()
    st.markdown("Each layer pruned **alone** (all others dense), by one criterion's ranking within that layer, "
                "evaluated without fine-tuning on the task's evaluation data (Han et al. 2015; Distiller's "
                "sensitivity analysis). A flat curve marks a layer that can be pruned hard.")
    cols = st.columns(3)
    scan_criterion = cols[0].selectbox("Criterion", criteria, key="scan_criterion")
    mode = cols[1].radio("Scan", ["quick", "full"], horizontal=True, key="scan_grid",
                         help=f"quick: sparsities {', '.join(f'{s:g}' for s in analysis.QUICK_SCAN_SPARSITIES[1:])}, "
                              f"evaluated on the first {analysis.QUICK_IMAGES} test images (classifier) or the central "
                              f"{analysis.QUICK_CROP[0]}x{analysis.QUICK_CROP[1]} crop of the pair (stereo). "
                              f"full: sparsities {', '.join(f'{s:g}' for s in SCAN_SPARSITIES[1:])}, all evaluation data.")
    grid_values = analysis.QUICK_SCAN_SPARSITIES if mode == "quick" else SCAN_SPARSITIES
    scan_task = analysis.QuickEvaluation(task) if mode == "quick" else task
    evaluations = len(layers) * (len(grid_values) - 1) + 1
    scan = analysis.read_sensitivity(model, scan_task, scan_criterion, grid_values)
    if scan is None:
        cols[2].write(f"{evaluations} evaluations of the network, not cached yet.")
        if cols[2].button("Run the scan", key="run_scan"):
            bar = st.progress(0.0, text="Scanning...")
            try:
                scan = analysis.sensitivity_curves(
                    model, scan_task, scan_criterion, stats, grid_values,
                    progress=lambda i, n: bar.progress(i / n, text=f"Evaluations: {i}/{n}"))
            except JPQError as exc:
                show_error(exc)
            bar.empty()
    if scan is not None:
        metric = METRIC_LABELS.get(scan["metric"], scan["metric"])
        st.plotly_chart(sensitivity_figure(analysis.sensitivity_frame(scan), metric), width="stretch", key="sens_figure")
        dense = ", ".join(f"{k} {v:.4g}" for k, v in scan["dense"].items() if k in ("bad3", "epe", "top1"))
        st.caption(f"Dense network on this scan's data: {dense}. This {mode} scan ({evaluations} evaluations) took {scan['seconds']:.0f} s on "
                   "this machine when it ran" + (" and was read from the disk cache." if scan["cached"] else "."))
