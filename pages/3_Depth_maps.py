"""Depth maps: two compression settings side by side, against the dense network and SGBM, on any pair."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import streamlit as st

from jpq_core.data.stereo_files import pair_from_bytes
from jpq_core.errors import JPQError
from app_support.ui import (cached_comparison, compressed_disparity, ensure_scores, remember_sample, show_error,
                            sidebar_config, stereo_sample)
from jpq_core.live import LIVE_ACTIVATION_BITS, LIVE_WEIGHT_BITS, SPARSITY_CHOICES, LiveConfig
from jpq_core.plots import ERROR_LIMIT_PX, disparity_figure, disparity_limit, error_map, rgb_figure
from jpq_core.registry import criterion_names

st.set_page_config(page_title="Depth maps - JPQ Explorer", layout="wide")
st.title("Depth maps")
st.caption("The stereo network compressed two ways, next to the dense network and OpenCV's SGBM. Setting A is the "
           "sidebar's; setting B is chosen here. No fine-tuning: what pruning and quantization alone do.")

config_a = sidebar_config()
if config_a.network != "stereo":
    config_a = LiveConfig(**{**config_a.__dict__, "network": "stereo", "checkpoint": ""})
    st.info("The sidebar's network is a classifier; setting A applies its settings to the stereo network.")

source = st.radio("Stereo pair", ["Middlebury motorcycle", "Synthetic scene", "Your own pair"], horizontal=True, key="dm_source")
seed = 0
if source == "Synthetic scene":
    seed = int(st.number_input("Scene (validation split)", 0, 9999, 0, key="dm_seed"))
elif source == "Your own pair":
    cols = st.columns(3)
    left = cols[0].file_uploader("Left image", type=["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"], key="dm_left")
    right = cols[1].file_uploader("Right image", type=["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"], key="dm_right")
    gt = cols[2].file_uploader("Ground truth (optional: .pfm, .npy, 16-bit .png = disparity x 256)",
                               type=["pfm", "npy", "png"], key="dm_gt")
    if left is None or right is None:
        st.info("Upload a rectified pair (left and right view, same size) to run the networks on it. Disparities "
                "up to 96 px are in the network's range; larger pairs are downscaled to about 1 megapixel.")
        st.stop()
    try:
        data = [left.getvalue(), right.getvalue(), gt.getvalue() if gt is not None else None]
        sample = pair_from_bytes(*data, labels=(left.name, right.name, gt.name if gt else "ground truth"), name=left.name)
    except JPQError as exc:
        show_error(exc)
        st.stop()
    for notice in sample.notices:
        st.warning(notice)
    seed = remember_sample(hashlib.sha1(b"".join(d or b"" for d in data)).hexdigest(), sample)

with st.expander("Setting B", expanded=True):
    cols = st.columns(4)
    config_b = LiveConfig(
        network="stereo",
        criterion=cols[0].selectbox("Criterion (B)", criterion_names("weight"), key="dm_criterion"),
        sparsity=cols[1].select_slider("Sparsity (B)", SPARSITY_CHOICES, value=0.0, format_func=lambda s: f"{s:.1%}", key="dm_sparsity"),
        wbits=cols[2].select_slider("Weight bits (B)", LIVE_WEIGHT_BITS, value=8, format_func=lambda b: "float" if b is None else str(b), key="dm_wbits"),
        abits=cols[3].select_slider("Activation bits (B)", LIVE_ACTIVATION_BITS, value=8, format_func=lambda b: "float" if b is None else str(b), key="dm_abits"),
    )

try:
    sample = stereo_sample(source, seed)
    baseline = cached_comparison(source, seed)
    runs = {}
    for label, config in (("A", config_a), ("B", config_b)):
        ensure_scores(config)
        runs[label] = compressed_disparity(config, source, seed)
except JPQError as exc:
    show_error(exc)
    st.stop()

gt = sample.disparity
zmax = disparity_limit(gt, baseline["network"]["disparity"])
rows = [("Dense network", baseline["network"]["metrics"]), ("OpenCV SGBM", baseline["sgbm"]["metrics"]),
        (f"A: {config_a.criterion} {config_a.sparsity:.1%}, {config_a.wbits or 'float'}/{config_a.abits or 'float'} bits", runs["A"]["metrics"]),
        (f"B: {config_b.criterion} {config_b.sparsity:.1%}, {config_b.wbits or 'float'}/{config_b.abits or 'float'} bits", runs["B"]["metrics"])]
if gt is not None:
    st.dataframe(pd.DataFrame([{"method": name, "bad-3": m["bad3"], "bad-2": m["bad2"], "EPE (px)": m["epe"],
                                "coverage": m["coverage"]} for name, m in rows]),
                 hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="percent") for c in ("bad-3", "bad-2", "coverage")})
    st.caption("bad-3: share of pixels with ground truth off by more than 3 px (unmatched pixels count as bad); EPE over "
               "matched pixels; SGBM leaves pixels unmatched (coverage < 100%).")
else:
    st.info("No ground truth for this pair: the maps are shown without scores.")

grid = st.columns(3)
grid[0].plotly_chart(rgb_figure(sample.left, "Left image", 280), width="stretch")
grid[1].plotly_chart(disparity_figure(gt, "Ground truth", zmax, 280) if gt is not None else
                     disparity_figure(baseline["sgbm"]["disparity"], "OpenCV SGBM", zmax, 280), width="stretch")
grid[2].plotly_chart(disparity_figure(baseline["network"]["disparity"], "Dense network", zmax, 280), width="stretch")
for label, config in (("A", config_a), ("B", config_b)):
    row = st.columns(3)
    disp = runs[label]["disparity"]
    row[0].plotly_chart(disparity_figure(disp, f"Setting {label}", zmax, 280), width="stretch")
    if gt is not None:
        row[1].plotly_chart(disparity_figure(error_map(disp, gt), f"Setting {label}: |error|", ERROR_LIMIT_PX, 280, error=True),
                            width="stretch")
    diff = np.abs(disp - baseline["network"]["disparity"])
    row[2].plotly_chart(disparity_figure(diff, f"Setting {label}: change from dense", ERROR_LIMIT_PX, 280, error=True),
                        width="stretch")
