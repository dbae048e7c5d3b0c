"""JPQ Explorer, the Explore page: move the sliders, see accuracy, memory, BOPs and the depth map change.

Run with `make app` (or `streamlit run app.py`). The other pages are in `pages/`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_support.ui import (cached_results, cost_cards, dense_evaluation, ensure_scores, live_network, live_result,
                            show_error, sidebar_config)
from jpq_core.cluster import configured_address
from jpq_core.errors import JPQError
from jpq_core.live import compress_command, matching_runs
from jpq_core.plots import (ERROR_LIMIT_PX, confusion_figure, disparity_figure, disparity_limit, error_map,
                            layer_cost_figure, rgb_figure)
from jpq_core.report import finetuning_label

st.set_page_config(page_title="JPQ Explorer", layout="wide")
st.title("JPQ Explorer")
st.caption(
    "Joint pruning and quantization (after Yu, Wu, Klopp et al., 2020). Pick a network, a criterion, a sparsity "
    "and bit widths in the sidebar: the network is pruned and quantized now, without fine-tuning, and measured. "
    "The link in the address bar keeps the configuration."
)

config = sidebar_config()
try:
    ensure_scores(config)
    result = live_result(config)
    dense = dense_evaluation(config.network, config.checkpoint)
except JPQError as exc:
    show_error(exc)
    st.stop()

m, d = result.evaluation.metrics, dense.metrics
cols = st.columns(4)
if "bad3" in m:
    cols[0].metric("bad-3", f"{m['bad3']:.1%}", delta=f"{m['bad3'] - d['bad3']:+.1%} vs dense", delta_color="inverse",
                   help="share of pixels with ground truth whose disparity is off by more than 3 px")
    cols[1].metric("EPE", f"{m['epe']:.2f} px", delta=f"{m['epe'] - d['epe']:+.2f} px vs dense", delta_color="inverse",
                   help="mean absolute disparity error")
else:
    cols[0].metric("Top-1", f"{m['top1']:.1%}", delta=f"{m['top1'] - d['top1']:+.1%} vs dense",
                   help="accuracy on the 540 held-out digits")
    cols[1].metric("Mistakes", f"{int((result.evaluation.confusion.sum() - np.trace(result.evaluation.confusion)))}",
                   help=f"of {int(result.evaluation.confusion.sum())} test images")
cols[2].metric("Sparsity achieved", f"{result.sparsity:.2%}", help="share of prunable weights that are exactly zero")
cols[3].metric("Weight bits / act. bits", f"{config.wbits or 32} / {config.abits or 32}")
cost_cards(result.cost)

runs = matching_runs(cached_results()[0], config) if not config.checkpoint else cached_results()[0].iloc[:0]
tuned = runs[runs["finetune"] != "none"] if not runs.empty else runs
with st.expander(f"Fine-tuned runs of this configuration (cached): {len(tuned)}", expanded=not tuned.empty):
    if tuned.empty:
        st.write("None is cached for this exact configuration. Fine-tune it yourself (minutes on a CPU):")
        st.code(compress_command(config, ray_address=configured_address()), language="bash")
        st.caption("The Trade-offs page shows every cached run; selecting one opens it here.")
    else:
        tuned = tuned.assign(**{"fine-tuning": [finetuning_label(r) for _, r in tuned.iterrows()]})
        shown = tuned[["pipeline", "fine-tuning", "headline", "dense_" + tuned["metric"].iloc[0], "memory_ratio",
                       "bops_ratio", "grid"]].rename(columns={"headline": tuned["metric"].iloc[0] + " (fine-tuned)"})
        st.dataframe(shown, hide_index=True, width="stretch")
        st.caption("Measured after fine-tuning with the stated budget (cached, not live); the cards above are live, "
                   "without fine-tuning.")

st.subheader("What the network sees and says")
evaluation = result.evaluation
if live_network(config.network).is_stereo:
    from jpq_core.data import stereo_eval_samples

    sample = stereo_eval_samples("middlebury")[0]
    zmax = disparity_limit(sample.disparity)
    error = error_map(evaluation.disparity, sample.disparity)
    row = st.columns(4)
    row[0].plotly_chart(rgb_figure(sample.left, "Left image", height=260), width="stretch")
    row[1].plotly_chart(disparity_figure(dense.disparity, "Dense network", zmax, height=260), width="stretch")
    row[2].plotly_chart(disparity_figure(evaluation.disparity, "Compressed", zmax, height=260), width="stretch")
    row[3].plotly_chart(disparity_figure(error, "Compressed |error|", ERROR_LIMIT_PX, height=260, error=True), width="stretch")
    st.caption("Middlebury 2014 motorcycle pair (741x500), ground truth from the dataset. The Depth maps page "
               "compares two settings and SGBM, on this pair, synthetic scenes or your own.")
else:
    left, right = st.columns([3, 2])
    left.plotly_chart(confusion_figure(evaluation.confusion, range(evaluation.confusion.shape[0]),
                                       "Confusion matrix, compressed network"), width="stretch")
    changed = int((evaluation.predicted != dense.predicted).sum())
    right.metric("Predictions changed by compression", f"{changed}", help="test images the compressed and the dense "
                 "network classify differently")

st.subheader("Per layer")
st.plotly_chart(layer_cost_figure(result.layers), width="stretch")
table = pd.DataFrame(result.layers)[["name", "kind", "weights", "nonzero", "sparsity", "wbits", "abits", "encoding",
                                     "weight_bits", "macs", "dense_macs"]]
table["weight KiB"] = table.pop("weight_bits") / 8 / 1024
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"sparsity": st.column_config.NumberColumn(format="%.2f%%"),
                            "weight KiB": st.column_config.NumberColumn(format="%.2f")})
t = result.timings
st.caption(f"This configuration took {sum(t.values()):.2f} s on this machine: scores {t['scores']:.2f} s, masks "
           f"{t['masks']:.2f} s, activation calibration {t['calibrate']:.2f} s, evaluation {t['evaluate']:.2f} s, "
           f"cost model {t['cost']:.2f} s. No fine-tuning: see Trade-offs for fine-tuned runs.")
