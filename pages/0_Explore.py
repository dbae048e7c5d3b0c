"""JPQ Explorer, the Explore page: move the sliders, see accuracy, memory, BOPs and the depth map change.

Run with `make app` (or `streamlit run app.py`). The other pages are in `pages/`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from jpq_core.cluster import configured_address
from jpq_core.errors import JPQError
from jpq_core.live import AUTO_RECOVERY_MARGIN, compress_command, matching_runs
from jpq_core.models import is_shipped
from jpq_core.images import DISPARITY_SCALE, ERROR_LIMIT_PX, ERROR_SCALE, colour_bar_png
from jpq_core.plots import confusion_figure, layer_cost_figure
from jpq_core.report import finetuning_label
from app_support.job_panel import finetune_panel
from app_support.ui import (cached_results, compressed_images, cost_cards, deferred, dense_evaluation, ensure_scores,
                            image_with_title, live_network, live_result, live_result_ready, path_caption, pytorch_result, show_error,
                            sidebar_config, stereo_reference_images, untrained_notice)

BROWSER_PAINT_S = 0.3

st.set_page_config(page_title="JPQ Explorer", layout="wide")
st.title("JPQ Explorer")
st.caption(
    "Joint pruning and quantization (after Yu, Wu, Klopp et al., 2020). Pick a network, a criterion, a sparsity "
    "and bit widths in the sidebar: the network is pruned and quantized now, without fine-tuning, and measured. "
    "The link in the address bar keeps the configuration."
)

config = sidebar_config()
untrained_notice(config, "Recovery is off for random weights (auto runs none). ")
show_raw = config.recovery_method != "none" and st.toggle("Show the network without recovery", key="ex_raw",
                                    help=f"the same pruning and quantization before {config.recovery_method} repaired it")
try:
    ensure_scores(config)
    dense = dense_evaluation(config.network, config.checkpoint)
    raw = live_result(config.without_recovery())
    recovering = config.needs_recovery(raw.evaluation.metrics, dense.metrics)
except JPQError as exc:
    show_error(exc)
    st.stop()


def show_cards(result, note: str = "") -> None:
    """Metric cards, cost cards and which path computed them, for `result` (raw or recovered)."""
    m, d = result.evaluation.metrics, dense.metrics
    before = result.raw_metrics
    cols = st.columns(5)
    if "bad3" in m:
        cols[0].metric("bad-3", f"{m['bad3']:.1%}", delta=f"{m['bad3'] - d['bad3']:+.1%} vs dense", delta_color="inverse",
                       help="share of pixels with ground truth whose disparity is off by more than 3 px"
                       + (f"; without recovery {before['bad3']:.1%}" if before else ""))
        cols[1].metric("EPE", f"{m['epe']:.2f} px", delta=f"{m['epe'] - d['epe']:+.2f} px vs dense", delta_color="inverse",
                       help="mean absolute disparity error" + (f"; without recovery {before['epe']:.2f} px" if before else ""))
    else:
        cols[0].metric("Top-1" + (" (random weights)" if config.untrained else ""), f"{m['top1']:.1%}", delta=f"{m['top1'] - d['top1']:+.1%} vs dense",
                       help="accuracy on the 540 held-out digits" + (f"; without recovery {before['top1']:.1%}" if before else ""))
        cols[1].metric("Mistakes", f"{int((result.evaluation.confusion.sum() - np.trace(result.evaluation.confusion)))}",
                       help=f"of {int(result.evaluation.confusion.sum())} test images")
    cols[2].metric("Sparsity achieved", f"{result.sparsity:.2%}", help="share of prunable weights that are exactly zero")
    cols[3].metric("Weight bits / act. bits", f"{config.wbits or 32} / {config.abits or 32}")
    cols[4].metric("Computed by", result.evaluation.path, delta=f"{result.evaluation.seconds:.2f} s", delta_color="off",
                   delta_arrow="off", help="what ran the compressed network on the evaluation data, and how long that took")
    if note:
        st.info(note, icon="⏳")
    elif result.recovery:
        key = "bad3" if "bad3" in m else "top1"
        scalars = "".join(f", {name} ×{m:.2f}" for name, m in result.recovery.get("scalars", {}).items())
        st.caption(f"Recovered by **{result.recovery['method']}**{scalars} in {result.recovery['seconds']:.1f} s on "
                   f"{result.recovery['samples']} calibration samples, no training: {key} {before[key]:.1%} without "
                   f"recovery, {m[key]:.1%} with it (the toggle above shows the network without recovery).")
    elif recovering:
        st.caption(f"Without recovery: turn the toggle above off to see {config.recovery_method} repair this network.")
    elif config.recovery == "auto":
        st.caption(f"Not recovered: without recovery this network is within {AUTO_RECOVERY_MARGIN * 100:.0f} point of the dense "
                   f"one, so auto skips {config.recovery_method}; choose it in the sidebar to run it anyway.")
    cost_cards(result.cost)
    st.caption(path_caption(result, dense))


def show_maps(result) -> None:
    """The compressed network's depth map and error (stereo), or its confusion matrix (classifiers)."""
    if live_network(config.network).is_stereo:
        fixed, live_maps = stereo_reference_images(config.network, config.checkpoint), compressed_images(result.config)
        row = st.columns(4)
        image_with_title(row[0], "Left image", fixed["left"])
        image_with_title(row[1], "Dense network", fixed["dense"])
        image_with_title(row[2], "Compressed" + (" and recovered" if result.recovery else ""), live_maps["compressed"])
        image_with_title(row[3], "Compressed |error|", live_maps["error"])
        bars = st.columns(4)
        bars[1].image(colour_bar_png(DISPARITY_SCALE), width="stretch", output_format="PNG",
                      caption=f"disparity: 0 px (far) to {fixed['zmax']:.0f} px (near), both maps")
        bars[3].image(colour_bar_png(ERROR_SCALE), width="stretch", output_format="PNG",
                      caption=f"|error|: 0 to {ERROR_LIMIT_PX:.0f} px and more; white: no ground truth")
        st.caption("Middlebury 2014 motorcycle pair (741x500), ground truth from the dataset. The Depth maps page "
                   "compares two settings and SGBM, on this pair, synthetic scenes or your own.")
    else:
        evaluation = result.evaluation
        left, right = st.columns([3, 2])
        left.plotly_chart(confusion_figure(evaluation.confusion, range(evaluation.confusion.shape[0]),
                                           "Confusion matrix, compressed network"), width="stretch")
        changed = int((evaluation.predicted != dense.predicted).sum())
        right.metric("Predictions changed by compression", f"{changed}", help="test images the compressed and the dense "
                     "network classify differently")


# Slots in page order. The cards and maps are filled as soon as their slot exists, so the page answers before the
# rest is drawn: with the network without recovery while recovery runs (saying so), then refilled when it is done.
waiting = recovering and not show_raw and not live_result_ready(config)
first = live_result(config) if recovering and not show_raw and not waiting else raw
note = (f"Recovering with {config.recovery_method} (a few seconds): until it is done, these numbers and maps are "
        "the network without recovery.") if waiting else ""
cards, check_slot = st.empty(), st.container()
with cards.container():
    show_cards(first, note)

results = cached_results()[0]
runs = matching_runs(results, config) if not config.checkpoint else results.iloc[:0]
tuned = runs[runs["finetune"] != "none"] if not runs.empty else runs
with st.expander(f"Fine-tuned runs of this configuration (cached): {len(tuned)}", expanded=True):
    if tuned.empty:
        st.write("None is cached for this exact configuration yet.")
    else:
        tuned = tuned.assign(**{"fine-tuning": [finetuning_label(r) for _, r in tuned.iterrows()]})
        shown = tuned[["pipeline", "fine-tuning", "headline", "dense_" + tuned["metric"].iloc[0], "memory_ratio",
                       "bops_ratio", "grid"]].rename(columns={"headline": tuned["metric"].iloc[0] + " (fine-tuned)"})
        st.dataframe(shown, hide_index=True, width="stretch")
        st.caption("Measured after fine-tuning with the stated budget (cached, not live); the cards above are live, "
                   "without fine-tuning.")
    if config.checkpoint or not is_shipped(config.network):
        st.caption("Fine-tuning from this page starts from the shipped weights"
                   + ("" if is_shipped(config.network) else ", and none ship for torchvision's architectures") +
                   f"; for your own weights, run `python -m jpq_core compress --network {config.network} "
                   "--checkpoint FILE ...` (see the README).")
    else:
        finetune_panel(config, results)
        with st.popover("Or run it yourself"):
            st.code(compress_command(config, ray_address=configured_address()), language="bash")
            st.caption("The Trade-offs page shows every cached run; selecting one opens it here.")

st.subheader("What the network sees and says")
maps = st.empty()
with maps.container():
    show_maps(first)

st.subheader("Per layer")
st.plotly_chart(layer_cost_figure(raw.layers), width="stretch")  # recovery keeps every layer's count
table = pd.DataFrame(raw.layers)[["name", "kind", "weights", "nonzero", "sparsity", "wbits", "abits", "encoding",
                                  "weight_bits", "macs", "dense_macs"]]
table["weight KiB"] = table.pop("weight_bits") / 8 / 1024
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"sparsity": st.column_config.NumberColumn(format="%.2f%%"),
                            "weight KiB": st.column_config.NumberColumn(format="%.2f")})
timing = st.empty()


def show(result, note: str = "") -> None:
    with cards.container():
        show_cards(result, note)
    with maps.container():
        show_maps(result)


result = first
if waiting:
    # Recovery takes both cores for seconds: first give the browser a moment to draw the answer sent above.
    time.sleep(BROWSER_PAINT_S)
    try:
        result = live_result(config)
    except JPQError as exc:
        with check_slot:
            show_error(exc)
    show(result)
m = result.evaluation.metrics
with check_slot:
    if result.evaluation.path == "engine" and st.toggle("Check the engine against PyTorch", key="ex_check_engine",
                                                        help="run the same configuration in PyTorch (slower) and "
                                                             "compare the metrics"):
        def show_check(reference) -> None:
            r = reference.evaluation.metrics
            st.caption("PyTorch on the same configuration: " + ", ".join(
                f"{k} {r[k]:.4f} (engine {m[k]:.4f})" for k in ("bad3", "epe") if k in r)
                + f"; PyTorch took {reference.evaluation.seconds:.2f} s against the engine's {result.evaluation.seconds:.2f} s.")

        deferred("Running the same configuration in PyTorch; the rest of the page does not wait for it.",
                 lambda: pytorch_result(result.config), show_check)
t = result.timings
timing.caption(f"This configuration took {sum(t.values()):.2f} s on this machine: scores {t['scores']:.2f} s, masks "
               f"{t['masks']:.2f} s, activation calibration {t['calibrate']:.2f} s, compiling for the engine {t['compile']:.2f} s, "
           f"evaluation {t['evaluate']:.2f} s, "
           + (f"recovery ({config.recovery_method}) {t['recovery']:.2f} s, " if "recovery" in t else "") +
           f"cost model {t['cost']:.2f} s. No fine-tuning: see Trade-offs for fine-tuned runs.")
